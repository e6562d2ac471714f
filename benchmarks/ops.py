"""Fused ops vs their baselines: median time, ratio and peak extra memory, in one run.

    python benchmarks/ops.py            # full shapes of the targets in docs/perf.md
    python benchmarks/ops.py --quick    # small shapes (a smoke run, used by the tests)
    python benchmarks/ops.py --only gae

Cases come from benchmarks/ops_advantages.py (gae, group_advantages),
benchmarks/ops_logprob.py (logprob_entropy, logprob_entropy_from_hidden) and
benchmarks/ops_checksum.py (checksum); each defines
`cases(device, quick) -> list[Case]`. On a GPU the table also shows achieved GB/s next to a
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Case, ensure_malloc_env, fmt_bytes, machine_line, peak_extra_bytes, time_ms  # noqa: E402

CASE_MODULES = ("ops_advantages", "ops_logprob", "ops_checksum")


def copy_bandwidth_gbs(device) -> float:
    import torch

    x = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=3, repeats=10)
    return 2 * x.numel() / (ms * 1e-3) / 1e9  # read + write


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--only", default=None, help="run only cases whose op name contains this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from megarl._ext import extension_loaded

    print(machine_line(device), f"; extension loaded: {extension_loaded()}")
    copy_gbs = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    if copy_gbs:
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read+write)")
    cases: list[Case] = []
    for name in CASE_MODULES:
        cases += importlib.import_module(name).cases(device, args.quick)
    if args.only:
        cases = [c for c in cases if args.only in c.op]
    repeats = 2 if args.quick else 5
    header = "| op | shape | baseline | baseline ms | megarl ms | speed-up | baseline mem | megarl mem | mem ratio | target |"
    print(header)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for c in cases:
        t_base = time_ms(c.baseline, device, warmup=1, repeats=repeats)
        t_fused = time_ms(c.megarl, device, warmup=1, repeats=repeats)
        m_base = peak_extra_bytes(c.baseline, device)
        m_fused = peak_extra_bytes(c.megarl, device)
        ratio_mem = m_fused / m_base if m_base > 0 else float("nan")
        row = (f"| {c.op} | {c.shape} | {c.baseline_name} | {t_base:.2f} | {t_fused:.2f} | "
               f"{t_base / t_fused:.1f}x | {fmt_bytes(m_base)} | {fmt_bytes(m_fused)} | {ratio_mem:.3f} | {c.target} |")
        if c.bytes_moved and copy_gbs:
            gbs = c.bytes_moved / (t_fused * 1e-3) / 1e9
            row += f" {gbs:.0f} GB/s ({gbs / (copy_gbs / 2):.2f} of one-way copy)"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    ensure_malloc_env()
    sys.exit(main())
