"""megarl.ops.gae and megarl.ops.group_advantages: the references against hand-written loops, the
compiled kernels (CPU here, CUDA where present) against the references, outputs and gradients."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megarl import _ext, ops
from megarl.ops import advantages as adv_mod

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # both sides accumulate in fp32 and round once at the end: at most one bf16 ulp apart
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
GROUP_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def _require_kernel(op: str, device: str) -> None:
    assert _ext.has_kernel(op, device), (
        f"megarl._C has no {device} kernel for megarl::{op}: build the extension (tools/install); "
        "comparing the reference with itself would prove nothing"
    )


def _device_param(device: str):
    return pytest.param(device, marks=pytest.mark.gpu) if device == "cuda" else device


# ---------------------------------------------------------------------------------------------
# references against loops written out here


def _gae_loop(rewards, values, mask, gamma, lam):
    """verl's recursion on Python floats, one row at a time, advantage 0 where mask is 0."""
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        next_value, last, a_row = 0.0, 0.0, [0.0] * len(r_row)
        for t in reversed(range(len(r_row))):
            if m_row[t]:
                last = r_row[t] + gamma * next_value - v_row[t] + gamma * lam * last
                next_value = v_row[t]
                a_row[t] = last
        advantages.append(a_row)
        returns.append([a + v for a, v in zip(a_row, v_row)])
    return advantages, returns


def test_gae_reference_hand_values():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - v_t, the reward at the last token.
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.25, 0.75]], dtype=torch.float64)
    a, ret = ops.gae_reference(r, v, torch.ones_like(r, dtype=torch.bool), 1.0, 1.0)
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.75, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64))
    # a hole: t=1 is skipped, t=0 bootstraps from v_2 and A_2; lam = 0 leaves one-step TD errors
    m = torch.tensor([[True, False, True]])
    a, ret = ops.gae_reference(r, v, m, 0.5, 0.0)
    torch.testing.assert_close(a, torch.tensor([[0.0 + 0.5 * 0.75 - 0.5, 0.0, 1.0 - 0.75]], dtype=torch.float64))
    torch.testing.assert_close(ret, a + v)


