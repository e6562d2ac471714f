"""Log-probability of the target token and entropy of softmax(logits / temperature), fused.

Per row t of logits [T, V] with z = logits / temperature and p = softmax(z):

    logprobs[t] = z[t, targets[t]] - logsumexp_j z[t, j]
    entropy[t]  = logsumexp_j z[t, j] - sum_j p[t, j] z[t, j]   ( = -sum_j p log p )

The fused kernels (csrc/logprob_entropy.cpp, csrc/cuda/logprob_entropy.cu) read the logits once
for both outputs (online max / sum-exp / sum p*z / target logit per row, fp32 math for fp32,
bf16 and fp16 logits) and once more in backward, writing dL/dlogits in the logits' dtype
without keeping a softmax: only per-row statistics are saved.

Under tensor parallelism (``tp_group``) each rank holds the contiguous vocabulary slice
[rank * V_local, (rank + 1) * V_local) and global target ids; each call makes one MAX and one
SUM all-reduce of per-row statistics and none in backward.

Conventions (the reference and the kernels agree on all of them):
  * a ``-inf`` logit is a masked vocabulary entry: probability 0, no contribution, no NaN;
    a ``-inf`` target logit gives logprob ``-inf`` (and a finite gradient);
  * a row whose logits are ALL ``-inf`` has no distribution: its logprob, entropy and gradient
    are NaN (what torch.log_softmax gives);
  * target ids out of [0, V_global) raise ValueError for CPU tensors (checked, cheap); on an
    accelerator a check would synchronise, so such rows get a NaN logprob instead.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from megarl._ext import extension_loaded, has_kernel

DEFAULT_CHUNK_SIZE = 1024
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# exp(-100) is 0 in float32; clamping there keeps 0 * (-inf) out of the sums (kernels agree).
_MIN_D = -100.0


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


class _GatherVocab(torch.autograd.Function):
    """All-gathers vocabulary shards [T, V_local] -> [T, V_global]; backward keeps this rank's
    slice (every rank computes the same loss from the gathered logits, as under TP)."""

    @staticmethod
    def forward(ctx, shard_TV, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        parts = [torch.empty_like(shard_TV) for _ in range(world)]
        dist.all_gather(parts, shard_TV.contiguous(), group=group)
        ctx.rank, ctx.v_local = dist.get_rank(group), shard_TV.shape[1]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad_TV):
        start = ctx.rank * ctx.v_local
        return grad_TV[:, start : start + ctx.v_local].contiguous(), None


def logprob_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive composition the fused op equals (differentiable with torch autograd).

        z = logits / temperature                       (float32 math; float64 for float64 input)
        logprobs = log_softmax(z).gather(-1, targets)
        entropy  = -(softmax(z) * log_softmax(z)).sum(-1)   (0 * log 0 counted as 0)

    Shapes: logits [T, V_local], targets [T] (global ids) -> logprobs [T], entropy [T].
    With ``tp_group`` the shards are all-gathered first (O(T x V_global) memory).
    """
    if tp_group is not None:
        logits = _GatherVocab.apply(logits, tp_group)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    # Masked (-inf) entries: softmax 0 times log_softmax -inf is NaN in the plain product.
    entropy = -(torch.softmax(z, dim=-1) * torch.where(torch.isneginf(logp), 0.0, logp)).sum(-1)
    return logprobs, entropy


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _tp_layout(tp_group) -> tuple[int, int]:
    """(rank, world size) of the tensor-parallel group; (0, 1) without one."""
    if tp_group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise ValueError(f"temperature: expected a positive real number, got {type(temperature).__name__}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
    return value


def _check_targets(targets, num_rows: int, device: torch.device, vocab_global: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != num_rows:
        raise ValueError(f"targets: expected shape [{num_rows}] (one id per row), got {list(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer dtype (token ids), got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets: expected device {device} (the logits' device), got {targets.device}")
    targets = targets.long()
    if device.type == "cpu" and num_rows > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab_global:
            raise ValueError(
                f"targets: ids must lie in [0, {vocab_global}) (the global vocabulary), got min {lo}, max {hi}"
            )
    return targets


def _check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name}: expected shape [T, V_local], got {list(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name}: the vocabulary dimension is empty (shape {list(logits.shape)})")
    if logits.dtype not in _KERNEL_DTYPES:
        raise ValueError(
            f"{name}: expected float32, bfloat16 or float16, got {logits.dtype} "
            "(logprob_entropy_reference accepts float64)"
        )


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int (rows per chunk), got {chunk_size!r}")
    return chunk_size


# --------------------------------------------------------------------------------------------
# Local pieces (kernel or torch), shared by the tensor-parallel and from-hidden paths
# --------------------------------------------------------------------------------------------


def _use_kernel(device: torch.device) -> bool:
    """The one dispatch decision: the compiled kernels when built for this device, torch otherwise."""
    return has_kernel("logprob_entropy_fwd", device)


def _stats_torch(logits, targets, temperature: float, vocab_start: int) -> torch.Tensor:
    """Torch version of megarl::logprob_entropy_stats: [T, 4] = (row max, s, w, zt), see the kernel."""
    x = logits.float()
    row_max = x.amax(dim=-1)
    finite = row_max != -math.inf
    d = ((x - row_max.unsqueeze(-1)) / temperature).clamp_min(_MIN_D)
    e = d.exp()
    s = torch.where(finite, e.sum(-1), 0.0)
    w = torch.where(finite, (e * d).sum(-1), 0.0)
    local = targets - vocab_start
    own = (local >= 0) & (local < x.shape[1])
    xt = x.gather(-1, local.clamp(0, x.shape[1] - 1).unsqueeze(-1)).squeeze(-1)
    zt = torch.where(finite, (xt - row_max) / temperature, -math.inf)
    return torch.stack([row_max, s, w, torch.where(own, zt, 0.0)], dim=1)


def _grad_torch(g_lp, g_ent, logits, targets, lse_stats, entropy, temperature: float, vocab_start: int):
    """Torch version of megarl::logprob_entropy_bwd (O(T x V) float32 temporaries)."""
    x = logits.float()
    row_max, log_s = lse_stats[:, 0:1], lse_stats[:, 1:2]
    d = ((x - row_max) / temperature - log_s).clamp_min(_MIN_D)
    p = d.exp()
    grad = p * ((-g_lp - g_ent * entropy).unsqueeze(-1) - g_ent.unsqueeze(-1) * d)
    local = targets - vocab_start
    own = (local >= 0) & (local < x.shape[1])
    rows = torch.nonzero(own).squeeze(-1)
    grad[rows, local[rows]] += g_lp[rows]
    return (grad / temperature).to(logits.dtype)


def _stats(logits, targets, temperature: float, vocab_start: int) -> torch.Tensor:
    if _use_kernel(logits.device):
        return torch.ops.megarl.logprob_entropy_stats(logits, targets, temperature, vocab_start)
    return _stats_torch(logits, targets, temperature, vocab_start)


def _grad(g_lp, g_ent, logits, targets, lse_stats, entropy, temperature: float, vocab_start: int):
    g_lp = g_lp.float().contiguous() if g_lp is not None else torch.zeros_like(entropy)
    g_ent = g_ent.float().contiguous() if g_ent is not None else torch.zeros_like(entropy)
    if _use_kernel(logits.device):
        return torch.ops.megarl.logprob_entropy_bwd(
            g_lp, g_ent, logits, targets, lse_stats, entropy, temperature, vocab_start
        )
    return _grad_torch(g_lp, g_ent, logits, targets, lse_stats, entropy, temperature, vocab_start)


def _combine(stats, targets, vocab_start: int, v_local: int, temperature: float, tp_group):
    """Merges per-shard stats [T, 4] into (logprobs, entropy, lse_stats [T, 2] = (max, log S)).

    Collectives (tp_group given): one MAX all-reduce of the row maxima, one SUM all-reduce of
    (s, w, zt) packed into one [T, 3] tensor, each rescaled to the global max first.
    """
    row_max, s, w, zt = stats.unbind(1)
    own = (targets >= vocab_start) & (targets < vocab_start + v_local)
    if tp_group is None:
        big_s, big_w, big_zt = s, w, torch.where(own, zt, math.nan)
        global_max = row_max
    else:
        import torch.distributed as dist

        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        c = (row_max - global_max) / temperature
        e = torch.exp(c)
        # A shard adds nothing when it is all -inf (s == 0) or far below the global max (e == 0,
        # e.g. a padded-vocab shard filled with finfo.min): c * s could be -inf, and 0 * -inf NaN.
        present = (s > 0) & (e > 0)
        packed = torch.stack(
            [
                torch.where(present, e * s, 0.0),
                torch.where(present, e * (w + c * s), 0.0),
                torch.where(own, zt + c, 0.0),
            ],
            dim=1,
        )
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        big_s, big_w, big_zt = packed.unbind(1)
        world = dist.get_world_size(tp_group)
        in_range = (targets >= 0) & (targets < v_local * world)
        big_zt = torch.where(in_range, big_zt, math.nan)
    log_s = torch.log(big_s)
    logprobs = big_zt - log_s
    entropy = log_s - big_w / big_s
    return logprobs, entropy, torch.stack([global_max, log_s], dim=1)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _register_op_autograd() -> None:
    """register_fake for the three ops and register_autograd for the unsharded forward."""
    if not extension_loaded() or not hasattr(torch.ops.megarl, "logprob_entropy_fwd"):
        return

    @torch.library.register_fake("megarl::logprob_entropy_stats")
    def _stats_fake(logits, targets, temperature, vocab_start):
        return logits.new_empty((logits.shape[0], 4), dtype=torch.float32)

    @torch.library.register_fake("megarl::logprob_entropy_fwd")
    def _fwd_fake(logits, targets, temperature):
        num_rows = logits.shape[0]
        return (
            logits.new_empty((num_rows,), dtype=torch.float32),
            logits.new_empty((num_rows,), dtype=torch.float32),
            logits.new_empty((num_rows, 2), dtype=torch.float32),
        )

    @torch.library.register_fake("megarl::logprob_entropy_bwd")
    def _bwd_fake(grad_logprobs, grad_entropy, logits, targets, lse_stats, entropy, temperature, vocab_start):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        logits, targets, temperature = inputs
        _, entropy, lse_stats = output
        ctx.save_for_backward(logits, targets, lse_stats, entropy)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(lse_stats)

    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse_stats):
        logits, targets, lse_stats, entropy = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = _grad(grad_logprobs, grad_entropy, logits, targets, lse_stats, entropy, ctx.temperature, 0)
        return grad, None, None

    torch.library.register_autograd("megarl::logprob_entropy_fwd", backward, setup_context=setup_context)


_register_op_autograd()


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Local stats kernel -> MAX, SUM all-reduce -> merge; backward is local (no collectives)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, tp_group):
        rank, _ = _tp_layout(tp_group)
        v_local = logits.shape[1]
        vocab_start = rank * v_local
        stats = _stats(logits, targets, temperature, vocab_start)
        logprobs, entropy, lse_stats = _combine(stats, targets, vocab_start, v_local, temperature, tp_group)
        ctx.save_for_backward(logits, targets, lse_stats, entropy)
        ctx.temperature, ctx.vocab_start = temperature, vocab_start
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, lse_stats, entropy = ctx.saved_tensors
        grad = _grad(grad_logprobs, grad_entropy, logits, targets, lse_stats, entropy, ctx.temperature, ctx.vocab_start)
        return grad, None, None, None


