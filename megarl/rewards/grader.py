"""Grading in isolated worker processes: hard wall-clock timeout and memory cap per item.

The reward must never hang or crash a training step (verl PR #5635: math-verify's
signal.alarm timeout raised inside worker threads and every MATH reward silently became 0;
PR #5839: without the timeout, training hung; AReaL #1426: one hung verification blocked
every reward worker). So:

* Items go one at a time to worker processes; the parent enforces the per-item wall-clock
  timeout by killing the worker (SIGKILL). No signal.alarm anywhere, so grade_batch works from
  any thread.
* A worker past the timeout, or one that dies (segfault, OOM kill), is replaced; its item gets
  correct=False with the reason "timeout" / "worker_crash", is counted in `stats`, and no
  other item waits for it beyond its own grading.
* Each worker caps its address space with RLIMIT_AS: a hostile item fails with MemoryError
  ("memory_limit") instead of taking the machine's memory.
* Workers are recycled after `max_items_per_worker` items, bounding slow growth (caches).

Process layout: the pool starts one "zygote", a fresh interpreter (subprocess: fork+exec, safe
from a multi-threaded trainer) that imports sympy and warms up the LaTeX parser (ANTLR builds
its prediction tables lazily: a cold parser takes ~10x longer per new construct). Workers are
os.fork()s of the single-threaded zygote, so a replacement is ready in milliseconds and warm.
multiprocessing's spawn/forkserver would re-run the trainer's __main__ in every worker
(importing torch into each grader); fork of the trainer itself is unsafe with threads.

    with GraderPool(GraderConfig(num_workers=2)) as pool:
        results = pool.grade_batch(responses, answers)   # list[GradeResult], input order

`grade_fn` (a picklable top-level function `(response, answer, *, last_number_fallback) ->
GradeResult`) lets the same isolation serve other verifiers; it defaults to
megarl.rewards.math.grade.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recvfds, sendfds
from typing import Any, Callable, Mapping, Sequence

from megarl.rewards.math import GradeResult

__all__ = ["GraderConfig", "GraderPool", "GraderStats"]


@dataclass(frozen=True)
class GraderConfig:
    """Grader pool settings.

    num_workers: worker processes (each grades one item at a time).
    timeout_s: hard wall-clock limit per item; the worker is killed past it.
    memory_mb: address-space cap (RLIMIT_AS) per worker; 0 disables it.
    last_number_fallback: accept the last number in a response when it states no answer
        (off: a reward that accepts any number mentioned can be gamed by spraying numbers).
    max_items_per_worker: recycle a worker after this many items (0: never).
    startup_timeout_s: how long the zygote may take to import and warm up, and a worker to start.
    """

    num_workers: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 1024
    last_number_fallback: bool = False
    max_items_per_worker: int = 20_000
    startup_timeout_s: float = 120.0

    def __post_init__(self):
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"GraderConfig.num_workers must be an int >= 1, got {self.num_workers!r}")
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"GraderConfig.timeout_s must be a number > 0, got {self.timeout_s!r}")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 0 or 0 < self.memory_mb < 256:
            raise ValueError(
                f"GraderConfig.memory_mb must be 0 (no cap) or an int >= 256 (a worker with sympy "
                f"loaded maps ~150 MB), got {self.memory_mb!r}"
            )
        if not isinstance(self.last_number_fallback, bool):
            raise ValueError(f"GraderConfig.last_number_fallback must be a bool, got {self.last_number_fallback!r}")
        if not isinstance(self.max_items_per_worker, int) or self.max_items_per_worker < 0:
            raise ValueError(f"GraderConfig.max_items_per_worker must be an int >= 0, got {self.max_items_per_worker!r}")
        if not isinstance(self.startup_timeout_s, (int, float)) or not self.startup_timeout_s > 0:
            raise ValueError(f"GraderConfig.startup_timeout_s must be a number > 0, got {self.startup_timeout_s!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GraderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GraderConfig key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class GraderStats:
    """Counts since the pool started. errors counts reasons "error: ..."; too_complex counts
    inputs the grader's guards rejected without trying."""

    graded: int = 0
    correct: int = 0
    timeouts: int = 0
    crashes: int = 0
    memory_errors: int = 0
    errors: int = 0
    too_complex: int = 0
    workers_started: int = 0
    workers_replaced: int = 0
    zygote_restarts: int = 0
    max_latency_s: float = 0.0


# ------------------------------------------------------------------------------------------
# Child side (zygote and workers)
# ------------------------------------------------------------------------------------------

