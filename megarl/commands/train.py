"""`megarl train RECIPE.yaml [key=value ...]`: RL training (see megarl/trainers/rl.py).

Outside torchrun it relaunches itself with `torchrun --standalone --nproc_per_node
<parallel.nproc>`; under torchrun (or Slurm + torchrun) every rank runs the loop.
"""

from __future__ import annotations

HELP = "RL training (GRPO, Dr.GRPO, RLOO, REINFORCE++, PPO with a critic) from a YAML recipe"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see examples/ and docs/training.md)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 optim.lr=1e-6")


def launch_if_needed(nproc: int, argv: list[str]) -> int | None:
    """Relaunches `python -m megarl.cli <argv>` under torchrun when not already distributed."""
    import os
    import subprocess
    import sys

    if "RANK" in os.environ:
        return None
    from megarl.parallel.groups import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           "-m", "megarl.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    # glibc keeps freed activation memory in its heap, so a process's resident memory only
    # grows; serving blocks of 64 KiB and more by mmap returns them to the OS when freed (peak
    # RSS of the SmolLM2 recipe: 8.8 GB -> see docs/training.md). Set them yourself to override.
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.setdefault(key, "65536")
    return subprocess.call(cmd, env=env)


def main(args) -> int:
    from megarl.config import load_config
    from megarl.trainers.config import RLConfig

    cfg = load_config(RLConfig, args.recipe, args.overrides)  # validate before launching anything
    code = launch_if_needed(cfg.parallel.nproc, ["train", args.recipe, *args.overrides])
    if code is not None:
        return code
    from megarl.trainers.rl import train

    results = train(cfg)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        before, after = results.get("accuracy_before"), results["accuracy_after"]
        if before is not None:
            print(f"accuracy before={before:.3f} after={after:.3f}", flush=True)
        else:
            print(f"accuracy after={after:.3f}", flush=True)
    dist.destroy_process_group()
    return 0
