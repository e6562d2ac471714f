"""Grading in isolated worker processes: hard wall-clock timeout and memory cap per item.

The reward must never hang or crash a training step (verl PR #5635: math-verify's
signal.alarm timeout raised inside worker threads and every MATH reward silently became 0;
PR #5839: without the timeout, training hung; AReaL #1426: one hung verification blocked
every reward worker). So:

* Items go one at a time to worker processes that are fresh interpreters (subprocess:
  fork+exec, safe to start from any thread, and unlike multiprocessing's spawn/forkserver they
  do not re-run the trainer's __main__, which would import torch into every grader). No
  signal.alarm anywhere: the parent enforces the timeout by killing the worker.
* A worker that exceeds the per-item timeout is killed (SIGKILL) and replaced; a worker that
  dies (segfault, OOM kill) is replaced; each such item gets correct=False with the reason
  "timeout" / "worker_crash", is counted in `stats`, and never delays other items beyond their
  own timeout.
* Each worker caps its address space with RLIMIT_AS, so a hostile item fails with a
  MemoryError ("memory_limit") instead of taking the machine's memory.
* Workers are recycled after `max_items_per_worker` items, bounding slow growth (sympy caches).

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
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from dataclasses import dataclass
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
    startup_timeout_s: how long a new worker may take to import and warm up.
    """

    num_workers: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 1024
    last_number_fallback: bool = False
    max_items_per_worker: int = 20_000
    startup_timeout_s: float = 60.0

    def __post_init__(self):
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"GraderConfig.num_workers must be an int >= 1, got {self.num_workers!r}")
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"GraderConfig.timeout_s must be a number > 0, got {self.timeout_s!r}")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 0 or 0 < self.memory_mb < 200:
            raise ValueError(
                f"GraderConfig.memory_mb must be 0 (no cap) or an int >= 200 (a worker with sympy "
                f"loaded needs ~100 MB of address space), got {self.memory_mb!r}"
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
    inputs rejected by the grader's guards."""

    graded: int = 0
    correct: int = 0
    timeouts: int = 0
    crashes: int = 0
    memory_errors: int = 0
    errors: int = 0
    too_complex: int = 0
    workers_started: int = 0
    workers_replaced: int = 0
    max_latency_s: float = 0.0


def _set_memory_cap(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    import resource

    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(read_fd: int, write_fd: int) -> None:
    """Worker process: receive (seq, response, answer), send (seq, correct, extracted, reason).

    The first message carries the parent's sys.path (so a grade_fn from any importable module
    unpickles), the grade function, the memory cap and the fallback flag.
    """
    import signal

    # Ctrl-C goes to the whole process group; the parent decides what happens to workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    parent_path, grade_fn_blob, memory_mb, last_number_fallback = inbox.recv()
    sys.path[:0] = [p for p in parent_path if p not in sys.path]
    grade_fn = pickle.loads(grade_fn_blob)
    from megarl.rewards import math as math_rewards

    if grade_fn is None:
        grade_fn = math_rewards.grade
        math_rewards.warmup()
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


_WORKER_CMD = "import sys; from megarl.rewards.grader import _worker_main; _worker_main(int(sys.argv[1]), int(sys.argv[2]))"


class _Worker:
    __slots__ = ("proc", "conn", "results", "ready", "started_at", "busy", "deadline", "sent_at", "items")

    def __init__(self, proc: subprocess.Popen, conn: Connection, results: Connection):
        self.proc = proc
        self.conn = conn  # to the worker
        self.results = results  # from the worker; EOF when it dies
        self.ready = False
        self.started_at = time.monotonic()
        self.busy: tuple[int, int] | None = None  # (seq, index in the batch)
        self.deadline = 0.0
        self.sent_at = 0.0
        self.items = 0


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
        self._counts = collections.Counter()
        self._max_latency = 0.0
        self._seq = 0
        self._workers: list[_Worker] = []
        self._closed = False
        self.last_batch_latencies_s: list[float] = []
        for _ in range(self.config.num_workers):
            self._workers.append(self._start_worker())

    # ---------------------------------------------------------------- lifecycle

    def _start_worker(self) -> _Worker:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CMD, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                start_new_session=False,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        conn = Connection(to_child_w, readable=False)
        results = Connection(from_child_r, writable=False)
        conn.send((list(sys.path), self._grade_fn_blob, self.config.memory_mb, self.config.last_number_fallback))
        self._counts["workers_started"] += 1
        return _Worker(proc, conn, results)

    def _stop_worker(self, w: _Worker, *, kill: bool) -> None:
        if not kill:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                kill = True
        if not kill:
            try:
                w.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                kill = True
        if kill and w.proc.poll() is None:
            w.proc.kill()
        try:
            w.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            pass
        w.conn.close()
        w.results.close()

    def _replace(self, i: int, *, kill: bool, counted: bool = True) -> None:
        self._stop_worker(self._workers[i], kill=kill)
        self._workers[i] = self._start_worker()
        if counted:
            self._counts["workers_replaced"] += 1

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            self._stop_worker(w, kill=w.busy is not None)
        self._workers = []

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
            max_latency_s=self._max_latency,
        )

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for RSS monitoring)."""
        return [w.proc.pid for w in self._workers]

    def wait_ready(self) -> None:
        """Block until every worker has imported sympy and warmed up (grade_batch does not
        need this; it hands items to workers as they become ready)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool is closed")
            while not all(w.ready for w in self._workers):
                starting = {w.results: i for i, w in enumerate(self._workers) if not w.ready}
                first_deadline = min(self._workers[i].started_at for i in starting.values()) + self.config.startup_timeout_s
                remaining = first_deadline - time.monotonic()
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
        try:
            while pending or any(w.busy is not None for w in self._workers):
                now = time.monotonic()
                # Hand items to idle, ready workers.
                for i, w in enumerate(self._workers):
                    if w.ready and w.busy is None and pending:
                        idx = pending.popleft()
                        self._seq += 1
                        try:
                            w.conn.send((self._seq, responses[idx], answers[idx]))
                        except (OSError, ValueError):
                            # Died while idle: not this item's fault, so it goes back in line.
                            pending.appendleft(idx)
                            self._replace(i, kill=True)
                            continue
                        w.busy = (self._seq, idx)
                        w.sent_at = time.monotonic()
                        w.deadline = w.sent_at + timeout
                now = time.monotonic()
                # Sleep until a message, a death, or the nearest deadline.
                deadlines = [w.deadline if w.busy else w.started_at + self.config.startup_timeout_s
                             for w in self._workers if w.busy or not w.ready]
                wait_s = max(0.0, min(deadlines) - now) if deadlines else None
                waitables = {w.results: i for i, w in enumerate(self._workers)}
                for obj in wait(list(waitables), timeout=wait_s):
                    self._service(waitables[obj], results, latencies)
                # Deadlines.
                now = time.monotonic()
                for i, w in enumerate(self._workers):
                    if w.busy is not None and now >= w.deadline:
                        _, idx = w.busy
                        self._finish(results, latencies, idx, GradeResult(False, None, "timeout"), now - w.sent_at)
                        self._replace(i, kill=True)
                    elif not w.ready and now >= w.started_at + self.config.startup_timeout_s:
                        self.close()
                        raise RuntimeError(
                            f"grader worker did not start within {self.config.startup_timeout_s} s "
                            f"(exit code {w.proc.returncode})"
                        )
        finally:
            # Interrupted mid-batch (KeyboardInterrupt): busy workers hold items of a batch
            # nobody waits for any more; restart them so the next batch starts clean.
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
                w.ready = True
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
        # Dead: a crash while grading is that item's result; at start-up it is fatal.
        if not w.ready:
            try:
                code = w.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            raise RuntimeError(f"grader worker exited during start-up with exit code {code}")
        if w.busy is not None:
            _, idx = w.busy
            w.busy = None
            self._finish(results, latencies, idx, GradeResult(False, None, "worker_crash"), time.monotonic() - w.sent_at)
        self._replace(i, kill=True)