class _LogprobEntropyFromHidden(torch.autograd.Function):
    """Chunks of rows: logits = hidden_c @ weight.T live one chunk at a time, in backward too."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group, chunk_size):
        rank, _ = _tp_layout(tp_group)
        num_rows, v_local = hidden.shape[0], weight.shape[0]
        vocab_start = rank * v_local
        stats = hidden.new_empty((num_rows, 4), dtype=torch.float32)
        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            logits = hidden[start:end] @ weight.t()
            stats[start:end] = _stats(logits, targets[start:end], temperature, vocab_start)
            del logits
        logprobs, entropy, lse_stats = _combine(stats, targets, vocab_start, v_local, temperature, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse_stats, entropy)
        ctx.temperature, ctx.vocab_start, ctx.chunk_size = temperature, vocab_start, chunk_size
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse_stats, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in the weight's dtype over chunks (each chunk's matmul sums in fp32 on GPU).
        grad_weight = torch.zeros_like(weight) if need_weight else None
        num_rows = hidden.shape[0]
        g_lp = grad_logprobs if grad_logprobs is not None else torch.zeros_like(entropy)
        g_ent = grad_entropy if grad_entropy is not None else torch.zeros_like(entropy)
        for start in range(0, num_rows, ctx.chunk_size):
            end = min(start + ctx.chunk_size, num_rows)
            hidden_c = hidden[start:end]
            logits = hidden_c @ weight.t()
            grad_logits = _grad(
                g_lp[start:end],
                g_ent[start:end],
                logits,
                targets[start:end],
                lse_stats[start:end],
                entropy[start:end],
                ctx.temperature,
                ctx.vocab_start,
            )
            del logits
            if need_hidden:
                torch.matmul(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), hidden_c)
            del grad_logits
        return grad_hidden, grad_weight, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public dispatch points
# --------------------------------------------------------------------------------------------


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [T], entropy [T]) float32 of softmax(logits / temperature) at ``targets``.

    Args:
        logits: [T, V_local] float32/bfloat16/float16; with ``tp_group`` this rank's contiguous
            vocabulary slice [rank * V_local, (rank + 1) * V_local).
        targets: [T] integer token ids in the GLOBAL vocabulary.
        temperature: > 0; z = logits / temperature.
        tp_group: the tensor-parallel process group, or None (no communication).

    Equals ``logprob_entropy_reference`` (see the module docstring for -inf and range rules).
    Gradient flows to ``logits`` only (in its dtype); under TP each rank gets the gradient of
    its own slice, with no collective in backward.
    """
    _check_logits(logits)
    temperature = _check_temperature(temperature)
    _, world = _tp_layout(tp_group)
    targets = _check_targets(targets, logits.shape[0], logits.device, logits.shape[1] * world)
    if tp_group is not None:
        return _VocabParallelLogprobEntropy.apply(logits, targets, temperature, tp_group)
    if not _use_kernel(logits.device):
        return logprob_entropy_reference(logits, targets, temperature)
    logprobs, entropy, _ = torch.ops.megarl.logprob_entropy_fwd(logits, targets, temperature)
    return logprobs, entropy


