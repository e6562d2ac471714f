"""Policy, KL, entropy and value losses, and their reduction over the global batch.

Per-token functions return [B, T] tensors; ``aggregate`` turns one into the scalar this
micro-batch contributes, given the token and sequence counts of the WHOLE global batch (all
micro-batches of all data-parallel ranks). Because every mode divides by global counts only, the
sum of the micro-batch scalars over micro-batches and ranks is the loss of the global batch, so
gradients accumulated over micro-batches and summed across DP ranks are exact. (Megatron's DDP
averages gradients over DP ranks and its schedule divides by the number of micro-batches;
trainers undo those two factors, they do not change this math.)

Sign conventions: every loss here is minimised. The PPO term is -A * ratio (clipped); the KL
term is +coef * KL; the entropy coefficient is signed and enters as -entropy_coef * H, so
entropy_coef = +0.001 is an entropy BONUS (the 1-shot RLVR setting) and a negative value
penalises entropy. pg_coef scales the PPO term; pg_coef = 0 trains on the entropy term alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]

# exp() of a log-ratio beyond +-20 overflows float16/bfloat16 ranges and means a broken sample
# anyway; verl clamps at the same place.
_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class KLConfig:
    """KL to the reference policy.

    placement: "none"; "loss" adds coef * KL(kind) to the actor loss (verl: use_kl_loss);
        "reward" subtracts coef * KL(kind) from the token rewards before the advantages
        (verl: use_kl_in_reward), see apply_kl_penalty.
    kind: estimator k1, k2 or k3 (see kl_penalty).
    k3_clamp: k3 values are clamped to [-k3_clamp, k3_clamp] (verl's low_var_kl uses 10).
    """

    placement: Literal["none", "loss", "reward"] = "none"
    coef: float = 0.001
    kind: KLKind = "k3"
    k3_clamp: float = 10.0

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0, got {self.coef}")
        if not self.k3_clamp > 0:
            raise ValueError(f"k3_clamp must be > 0, got {self.k3_clamp}")


@dataclass(frozen=True)
class ActorLossConfig:
    """The actor objective: pg_coef * PPO-clip + kl.coef * KL - entropy_coef * entropy.

    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (asymmetric clip;
        DAPO's clip-higher uses clip_high = 0.28).
    dual_clip: None, or the dual-clip constant c > 1: for negative advantages the loss is capped
        at -c * A (verl applies c = 3.0 always; here it is opt-in).
    pg_coef: weight of the PPO term (0 = entropy-only ablation).
    entropy_coef: signed; +x adds an entropy bonus x * H (the loss decreases as entropy grows).
    agg_mode: how per-token losses become a scalar (see aggregate).
    max_response_len: the constant L_max of seq-mean-token-sum-norm (required for that mode).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    pg_coef: float = 1.0
    entropy_coef: float = 0.0
    kl: KLConfig = field(default_factory=KLConfig)
    agg_mode: AggMode = "token-mean"
    max_response_len: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or null to disable), got {self.dual_clip}")
        _check_sum_norm(self.agg_mode, self.max_response_len)


@dataclass(frozen=True)
class CriticLossConfig:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- value_clip) - R)^2).

    value_clip: None disables the clipped branch (plain 0.5 * (V - R)^2); verl's default is 0.5.
    """

    value_clip: float | None = 0.5
    agg_mode: AggMode = "token-mean"
    max_response_len: int | None = None

    def __post_init__(self) -> None:
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"value_clip must be > 0 (or null to disable), got {self.value_clip}")
        _check_sum_norm(self.agg_mode, self.max_response_len)


def _check_sum_norm(mode: str, max_response_len: int | None) -> None:
    if max_response_len is not None and max_response_len < 1:
        raise ValueError(f"max_response_len must be >= 1, got {max_response_len}")
    if mode == "seq-mean-token-sum-norm" and max_response_len is None:
        raise ValueError("agg_mode 'seq-mean-token-sum-norm' needs max_response_len (the constant L_max)")


# ----------------------------------------------------------------------------------------------
# aggregation


def count_tokens_and_seqs(masks: Iterable[torch.Tensor], process_group: Any = None) -> tuple[int, int]:
    """Global (num_tokens, num_seqs) of the response masks of all micro-batches on all ranks.

    masks: the [B_i, T_i] response masks of this rank's micro-batches. A sequence counts when it
    has at least one response token (all-padding rows contribute nothing to any mode).
    """
    local = None
    for mask in masks:
        m = mask.bool()
        part = torch.stack([m.sum(), m.any(dim=-1).sum()]).to(torch.int64)
        local = part if local is None else local + part
    if local is None:
        raise ValueError("count_tokens_and_seqs needs at least one response mask")
    if process_group is not None:
        # on the masks' device: an NCCL group cannot reduce CPU tensors
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    return int(local[0]), int(local[1])


def aggregate(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    mode: AggMode,
    global_num_tokens: int | float | torch.Tensor | None = None,
    global_num_seqs: int | float | torch.Tensor | None = None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the global-batch loss (a scalar). With n_i = tokens of row i,
    N = global_num_tokens, S = global_num_seqs, L = max_response_len, sums over masked entries:

        token-mean               sum_{i,t} l_it / N
        seq-mean-token-mean      sum_i (sum_t l_it / n_i) / S
        seq-mean-token-sum       sum_{i,t} l_it / S
        seq-mean-token-sum-norm  sum_{i,t} l_it / (S * L)       (Dr. GRPO's constant normaliser)

    Summing the results over all micro-batches and ranks gives the global-batch value.
    """
    if mode not in _AGG_MODES:
        raise ValueError(f"agg_mode must be one of {', '.join(_AGG_MODES)}, got {mode!r}")
    if loss_BT.shape != mask_BT.shape:
        raise ValueError(f"loss {tuple(loss_BT.shape)} and mask {tuple(mask_BT.shape)} must have the same shape")
    m = mask_BT.to(loss_BT.dtype)
    # where() rather than a product so inf/nan on padding cannot leak into the sum.
    masked = torch.where(mask_BT.bool(), loss_BT, torch.zeros_like(loss_BT))
    if mode == "token-mean":
        return masked.sum() / _positive("global_num_tokens", global_num_tokens)
    num_seqs = _positive("global_num_seqs", global_num_seqs)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp_min(1.0)
        return per_seq.sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / num_seqs
    return masked.sum() / (num_seqs * _positive("max_response_len", max_response_len))


