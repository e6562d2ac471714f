"""Benchmark cases for logprob_entropy and logprob_entropy_from_hidden (run by benchmarks/ops.py).

Every case is forward + backward with random upstream grads on both outputs unless its name
says "fwd". Baselines:
  * naive: logprob_entropy_reference (log_softmax, gather, softmax * log_softmax) under autograd;
  * materialised: hidden @ weight.T, then the naive composition;
  * megatron (GPU only): megatron-core's vocab_parallel_cross_entropy (TP group of one) plus a
    separate naive entropy pass.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Case  # noqa: E402


def _fwd_bwd(fn, leaves, g_lp, g_ent):
    """A closure running fn() -> (logprobs, entropy) and returning the grads of the leaves."""

    def run():
        lp, ent = fn()
        return torch.autograd.grad((g_lp * lp + g_ent * ent).sum(), leaves)

    return run


def _logits_case(device, num_rows, vocab, dtype, target, gen):
    from megarl.ops import logprob_entropy, logprob_entropy_reference

    logits = (torch.randn(num_rows, vocab, generator=gen, device=device) * 2).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen, device=device)
    g_lp, g_ent = torch.randn(num_rows, device=device), torch.randn(num_rows, device=device)
    return Case(
        op="logprob_entropy fwd+bwd",
        shape=f"[{num_rows}, {vocab}] {str(dtype).replace('torch.', '')}",
        baseline=_fwd_bwd(lambda: logprob_entropy_reference(logits, targets), [logits], g_lp, g_ent),
        megarl=_fwd_bwd(lambda: logprob_entropy(logits, targets), [logits], g_lp, g_ent),
        baseline_name="naive composition",
        target=target,
    )


def _hidden_case(device, num_rows, vocab, hidden_size, dtype, gen):
    from megarl.ops import logprob_entropy_from_hidden, logprob_entropy_reference

    hidden = torch.randn(num_rows, hidden_size, generator=gen, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=device) / hidden_size**0.5).to(dtype)
    weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen, device=device)
    g_lp, g_ent = torch.randn(num_rows, device=device), torch.randn(num_rows, device=device)
    leaves = [hidden, weight]
    return Case(
        op="logprob_entropy_from_hidden fwd+bwd",
        shape=f"T={num_rows} V={vocab} H={hidden_size} {str(dtype).replace('torch.', '')}",
        baseline=_fwd_bwd(lambda: logprob_entropy_reference(hidden @ weight.t(), targets), leaves, g_lp, g_ent),
        megarl=_fwd_bwd(lambda: logprob_entropy_from_hidden(hidden, weight, targets), leaves, g_lp, g_ent),
        baseline_name="materialised logits + naive",
        target="<=1/8 peak memory",
    )


def _megatron_tp1_cross_entropy():
    """megatron-core's vocab_parallel_cross_entropy with a tensor-parallel group of one."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if not dist.is_initialized():
        init_file = os.path.join(tempfile.mkdtemp(prefix="megarl_bench_"), "dist_init")
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    return vocab_parallel_cross_entropy


def _gpu_cases(device, quick, gen):
    from megarl.ops import logprob_entropy, logprob_entropy_reference

    num_rows, vocab = (512, 151936) if quick else (8192, 151936)
    logits = (torch.randn(num_rows, vocab, generator=gen, device=device) * 2).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen, device=device)
    shape = f"[{num_rows}, {vocab}] bfloat16"
    cases = [
        Case(
            op="logprob_entropy fwd",
            shape=shape,
            baseline=lambda: logprob_entropy_reference(logits, targets),
            megarl=lambda: logprob_entropy(logits, targets),
            baseline_name="naive composition",
            target="within 1.3x of one read at copy bandwidth",
            bytes_moved=logits.numel() * logits.element_size(),
        )
    ]
    try:
        cross_entropy = _megatron_tp1_cross_entropy()
    except ImportError as exc:
        print(f"ops_logprob: skipping the megatron case ({exc})", file=sys.stderr)
        return cases
    leaf = logits.clone().requires_grad_(True)
    g_lp, g_ent = torch.randn(num_rows, device=device), torch.randn(num_rows, device=device)

    def megatron_then_entropy():
        logprobs = -cross_entropy(leaf, targets)  # it upcasts bf16 to a float32 copy first
        z = leaf.float()
        entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        return logprobs, entropy

    cases.append(
        Case(
            op="logprob_entropy fwd+bwd",
            shape=shape,
            baseline=_fwd_bwd(megatron_then_entropy, [leaf], g_lp, g_ent),
            megarl=_fwd_bwd(lambda: logprob_entropy(leaf, targets), [leaf], g_lp, g_ent),
            baseline_name="megatron vocab_parallel_cross_entropy + entropy pass",
            target="faster, less memory",
        )
    )
    return cases


def cases(device: torch.device, quick: bool) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    if quick:
        out = [
            _logits_case(device, 64, 4099, torch.float32, ">=4x faster, <=1/4 peak extra memory", gen),
            _hidden_case(device, 128, 4099, 64, torch.float32, gen),
        ]
    else:
        out = [
            _logits_case(device, 4096, 32768, torch.float32, ">=4x faster, <=1/4 peak extra memory", gen),
            _hidden_case(device, 8192, 32768, 1024, torch.float32, gen),
        ]
    if device.type == "cuda":
        out += _gpu_cases(device, quick, gen)
    return out
