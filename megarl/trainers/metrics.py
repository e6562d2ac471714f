"""Metrics to TensorBoard, to metrics.jsonl and to the console (a progress bar with ETA)."""

from __future__ import annotations

import json
import os
import sys
import time


class MetricsLogger:
    """Rank 0 logs; other ranks hold a disabled logger (every method is a no-op)."""

    CONSOLE_KEYS = ("reward/mean", "reward/accuracy", "response/length_mean", "actor/entropy",
                    "actor/clip_frac", "actor/grad_norm", "time/step", "eval/accuracy")

    def __init__(self, run_dir: str, *, enabled: bool, total_steps: int, start_step: int = 0) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.start = start_step
        self.t0 = time.perf_counter()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb_dir = os.path.join(run_dir, "tensorboard")
        self.writer = SummaryWriter(self.tb_dir)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        # The bar only on a terminal; logs (CI, Slurm) get one line per step instead.
        self.bar = tqdm(total=total_steps, initial=start_step, desc="rl", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=not sys.stderr.isatty())

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        """Metrics outside a training step (held-out evaluation before the first step):
        TensorBoard only; metrics.jsonl keeps one row per training step."""
        if self.enabled:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def log_text(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stdout)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        shown = {k.replace("/", "_").replace("reward_", ""): f"{metrics[k]:.3g}" for k in self.CONSOLE_KEYS if k in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        self.bar.write(f"step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in shown.items())
                       + f" eta={eta:.0f}s", file=sys.stdout)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
