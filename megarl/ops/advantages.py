"""Advantage estimators as fused ops: GAE (PPO with a critic) and group-relative advantages
(GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline).

Each op has a torch reference (``*_reference``, the equation in its docstring), a C++ CPU kernel
and a CUDA kernel in megarl._C (csrc/advantages.cpp, csrc/cuda/advantages.cu), and one dispatch
function (``gae``, ``group_advantages``) that runs the kernel when it is built for the input's
device and the reference otherwise. The fake (meta) kernels and GAE's autograd formula are
registered here, once the extension has loaded.
"""

from __future__ import annotations

import math

import torch

from megarl import _ext

__all__ = ["GROUP_MODES", "gae", "gae_reference", "group_advantages", "group_advantages_reference"]

GROUP_MODES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16/32-bit inputs, fp64 stays fp64 (at::opmath_type in the kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# GAE


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, a Python loop over t (torch reference of ``gae``).

    Shapes: rewards, values, mask [B, T]; advantages, returns [B, T] in the input dtype.

    Over t = T-1 .. 0, per row, with next_value = 0 and A = 0 before the last position::

        mask_t = 1:  delta_t = r_t + gamma * next_value - v_t
                     A = delta_t + gamma * lam * A          advantages_t = A
                     next_value = v_t
        mask_t = 0:  A and next_value carry through          advantages_t = 0
        returns_t = advantages_t + v_t

    so a masked position (e.g. a tool-output token inside a multi-turn response) is skipped: the
    valid position before it bootstraps from the next valid value and advantage. This is verl's
    ``compute_gae_advantage_return`` except that verl reports the carried advantage at masked
    positions (which its losses then mask out) and whitens; no whitening here. Accumulates in
    fp32 (fp64 for fp64 input); differentiable in rewards and values through autograd.
    """
    acc = _acc_dtype(rewards.dtype)
    r, v = rewards.to(acc), values.to(acc)
    valid = mask.to(torch.bool)
    B, T = r.shape
    next_value = r.new_zeros(B)
    last_adv = r.new_zeros(B)
    zero = r.new_zeros(())
    # unbind once: indexing r[:, t] in the loop would make the backward O(B * T^2)
    r_cols, v_cols, valid_cols = r.unbind(1), v.unbind(1), valid.unbind(1)
    columns = []
    for t in reversed(range(T)):
        delta = r_cols[t] + gamma * next_value - v_cols[t]
        adv_t = delta + gamma * lam * last_adv
        next_value = torch.where(valid_cols[t], v_cols[t], next_value)
        last_adv = torch.where(valid_cols[t], adv_t, last_adv)
        columns.append(torch.where(valid_cols[t], adv_t, zero))
    advantages = torch.stack(columns[::-1], dim=1) if columns else r.new_zeros(B, 0)
    returns = advantages + v
    return advantages.to(rewards.dtype), returns.to(rewards.dtype)


def _check_gae_inputs(rewards, values, mask, gamma, lam) -> None:
    for name, x in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"gae: {name} must be a torch.Tensor, got {type(x).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"gae: rewards must be 2-D [B, T], got shape {tuple(rewards.shape)}")
    if rewards.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"gae: rewards must be float16/bfloat16/float32/float64, got {rewards.dtype}")
    if values.shape != rewards.shape:
        raise ValueError(f"gae: values shape {tuple(values.shape)} does not match rewards shape {tuple(rewards.shape)}")
    if values.dtype != rewards.dtype:
        raise ValueError(f"gae: values dtype {values.dtype} does not match rewards dtype {rewards.dtype}")
    if mask.shape != rewards.shape:
        raise ValueError(f"gae: mask shape {tuple(mask.shape)} does not match rewards shape {tuple(rewards.shape)}")
    if mask.is_complex():
        raise ValueError(f"gae: mask must be bool or real numbers (nonzero = valid), got {mask.dtype}")
    if mask.requires_grad:
        raise ValueError("gae: mask must not require grad (it selects positions; detach it)")
    if not (values.device == rewards.device == mask.device):
        raise ValueError(
            f"gae: rewards ({rewards.device}), values ({values.device}) and mask ({mask.device}) "
            "must be on one device"
        )
    for name, x in (("gamma", gamma), ("lam", lam)):
        try:
            x = float(x)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"gae: {name} must be a number in [0, 1], got {x!r}") from None
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"gae: {name} must be a number in [0, 1], got {x}")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns; see ``gae_reference`` for the equation.

    Args:
        rewards: [B, T] token-level rewards, float16/bfloat16/float32/float64.
        values: [B, T] critic values, same dtype and device.
        mask: [B, T] bool (or numbers, nonzero = response token that takes part in the loss).
        gamma, lam: discount and GAE lambda, numbers in [0, 1].
    Returns:
        (advantages, returns), each [B, T] in the input dtype (fp32 accumulation). advantages is
        0 where mask is 0, returns = advantages + values. Differentiable in rewards and values;
        the fused backward runs the adjoint recursion forward in time.
    """
    _check_gae_inputs(rewards, values, mask, gamma, lam)
    if mask.dtype != torch.bool:
        mask = mask != 0
    gamma, lam = float(gamma), float(lam)
    if _ext.has_kernel("gae", rewards.device):
        advantages, returns = torch.ops.megarl.gae(rewards, values, mask, gamma, lam)
        return advantages, returns
    return gae_reference(rewards, values, mask, gamma, lam)


# ---------------------------------------------------------------------------------------------
# group-relative advantages


def group_advantages_reference(
    scores: torch.Tensor, group_ids: torch.Tensor, mode: str, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages, vectorised torch in fp64 (torch reference of ``group_advantages``).

    Shapes: scores [N] (one scalar reward per response), group_ids [N] int (responses to the same
    prompt share an id; any order, any values); result [N] in the scores dtype.

    For response i in group g with n_g members, mean_g and the unbiased std_g (torch.std)::

        grpo:          A_i = (r_i - mean_g) / (std_g + eps)
        dr_grpo:       A_i = r_i - mean_g
        rloo:          A_i = r_i - mean(r_j, j in g, j != i) = n_g / (n_g - 1) * (r_i - mean_g)
        reinforce_pp:  d_i = r_i - mean_g,  A_i = (d_i - mean(d)) / sqrt(var(d) + eps)

    where mean(d) and the unbiased var(d) run over every response of a group of two or more.
    A group of one has no baseline: its advantage is 0 in every mode (never NaN).
    """
    acc = torch.float64
    x = scores.to(acc)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    G = counts.numel()
    n = counts.to(acc)
    mean = torch.zeros(G, dtype=acc, device=x.device).index_add_(0, inverse, x) / n
    d = x - mean[inverse]
    n_i = n[inverse]
    grouped = n_i > 1
    if mode == "grpo":
        sq_dev = torch.zeros(G, dtype=acc, device=x.device).index_add_(0, inverse, d * d)
        std = (sq_dev / (n - 1).clamp(min=1)).sqrt()
        adv = d / (std[inverse] + eps)
    elif mode == "dr_grpo":
        adv = d
    elif mode == "rloo":
        adv = d * n_i / (n_i - 1).clamp(min=1)
    elif mode == "reinforce_pp":
        members = d[grouped]
        if members.numel() > 1:
            adv = (d - members.mean()) / (members.var() + eps).sqrt()
        else:
            adv = torch.zeros_like(d)
    else:
        raise ValueError(f"group_advantages: unknown mode {mode!r}, expected one of {', '.join(GROUP_MODES)}")
    adv = torch.where(grouped, adv, torch.zeros((), dtype=acc, device=x.device))
    return adv.to(scores.dtype)


def _check_group_inputs(scores, group_ids, mode, eps) -> None:
    if not isinstance(scores, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
        raise ValueError("group_advantages: scores and group_ids must be torch.Tensors")
    if scores.dim() != 1 or scores.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"group_advantages: scores must be a 1-D float tensor [N], got shape {tuple(scores.shape)} "
            f"dtype {scores.dtype}"
        )
    if scores.requires_grad:
        raise ValueError(
            "group_advantages: scores requires grad, but group advantages are not differentiable "
            "(scores are rewards, constants of the policy loss): pass scores.detach()"
        )
    if group_ids.dim() != 1 or group_ids.dtype.is_floating_point or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_advantages: group_ids must be a 1-D integer tensor [N], got shape {tuple(group_ids.shape)} "
            f"dtype {group_ids.dtype}"
        )
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_advantages: group_ids has {group_ids.numel()} elements, scores has {scores.numel()}")
    if group_ids.device != scores.device:
        raise ValueError(
            f"group_advantages: scores ({scores.device}) and group_ids ({group_ids.device}) must be on one device"
        )
    if mode not in GROUP_MODES:
        raise ValueError(f"group_advantages: unknown mode {mode!r}, expected one of {', '.join(GROUP_MODES)}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"group_advantages: eps must be a finite number >= 0, got {eps!r}")


def group_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mode: str, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages; see ``group_advantages_reference`` for the equations.

    Args:
        scores: [N] one reward per response, float16/bfloat16/float32/float64. Must not require
            grad: rewards are constants of the policy loss, the op has no backward.
        group_ids: [N] integer group (prompt) id per response; groups of any size in any order.
        mode: "grpo", "dr_grpo", "rloo" or "reinforce_pp".
        eps: added to the group std (grpo) or to the batch variance (reinforce_pp), as verl does.
    Returns:
        [N] advantages in the scores dtype (statistics accumulate in fp64); 0 for a group of one.
    """
    _check_group_inputs(scores, group_ids, mode, eps)
    if group_ids.dtype != torch.int64:
        group_ids = group_ids.to(torch.int64)
    if _ext.has_kernel("group_advantages", scores.device):
        return torch.ops.megarl.group_advantages(scores, group_ids, mode, float(eps))
    return group_advantages_reference(scores, group_ids, mode, eps)


# ---------------------------------------------------------------------------------------------
# fake kernels and autograd of the compiled ops


def _register() -> None:
    @torch.library.register_fake("megarl::gae")
    def _gae_fake(rewards, values, mask, gamma, lam):
        return torch.empty_like(rewards, memory_format=torch.contiguous_format), torch.empty_like(
            rewards, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake("megarl::gae_backward")
    def _gae_backward_fake(grad_advantages, grad_returns, mask, gamma, lam):
        return torch.empty_like(grad_advantages, memory_format=torch.contiguous_format), torch.empty_like(
            grad_advantages, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake("megarl::group_advantages")
    def _group_advantages_fake(scores, group_ids, mode, eps):
        return torch.empty_like(scores, memory_format=torch.contiguous_format)

    def _gae_setup_context(ctx, inputs, output):
        _, _, mask, gamma, lam = inputs
        ctx.save_for_backward(mask)
        ctx.gamma, ctx.lam = gamma, lam

    def _gae_backward(ctx, grad_advantages, grad_returns):
        (mask,) = ctx.saved_tensors
        if grad_advantages is None:
            grad_advantages = torch.zeros_like(grad_returns)
        if grad_returns is None:
            grad_returns = torch.zeros_like(grad_advantages)
        grad_rewards, grad_values = torch.ops.megarl.gae_backward(
            grad_advantages, grad_returns, mask, ctx.gamma, ctx.lam
        )
        return grad_rewards, grad_values, None, None, None

    torch.library.register_autograd("megarl::gae", _gae_backward, setup_context=_gae_setup_context)


if _ext.extension_loaded():
    _register()
