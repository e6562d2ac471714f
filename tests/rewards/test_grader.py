"""megarl.rewards.grader: the isolated pool (timeouts, crashes, memory cap, threads, order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megarl.rewards.grader import GraderConfig, GraderPool
from megarl.rewards.math import GradeResult, grade

DATA = Path(__file__).resolve().parents[2] / "data"


def hostile_grade(response, answer, *, last_number_fallback=False):
    """A grade_fn that misbehaves on command, to exercise the pool's failure handling."""
    if response == "spin":
        while True:
            pass
    if response == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if response == "allocate":
        return GradeResult(len(bytearray(8 * 1024**3)) > 0, None, "allocated")
    if response == "raise":
        raise RuntimeError("grader bug")
    return grade(response, answer, last_number_fallback=last_number_fallback)


@pytest.fixture(scope="module")
def pool():
    with GraderPool(GraderConfig(num_workers=2, timeout_s=5.0)) as p:
        yield p


def test_math500_through_the_pool_in_order(pool):
    with open(DATA / "math500.jsonl") as f:
        rows = [json.loads(line) for line in f]
    # Interleave wrong answers so that order mistakes would show.
    shifted = rows[1:] + rows[:1]
    same_answer = {("5", "x=5"), ("7", "7"), ("3", "3")}  # neighbours with equal answers
    responses = [r["solution"] for r in rows] * 2
    answers = [r["answer"] for r in rows] + [s["answer"] for s in shifted]
    expected = [True] * 500 + [(r["answer"], s["answer"]) in same_answer for r, s in zip(rows, shifted)]
    results = pool.grade_batch(responses, answers)
    assert [r.correct for r in results] == expected
    assert [r.extracted for r in results[:3]] == [r["answer"] for r in rows[:3]]
    assert max(pool.last_batch_latencies_s) < pool.config.timeout_s
    assert pool.stats.timeouts == pool.stats.crashes == 0


def test_real_slow_input_times_out_without_blocking_others():
    # sympy needs >= 3 s (3.4 s on an idle 2-core machine, ~10 s under load) to sum sin(n)
    # over ten million terms: past the guards, so only the 1 s timeout stops it. The other
    # items must not wait for it.
    slow = r"\boxed{\sum_{n=1}^{10000000} \sin(n)}"
    with GraderPool(GraderConfig(num_workers=2, timeout_s=1.0)) as p:
        p.wait_ready()
        results = p.grade_batch([slow] + [r"\boxed{4}"] * 20 + [slow, r"\boxed{5}"], ["4"] * 23)
        assert [r.reason for r in results] == ["timeout"] + ["equal"] * 20 + ["timeout", "not_equal"]
        assert results[0] == GradeResult(False, None, "timeout")
        lat = p.last_batch_latencies_s
        assert 1.0 <= lat[0] < 4.0
        assert max(lat[1:21]) < 1.0  # served by the other worker meanwhile
        s = p.stats
        assert (s.graded, s.timeouts, s.workers_replaced, s.workers_started) == (23, 2, 2, 4)
        # The replaced workers serve the next batch.
        assert [r.correct for r in p.grade_batch([r"\boxed{1}", r"\boxed{2}"], ["1", "2"])] == [True, True]


def test_timeout_crash_memory_and_errors_are_results_not_failures():
    config = GraderConfig(num_workers=2, timeout_s=1.0, memory_mb=512)
    with GraderPool(config, grade_fn=hostile_grade) as p:
        items = ["spin", r"\boxed{1}", "segfault", r"\boxed{2}", "allocate", "raise", r"\boxed{3}"]
        results = p.grade_batch(items, ["1", "1", "1", "2", "1", "1", "3"])
        assert [r.reason for r in results] == [
            "timeout", "equal", "worker_crash", "equal", "memory_limit",
            "error: RuntimeError: grader bug", "equal",
        ]
        assert [r.correct for r in results] == [False, True, False, True, False, False, True]
        s = p.stats
        assert (s.timeouts, s.crashes, s.memory_errors, s.errors) == (1, 1, 1, 1)
        assert s.workers_replaced == 2  # the spinning and the crashed worker; MemoryError is survivable
        assert s.graded == 7 and s.correct == 3


def test_grading_from_a_thread():
    # verl PR #5635: math-verify's signal.alarm timeout failed in worker threads and every
    # reward became 0. The pool must grade correctly when called from any thread.
    out = {}

    def run():
        with GraderPool(GraderConfig(num_workers=1)) as p:
            out["results"] = p.grade_batch([r"\boxed{\frac{1}{2}}", r"\boxed{3}"], ["0.5", "4"])

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert [r.reason for r in out["results"]] == ["equal", "not_equal"]


def test_hostile_inputs_through_the_pool(pool):
    from test_math import HOSTILE  # same inputs as the in-process guard test

    before = pool.stats
    results = pool.grade_batch(list(HOSTILE.values()), ["4"] * len(HOSTILE))
    assert not any(r.correct for r in results)
    assert max(pool.last_batch_latencies_s) <= pool.config.timeout_s + 1.0
    assert pool.stats.crashes == before.crashes


def test_workers_are_recycled_after_max_items():
    with GraderPool(GraderConfig(num_workers=1, max_items_per_worker=2)) as p:
        results = p.grade_batch([rf"\boxed{{{i}}}" for i in range(5)], [str(i) for i in range(5)])
        assert all(r.correct for r in results)
        assert p.stats.workers_started == 3 and p.stats.workers_replaced == 0


def test_input_validation_and_lifecycle(pool):
    with pytest.raises(ValueError, match="differ in length"):
        pool.grade_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"answers\[1\] must be a str"):
        pool.grade_batch(["a", "b"], ["a", 2])
    assert pool.grade_batch([], []) == []
    with pytest.raises(ValueError, match="unknown GraderConfig key"):
        GraderConfig.from_dict({"num_workers": 2, "timeout": 5})
    assert GraderConfig.from_dict({"timeout_s": 2.5}).timeout_s == 2.5
    for bad in ({"num_workers": 0}, {"timeout_s": 0}, {"memory_mb": 50}, {"last_number_fallback": 1}):
        with pytest.raises(ValueError, match="GraderConfig"):
            GraderConfig(**bad)
    with pytest.raises(ValueError, match="picklable"):
        GraderPool(grade_fn=lambda r, a, **k: None)
    p = GraderPool(GraderConfig(num_workers=1))
    p.wait_ready()
    pids = p.pids()
    assert len(pids) == 2  # the zygote and one worker
    p.close()
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.grade_batch(["x"], ["x"])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_no_orphans_when_the_trainer_dies():
    # A trainer killed with SIGKILL while a worker spins on a hostile item must not leave the
    # zygote or a CPU-burning worker behind.
    script = (
        "import os, signal, sys, threading, time\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "from megarl.rewards.grader import GraderConfig, GraderPool\n"
        "from test_grader import hostile_grade\n"
        "p = GraderPool(GraderConfig(num_workers=1, timeout_s=600), grade_fn=hostile_grade)\n"
        "p.wait_ready()\n"
        "print(*p.pids(), flush=True)\n"
        "threading.Thread(target=p.grade_batch, args=(['spin'], ['1']), daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
