"""Advantage estimators: one registry, one signature, typed inputs and outputs.

    ADVANTAGE_ESTIMATORS[name](inputs: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs
    compute_advantages(inputs, cfg)   # looks cfg.estimator up in the registry

Estimators (formulas and the mapping to verl's names are in docs/algorithms.md):
    gae           PPO with a critic, GAE(gamma, lam) through megarl.ops.gae, then (cfg.gae_whiten)
                  whitened over all response tokens of the global batch
    grpo          (s - mean_g) / (std_g + eps)        through megarl.ops.group_advantages
    dr_grpo       s - mean_g                          (Dr. GRPO: no std division)
    rloo          s - mean of the other members of the group
    reinforce_pp  REINFORCE++ with a group-mean baseline (verl: reinforce_plus_plus_baseline)

Group estimators take one score per sequence (``scores``, or the masked sum of
``token_rewards``) and broadcast the per-sequence advantage over that sequence's response tokens.
A group of one sequence gets advantage 0. Every sequence of a group must be on the same rank:
group statistics are local; batch-wide statistics (GAE whitening, reinforce_pp) are all-reduced
over ``inputs.process_group``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from megarl import ops


@dataclass(frozen=True)
class AdvantageConfig:
    """Which estimator and its constants.

    estimator: a key of ADVANTAGE_ESTIMATORS.
    gamma, lam: discount and GAE lambda (gae only; verl's defaults, 1.0 and 1.0).
    eps: added to the group std before dividing (grpo, reinforce_pp).
    gae_whiten: whiten GAE advantages over all response tokens of the batch (mean 0, unbiased
        std 1), across the ranks of ``AdvantageInputs.process_group``. verl always does this;
        here it is explicit and on by default. The group estimators ignore it (reinforce_pp
        normalises by definition).
    """

    estimator: str = "grpo"
    gamma: float = 1.0
    lam: float = 1.0
    eps: float = 1e-6
    gae_whiten: bool = True

    def __post_init__(self) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            close = difflib.get_close_matches(self.estimator, list(ADVANTAGE_ESTIMATORS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(
                f"estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {self.estimator!r}{hint}"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if not self.eps > 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class AdvantageInputs:
    """What every estimator receives; each uses the fields it needs and checks they are there.

    Shapes (B sequences, T response positions):
        response_mask  [B, T]  1 (or True) on response tokens, 0 on padding
        token_rewards  [B, T]  per-token rewards (outcome reward on the last response token,
                               KL penalty on every token, PRM rewards at step ends...), or
        scores         [B]     one scalar per sequence; give exactly one of the two
        values         [B, T]  critic values V(s_t) (gae only)
        group_ids      [B]     integer id of each sequence's prompt group (group estimators)
    process_group: the data-parallel group whose ranks share the batch statistics of GAE
        whitening and of reinforce_pp's normalisation; None uses the local batch only.
    """

    response_mask: torch.Tensor
    token_rewards: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    values: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    process_group: Any = None

    def __post_init__(self) -> None:
        mask = self.response_mask
        if mask.dim() != 2:
            raise ValueError(f"response_mask must be [B, T], got shape {tuple(mask.shape)}")
        if (self.token_rewards is None) == (self.scores is None):
            raise ValueError("give exactly one of token_rewards [B, T] and scores [B]")
        if self.token_rewards is not None and self.token_rewards.shape != mask.shape:
            raise ValueError(
                f"token_rewards must match response_mask {tuple(mask.shape)}, got {tuple(self.token_rewards.shape)}"
            )
        if self.scores is not None and tuple(self.scores.shape) != (mask.shape[0],):
            raise ValueError(f"scores must be [B] = [{mask.shape[0]}], got {tuple(self.scores.shape)}")
        if self.values is not None and self.values.shape != mask.shape:
            raise ValueError(f"values must match response_mask {tuple(mask.shape)}, got {tuple(self.values.shape)}")
        if self.group_ids is not None:
            if tuple(self.group_ids.shape) != (mask.shape[0],):
                raise ValueError(f"group_ids must be [B] = [{mask.shape[0]}], got {tuple(self.group_ids.shape)}")
            if self.group_ids.dtype.is_floating_point or self.group_ids.dtype == torch.bool:
                raise ValueError(f"group_ids must be an integer tensor, got {self.group_ids.dtype}")

    def sequence_scores(self) -> torch.Tensor:
        """[B] the given scores, or the masked sum of token_rewards over each response."""
        if self.scores is not None:
            return self.scores
        return (self.token_rewards * self.response_mask.to(self.token_rewards.dtype)).sum(-1)

    def dense_token_rewards(self) -> torch.Tensor:
        """[B, T] the given token rewards, or each score placed on its sequence's last response token."""
        if self.token_rewards is not None:
            return self.token_rewards
        return scores_to_token_rewards(self.scores, self.response_mask)


@dataclass(frozen=True)
class AdvantageOutputs:
    """advantages [B, T] (zero on padding); returns [B, T] critic targets, or None without a critic."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None


AdvantageFn = Callable[[AdvantageInputs, AdvantageConfig], AdvantageOutputs]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Adds ``fn(inputs, cfg) -> AdvantageOutputs`` to ADVANTAGE_ESTIMATORS under ``name``."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        assert name not in ADVANTAGE_ESTIMATORS, f"advantage estimator {name!r} registered twice"
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def compute_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs:
    """Runs the estimator named by ``cfg.estimator``."""
    return ADVANTAGE_ESTIMATORS[cfg.estimator](inputs, cfg)


# ----------------------------------------------------------------------------------------------
# helpers


def scores_to_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] scores -> [B, T] rewards, each score on the last response token of its row.

    A row without response tokens gets no reward.
    """
    mask = response_mask.bool()
    num_T = mask.shape[1]
    positions = torch.arange(num_T, device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)  # [B], -1 if empty
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    has = last >= 0
    rewards[has.nonzero(as_tuple=True)[0], last[has]] = scores[has]
    return rewards


def masked_whiten(
    x_BT: torch.Tensor, mask_BT: torch.Tensor, process_group: Any = None, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of every rank in ``process_group``.

    var is the unbiased (Bessel-corrected) variance, as in verl's masked_whiten. The moments are
    accumulated in float64 and all-reduced, so the result equals whitening the concatenated batch.
    Returns zeros on masked-out entries.
    """
    m = mask_BT.to(torch.float64)
    x = x_BT.to(torch.float64)
    stats = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
    if process_group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
    total, total_sq, n = stats.unbind()
    if n.item() < 2:
        raise ValueError(f"whitening needs at least 2 response tokens in the batch, got {int(n.item())}")
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0.0) * n / (n - 1)
    return (((x - mean) * torch.rsqrt(var + eps)) * m).to(x_BT.dtype)


def _broadcast(adv_B: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return adv_B.unsqueeze(-1) * response_mask.to(adv_B.dtype)


def _reinforce_pp_across_ranks(scores_B, group_ids_B, eps: float, process_group: Any) -> torch.Tensor:
    """reinforce_pp whose batch normalisation spans every rank of ``process_group``.

    The fused op normalises over the local batch; here its group-mean step (the dr_grpo op) runs
    locally (groups never span ranks) and the mean/unbiased variance of the deviations are
    all-reduced, so each rank gets exactly its rows of the unsharded result.
    """
    d = ops.group_advantages(scores_B, group_ids_B, "dr_grpo").to(torch.float64)
    _, inverse, counts = torch.unique(group_ids_B, return_inverse=True, return_counts=True)
    grouped = (counts[inverse] > 1).to(torch.float64)  # a group of one has no baseline: advantage 0
    stats = torch.stack([(d * grouped).sum(), (d * d * grouped).sum(), grouped.sum()])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
    total, total_sq, n = stats.unbind()
    if n.item() < 2:
        return torch.zeros_like(scores_B)
    mean = total / n
    var = (total_sq - n * mean * mean).clamp_min(0.0) / (n - 1)
    return ((d - mean) / torch.sqrt(var + eps) * grouped).to(scores_B.dtype)


def _group_estimator(mode: str) -> AdvantageFn:
    def estimate(inputs: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs:
        if inputs.group_ids is None:
            raise ValueError(f"advantage estimator {cfg.estimator!r} needs group_ids [B]")
        with torch.no_grad():
            scores = inputs.sequence_scores().detach()
            if mode == "reinforce_pp" and inputs.process_group is not None:
                adv_B = _reinforce_pp_across_ranks(scores, inputs.group_ids, cfg.eps, inputs.process_group)
            else:
                adv_B = ops.group_advantages(scores, inputs.group_ids, mode, eps=cfg.eps)
        return AdvantageOutputs(advantages=_broadcast(adv_B, inputs.response_mask), returns=None)

    estimate.__name__ = f"{mode}_advantages"
    estimate.__doc__ = f"Group estimator {mode!r}: megarl.ops.group_advantages(scores, group_ids, {mode!r})."
    return estimate


for _mode in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
    register_advantage_estimator(_mode)(_group_estimator(_mode))


@register_advantage_estimator("gae")
def gae_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs:
    """GAE over response tokens; returns = unwhitened advantages + values (the critic's targets).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, where t+1 is the
    next response token (padding is skipped) and V after the last response token is 0.
    """
    if inputs.values is None:
        raise ValueError("advantage estimator 'gae' needs values [B, T] from a critic")
    mask = inputs.response_mask
    dtype = torch.promote_types(inputs.dense_token_rewards().dtype, inputs.values.dtype)
    rewards = inputs.dense_token_rewards().detach().to(dtype)
    values = inputs.values.detach().to(dtype)
    with torch.no_grad():
        advantages, returns = ops.gae(rewards, values, mask.detach(), cfg.gamma, cfg.lam)
        if cfg.gae_whiten:
            advantages = masked_whiten(advantages, mask, inputs.process_group)
        else:
            advantages = advantages * mask.to(advantages.dtype)
    return AdvantageOutputs(advantages=advantages, returns=returns)
