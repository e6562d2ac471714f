"""`megarl demo`: the CPU demo, end to end (README Quickstart).

1. prepare: generate the addition task, a character tokenizer and a tiny Qwen2 model, and
   SFT-warm it up (single process) on an imperfect teacher whose answers are often off by one,
   so the model can add but its greedy answers are often wrong;
2. GRPO with examples/demo_cpu.yaml on 2 CPU ranks (tensor parallel 2) through megatron-core:
   the verifier reward (the exact sum) is what corrects the teacher's bias;
3. print `accuracy before=A after=B` (greedy held-out accuracy) as the last line.
"""

from __future__ import annotations

HELP = "run the CPU demo: SFT warm-up, then GRPO on 2 CPU ranks (TP=2); prints held-out accuracy before/after"


def add_arguments(parser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where data, models, logs and checkpoints go")
    parser.add_argument("--sft-steps", type=int, default=400, help="SFT warm-up steps (batch 64)")
    parser.add_argument("--teacher-error", type=float, default=0.6,
                        help="fraction of SFT demonstrations whose answer is off by one (an imperfect teacher)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.steps=30")


def recipe_path() -> str:
    from pathlib import Path

    import megarl

    path = Path(megarl.__file__).resolve().parents[1] / "examples" / "demo_cpu.yaml"
    if not path.is_file():
        raise ValueError(f"the demo recipe {path} is missing (megarl demo runs from a source checkout)")
    return str(path)


def main(args) -> int:
    import os
    import shutil

    from megarl.commands.train import launch_if_needed
    from megarl.config import load_config
    from megarl.trainers.config import RLConfig

    run_dir = os.path.abspath(args.run_dir)
    overrides = [
        f"model.hf_dir={run_dir}/init",
        f"data.train={run_dir}/data/train.jsonl",
        f"data.test={run_dir}/data/test.jsonl",
        f"train.run_dir={run_dir}/grpo",
        *args.overrides,
    ]
    recipe = recipe_path()
    if os.environ.get("RANK") is None:
        from megarl.pipelines.demo import prepare

        # A demo run starts fresh: an earlier run's checkpoints would resume it.
        shutil.rmtree(os.path.join(run_dir, "grpo"), ignore_errors=True)
        info = prepare(run_dir, sft_steps=args.sft_steps, seed=args.seed, teacher_error=args.teacher_error)
        print(f"demo: SFT warm-up on an imperfect teacher done ({args.sft_steps} steps, "
              f"{args.teacher_error:.0%} of demonstrations off by one, loss {info['sft_loss']:.3f}); "
              f"model {info['model']}; data {os.path.dirname(info['train'])}", flush=True)
        cfg = load_config(RLConfig, recipe, overrides)
        print(f"demo: GRPO on {cfg.parallel.nproc} CPU ranks (tp={cfg.parallel.tp}, pp={cfg.parallel.pp}); "
              f"TensorBoard logs in {cfg.train.run_dir}/tensorboard", flush=True)
        return launch_if_needed(cfg.parallel.nproc, ["train", recipe, *overrides]) or 0
    raise ValueError("megarl demo launches its own ranks; run it without torchrun")