_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _positive(name: str, value: Any) -> Any:
    if value is None:
        raise ValueError(f"{name} is required for this aggregation mode")
    if (value <= 0) if not isinstance(value, torch.Tensor) else bool((value <= 0).any()):
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# per-token terms


@dataclass(frozen=True)
class PolicyLossOutputs:
    """Per-token PPO-clip results, all [B, T].

    loss: the per-token loss to aggregate; ratio: pi/pi_old; clipped: the clip bound was the
    active (larger) term; dual_clipped: the dual-clip cap was active (negative advantages only);
    approx_kl: k3 estimate of KL(pi_old || pi), (ratio - 1) - log(ratio).
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    dual_clipped: torch.Tensor
    approx_kl: torch.Tensor


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> PolicyLossOutputs:
    """PPO-clip per token, with asymmetric clip range and optional dual clip.

        r = exp(logp - old_logp)                     (log-ratio clamped to [-20, 20])
        l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        l = min(l, -c A)   where A < 0 and dual_clip = c is set
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logp_BT - old_logp_BT).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages_BT * ratio
    clipped_term = -advantages_BT * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    if dual_clip is not None:
        cap = -advantages_BT * dual_clip
        negative = advantages_BT < 0
        dual_clipped = negative & (loss > cap)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    else:
        dual_clipped = torch.zeros_like(clipped)
    with torch.no_grad():
        approx_kl = (ratio - 1.0) - log_ratio
    return PolicyLossOutputs(
        loss=loss, ratio=ratio.detach(), clipped=clipped, dual_clipped=dual_clipped, approx_kl=approx_kl
    )


