"""logprob_entropy / logprob_entropy_from_hidden vs the torch reference (evaluated in float64),
outputs and gradients, the compiled ops through torch.library.opcheck, the torch fallback, and
input errors. Tensor-parallel checks: test_logprob_entropy_tp.py."""

import importlib
import math

import pytest
import torch

from megarl._ext import has_kernel
from megarl.ops import logprob_entropy, logprob_entropy_from_hidden, logprob_entropy_reference

# The module, not the function of the same name that megarl.ops re-exports.
lpe_module = importlib.import_module("megarl.ops.logprob_entropy")

NEG_INF = float("-inf")
# The kernel of each device is what these tests check (the fallback has its own test).
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not has_kernel("logprob_entropy_fwd", "cpu"), reason="no logprob_entropy CPU kernel"),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and has_kernel("logprob_entropy_fwd", "cuda")),
                reason="needs a CUDA device and the CUDA kernel of logprob_entropy",
            ),
        ],
    ),
]


def _reference_with_grads(logits, targets, temperature, g_lp, g_ent):
    """float64 reference outputs and d(sum(g_lp*lp + g_ent*ent))/dlogits, on the CPU."""
    x = logits.detach().cpu().double().requires_grad_(True)
    targets, g_lp, g_ent = targets.cpu(), g_lp.cpu(), g_ent.cpu()
    lp, ent = logprob_entropy_reference(x, targets, temperature)
    (grad,) = torch.autograd.grad((g_lp.double() * lp + g_ent.double() * ent).sum(), x)
    return lp.detach(), ent.detach(), grad


def _fused_with_grads(logits, targets, temperature, g_lp, g_ent, device="cpu"):
    x = logits.detach().to(device).requires_grad_(True)
    lp, ent = logprob_entropy(x, targets.to(device), temperature)
    (grad,) = torch.autograd.grad((g_lp.to(device) * lp + g_ent.to(device) * ent).sum(), x)
    return lp.detach().cpu(), ent.detach().cpu(), grad.cpu()


def _close(actual, expected, dtype, what):
    """float32 math for every input dtype: outputs to fp32 accuracy; grads to their dtype's."""
    if what == "grad" and dtype != torch.float32:
        rtol, atol = (1.6e-2, 1e-4) if dtype == torch.bfloat16 else (2e-3, 1e-5)
    else:
        rtol, atol = 2e-6, 2e-5
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, equal_nan=True, msg=what)