def logprob_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprob_entropy(hidden @ weight.T, targets, ...)`` without materialising [T, V] logits.

    Args:
        hidden: [T, H] last hidden states (same dtype as ``weight``).
        weight: [V_local, H] output-layer (LM head) weight, this rank's vocabulary shard under TP.
        targets: [T] global token ids.
        chunk_size: rows per chunk; peak extra memory is about 2 x chunk_size x V_local
            elements of the weight's dtype (logits and their gradient, in backward).

    Returns (logprobs [T], entropy [T]) float32. Gradients:
        weight.grad: the exact gradient of this rank's shard.
        hidden.grad: this rank's PARTIAL gradient, sum_{j in shard} dL/dlogits[:, j] weight[j];
            the full gradient is its sum over the TP group, which the caller does, as megatron's
            ColumnParallelLinear does for its input (an all-reduce in backward). Without
            tp_group it is the full gradient.
    Backward recomputes each chunk's logits (one extra matmul per chunk).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden: expected a tensor of shape [T, H], got {getattr(hidden, 'shape', hidden)}")
    _check_logits(weight, name="weight")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"weight: expected shape [V_local, {hidden.shape[1]}] (H of hidden), got {list(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden: expected dtype {weight.dtype} (the weight's), got {hidden.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden: expected device {weight.device} (the weight's), got {hidden.device}")
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    _, world = _tp_layout(tp_group)
    targets = _check_targets(targets, hidden.shape[0], hidden.device, weight.shape[0] * world)
    return _LogprobEntropyFromHidden.apply(hidden, weight, targets, temperature, tp_group, chunk_size)