def _set_memory_cap(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    import resource

    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent (the zygote) exits: a worker spinning on a hostile
    item never reads the EOF that tells an idle one the pool is gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: an orphaned worker still exits at its next EOF
    if os.getppid() != parent_pid:
        os._exit(0)  # the zygote died before prctl took effect


def _serve(inbox: Connection, outbox: Connection, grade_fn: Callable, memory_mb: int, last_number_fallback: bool) -> None:
    """Worker loop: receive (seq, response, answer), send (seq, correct, extracted, reason)."""
    _set_memory_cap(memory_mb)
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        seq, response, answer = msg
        try:
            r = grade_fn(response, answer, last_number_fallback=last_number_fallback)
            out = (seq, bool(r.correct), r.extracted, str(r.reason))
        except MemoryError:
            out = (seq, False, None, "memory_limit")
        except BaseException as e:  # noqa: BLE001 - report, keep serving
            out = (seq, False, None, f"error: {type(e).__name__}: {str(e)[:200]}")
        try:
            outbox.send(out)
        except MemoryError:
            outbox.send((seq, False, None, "memory_limit"))


def _zygote_main(sock_fd: int) -> None:
    """Warm up once, then fork one worker per request; each request carries the worker's pipes."""
    # Ctrl-C reaches the whole process group; the pool decides what happens to its processes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Workers are not our business once forked: let the kernel reap them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    control = Connection(os.dup(sock.fileno()))
    parent_path, grade_fn_blob, memory_mb, last_number_fallback = control.recv()
    sys.path[:0] = [p for p in parent_path if p not in sys.path]
    grade_fn = pickle.loads(grade_fn_blob)
    from megarl.rewards import math as math_rewards

    if grade_fn is None:
        grade_fn = math_rewards.grade
    math_rewards.warmup()
    control.send("ready")
    while True:
        try:
            if control.recv() != "fork":
                return
            inbox_fd, outbox_fd = recvfds(sock, 2)
        except (EOFError, OSError):
            return
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                _die_with_parent(zygote_pid)
                control.close()
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _serve(Connection(inbox_fd, writable=False), Connection(outbox_fd, readable=False),
                       grade_fn, memory_mb, last_number_fallback)
            finally:
                os._exit(0)
        os.close(inbox_fd)
        os.close(outbox_fd)


_ZYGOTE_CMD = "import sys; from megarl.rewards.grader import _zygote_main; _zygote_main(int(sys.argv[1]))"


# ------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------

class _Worker:
    __slots__ = ("conn", "results", "pid", "started_at", "busy", "deadline", "sent_at", "items")

    def __init__(self, conn: Connection, results: Connection):
        self.conn = conn  # to the worker
        self.results = results  # from the worker; EOF when it dies
        self.pid: int | None = None  # known once it reports ready
        self.started_at = time.monotonic()
        self.busy: tuple[int, int] | None = None  # (seq, index in the batch)
        self.deadline = 0.0
        self.sent_at = 0.0
        self.items = 0

    @property
    def ready(self) -> bool:
        return self.pid is not None


class GraderPool:
    """Grade (response, reference) pairs in worker processes with per-item hard limits.

    Thread-safe: concurrent grade_batch calls are serialised. Use as a context manager or call
    close(). See the module docstring for the failure model.
    """

    def __init__(self, config: GraderConfig | None = None, *, grade_fn: Callable | None = None):
        self.config = config if config is not None else GraderConfig()
        if not isinstance(self.config, GraderConfig):
            raise ValueError(f"config must be a GraderConfig, got {type(self.config).__name__}")
        try:
            self._grade_fn_blob = pickle.dumps(grade_fn)
        except Exception as e:
            raise ValueError(f"grade_fn must be a picklable top-level function: {e}") from e
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._max_latency = 0.0
        self._seq = 0
        self._closed = False
        self._startup_failures = 0
        self._workers: list[_Worker] = []
        self.last_batch_latencies_s: list[float] = []
        self._start_zygote()
        for _ in range(self.config.num_workers):
            self._workers.append(self._start_worker())

    # ---------------------------------------------------------------- processes

    def _start_zygote(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._zygote = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE_CMD, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                # Whatever a parser prints goes to stderr: stdout may be `megarl grade`'s output.
                stdout=2,
            )
        finally:
            theirs.close()
        self._zygote_sock = ours
        self._zygote_control = Connection(os.dup(ours.fileno()))
        self._zygote_control.send(
            (list(sys.path), self._grade_fn_blob, self.config.memory_mb, self.config.last_number_fallback)
        )
        self._zygote_started_at = time.monotonic()
        self._zygote_ready = False

    def _stop_zygote(self) -> None:
        # EOF on its control socket makes the zygote exit; kill it if it does not.
        for closer in (self._zygote_control.close, self._zygote_sock.close):
            try:
                closer()
            except OSError:
                pass
        try:
            self._zygote.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self._zygote.kill()
            self._zygote.wait(timeout=10.0)

    def _wait_zygote_ready(self) -> None:
        if self._zygote_ready:
            return
        remaining = self._zygote_started_at + self.config.startup_timeout_s - time.monotonic()
        if not self._zygote_control.poll(max(0.0, remaining)):
            self.close()
            raise RuntimeError(f"grader zygote did not start within {self.config.startup_timeout_s} s")
        try:
            msg = self._zygote_control.recv()
        except (EOFError, OSError):
            code = self._zygote.poll()
            self.close()
            raise RuntimeError(f"grader zygote exited during start-up (exit code {code})") from None
        assert msg == "ready", msg
        self._zygote_ready = True

    def _start_worker(self) -> _Worker:
        to_w_r, to_w_w = os.pipe()
        from_w_r, from_w_w = os.pipe()
        try:
            for attempt in (0, 1):
                try:
                    self._zygote_control.send("fork")
                    sendfds(self._zygote_sock, [to_w_r, from_w_w])
                    break
                except OSError:
                    if attempt:
                        raise
                    # The zygote died (killed from outside): start another and retry once.
                    self._stop_zygote()
                    self._start_zygote()
                    self._counts["zygote_restarts"] += 1
        finally:
            os.close(to_w_r)
            os.close(from_w_w)
        self._counts["workers_started"] += 1
        return _Worker(Connection(to_w_w, readable=False), Connection(from_w_r, writable=False))

    def _stop_worker(self, w: _Worker, *, kill: bool) -> None:
        if not kill:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                kill = True
        if kill and w.pid is not None:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        w.conn.close()
        w.results.close()

    def _replace(self, i: int, *, kill: bool, counted: bool = True) -> None:
        self._stop_worker(self._workers[i], kill=kill)
        self._workers[i] = self._start_worker()
        if counted:
            self._counts["workers_replaced"] += 1

    def close(self) -> None:
        """Stop the workers and the zygote and wait for them to exit (idempotent)."""
        if self._closed:
            return
        self._closed = True
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
            if w.busy is not None and w.pid is not None:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # A worker has exited when its result pipe reaches EOF.
        alive = {w.results: w for w in workers}
        deadline = time.monotonic() + 2.0
        while alive and time.monotonic() < deadline:
            for conn in wait(list(alive), timeout=max(0.0, deadline - time.monotonic())):
                try:
                    conn.recv()
                except (EOFError, OSError):
                    alive.pop(conn)
        for w in alive.values():
            if w.pid is not None:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for w in workers:
            w.conn.close()
            w.results.close()
        self._stop_zygote()

    def __enter__(self) -> "GraderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def stats(self) -> GraderStats:
        c = self._counts
        return GraderStats(
            graded=c["graded"], correct=c["correct"], timeouts=c["timeouts"], crashes=c["crashes"],
            memory_errors=c["memory_errors"], errors=c["errors"], too_complex=c["too_complex"],
            workers_started=c["workers_started"], workers_replaced=c["workers_replaced"],
            zygote_restarts=c["zygote_restarts"], max_latency_s=self._max_latency,
        )

    def pids(self) -> list[int]:
        """The zygote's and the ready workers' PIDs (for RSS monitoring)."""
        return [self._zygote.pid] + [w.pid for w in self._workers if w.pid is not None]

    def wait_ready(self) -> None:
        """Block until every worker can take an item (grade_batch does not need this; it hands
        items to workers as they become ready)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool is closed")
            self._wait_zygote_ready()
            while not all(w.ready for w in self._workers):
                starting = {w.results: i for i, w in enumerate(self._workers) if not w.ready}
                first = min(self._workers[i].started_at for i in starting.values())
                remaining = first + self.config.startup_timeout_s - time.monotonic()
                if remaining <= 0:
                    self.close()
                    raise RuntimeError(f"grader worker did not start within {self.config.startup_timeout_s} s")
                for obj in wait(list(starting), timeout=remaining):
                    self._service(starting[obj], None, None)

    # ---------------------------------------------------------------- grading

    def grade_batch(self, responses: Sequence[str], answers: Sequence[str]) -> list[GradeResult]:
        """Grade responses[i] against answers[i]; results in input order.

        Every item gets a result within about timeout_s of reaching a worker, whatever the
        content. Shape: two equal-length sequences of str.
        """
        if len(responses) != len(answers):
            raise ValueError(f"responses and answers differ in length: {len(responses)} vs {len(answers)}")
        for i, (r, a) in enumerate(zip(responses, answers)):
            if not isinstance(r, str):
                raise ValueError(f"responses[{i}] must be a str, got {type(r).__name__}")
            if not isinstance(a, str):
                raise ValueError(f"answers[{i}] must be a str, got {type(a).__name__}")
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool is closed")
            self._wait_zygote_ready()
            return self._run(list(responses), list(answers))

    def _finish(self, results, latencies, idx: int, result: GradeResult, latency: float) -> None:
        results[idx] = result
        latencies[idx] = latency
        self._max_latency = max(self._max_latency, latency)
        c = self._counts
        c["graded"] += 1
        c["correct"] += bool(result.correct)
        reason = result.reason
        if reason == "timeout":
            c["timeouts"] += 1
        elif reason == "worker_crash":
            c["crashes"] += 1
        elif reason == "memory_limit":
            c["memory_errors"] += 1
        elif reason == "too_complex":
            c["too_complex"] += 1
        elif reason.startswith("error"):
            c["errors"] += 1

    def _run(self, responses: list[str], answers: list[str]) -> list[GradeResult]:
        n = len(responses)
        results: list[GradeResult | None] = [None] * n
        latencies = [0.0] * n
        pending = collections.deque(range(n))
        timeout = self.config.timeout_s
        startup = self.config.startup_timeout_s
        try:
            while pending or any(w.busy is not None for w in self._workers):
                for i, w in enumerate(self._workers):
                    if w.ready and w.busy is None and pending:
                        idx = pending.popleft()
                        self._seq += 1
                        try:
                            w.conn.send((self._seq, responses[idx], answers[idx]))
                        except (OSError, ValueError):
                            # Died while idle: not this item's doing, so it goes back in line.
                            pending.appendleft(idx)
                            self._replace(i, kill=True)
                            continue
                        w.busy = (self._seq, idx)
                        w.sent_at = time.monotonic()
                        w.deadline = w.sent_at + timeout
                # Sleep until a result, a death (EOF), or the nearest deadline.
                deadlines = [w.deadline if w.busy else w.started_at + startup
                             for w in self._workers if w.busy or not w.ready]
                wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                readable = {w.results: i for i, w in enumerate(self._workers)}
                for obj in wait(list(readable), timeout=wait_s):
                    self._service(readable[obj], results, latencies)
                now = time.monotonic()
                for i, w in enumerate(self._workers):
                    if w.busy is not None and now >= w.deadline:
                        _, idx = w.busy
                        self._finish(results, latencies, idx, GradeResult(False, None, "timeout"), now - w.sent_at)
                        self._replace(i, kill=True)
                    elif not w.ready and now >= w.started_at + startup:
                        self.close()
                        raise RuntimeError(f"grader worker did not start within {startup} s")
        finally:
            # Interrupted mid-batch (KeyboardInterrupt): busy workers hold items of a batch
            # nobody waits for any more; restart them so the next batch starts clean.
            if not self._closed:
                for i, w in enumerate(self._workers):
                    if w.busy is not None:
                        self._replace(i, kill=True, counted=False)
        self.last_batch_latencies_s = latencies
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _service(self, i: int, results, latencies) -> None:
        """Read what worker i has to say, or handle its death (EOF on its result pipe)."""
        w = self._workers[i]
        try:
            msg = w.results.recv()
        except (EOFError, OSError):
            msg = None
        if msg is not None:
            if msg[0] == "ready":
                w.pid = msg[1]
                self._startup_failures = 0
                return
            seq, correct, extracted, reason = msg
            if w.busy is None or w.busy[0] != seq:
                return  # a result for an item already given up on
            _, idx = w.busy
            w.busy = None
            w.items += 1
            self._finish(results, latencies, idx, GradeResult(correct, extracted, reason), time.monotonic() - w.sent_at)
            limit = self.config.max_items_per_worker
            if limit and w.items >= limit:
                self._replace(i, kill=False, counted=False)
            return
        # Dead. A crash while grading is that item's result.
        if not w.ready:
            self._startup_failures += 1
            if self._startup_failures > 3:
                self.close()
                raise RuntimeError("grader workers keep dying during start-up (memory_mb too small?)")
        if w.busy is not None:
            _, idx = w.busy
            w.busy = None
            self._finish(results, latencies, idx, GradeResult(False, None, "worker_crash"), time.monotonic() - w.sent_at)
        self._replace(i, kill=False)
