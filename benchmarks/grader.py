"""Math grader benchmark: pool throughput and latency on MATH500, and a hostile-input soak.

    python benchmarks/grader.py                 # full run (targets in docs/grading.md)
    python benchmarks/grader.py --quick         # a smoke run: fewer repeats, 500 hostile items

1. Throughput on MATH500 (solution, answer) pairs: GraderPool with --workers workers against
   two baselines measured in the same run: megarl's grade() serially in this process (no
   isolation), and math-verify's parse+verify serially in this process. Also the same pairs with
   each solution graded against its neighbour's answer (wrong answers take the sympy path).
   Target: >= 200 gradings/s with 2 workers; p99 latency <= the timeout.
2. Hostile soak: --adversarial gradings (default 10,000) of power towers, 10,000 nested
   braces, 1 MB responses, unbalanced braces, NUL bytes, huge factorials and sums sympy cannot
   finish. Target: every item answered (zero hangs), none graded correct, pool RSS bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def percentile(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def hostile_items(n: int) -> list[tuple[str, str, str]]:
    """n hostile (category, response, answer) triples; each unique so no cache absorbs the work."""
    makers = [
        ("power tower", lambda k: r"\boxed{2^{2^{2^{2^{2^{" + str(k % 7 + 2) + "}}}}}}"),
        ("9^9^9", lambda k: r"The answer is $9^{9^{" + str(9 + k % 5) + "}}$."),
        ("huge factorial", lambda k: r"\boxed{(" + str(k + 10) + "^{10})!}"),
        ("symbolic power", lambda k: r"\boxed{(x+" + str(k) + ")^{100000}}"),
        ("10,000 nested braces", lambda k: r"\boxed{" + "{" * 10_000 + str(k) + "}" * 10_000 + "}"),
        ("400 nested parens", lambda k: r"\boxed{" + "(" * 400 + str(k) + ")" * 400 + "}"),
        ("60 nested fractions", lambda k: r"\boxed{" + r"\frac{1}{" * 60 + str(k) + "}" * 60 + "}"),
        ("unbalanced braces", lambda k: r"so \boxed{\frac{" + str(k) + "}{1}"),
        ("NUL bytes", lambda k: "\x00\\boxed{\x00" + str(k) + "\x00}\x00" * 200),
        ("2,000 unclosed boxes", lambda k: r"\boxed{" * 2000 + str(k)),
        ("5,000 'final answer is'", lambda k: "final answer is 4 " * 5000 + str(k)),
        ("exp tower", lambda k: r"\boxed{e^{e^{e^{" + str(k + 100) + "}}}}"),
    ]
    items = []
    for k in range(n):
        if k % 1000 == 999:
            # A sum sympy evaluates term by term for tens of seconds: only the timeout stops it.
            items.append(("slow sum (past the guards)", r"\boxed{\sum_{n=1}^{" + str(10_000_000 + k) + r"} \sin(n)}", "4"))
        elif k % 100 == 50:
            items.append(("1 MB, no answer", "4 " * 500_000 + str(k), "4"))
        elif k % 100 == 51:
            items.append(("1 MB boxed", r"\boxed{" + "4+" * 500_000 + str(k) + "}", "4"))
        else:
            name, make = makers[k % len(makers)]
            items.append((name, make(k), "4"))
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=4, help="passes over the 500 MATH500 pairs")
    parser.add_argument("--adversarial", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="--repeats 1 --adversarial 500")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.adversarial = 1, 500

    import sympy

    from megarl.rewards.grader import GraderConfig, GraderPool
    from megarl.rewards.math import grade

    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} at start; python {platform.python_version()}; sympy {sympy.__version__}")
    rows = [json.loads(line) for line in open(REPO / "data" / "math500.jsonl")]
    right = [(r["solution"], r["answer"]) for r in rows] * args.repeats
    shifted = rows[1:] + rows[:1]
    wrong = [(r["solution"], s["answer"]) for r, s in zip(rows, shifted)] * args.repeats

    # Baselines, serial in this process.
    def serial(fn, pairs):
        t0 = time.perf_counter()
        lat = []
        for resp, ans in pairs:
            t = time.perf_counter()
            fn(resp, ans)
            lat.append(time.perf_counter() - t)
        return len(pairs) / (time.perf_counter() - t0), lat

    logging.disable(logging.WARNING)
    from math_verify import parse, verify

    def math_verify_grade(resp, ans):
        return verify(parse("$" + ans + "$"), parse(resp))

    grade(r"\boxed{x^2}", "x^2+1")  # import sympy and the parser outside the timing
    math_verify_grade(r"\boxed{x^2}", "x^2+1")

    print(f"\n| workload ({args.repeats} x 500 MATH500 pairs) | grader | gradings/s | p50 ms | p99 ms | max ms | vs in-process | vs math-verify |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    config = GraderConfig(num_workers=args.workers, timeout_s=args.timeout)
    with GraderPool(config) as pool:
        t = time.perf_counter()
        pool.wait_ready()
        startup = time.perf_counter() - t
        for label, pairs in (("solution vs own answer", right), ("solution vs neighbour's answer", wrong)):
            base_rate, base_lat = serial(grade, pairs)
            mv_rate, mv_lat = serial(math_verify_grade, pairs)
            t = time.perf_counter()
            results = pool.grade_batch([p[0] for p in pairs], [p[1] for p in pairs])
            rate = len(pairs) / (time.perf_counter() - t)
            lat = pool.last_batch_latencies_s
            n_correct = sum(r.correct for r in results)
            for name, r, l in (("megarl grade(), serial in-process", base_rate, base_lat),
                               ("math-verify parse+verify, serial in-process", mv_rate, mv_lat),
                               (f"megarl GraderPool, {args.workers} workers", rate, lat)):
                print(f"| {label} | {name} | {r:.0f} | {percentile(l, .5) * 1e3:.2f} | {percentile(l, .99) * 1e3:.2f} "
                      f"| {max(l) * 1e3:.1f} | {r / base_rate:.2f}x | {r / mv_rate:.2f}x |", flush=True)
            print(f"|  | (pool graded {n_correct}/{len(pairs)} correct) | | | | | | |")
        print(f"\npool start-up (zygote import + parser warm-up + {args.workers} forks): {startup:.2f} s")
        print(f"target: >= 200 gradings/s with 2 workers on 'solution vs own answer'; p99 <= timeout {args.timeout} s")

    # Hostile soak.
    items = hostile_items(args.adversarial)
    print(f"\nhostile soak: {len(items)} gradings, timeout {args.timeout} s, memory cap {config.memory_mb} MB per worker")
    print("| after items | wall s | max latency s | timeouts | crashes | too_complex | workers replaced | pool RSS MB (zygote + workers) | parent RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rss_samples = []
    by_category: dict[str, collections.Counter] = {}
    worst: dict[str, float] = {}
    answered = 0
    wrongly_correct = 0
    max_latency = 0.0
    with GraderPool(config) as pool:
        pool.wait_ready()
        rss_start = sum(rss_mb(p) for p in pool.pids())
        t0 = time.perf_counter()
        batch = 500
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            results = pool.grade_batch([c[1] for c in chunk], [c[2] for c in chunk])
            for (category, _, _), r, lat in zip(chunk, results, pool.last_batch_latencies_s):
                by_category.setdefault(category, collections.Counter())[r.reason] += 1
                worst[category] = max(worst.get(category, 0.0), lat)
            answered += len(results)
            wrongly_correct += sum(r.correct for r in results)
            max_latency = max(max_latency, max(pool.last_batch_latencies_s))
            pool_rss = sum(rss_mb(p) for p in pool.pids())
            rss_samples.append(pool_rss)
            s = pool.stats
            if (start // batch) % 4 == 3 or start + batch >= len(items):
                print(f"| {start + len(chunk)} | {time.perf_counter() - t0:.1f} | {max_latency:.2f} | {s.timeouts} | {s.crashes} "
                      f"| {s.too_complex} | {s.workers_replaced} | {pool_rss:.0f} | {rss_mb(os.getpid()):.0f} |", flush=True)
        s = pool.stats
    hangs = len(items) - answered
    print(f"\nanswered {answered}/{len(items)} (hangs: {hangs}); graded correct: {wrongly_correct}; "
          f"max latency {max_latency:.2f} s (timeout {args.timeout} s); "
          f"pool RSS {rss_start:.0f} MB at start, max {max(rss_samples):.0f} MB, {rss_samples[-1]:.0f} MB at end; "
          f"errors {s.errors}, over memory {s.memory_errors}")
    print("\n| hostile input | items | reasons | max latency s |")
    print("|---|---:|---|---:|")
    for category, reasons in by_category.items():
        print(f"| {category} | {sum(reasons.values())} | "
              f"{', '.join(f'{k} {v}' for k, v in reasons.most_common())} | {worst[category]:.2f} |")
    print(f"machine load average {os.getloadavg()[0]:.1f} at end")
    return 0 if hangs == 0 and wrongly_correct == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
