"""Vocabulary-parallel logprob_entropy and logprob_entropy_from_hidden at TP=2 (gloo, CPU) vs the
unsharded float64 reference: outputs, gradients, and the collectives each call makes.

All checks run in ONE launch of two processes (each start costs seconds)."""

import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
T, V, H = 9, 2 * 1031, 24
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "barrier",
)


class _CountCollectives:
    """Counts torch.distributed collective calls made inside the with-block."""

    def __enter__(self):
        self.calls, self._saved = [], {}
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                real = getattr(dist, name)
                self._saved[name] = real
                setattr(dist, name, self._wrap(name, real))
        return self

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(T, V, generator=gen) * 3
    targets = torch.randint(0, V, (T,), generator=gen)
    half = V // 2
    logits[torch.rand(T, V, generator=gen) < 0.2] = float("-inf")
    logits[0, :half] = float("-inf")  # rank 0's shard of row 0 is fully masked...
    targets[0] = half + 5  # ...and the target lives on rank 1
    logits[1, targets[1]] = float("-inf")  # masked target
    logits[2] *= 1e4 / logits[2][logits[2].isfinite()].abs().max()  # very large logits
    targets[3] = 3  # a target on rank 0
    logits = logits.to(dtype)
    logits[4, :half] = torch.finfo(dtype).min  # rank 0's shard of row 4 far below rank 1's max
    targets[4] = half + 7
    g_lp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    return logits, targets, g_lp, g_ent


def _reference(logits, targets, temperature, g_lp, g_ent):
    from megarl.ops import logprob_entropy_reference

    x = logits.double().requires_grad_(True)
    lp, ent = logprob_entropy_reference(x, targets, temperature)
    (grad,) = torch.autograd.grad((g_lp.double() * lp + g_ent.double() * ent).sum(), x)
    return lp.detach(), ent.detach(), grad


def _check_logprob_entropy(fn, dtype, rank, temperature=0.7):
    logits, targets, g_lp, g_ent = _inputs(dtype)
    v_local = V // WORLD
    shard = logits[:, rank * v_local : (rank + 1) * v_local].clone().requires_grad_(True)
    with _CountCollectives() as fwd:
        lp, ent = fn(shard, targets, temperature, tp_group=dist.group.WORLD)
    with _CountCollectives() as bwd:
        (grad,) = torch.autograd.grad((g_lp * lp + g_ent * ent).sum(), shard)
    ref_lp, ref_ent, ref_grad = _reference(logits, targets, temperature, g_lp, g_ent)
    ref_grad = ref_grad[:, rank * v_local : (rank + 1) * v_local]
    torch.testing.assert_close(lp.double(), ref_lp, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=2e-6, atol=2e-5)
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, **grad_tol)
    assert grad.dtype == dtype and not grad.isnan().any()
    return fwd.calls, bwd.calls


def _check_from_hidden(dtype, rank, chunk_size):
    from megarl.ops import logprob_entropy_from_hidden

    gen = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(T, H, generator=gen), torch.randn(V, H, generator=gen) / 3
    targets = torch.randint(0, V, (T,), generator=gen)
    g_lp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    v_local = V // WORLD
    h = hidden.to(dtype).requires_grad_(True)
    w = weight[rank * v_local : (rank + 1) * v_local].to(dtype).requires_grad_(True)
    with _CountCollectives() as fwd:
        lp, ent = logprob_entropy_from_hidden(h, w, targets, 0.7, tp_group=dist.group.WORLD, chunk_size=chunk_size)
    with _CountCollectives() as bwd:
        grad_h, grad_w = torch.autograd.grad((g_lp * lp + g_ent * ent).sum(), (h, w))
    # The documented contract: hidden's grad is this rank's partial sum; the caller reduces it.
    grad_h = grad_h.float()
    dist.all_reduce(grad_h, group=dist.group.WORLD)
    hr, wr = hidden.to(dtype).double().requires_grad_(True), weight.to(dtype).double().requires_grad_(True)
    ref_lp, ref_ent, _ = _reference(hr.detach() @ wr.detach().t(), targets, 0.7, g_lp, g_ent)
    from megarl.ops import logprob_entropy_reference

    r_lp, r_ent = logprob_entropy_reference(hr @ wr.t(), targets, 0.7)
    ref_h, ref_w = torch.autograd.grad((g_lp.double() * r_lp + g_ent.double() * r_ent).sum(), (hr, wr))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)
    torch.testing.assert_close(grad_h.double(), ref_h, **tol)
    torch.testing.assert_close(grad_w.double(), ref_w[rank * v_local : (rank + 1) * v_local], **tol)
    return fwd.calls, bwd.calls


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from megarl.ops import logprob_entropy, logprob_entropy_reference

        lpe_module = importlib.import_module("megarl.ops.logprob_entropy")
        assert lpe_module._use_kernel(torch.device("cpu")), "the TP test needs the compiled CPU kernel"
        for dtype in (torch.float32, torch.bfloat16):
            fwd, bwd = _check_logprob_entropy(logprob_entropy, dtype, rank)
            assert fwd == ["all_reduce", "all_reduce"], fwd
            assert bwd == [], bwd
        # The reference itself, sharded: it gathers the shards (one collective).
        fwd, _ = _check_logprob_entropy(logprob_entropy_reference, torch.float32, rank)
        assert fwd == ["all_gather"], fwd
        for dtype in (torch.float32, torch.bfloat16):
            fwd, bwd = _check_from_hidden(dtype, rank, chunk_size=4)  # 3 chunks, still 2 collectives
            assert fwd == ["all_reduce", "all_reduce"], fwd
            assert bwd == [], bwd
        # Without the kernel the same collectives run around the torch versions of the pieces.
        lpe_module.has_kernel = lambda op, device: False
        fwd, _ = _check_logprob_entropy(logprob_entropy, torch.float32, rank)
        assert fwd == ["all_reduce", "all_reduce"], fwd
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_matches_unsharded(tmp_path):
    from megarl._ext import has_kernel

    if not has_kernel("logprob_entropy_fwd", "cpu"):
        pytest.skip("megarl._C without the logprob_entropy CPU kernel")
    init_file = os.path.join(tmp_path, "dist_init")
    mp.spawn(_worker, args=(init_file,), nprocs=WORLD, join=True)