def test_gae_reference_matches_python_loop():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 9, generator=g, dtype=torch.float64)
    v = torch.randn(3, 9, generator=g, dtype=torch.float64)
    m = torch.rand(3, 9, generator=g) > 0.35
    m[1] = False
    m[2, 0] = m[2, -1] = False
    a, ret = ops.gae_reference(r, v, m, 0.9, 0.8)
    a_loop, ret_loop = _gae_loop(r.tolist(), v.tolist(), m.tolist(), 0.9, 0.8)
    torch.testing.assert_close(a, torch.tensor(a_loop, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(ret_loop, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def _group_loop(scores, ids, mode, eps):
    members: dict[int, list[float]] = {}
    for s, i in zip(scores, ids):
        members.setdefault(i, []).append(s)
    d = [s - statistics.mean(members[i]) for s, i in zip(scores, ids)]
    sizes = [len(members[i]) for i in ids]
    out = []
    for s, i, di, n in zip(scores, ids, d, sizes):
        if n == 1:
            out.append(0.0)
        elif mode == "grpo":
            out.append(di / (statistics.stdev(members[i]) + eps))
        elif mode == "dr_grpo":
            out.append(di)
        elif mode == "rloo":
            out.append(s - (sum(members[i]) - s) / (n - 1))
        else:
            grouped = [x for x, m in zip(d, sizes) if m > 1]
            mu, var = statistics.mean(grouped), statistics.variance(grouped)
            out.append((di - mu) / math.sqrt(var + eps))
    return out


@pytest.mark.parametrize("mode", adv_mod.GROUP_MODES)
def test_group_reference_matches_python_loop(mode):
    scores = [1.0, 0.0, 0.5, 3.0, 2.0, 7.0, 1.0, 1.0, -2.0, 4.0]
    ids = [7, -3, 7, 10**12, -3, 42, 7, -3, 10**12, 5]  # 42 and 5 are groups of one
    got = ops.group_advantages_reference(
        torch.tensor(scores, dtype=torch.float64), torch.tensor(ids), mode, eps=1e-3
    )
    torch.testing.assert_close(got, torch.tensor(_group_loop(scores, ids, mode, 1e-3), dtype=torch.float64))
    assert got[5] == 0 and got[9] == 0


# ---------------------------------------------------------------------------------------------
# gae kernels against the reference


def _gae_inputs(B, T, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = torch.rand(B, T, generator=g) > 0.25  # holes everywhere
    if B > 1:
        m[0] = False  # a fully masked row
    if T > 2:
        m[-1, :2] = False  # leading padding
        m[-1, -1] = True
    to = dict(dtype=dtype, device=device)
    return r.to(**to), v.to(**to), m.to(device)


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 7), (5, 33), (3, 301)])
def test_gae_kernel_matches_reference(B, T, dtype, device):
    _require_kernel("gae", device)
    _require_kernel("gae_backward", device)
    r, v, m = _gae_inputs(B, T, dtype, device, seed=B * 1000 + T)
    gamma, lam = 0.99, 0.95
    r1, v1 = r.clone().requires_grad_(), v.clone().requires_grad_()
    r2, v2 = r.clone().requires_grad_(), v.clone().requires_grad_()
    a1, ret1 = ops.gae(r1, v1, m, gamma, lam)
    a2, ret2 = ops.gae_reference(r2, v2, m, gamma, lam)
    assert a1.dtype == ret1.dtype == dtype and a1.shape == (B, T)
    torch.testing.assert_close(a1, a2, **TOL[dtype])
    torch.testing.assert_close(ret1, ret2, **TOL[dtype])
    assert not a1[~m].any(), "masked positions must report advantage 0"

    g = torch.Generator().manual_seed(7)
    ga = torch.randn(B, T, generator=g).to(dtype=dtype, device=device)
    gr = torch.randn(B, T, generator=g).to(dtype=dtype, device=device)
    grads1 = torch.autograd.grad([a1, ret1], [r1, v1], [ga, gr])
    grads2 = torch.autograd.grad([a2, ret2], [r2, v2], [ga, gr])
    for x1, x2 in zip(grads1, grads2):
        assert x1.dtype == dtype
        torch.testing.assert_close(x1, x2, **TOL[dtype])


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
@pytest.mark.parametrize("used", ["advantages", "returns"])
def test_gae_gradient_through_one_output(used, device):
    _require_kernel("gae", device)
    r, v, m = _gae_inputs(4, 17, torch.float64, device, seed=3)
    results = []
    for fn in (ops.gae, ops.gae_reference):
        rr, vv = r.clone().requires_grad_(), v.clone().requires_grad_()
        a, ret = fn(rr, vv, m, 0.9, 0.7)
        out = a if used == "advantages" else ret
        (out * torch.arange(out.numel(), device=device).view_as(out)).sum().backward()
        results.append((rr.grad, vv.grad))
    for x1, x2 in zip(*results):
        torch.testing.assert_close(x1, x2, **TOL[torch.float64])


def test_gae_gradcheck_float64():
    _require_kernel("gae", "cpu")
    r, v, m = _gae_inputs(2, 6, torch.float64, "cpu", seed=11)
    torch.autograd.gradcheck(
        lambda r, v: ops.gae(r, v, m, 0.95, 0.9), (r.requires_grad_(), v.requires_grad_())
    )


def test_gae_mask_dtypes_and_noncontiguous():
    _require_kernel("gae", "cpu")
    r, v, m = _gae_inputs(6, 11, torch.float32, "cpu", seed=5)
    expected = ops.gae_reference(r, v, m, 0.9, 0.9)
    for mask in (m, m.to(torch.int64), m.to(torch.float32)):
        for got, want in zip(ops.gae(r, v, mask, 0.9, 0.9), expected):
            torch.testing.assert_close(got, want)
    # transposed views: the kernel must read the logical layout, not the storage
    rt, vt, mt = r.t().contiguous().t(), v.t().contiguous().t(), m.t().contiguous().t()
    assert not rt.is_contiguous()
    for got, want in zip(ops.gae(rt, vt, mt, 0.9, 0.9), expected):
        torch.testing.assert_close(got, want)


def test_gae_empty_batch():
    for shape in [(0, 5), (3, 0)]:
        r = torch.zeros(shape)
        a, ret = ops.gae(r, r, torch.ones(shape, dtype=torch.bool), 1.0, 1.0)
        assert a.shape == ret.shape == shape


# ---------------------------------------------------------------------------------------------
# group_advantages kernels against the reference


def _group_inputs(dtype, device, seed, n_groups=40):
    """Unequal groups (sizes 1..9, several of one), shuffled, ids from the whole int64 range."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 10, (n_groups,), generator=g)
    sizes[:5] = 1
    names = torch.randint(-(2**62), 2**62, (n_groups,), generator=g)
    names[:3] = torch.tensor([torch.iinfo(torch.int64).min, 0, -1])
    ids = torch.repeat_interleave(names, sizes)
    perm = torch.randperm(ids.numel(), generator=g)
    ids = ids[perm]
    scores = torch.randn(ids.numel(), generator=g, dtype=torch.float64)
    scores[::3] = (scores[::3] > 0).to(torch.float64)  # binary rewards as in RLVR, incl. ties
    return scores.to(dtype=dtype, device=device), ids.to(device)


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", adv_mod.GROUP_MODES)
def test_group_kernel_matches_reference(mode, dtype, device):
    _require_kernel("group_advantages", device)
    scores, ids = _group_inputs(dtype, device, seed=adv_mod.GROUP_MODES.index(mode))
    got = ops.group_advantages(scores, ids, mode)
    want = ops.group_advantages_reference(scores, ids, mode)
    assert got.dtype == dtype and got.shape == scores.shape and got.device == scores.device
    torch.testing.assert_close(got, want, **GROUP_TOL[dtype])
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
@pytest.mark.parametrize("mode", adv_mod.GROUP_MODES)
def test_group_singletons_and_ties(mode, device):
    _require_kernel("group_advantages", device)
    # a constant group, singletons (one of them infinite) and eps = 0: never NaN where defined
    scores = torch.tensor([1.0, 1.0, 1.0, 5.0, float("inf"), 2.0, 4.0], device=device, dtype=torch.float64)
    ids = torch.tensor([3, 3, 3, 9, 8, 1, 1], device=device)
    got = ops.group_advantages(scores, ids, mode, eps=0.0 if mode != "grpo" else 1e-6)
    assert torch.equal(got[3:5], torch.zeros(2, dtype=torch.float64, device=device))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ops.group_advantages_reference(scores, ids, mode, eps=0.0 if mode != "grpo" else 1e-6))
    only_singletons = ops.group_advantages(scores[3:5], ids[3:5], mode)
    assert torch.equal(only_singletons, torch.zeros(2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("mode", adv_mod.GROUP_MODES)
def test_group_permutation_equivariant_and_large(mode):
    _require_kernel("group_advantages", "cpu")
    g = torch.Generator().manual_seed(2)
    ids = torch.arange(600).repeat_interleave(8) * 7919 - 10**15  # 4800 responses, groups of 8
    scores = torch.randint(0, 2, (ids.numel(),), generator=g).to(torch.float32)
    perm = torch.randperm(ids.numel(), generator=g)
    base = ops.group_advantages(scores, ids, mode)
    torch.testing.assert_close(base, ops.group_advantages_reference(scores, ids, mode), **GROUP_TOL[torch.float32])
    torch.testing.assert_close(ops.group_advantages(scores[perm], ids[perm], mode), base[perm], rtol=0, atol=0)


def test_group_int32_ids_and_empty():
    _require_kernel("group_advantages", "cpu")
    scores, ids = _group_inputs(torch.float32, "cpu", seed=4)
    small = torch.unique(ids, return_inverse=True)[1].to(torch.int32)
    torch.testing.assert_close(ops.group_advantages(scores, small, "grpo"), ops.group_advantages(scores, ids, "grpo"))
    empty = ops.group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64), "rloo")
    assert empty.shape == (0,)


# ---------------------------------------------------------------------------------------------
# op registration, dispatch, errors


def test_opcheck():
    _require_kernel("gae", "cpu")
    r, v, m = _gae_inputs(3, 10, torch.float32, "cpu", seed=8)
    torch.library.opcheck(torch.ops.megarl.gae.default, (r.requires_grad_(), v.requires_grad_(), m, 0.99, 0.95))
    ga, gr = torch.randn(3, 10), torch.randn(3, 10)
    torch.library.opcheck(torch.ops.megarl.gae_backward.default, (ga, gr, m, 0.99, 0.95))
    scores, ids = _group_inputs(torch.float32, "cpu", seed=9)
    for mode in adv_mod.GROUP_MODES:
        torch.library.opcheck(torch.ops.megarl.group_advantages.default, (scores, ids, mode, 1e-6))


def test_dispatch_falls_back_without_kernel(monkeypatch):
    _require_kernel("gae", "cpu")
    calls = []
    for name in ("gae_reference", "group_advantages_reference"):
        original = getattr(adv_mod, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(adv_mod, name, spy)
    r, v, m = _gae_inputs(2, 5, torch.float32, "cpu", seed=10)
    scores, ids = _group_inputs(torch.float32, "cpu", seed=10)

    fused = ops.gae(r, v, m, 0.9, 0.9), ops.group_advantages(scores, ids, "grpo")
    assert calls == [], "with the extension built, the dispatch must not run the references"

    monkeypatch.setattr(_ext, "has_kernel", lambda op, device: False)
    r_grad = r.clone().requires_grad_()
    fallback = ops.gae(r_grad, v, m, 0.9, 0.9), ops.group_advantages(scores, ids, "grpo")
    assert calls == ["gae_reference", "group_advantages_reference"]
    assert fallback[0][0].grad_fn is not None  # autograd through the reference
    for x, y in zip([*fused[0], fused[1]], [*fallback[0], fallback[1]]):
        torch.testing.assert_close(x, y.detach())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rewards=torch.zeros(4)), "rewards must be 2-D"),
        (dict(rewards=torch.zeros(2, 3, dtype=torch.int64)), "rewards must be float"),
        (dict(values=torch.zeros(2, 4)), "values shape"),
        (dict(values=torch.zeros(2, 3, dtype=torch.float64)), "values dtype"),
        (dict(mask=torch.ones(3, 2, dtype=torch.bool)), "mask shape"),
        (dict(gamma=1.5), "gamma must be a number in"),
        (dict(lam="x"), "lam must be a number in"),
        (dict(values=[[0.0] * 3] * 2), "values must be a torch.Tensor"),
    ],
)
def test_gae_bad_input(kwargs, match):
    args = dict(rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), mask=torch.ones(2, 3, dtype=torch.bool),
                gamma=1.0, lam=0.95)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ops.gae(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scores=torch.zeros(2, 2)), "scores must be a 1-D float"),
        (dict(scores=torch.zeros(4, dtype=torch.int64)), "scores must be a 1-D float"),
        (dict(group_ids=torch.zeros(4)), "group_ids must be a 1-D integer"),
        (dict(group_ids=torch.zeros(3, dtype=torch.int64)), "group_ids has 3 elements"),
        (dict(mode="ppo"), "unknown mode 'ppo'"),
        (dict(eps=-1.0), "eps must be"),
        (dict(scores=torch.zeros(4, requires_grad=True)), "not differentiable"),
    ],
)
def test_group_bad_input(kwargs, match):
    args = dict(scores=torch.zeros(4), group_ids=torch.zeros(4, dtype=torch.int64), mode="grpo", eps=1e-6)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ops.group_advantages(**args)


def test_compiled_ops_raise_value_error():
    _require_kernel("gae", "cpu")
    with pytest.raises(ValueError, match="mask must be a bool"):
        torch.ops.megarl.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown mode 'x'"):
        torch.ops.megarl.group_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.int64), "x", 1e-6)
