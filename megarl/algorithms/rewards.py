"""Reward-shaping math (no grading here: the verifier and reward models live in megarl.rewards).

    format_reward(text, cfg)                         the answer format is present: 1.0 / 0.0
    qwen_math_shaping(rm_score, verifier, alpha)     sigmoid(alpha * r_m) + (r_v - 1)
    HapoHistory / hapo_length_reward                 HAPO history-aware length reward
    prm_clip / prm_delta / shape_prm_rewards         PRM step-reward refinements (Clip, Delta)
    step_rewards_to_token_rewards                    step rewards -> [B, T] at step ends

Formulas, their sources and the config keys are in docs/algorithms.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# format reward


@dataclass(frozen=True)
class FormatRewardConfig:
    """Whether a response states its final answer in the expected form.

    style:
        "boxed"      a non-empty \\boxed{...} (or \\fbox{...}) with balanced braces anywhere
        "answer_is"  the response ends with "The answer is X" (optionally "final answer",
                     optionally ":", an optional final "."), X non-empty, on that line, and
                     without a sentence end (". ") inside
        "either"     one of the two
    present, absent: the reward for each case.
    """

    style: Literal["boxed", "answer_is", "either"] = "boxed"
    present: float = 1.0
    absent: float = 0.0


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# X may hold "3.5" but not a sentence end (". "), so "The answer is 4. Let me check..." fails.
_ANSWER_IS_RE = re.compile(r"(?i)\bthe\s+(?:final\s+)?answer\s+is\s*:?[ \t]*((?:[^\n.]|\.(?!\s))*?)[ \t]*\.?\s*\Z")


def has_boxed_answer(text: str) -> bool:
    """True if some \\boxed{...} / \\fbox{...} closes its braces and holds non-blank content."""
    for match in _BOXED_RE.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    if text[start:i].strip():
                        return True
                    break
    return False


def has_answer_is(text: str) -> bool:
    """True if the text ends with "The answer is X[.]" with a non-empty X on that line."""
    match = _ANSWER_IS_RE.search(text)
    return bool(match and match.group(1).strip(" \t$."))


def format_reward(text: str, cfg: FormatRewardConfig = FormatRewardConfig()) -> float:
    """cfg.present if the response has the configured answer format, else cfg.absent."""
    if cfg.style == "boxed":
        ok = has_boxed_answer(text)
    elif cfg.style == "answer_is":
        ok = has_answer_is(text)
    else:
        ok = has_boxed_answer(text) or has_answer_is(text)
    return cfg.present if ok else cfg.absent


def format_rewards(texts: Sequence[str], cfg: FormatRewardConfig = FormatRewardConfig()) -> torch.Tensor:
    """[B] float32 format rewards of a batch of responses."""
    return torch.tensor([format_reward(t, cfg) for t in texts], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Qwen2.5-Math reward-model shaping


def qwen_math_shaping(rm_score_B: torch.Tensor, verifier_reward_B: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Qwen2.5-Math RL reward: r = sigmoid(alpha * r_m) + (r_v - 1), all [B].

    r_m is the reward model's raw score, r_v the verifier's reward in {0, 1}: a correct response
    gets a reward in (0, 1), an incorrect one in (-1, 0), so correctness dominates and the RM
    ranks responses within each class. (The Qwen2.5-Math report uses alpha = 0.5.)
    """
    if rm_score_B.shape != verifier_reward_B.shape:
        raise ValueError(
            f"rm_score {tuple(rm_score_B.shape)} and verifier_reward {tuple(verifier_reward_B.shape)} must match"
        )
    return torch.sigmoid(alpha * rm_score_B) + (verifier_reward_B.to(rm_score_B.dtype) - 1.0)


# ----------------------------------------------------------------------------------------------
# HAPO: history-aware length reward

# The correct-response floor keeps every correct response above every incorrect one once the
# correctness reward (1 vs 0) is added (HAPO, Huang et al. 2025).
HAPO_CORRECT_FLOOR = -0.7