def _make_logits(num_rows, vocab, dtype, gen, scale=3.0):
    logits = torch.randn(num_rows, vocab, generator=gen) * scale
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    if vocab > 2:
        # masked vocabulary entries, a masked target, a row of very large logits, and a row
        # whose maximum sits in the last block (the online rescale across blocks)
        logits[torch.rand(num_rows, vocab, generator=gen) < 0.2] = NEG_INF
        logits[0, targets[0]] = NEG_INF
        if num_rows > 1:
            logits[1] *= 1e4 / logits[1][logits[1].isfinite()].abs().max()
        if num_rows > 2:
            logits[2] = torch.linspace(-20.0, 20.0, vocab)
    return logits.to(dtype), targets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (4, 1000), (3, 4099), (2, 9000)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(shape, dtype, temperature, device):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), temperature)) % 2**31)
    logits, targets = _make_logits(*shape, dtype, gen)
    g_lp, g_ent = torch.randn(shape[0], generator=gen), torch.randn(shape[0], generator=gen)
    lp, ent, grad = _fused_with_grads(logits, targets, temperature, g_lp, g_ent, device)
    ref_lp, ref_ent, ref_grad = _reference_with_grads(logits, targets, temperature, g_lp, g_ent)
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    assert not lp.isnan().any() and not ent.isnan().any() and not grad.isnan().any()
    _close(lp, ref_lp, dtype, "logprobs")
    _close(ent, ref_ent, dtype, "entropy")
    _close(grad, ref_grad, dtype, "grad")
    if shape[1] > 2:
        assert lp[0].item() == NEG_INF  # masked target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_misaligned_rows_and_one_output_used(device, dtype):
    """A view starting one element in: rows are not 16-byte aligned (and the gradient's rows
    align differently from the input's), which the CUDA kernels handle with a scalar head."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 300, generator=gen).to(dtype).to(device)
    logits, targets = wide[:, 1:258], torch.randint(0, 257, (5,), generator=gen)
    lp, ent = logprob_entropy(logits, targets.to(device), 1.3)
    ref_lp, ref_ent, _ = _reference_with_grads(logits, targets, 1.3, torch.zeros(5), torch.zeros(5))
    _close(lp.cpu(), ref_lp, dtype, "logprobs")
    _close(ent.cpu(), ref_ent, dtype, "entropy")
    x = wide.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(logprob_entropy(x[:, 1:258], targets.to(device))[1].sum(), x)
    _, _, ref_grad = _reference_with_grads(logits, targets, 1.0, torch.zeros(5), torch.ones(5))
    _close(grad[:, 1:258].cpu(), ref_grad, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_finfo_min_masking(device, dtype):
    """Logits masked with finfo.min instead of -inf: (x - max) / temperature overflows to -inf
    and rescale factors underflow to 0; no NaN may come of it."""
    gen = torch.Generator().manual_seed(9)
    low = torch.finfo(dtype).min
    logits = torch.randn(4, 9000, generator=gen)
    logits[0, :5000] = low  # the first CPU block (4096) is all finfo.min; the max comes later
    logits[1, torch.rand(9000, generator=gen) < 0.5] = low
    logits[2, 1:] = low
    logits[3, 4500:] = low  # and a shard of it at the end
    targets = torch.tensor([6000, 0, 0, 10])
    logits[1, 0] = 1.0
    g_lp, g_ent = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    logits = logits.to(dtype)
    lp, ent, grad = _fused_with_grads(logits, targets, 0.7, g_lp, g_ent, device)
    ref_lp, ref_ent, ref_grad = _reference_with_grads(logits, targets, 0.7, g_lp, g_ent)
    assert not (lp.isnan().any() or ent.isnan().any() or grad.isnan().any())
    _close(lp, ref_lp, dtype, "logprobs")
    _close(ent, ref_ent, dtype, "entropy")
    _close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_row_is_nan_like_the_reference(device):
    logits = torch.randn(3, 50, device=device)
    logits[1] = NEG_INF
    targets = torch.tensor([0, 1, 2], device=device)
    for fn in (logprob_entropy, logprob_entropy_reference):
        x = logits.clone().requires_grad_(True)
        lp, ent = fn(x, targets)
        (grad,) = torch.autograd.grad((lp + ent).sum(), x)
        assert lp[1].isnan() and ent[1].isnan() and grad[1].isnan().all(), fn.__name__
        assert lp[[0, 2]].isfinite().all() and grad[[0, 2]].isfinite().all(), fn.__name__


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_each_op(device):
    gen = torch.Generator().manual_seed(2)
    logits, targets = _make_logits(4, 300, torch.float32, gen)
    logits, targets = logits.to(device), targets.to(device)
    torch.library.opcheck(torch.ops.megarl.logprob_entropy_stats, (logits, targets, 0.7, 100))
    torch.library.opcheck(torch.ops.megarl.logprob_entropy_fwd, (logits.clone().requires_grad_(True), targets, 0.7))
    lp, ent, lse_stats = torch.ops.megarl.logprob_entropy_fwd(logits, targets, 0.7)
    grads = (torch.randn(4, generator=gen).to(device), torch.randn(4, generator=gen).to(device))
    torch.library.opcheck(
        torch.ops.megarl.logprob_entropy_bwd, (*grads, logits.bfloat16(), targets, lse_stats, ent, 0.7, 0)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab_start", [0, 150, 1000])
def test_stats_kernel_matches_torch_version(vocab_start, device):
    """The torch versions of the local pieces are what the TP and from-hidden paths fall back to."""
    gen = torch.Generator().manual_seed(vocab_start)
    logits, _ = _make_logits(6, 300, torch.float32, gen)
    logits[3, :] = NEG_INF
    targets = torch.randint(0, 1300, (6,), generator=gen)
    logits, targets = logits.to(device), targets.to(device)
    kernel = torch.ops.megarl.logprob_entropy_stats(logits, targets, 0.7, vocab_start)
    torch.testing.assert_close(kernel, lpe_module._stats_torch(logits, targets, 0.7, vocab_start), rtol=1e-5, atol=1e-5)
    lse_stats = torch.stack([kernel[:, 0], kernel[:, 1].log()], 1)
    grads = (torch.randn(6, generator=gen).to(device), torch.randn(6, generator=gen).to(device))
    args = (*grads, logits, targets, lse_stats, torch.rand(6).to(device))
    torch.testing.assert_close(
        torch.ops.megarl.logprob_entropy_bwd(*args, 0.7, vocab_start),
        lpe_module._grad_torch(*args, 0.7, vocab_start),
        rtol=1e-5,
        atol=1e-6,
        equal_nan=True,
    )


def test_fallback_without_kernel(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    logits, targets = _make_logits(5, 700, torch.float32, gen)
    g_lp, g_ent = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    monkeypatch.setattr(lpe_module, "has_kernel", lambda op, device: False)
    calls = []
    monkeypatch.setattr(lpe_module, "_stats_torch", lambda *a: calls.append(1) or _STATS_TORCH(*a))
    lp, ent, grad = _fused_with_grads(logits, targets, 0.9, g_lp, g_ent)
    ref_lp, ref_ent, ref_grad = _reference_with_grads(logits, targets, 0.9, g_lp, g_ent)
    for got, want, what in ((lp, ref_lp, "logprobs"), (ent, ref_ent, "entropy"), (grad, ref_grad, "grad")):
        _close(got, want, torch.float32, what)
    hidden, weight = torch.randn(7, 16, generator=gen), torch.randn(700, 16, generator=gen)
    _check_from_hidden(hidden, weight, targets.repeat(2)[:7], 0.9, chunk_size=3)
    assert calls, "from_hidden did not use the torch stats without the kernel"


_STATS_TORCH = lpe_module._stats_torch


def _check_from_hidden(hidden, weight, targets, temperature, chunk_size, device="cpu"):
    gen = torch.Generator().manual_seed(4)
    g_lp, g_ent = torch.randn(len(targets), generator=gen), torch.randn(len(targets), generator=gen)
    h, w = hidden.to(device).requires_grad_(True), weight.to(device).requires_grad_(True)
    lp, ent = logprob_entropy_from_hidden(h, w, targets.to(device), temperature, chunk_size=chunk_size)
    grads = torch.autograd.grad((g_lp.to(device) * lp + g_ent.to(device) * ent).sum(), (h, w))
    lp, ent, (grad_h, grad_w) = lp.cpu(), ent.cpu(), (g.cpu() for g in grads)
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_lp, ref_ent = logprob_entropy_reference(hr @ wr.t(), targets, temperature)
    ref_h, ref_w = torch.autograd.grad((g_lp.double() * ref_lp + g_ent.double() * ref_ent).sum(), (hr, wr))
    dtype = hidden.dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert grad_h.dtype == grad_w.dtype == dtype
    # bf16 inputs: the logits themselves are rounded to bf16 by the matmul, so outputs are
    # compared at bf16 accuracy too.
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)
    torch.testing.assert_close(grad_h.double(), ref_h, **tol)
    torch.testing.assert_close(grad_w.double(), ref_w, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_hidden_matches_reference(dtype, device):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(10, 32, generator=gen)
    weight = torch.randn(1001, 32, generator=gen) / 4
    targets = torch.randint(0, 1001, (10,), generator=gen)
    _check_from_hidden(hidden.to(dtype), weight.to(dtype), targets, 0.7, chunk_size=3, device=device)


def test_from_hidden_memory_is_per_chunk(monkeypatch):
    """No [T, V] tensor is ever created: every logits buffer has at most chunk_size rows."""
    gen = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(40, 8, generator=gen, requires_grad=True), torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (40,), generator=gen)
    seen = []
    real_stats, real_grad = lpe_module._stats, lpe_module._grad
    monkeypatch.setattr(lpe_module, "_stats", lambda x, *a: seen.append(x.shape[0]) or real_stats(x, *a))
    monkeypatch.setattr(lpe_module, "_grad", lambda g1, g2, x, *a: seen.append(x.shape[0]) or real_grad(g1, g2, x, *a))
    lp, ent = logprob_entropy_from_hidden(hidden, weight, targets, chunk_size=16)
    (lp + ent).sum().backward()
    assert seen == [16, 16, 8, 16, 16, 8]


def test_bad_input_names_the_argument():
    logits, targets = torch.randn(3, 10), torch.tensor([1, 2, 3])
    cases = [
        ((torch.randn(10), targets), "logits"),
        ((logits.double(), targets), "logits"),
        ((torch.randn(3, 0), targets), "logits"),
        ((logits, targets[:2]), "targets"),
        ((logits, targets.float()), "targets"),
        ((logits, torch.tensor([1, 2, 10])), "targets"),
        ((logits, torch.tensor([1, -1, 3])), "targets"),
        ((logits, targets, 0.0), "temperature"),
        ((logits, targets, -1.0), "temperature"),
        ((logits, targets, math.nan), "temperature"),
        ((logits, targets, "1"), "temperature"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            logprob_entropy(*args)
    hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    hidden_cases = [
        ((hidden[:, :3], weight, targets), {}, "weight"),
        ((hidden.double(), weight, targets), {}, "hidden"),
        ((hidden[0], weight, targets), {}, "hidden"),
        ((hidden, weight, torch.tensor([0, 0, 10])), {}, "targets"),
        ((hidden, weight, targets), {"chunk_size": 0}, "chunk_size"),
    ]
    for args, kwargs, name in hidden_cases:
        with pytest.raises(ValueError, match=name):
            logprob_entropy_from_hidden(*args, **kwargs)
