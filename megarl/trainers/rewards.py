"""The recipe's reward: a weighted sum of terms over one step's completions.

    correctness  "math" (grader pool: sandboxed, hard timeouts) or "last_integer"
    "format"     megarl.algorithms.rewards.format_reward
    "hapo"       HAPO length reward from the per-prompt history of earlier steps, then the
                 history is updated with this step's correct responses and merged (MIN) over DP
"""

from __future__ import annotations

from typing import Sequence

import torch

from megarl.trainers.config import RewardConfig


class RewardComputer:
    def __init__(self, cfg: RewardConfig, groups, num_prompts: int) -> None:
        self.cfg = cfg
        self.groups = groups
        self.kinds = {t.kind: t.weight for t in cfg.terms}
        self.pool = None
        if "math" in self.kinds:
            from megarl.rewards.grader import GraderConfig, GraderPool

            self.pool = GraderPool(GraderConfig(num_workers=cfg.grader_workers, timeout_s=cfg.grader_timeout_s))
        self.hapo = None
        if "hapo" in self.kinds:
            from megarl.algorithms.rewards import HapoHistory

            self.hapo = HapoHistory(num_prompts)

    def correct(self, texts: Sequence[str], answers: Sequence[str]) -> list[bool]:
        if self.pool is not None:
            return [r.correct for r in self.pool.grade_batch(list(texts), list(answers))]
        from megarl.rewards.last_integer import last_integer_correct

        return [last_integer_correct(t, a) for t, a in zip(texts, answers)]

    def __call__(self, texts: Sequence[str], answers: Sequence[str], prompt_ids: torch.Tensor,
                 lengths: torch.Tensor) -> tuple[torch.Tensor, list[bool], dict[str, float]]:
        """[B] rewards, [B] correctness, and per-term means for logging."""
        correct = self.correct(texts, answers)
        c = torch.tensor(correct, dtype=torch.float32)
        weight = self.kinds.get("math", self.kinds.get("last_integer"))
        total = weight * c
        metrics: dict[str, float] = {}
        if "format" in self.kinds:
            from megarl.algorithms.rewards import format_rewards

            f = format_rewards(texts, self.cfg.format)
            total = total + self.kinds["format"] * f
            metrics["format"] = float(f.mean())
        if self.hapo is not None:
            from megarl.algorithms.rewards import hapo_length_reward

            h = self.hapo.lookup(prompt_ids)
            r = hapo_length_reward(lengths, c.bool(), h, self.cfg.hapo.weight)
            total = total + self.kinds["hapo"] * r
            metrics["hapo"] = float(r.mean())
            self.hapo.update(prompt_ids, lengths, c.bool())
            self.hapo.all_reduce_min(self.groups.dp_group)
        return total, correct, metrics

    def state_dict(self) -> dict:
        return {"hapo": self.hapo.min_length.tolist() if self.hapo is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.hapo is not None and state.get("hapo") is not None:
            self.hapo.load_state_dict({"min_length": torch.tensor(state["hapo"], dtype=torch.float64)})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