def kl_penalty(
    logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: KLKind = "k3", k3_clamp: float = 10.0
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

        k1 = logp - ref_logp
        k2 = 0.5 * (logp - ref_logp)^2
        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1, the log-ratio clamped to [-20, 20]
             and the result to [-k3_clamp, k3_clamp] (verl's low_var_kl)
    """
    if kind == "k1":
        return logp_BT - ref_logp_BT
    if kind == "k2":
        return 0.5 * (logp_BT - ref_logp_BT).square()
    if kind == "k3":
        log_ratio = (ref_logp_BT - logp_BT).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-k3_clamp, k3_clamp)
    raise ValueError(f"KL kind must be one of k1, k2, k3, got {kind!r}")


def apply_kl_penalty(
    token_rewards_BT: torch.Tensor,
    logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    coef: float,
    kind: KLKind = "k1",
    k3_clamp: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL as a reward penalty: (token_rewards - coef * KL * mask, KL * mask), both [B, T], no grad.

    logp is the rollout/actor log-prob of the sampled tokens (verl's old_log_prob); verl's default
    estimator for this placement is k1.
    """
    with torch.no_grad():
        kl = kl_penalty(logp_BT.detach(), ref_logp_BT.detach(), kind, k3_clamp)
        kl = torch.where(mask_BT.bool(), kl, torch.zeros_like(kl))
        return token_rewards_BT - coef * kl.to(token_rewards_BT.dtype), kl


def entropy_term(entropy_BT: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token loss contribution of the signed entropy coefficient: -coef * H.

    coef > 0 rewards entropy (bonus), coef < 0 penalises it.
    """
    return -coef * entropy_BT


def value_loss(
    values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor, value_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token (PPO / verl), and where the clipped branch was larger.

        l = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)
    Returns (loss [B, T], clipped [B, T] bool).
    """
    unclipped = (values_BT - returns_BT).square()
    if value_clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    v_clipped = torch.maximum(torch.minimum(values_BT, old_values_BT + value_clip), old_values_BT - value_clip)
    clipped_sq = (v_clipped - returns_BT).square()
    return 0.5 * torch.maximum(unclipped, clipped_sq), clipped_sq > unclipped


# ----------------------------------------------------------------------------------------------
# composed losses


@dataclass(frozen=True)
class LossOutputs:
    """loss: the scalar to backpropagate (this micro-batch's share of the global loss).
    metrics: detached scalars normalised by the same global counts, so summing them over
    micro-batches and DP ranks gives the global-batch value."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def compute_actor_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    cfg: ActorLossConfig,
    *,
    global_num_tokens: int | float | torch.Tensor,
    global_num_seqs: int | float | torch.Tensor,
    ref_logp_BT: torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
) -> LossOutputs:
    """pg_coef * agg(PPO-clip) + [kl in loss] kl.coef * agg(KL) - entropy_coef * agg(H).

    All terms use cfg.agg_mode with the same global counts; since aggregation is linear this is
    agg of the combined per-token loss. ref_logp is required when cfg.kl.placement == "loss",
    entropy (with its graph) when entropy_coef != 0.

    Metrics: pg_loss, kl_loss (KL in the loss), entropy, clip_frac, clip_frac_lower (dual clip),
    approx_kl, ratio_mean; pg_loss and kl_loss in cfg.agg_mode, the others token means.
    """
    if cfg.kl.placement == "loss" and ref_logp_BT is None:
        raise ValueError("kl.placement is 'loss' but no reference log-probs (ref_logp_BT) were given")
    if cfg.entropy_coef != 0.0 and entropy_BT is None:
        raise ValueError(f"entropy_coef is {cfg.entropy_coef} but no per-token entropy (entropy_BT) was given")
    mask = response_mask_BT

    def agg(x: torch.Tensor, mode: str = cfg.agg_mode) -> torch.Tensor:
        return aggregate(x, mask, mode, global_num_tokens, global_num_seqs, cfg.max_response_len)

    pg = policy_loss(logp_BT, old_logp_BT, advantages_BT, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    pg_loss = agg(pg.loss)
    loss = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    if cfg.pg_coef != 0.0:
        loss = loss + cfg.pg_coef * pg_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": agg(pg.clipped.to(logp_BT.dtype), "token-mean").detach(),
        "approx_kl": agg(pg.approx_kl, "token-mean").detach(),
        "ratio_mean": agg(pg.ratio, "token-mean").detach(),
    }
    if cfg.dual_clip is not None:
        metrics["clip_frac_lower"] = agg(pg.dual_clipped.to(logp_BT.dtype), "token-mean").detach()
    if cfg.kl.placement == "loss":
        kl_loss = agg(kl_penalty(logp_BT, ref_logp_BT, cfg.kl.kind, cfg.kl.k3_clamp))
        loss = loss + cfg.kl.coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    if entropy_BT is not None:
        if cfg.entropy_coef != 0.0:
            loss = loss + agg(entropy_term(entropy_BT, cfg.entropy_coef))
        metrics["entropy"] = agg(entropy_BT.detach(), "token-mean")
    return LossOutputs(loss=loss, metrics=metrics)


def compute_critic_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    cfg: CriticLossConfig,
    *,
    global_num_tokens: int | float | torch.Tensor,
    global_num_seqs: int | float | torch.Tensor,
) -> LossOutputs:
    """agg(clipped value loss); metrics vf_loss, vf_clip_frac (token mean)."""
    per_token, clipped = value_loss(values_BT, old_values_BT, returns_BT, cfg.value_clip)
    loss = aggregate(per_token, response_mask_BT, cfg.agg_mode, global_num_tokens, global_num_seqs, cfg.max_response_len)
    clip_frac = aggregate(clipped.to(values_BT.dtype), response_mask_BT, "token-mean", global_num_tokens)
    return LossOutputs(loss=loss, metrics={"vf_loss": loss.detach(), "vf_clip_frac": clip_frac.detach()})
