"""Policy/KL/entropy/value losses and global-batch aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.algorithms import (
    ActorLossConfig,
    CriticLossConfig,
    KLConfig,
    aggregate,
    apply_kl_penalty,
    compute_actor_loss,
    compute_critic_loss,
    count_tokens_and_seqs,
    entropy_term,
    kl_penalty,
    policy_loss,
    value_loss,
)
from megarl.config import load_config

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def test_policy_loss_hand_values_asymmetric_and_dual_clip():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0]])
    ratio = torch.tensor([[1.5, 0.5, 1.5, 5.0, 1.3, 0.7]])
    logp = ratio.log().requires_grad_()
    old = torch.zeros_like(logp)

    out = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # max(-A r, -A clip(r, 0.8, 1.28))
    torch.testing.assert_close(out.loss.detach(), torch.tensor([[-1.28, -0.5, 1.5, 5.0, -1.28, 0.8]]))
    assert out.clipped.tolist() == [[True, False, False, False, True, True]]
    assert not out.dual_clipped.any()

    dual = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(dual.loss.detach(), torch.tensor([[-1.28, -0.5, 1.5, 3.0, -1.28, 0.8]]))
    assert dual.dual_clipped.tolist() == [[False, False, False, True, False, False]]

    # d loss / d logp = -A r where the unclipped term is active, 0 where a clip is active
    dual.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 1.5, 0.0, 0.0, 0.0]]))

    torch.testing.assert_close(out.approx_kl, ratio - 1 - ratio.log())
    torch.testing.assert_close(out.ratio, ratio)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, old, adv, dual_clip=1.0)


def test_policy_loss_matches_verl_style_formulation_on_random_data():
    g = torch.Generator().manual_seed(0)
    logp, old, adv = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    out = policy_loss(logp, old, adv, 0.2, 0.3, dual_clip=2.5)
    r = torch.exp(logp - old)
    pg1, pg2 = -adv * r, -adv * torch.clamp(r, 0.8, 1.3)
    clip1 = torch.maximum(pg1, pg2)
    expected = torch.where(adv < 0, torch.minimum(-adv * 2.5, clip1), clip1)
    torch.testing.assert_close(out.loss, expected)


def test_kl_estimators_hand_values_and_clamp():
    logp, ref = torch.tensor([-1.0, 0.0, -30.0]), torch.tensor([-2.0, -30.0, 0.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, 30.0, -30.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 450.0, 450.0]))
    # k3 = e^(ref-logp) - (ref-logp) - 1; log-ratio clamped to +-20, result to +-10
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-1.0), 10.0, 10.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3", k3_clamp=100.0)[1], torch.tensor(math.exp(-20.0) + 19.0))
    assert kl_penalty(logp, logp, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_apply_kl_penalty_in_reward():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, -0.5], [-1.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    new, kl = apply_kl_penalty(rewards, logp, ref, mask, coef=0.1, kind="k1")
    torch.testing.assert_close(kl, torch.tensor([[1.0, 0.0, -0.5], [0.5, 0.5, 0.0]]))
    torch.testing.assert_close(new, torch.tensor([[-0.1, 0.0, 1.05], [-0.05, 0.95, 0.0]]))
    assert not new.requires_grad


def test_entropy_term_sign_and_value_loss_hand_values():
    h = torch.tensor([2.0], requires_grad=True)
    bonus = entropy_term(h, 0.001)
    bonus.sum().backward()
    assert bonus.item() == pytest.approx(-0.002) and h.grad.item() == pytest.approx(-0.001)  # more entropy, lower loss

    v = torch.tensor([1.0, 0.6, 0.0])
    v_old = torch.tensor([0.5, 0.5, 0.5])
    ret = torch.tensor([2.0, 0.0, 0.1])
    loss, clipped = value_loss(v, v_old, ret, value_clip=0.2)
    # clip(V, V_old +- 0.2) = [0.7, 0.6, 0.3]
    torch.testing.assert_close(loss, 0.5 * torch.tensor([max(1.0, 1.69), 0.36, max(0.01, 0.04)]))
    assert clipped.tolist() == [True, False, True]
    plain, none_clipped = value_loss(v, v_old, ret, value_clip=None)
    torch.testing.assert_close(plain, 0.5 * (v - ret) ** 2)
    assert not none_clipped.any()


def test_aggregate_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "token-mean", 4, 2).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean", 4, 2).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum", 4, 2).item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", 4, 2, max_response_len=5).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError, match="global_num_seqs is required"):
        aggregate(loss, mask, "seq-mean-token-sum", 4)
    with pytest.raises(ValueError, match="max_response_len is required"):
        aggregate(loss, mask, "seq-mean-token-sum-norm", 4, 2)
    with pytest.raises(ValueError, match="global_num_tokens must be > 0"):
        aggregate(loss, mask, "token-mean", 0)
    with pytest.raises(ValueError, match="agg_mode must be one of"):
        aggregate(loss, mask, "seq-sum", 4, 2)  # type: ignore[arg-type]


def _random_batch(seed: int, num_B: int = 10, num_T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, num_T + 1, (num_B,), generator=g)
    lengths[3] = 0  # an empty response counts in no mode
    mask = (torch.arange(num_T)[None, :] < lengths[:, None]).float()
    return g, mask


def _split(tensors, bounds):
    """Micro-batches [lo, hi), each trimmed to its own longest response (as a packer would)."""
    mask = tensors[-1]
    for lo, hi in bounds:
        width = max(int(mask[lo:hi].sum(-1).max()), 1)
        yield [t[lo:hi, :width] for t in tensors]


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_sums_over_micro_batches_and_ranks_to_the_global_loss(mode):
    g, mask = _random_batch(1)
    loss = torch.randn(mask.shape, generator=g)
    num_tokens, num_seqs = count_tokens_and_seqs([mask])
    assert (num_tokens, num_seqs) == (int(mask.sum()), 9)
    # the global loss written directly over the whole batch
    rows = [loss[i, : int(mask[i].sum())] for i in range(mask.shape[0]) if mask[i].sum() > 0]
    expected = {
        "token-mean": torch.cat(rows).mean(),
        "seq-mean-token-mean": torch.stack([r.mean() for r in rows]).mean(),
        "seq-mean-token-sum": torch.stack([r.sum() for r in rows]).mean(),
        "seq-mean-token-sum-norm": torch.stack([r.sum() for r in rows]).mean() / 7,
    }[mode]
    whole = aggregate(loss, mask, mode, num_tokens, num_seqs, max_response_len=7)
    torch.testing.assert_close(whole, expected)
    # 2 fake DP ranks x uneven micro-batches; each micro-batch only knows the global counts
    ranks = [[(0, 2), (2, 5)], [(5, 6), (6, 10)]]
    assert count_tokens_and_seqs(m for rank in ranks for (m,) in _split([mask], rank)) == (num_tokens, num_seqs)
    total = sum(
        aggregate(lo, m, mode, num_tokens, num_seqs, max_response_len=7)
        for rank in ranks
        for lo, m in _split([loss, mask], rank)
    )
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize("mode", MODES)
def test_actor_loss_gradients_accumulate_over_micro_batches(mode):
    g, mask = _random_batch(2)
    theta = torch.randn(mask.shape, generator=g)  # stands in for the model: logp = theta
    old = theta + 0.1 * torch.randn(mask.shape, generator=g)
    ref = theta + 0.1 * torch.randn(mask.shape, generator=g)
    adv = torch.randn(mask.shape, generator=g)
    ent = torch.rand(mask.shape, generator=g) * 3
    cfg = ActorLossConfig(
        clip_low=0.2, clip_high=0.28, dual_clip=3.0, entropy_coef=0.001,
        kl=KLConfig(placement="loss", coef=0.05, kind="k3"), agg_mode=mode, max_response_len=7,
    )
    counts = dict(zip(("global_num_tokens", "global_num_seqs"), count_tokens_and_seqs([mask])))

    def run(bounds):
        logp = theta.clone().requires_grad_()
        entropy = ent * torch.exp(logp - theta)  # entropy with a graph back to the "model"
        total, metrics = 0.0, {}
        for lp, op, rp, a, h, m in _split([logp, old, ref, adv, entropy, mask], bounds):
            out = compute_actor_loss(lp, op, a, m, cfg, ref_logp_BT=rp, entropy_BT=h, **counts)
            out.loss.backward(retain_graph=True)
            total = total + out.loss.detach()
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
        return total, logp.grad, metrics

    full_loss, full_grad, full_metrics = run([(0, 10)])
    split_loss, split_grad, split_metrics = run([(0, 3), (3, 4), (4, 8), (8, 10)])
    torch.testing.assert_close(split_loss, full_loss)
    torch.testing.assert_close(split_grad, full_grad)
    assert set(full_metrics) == {"pg_loss", "kl_loss", "entropy", "clip_frac", "clip_frac_lower", "approx_kl", "ratio_mean"}
    for k in full_metrics:
        torch.testing.assert_close(split_metrics[k], full_metrics[k])
    # the scalar is the signed sum of its parts
    parts = full_metrics["pg_loss"] + 0.05 * full_metrics["kl_loss"]
    entropy_agg = aggregate(ent, mask, mode, max_response_len=7, **counts)
    torch.testing.assert_close(full_loss, parts - 0.001 * entropy_agg)


def test_entropy_only_ablation_and_required_inputs():
    mask = torch.ones(2, 3)
    logp = torch.zeros(2, 3, requires_grad=True)
    ent = torch.full((2, 3), 2.0, requires_grad=True)
    cfg = ActorLossConfig(pg_coef=0.0, entropy_coef=0.001)
    out = compute_actor_loss(
        logp, logp.detach(), torch.ones(2, 3), mask, cfg, global_num_tokens=6, global_num_seqs=2, entropy_BT=ent
    )
    assert out.loss.item() == pytest.approx(-0.002)
    out.loss.backward()
    assert logp.grad is None or logp.grad.abs().max() == 0  # no policy-gradient signal at all
    torch.testing.assert_close(ent.grad, torch.full((2, 3), -0.001 / 6))
    assert out.metrics["pg_loss"].item() == pytest.approx(-1.0)  # still reported
    with pytest.raises(ValueError, match="no per-token entropy"):
        compute_actor_loss(logp, logp, logp, mask, cfg, global_num_tokens=6, global_num_seqs=2)
    with pytest.raises(ValueError, match="kl.placement is 'loss' but no reference"):
        compute_actor_loss(
            logp, logp, logp, mask, ActorLossConfig(kl=KLConfig(placement="loss")), global_num_tokens=6, global_num_seqs=2
        )


def test_critic_loss_and_configs_from_yaml():
    v = torch.tensor([[1.0, 0.6, 0.0]], requires_grad=True)
    out = compute_critic_loss(
        v, torch.full((1, 3), 0.5), torch.tensor([[2.0, 0.0, 0.1]]), torch.tensor([[1, 1, 0]]),
        CriticLossConfig(value_clip=0.2), global_num_tokens=2, global_num_seqs=1,
    )
    assert out.loss.item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)
    assert out.metrics["vf_clip_frac"].item() == pytest.approx(0.5)

    cfg = load_config(ActorLossConfig, {"clip_high": 0.28, "entropy_coef": -0.001, "kl": {"placement": "reward", "kind": "k1"}})
    assert cfg.kl == KLConfig(placement="reward", coef=0.001, kind="k1") and cfg.entropy_coef == -0.001
    with pytest.raises(ValueError, match=r"unknown config key 'kl.coeff' \(did you mean 'coef'\?\)"):
        load_config(ActorLossConfig, {"kl": {"coeff": 0.1}})
    with pytest.raises(ValueError, match="config key 'agg_mode': agg_mode 'seq-mean-token-sum-norm' needs max_response_len"):
        load_config(ActorLossConfig, {"agg_mode": "seq-mean-token-sum-norm"})
    with pytest.raises(ValueError, match=r"config key 'dual_clip': dual_clip must be > 1"):
        load_config(ActorLossConfig, {"dual_clip": 0.5})
    with pytest.raises(ValueError, match=r"'agg_mode': expected one of .*did you mean 'token-mean'"):
        load_config(ActorLossConfig, {"agg_mode": "token_mean"})