@dataclass(frozen=True)
class HapoConfig:
    """weight: w in [0, 1], the scale of the length reward added to the correctness reward."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {self.weight}")


class HapoHistory:
    """Per-prompt minimum length of the correct responses seen so far (+inf: none yet).

    One float64 tensor indexed by prompt id (dataset index in [0, num_prompts)), on ``device``
    (a CUDA device when the DP group is NCCL, which cannot reduce CPU tensors). Each rank
    updates it with its own responses; all_reduce_min merges the ranks (min is idempotent, so
    reducing after every update keeps every rank equal to the global history).

    A training step uses it as HAPO's code does: rewards from the history of EARLIER steps, then
    the update with this step's correct responses, then the merge:

        h = history.lookup(prompt_ids)
        r = correct + hapo_length_reward(lengths, correct, h, weight)
        history.update(prompt_ids, lengths, correct); history.all_reduce_min(dp_group)
    """

    def __init__(self, num_prompts: int, device: torch.device | str = "cpu"):
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.min_length = torch.full((num_prompts,), math.inf, dtype=torch.float64, device=device)

    @property
    def num_prompts(self) -> int:
        return self.min_length.numel()

    def _check_ids(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must be a 1-D integer tensor, got {prompt_ids.dtype} {tuple(prompt_ids.shape)}")
        if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= self.num_prompts):
            raise ValueError(
                f"prompt_ids must be in [0, {self.num_prompts}), got values in "
                f"[{int(prompt_ids.min())}, {int(prompt_ids.max())}]"
            )
        return prompt_ids.to(self.min_length.device)

    def lookup(self, prompt_ids_B: torch.Tensor) -> torch.Tensor:
        """[B] float64 history minimum of each prompt (+inf where no correct response yet)."""
        return self.min_length[self._check_ids(prompt_ids_B)]

    def update(self, prompt_ids_B: torch.Tensor, lengths_B: torch.Tensor, correct_B: torch.Tensor) -> None:
        """Lowers each prompt's minimum to the shortest correct response of this batch."""
        ids = self._check_ids(prompt_ids_B)
        if lengths_B.shape != ids.shape or correct_B.shape != ids.shape:
            raise ValueError(
                f"prompt_ids {tuple(ids.shape)}, lengths {tuple(lengths_B.shape)} and correct "
                f"{tuple(correct_B.shape)} must all be [B]"
            )
        keep = correct_B.to(ids.device).bool()
        if keep.any():
            self.min_length.scatter_reduce_(
                0, ids[keep], lengths_B.to(self.min_length)[keep], reduce="amin", include_self=True
            )

    def all_reduce_min(self, group: Any = None) -> None:
        """Element-wise MIN over the ranks of ``group`` (explicit; None is the default group)."""
        dist.all_reduce(self.min_length, op=dist.ReduceOp.MIN, group=group)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"min_length": self.min_length.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"min_length"}:
            raise ValueError(f"HapoHistory state must have exactly the key 'min_length', got {sorted(state)}")
        value = state["min_length"]
        if tuple(value.shape) != (self.num_prompts,):
            raise ValueError(
                f"HapoHistory state 'min_length' has shape {tuple(value.shape)}, expected ({self.num_prompts},)"
            )
        self.min_length.copy_(value)


