"""1-shot RLVR at CPU scale, on the demo's addition task: one training example vs the full pool.

    python examples/one_shot_rlvr/cpu_experiment.py                     # ~4 runs of the demo recipe
    python examples/one_shot_rlvr/cpu_experiment.py --steps 150 --control

The paper's pipeline, end to end, on a task a CPU can train:
  1. prepare the demo task and model (megarl.pipelines.demo: 610 training / 200 held-out
     problems, a tiny Qwen2 SFT-warmed on an imperfect teacher), exactly as `megarl demo`;
  2. GRPO on the full pool with examples/demo_cpu.yaml and train.acc_log=true: every training
     example's accuracy each time it is trained on (run_dir/full/acc_log.json);
  3. rank the pool by the historical variance score (`megarl select-examples`) and take the top
     example;
  4. GRPO on that single example (data.train_indices=[k], repeated to fill every batch), same
     recipe, same number of steps;
  5. (--control) the same on the lowest-variance example, as the paper's contrast;
  6. write run_dir/results.json and run_dir/results.md: held-out accuracy of every run at every
     evaluation (megarl.eval's greedy pass@1 on the 200 held-out problems).
Results of a run on the 2-core CPU machine are in docs/one_shot_rlvr.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "demo_cpu.yaml"


def train(run_dir: Path, demo: dict, steps: int, eval_every: int, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "megarl.cli", "train", str(RECIPE),
           f"model.hf_dir={demo['model']}", f"data.train={demo['train']}", f"data.test={demo['test']}",
           f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.eval_every={eval_every}",
           "train.save_every=0", "train.resume=false", *extra]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def curve(run_dir: Path) -> dict[int, float]:
    """{step: held-out accuracy} from the evaluation results the trainer wrote."""
    out = {}
    for path in sorted((run_dir / "eval").glob("step_*/results.json")):
        out[int(path.parent.name.split("_")[1])] = json.loads(path.read_text())["average"]["score"]
    if not out:
        raise SystemExit(f"cpu_experiment: no evaluation results under {run_dir / 'eval'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/one_shot_cpu")
    ap.add_argument("--steps", type=int, default=300, help="GRPO steps of every run (the demo recipe's 300)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true", help="also train on the lowest-variance example")
    args = ap.parse_args()
    if args.steps < 1 or args.eval_every < 1:
        raise SystemExit("cpu_experiment: --steps and --eval-every must be >= 1")

    from megarl.fileio import atomic_write_text
    from megarl.pipelines.demo import prepare
    from megarl.pipelines.one_shot import variance_scores

    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    demo = prepare(run_dir / "demo", sft_steps=args.sft_steps, seed=args.seed, teacher_error=0.6)
    print(f"demo task prepared: SFT loss {demo['sft_loss']:.3f}", flush=True)

    train(run_dir / "full", demo, args.steps, args.eval_every, ["train.acc_log=true"])
    scores = variance_scores(run_dir / "full" / "acc_log.json")
    top, low = scores[0], scores[-1]
    print("historical variance, top 5: " + ", ".join(f"{i} ({s:.3f})" for i, s in scores[:5]), flush=True)
    records = [json.loads(line) for line in Path(demo["train"]).read_text().splitlines() if line.strip()]

    runs = {"full pool": ("full", None)}
    runs[f"1-shot (top variance: #{top[0]})"] = ("one_shot", top[0])
    if args.control:
        runs[f"1-shot (lowest variance: #{low[0]})"] = ("one_shot_low", low[0])
    for name, (sub, index) in runs.items():
        if index is not None:
            train(run_dir / sub, demo, args.steps, args.eval_every, [f"data.train_indices=[{index}]"])

    curves = {name: curve(run_dir / sub) for name, (sub, _) in runs.items()}
    steps = sorted(set().union(*curves.values()))
    results = {
        "steps": args.steps,
        "pool_size": len(records),
        "selected": {"index": top[0], "std": top[1], "record": records[top[0]]},
        "lowest": {"index": low[0], "std": low[1], "record": records[low[0]]},
        "curves": {name: {str(s): a for s, a in c.items()} for name, c in curves.items()},
    }
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    lines = ["| step | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{curves[n].get(s, float('nan')):.3f}" for n in curves) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "results.md", table)
    print(table)
    print(f"selected example #{top[0]} (std {top[1]:.3f}): {records[top[0]]['prompt']!r} -> {records[top[0]]['answer']}")


if __name__ == "__main__":
    main()
