"""Time split of GRPO steps (rollout / reward / log-prob / update / sync), tokens/s and peak memory.

    python benchmarks/step.py                      # the CPU demo configuration (examples/demo_cpu.yaml)
    python benchmarks/step.py --recipe smollm2     # examples/smollm2_arith_cpu.yaml (SmolLM2-135M, 2 ranks)
    python benchmarks/step.py --recipe path.yaml --steps 6 optim.lr=1e-6

It runs `megarl train` on the recipe for --steps steps (held-out evaluation cut to a few
problems, no checkpoints), reads the run's metrics.jsonl and prints, over the steps after the
first (the first one pays for warm-up), the median seconds of each phase and its share of the
step, generated tokens/s of the rollout and of the whole step, and the peak resident memory of
all ranks together. For the demo it first prepares the demo model with a short SFT warm-up
(timing does not depend on how well the model adds).

With the default rollout.engine "megatron" there is no sync phase: the in-process engine
generates with the very parameters the optimizer updates (colocated, shared storage); with
rollout.engine=hf (or vllm) the split has the WeightBridge's sync. benchmarks/sync.py times the
bridge on its own against a memcpy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _harness import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"demo": ROOT / "examples" / "demo_cpu.yaml", "smollm2": ROOT / "examples" / "smollm2_arith_cpu.yaml"}
# Peer reference on the SmolLM2 workload (data/README.md): TRL GRPOTrainer on this machine kind.
PHASE_ORDER = ("rollout", "reward", "logprob", "update", "critic", "sync")
SMOLLM2_REFERENCE = {"step": 42.8, "rollout": 11.0, "logprob": 8.7, "update": 22.9, "peak_rss_gb": 7.2}


def run(recipe: Path, steps: int, overrides: list[str], workdir: Path) -> list[dict]:
    run_dir = workdir / "run"
    cmd = [sys.executable, "-m", "megarl.cli", "train", str(recipe), f"train.steps={steps}",
           "train.eval_every=0", "train.save_every=0", "train.resume=false", "data.test_limit=4",
           f"train.run_dir={run_dir}", *overrides]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"benchmarks/step.py: megarl train exited with {proc.returncode}")
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "time/step" in r]


def summarize(rows: list[dict]) -> dict:
    timed = rows[1:] if len(rows) > 1 else rows
    med = lambda k: statistics.median(r.get(k, 0.0) for r in timed)  # noqa: E731
    found = {k[5:] for r in timed for k in r if k.startswith("time/") and k != "time/step"}
    phases = [p for p in PHASE_ORDER if p in found] + sorted(found - set(PHASE_ORDER))
    out = {
        "steps_timed": len(timed),
        "step_s": med("time/step"),
        "phases_s": {p: med(f"time/{p}") for p in phases},
        "rollout_tokens_per_s": med("perf/rollout_tokens_per_s"),
        "step_tokens_per_s": med("perf/tokens_per_s"),
        "response_length_mean": med("response/length_mean"),
        "peak_rss_gb": max(r.get("memory/peak_rss_gb", 0.0) for r in rows),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo", help="demo | smollm2 | a recipe path")
    ap.add_argument("--steps", type=int, default=None, help="steps to run (default: demo 8, others 4)")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = ap.parse_args()
    recipe = RECIPES.get(args.recipe, Path(args.recipe))
    if not recipe.is_file():
        raise SystemExit(f"benchmarks/step.py: --recipe {args.recipe}: no such recipe (demo, smollm2, or a YAML path)")
    steps = args.steps or (8 if args.recipe == "demo" else 4)
    if steps < 2:
        raise SystemExit("benchmarks/step.py: --steps must be >= 2 (the first step is warm-up)")
    print(machine_line(torch.device("cpu")), flush=True)
    with tempfile.TemporaryDirectory(prefix="megarl-step-") as tmp:
        work = Path(tmp)
        overrides = list(args.overrides)
        if args.recipe == "demo":
            from megarl.pipelines.demo import prepare

            info = prepare(work / "demo", sft_steps=50, seed=0, teacher_error=0.6)
            overrides = [f"model.hf_dir={info['model']}", f"data.train={info['train']}",
                         f"data.test={info['test']}", *overrides]
        rows = run(recipe, steps, overrides, work)
    s = summarize(rows)
    print(f"\n{recipe.name}: median over steps 2..{steps} ({s['steps_timed']} steps)")
    print(f"  {'phase':<10} {'seconds':>8} {'share':>7}")
    for p, t in s["phases_s"].items():
        print(f"  {p:<10} {t:8.2f} {t / s['step_s']:7.1%}")
    print(f"  {'step':<10} {s['step_s']:8.2f} {1:7.1%}")
    if "sync" not in s["phases_s"]:
        print("  sync       (none: the colocated engine shares the trained parameters; see benchmarks/sync.py)")
    print(f"  generated tokens/s: rollout {s['rollout_tokens_per_s']:.1f}, whole step {s['step_tokens_per_s']:.1f} "
          f"(mean response {s['response_length_mean']:.1f} tokens)")
    print(f"  peak RSS, all ranks together: {s['peak_rss_gb']:.2f} GB")
    if args.recipe == "smollm2":
        ref = SMOLLM2_REFERENCE
        print(f"  vs the peer reference on this machine kind (data/README.md, not this run): step "
              f"{s['step_s'] / ref['step']:.2f}x of {ref['step']} s (target <= 0.5), peak RSS "
              f"{s['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x of {ref['peak_rss_gb']} GB (target < 1)")
    if args.json:
        from megarl.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(s, indent=2))


if __name__ == "__main__":
    main()