def hapo_length_reward(
    lengths_B: torch.Tensor, correct_B: torch.Tensor, history_min_B: torch.Tensor, weight: float = 1.0
) -> torch.Tensor:
    """HAPO cosine length reward, [B] float32.

        c = cos(pi/2 * L / h) if L < 2h else -1
        correct:   max(-0.7, c)        incorrect: min(0, c)
        no history (h = +inf or h <= 0): 0
        result * weight, weight in [0, 1]

    L: response length in tokens; h: the prompt's minimum correct length from earlier steps.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"HAPO weight must be in [0, 1], got {weight}")
    if not (lengths_B.shape == correct_B.shape == history_min_B.shape):
        raise ValueError(
            f"lengths {tuple(lengths_B.shape)}, correct {tuple(correct_B.shape)} and history_min "
            f"{tuple(history_min_B.shape)} must all be [B]"
        )
    length = lengths_B.to(torch.float64)
    h = history_min_B.to(torch.float64)
    known = torch.isfinite(h) & (h > 0)
    safe_h = torch.where(known, h, torch.ones_like(h))
    c = torch.where(length < 2 * safe_h, torch.cos(math.pi / 2 * length / safe_h), torch.full_like(length, -1.0))
    correct = correct_B.bool()
    r = torch.where(correct, c.clamp_min(HAPO_CORRECT_FLOOR), c.clamp_max(0.0))
    r = torch.where(known, r, torch.zeros_like(r))
    return (weight * r).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# PRM step rewards


@dataclass(frozen=True)
class PrmShapingConfig:
    """How process-reward-model step scores become rewards (Gao et al. 2024).

    refinement: "none"; "clip": min(r_k - eta, 0); "delta": r_k - r_{k+1}, last step r_K;
        "clip_delta": clip, then delta.
    eta: the clip threshold.
    """

    refinement: Literal["none", "clip", "delta", "clip_delta"] = "clip_delta"
    eta: float = 0.0


def _step_mask(step_rewards_BK: torch.Tensor, step_mask_BK: torch.Tensor | None) -> torch.Tensor:
    if step_rewards_BK.dim() != 2:
        raise ValueError(f"step_rewards must be [B, K], got shape {tuple(step_rewards_BK.shape)}")
    if step_mask_BK is None:
        return torch.ones_like(step_rewards_BK, dtype=torch.bool)
    if step_mask_BK.shape != step_rewards_BK.shape:
        raise ValueError(
            f"step_mask {tuple(step_mask_BK.shape)} must match step_rewards {tuple(step_rewards_BK.shape)}"
        )
    return step_mask_BK.bool()


def prm_clip(step_rewards_BK: torch.Tensor, eta: float, step_mask_BK: torch.Tensor | None = None) -> torch.Tensor:
    """Clip refinement: min(r_k - eta, 0) on real steps, 0 on padding. [B, K]."""
    mask = _step_mask(step_rewards_BK, step_mask_BK)
    clipped = (step_rewards_BK - eta).clamp_max(0.0)
    return torch.where(mask, clipped, torch.zeros_like(clipped))


def prm_delta(step_rewards_BK: torch.Tensor, step_mask_BK: torch.Tensor | None = None) -> torch.Tensor:
    """Delta refinement: d_k = r_k - r_{k+1} for k < K_i, d_{K_i} = r_{K_i}, 0 on padding. [B, K].

    The return from step k, sum_{j>=k} d_j, telescopes to r_k: a trajectory cannot gain reward
    by adding steps. step_mask must mark a prefix of each row (steps are contiguous from 0).
    """
    mask = _step_mask(step_rewards_BK, step_mask_BK)
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("step_mask must mark a prefix of each row (no real step after a padded one)")
    next_r = torch.zeros_like(step_rewards_BK)
    next_r[:, :-1] = step_rewards_BK[:, 1:]
    next_mask = torch.zeros_like(mask)
    next_mask[:, :-1] = mask[:, 1:]
    delta = torch.where(next_mask, step_rewards_BK - next_r, step_rewards_BK)
    return torch.where(mask, delta, torch.zeros_like(delta))


def shape_prm_rewards(
    step_rewards_BK: torch.Tensor, cfg: PrmShapingConfig, step_mask_BK: torch.Tensor | None = None
) -> torch.Tensor:
    """Applies cfg.refinement to [B, K] step rewards."""
    mask = _step_mask(step_rewards_BK, step_mask_BK)
    r = torch.where(mask, step_rewards_BK, torch.zeros_like(step_rewards_BK))
    if cfg.refinement in ("clip", "clip_delta"):
        r = prm_clip(r, cfg.eta, mask)
    if cfg.refinement in ("delta", "clip_delta"):
        r = prm_delta(r, mask)
    return r


def step_rewards_to_token_rewards(
    step_rewards_BK: torch.Tensor,
    step_end_BK: torch.Tensor,
    num_tokens: int,
    step_mask_BK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Places each step's reward on the response position of the step's last token. [B, T].

    step_end_BK: integer positions in [0, num_tokens) (response-relative) of each step's last
    token. Two steps ending on the same token add up.
    """
    mask = _step_mask(step_rewards_BK, step_mask_BK)
    if step_end_BK.shape != step_rewards_BK.shape or step_end_BK.dtype.is_floating_point:
        raise ValueError(
            f"step_end must be an integer tensor shaped like step_rewards {tuple(step_rewards_BK.shape)}, "
            f"got {step_end_BK.dtype} {tuple(step_end_BK.shape)}"
        )
    ends = torch.where(mask, step_end_BK.long(), torch.zeros_like(step_end_BK, dtype=torch.long))
    if mask.any() and (int(ends[mask].min()) < 0 or int(ends[mask].max()) >= num_tokens):
        raise ValueError(f"step_end positions must be in [0, {num_tokens}), got [{int(ends[mask].min())}, {int(ends[mask].max())}]")
    values = torch.where(mask, step_rewards_BK, torch.zeros_like(step_rewards_BK))
    out = torch.zeros(step_rewards_BK.shape[0], num_tokens, dtype=step_rewards_BK.dtype, device=step_rewards_BK.device)
    return out.scatter_add_(1, ends, values)
