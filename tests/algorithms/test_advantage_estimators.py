"""Advantage estimators: registry, hand-computed values, a loop reference for GAE, input errors."""

from __future__ import annotations

import math

import pytest
import torch

from megarl import ops
from megarl.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    AdvantageInputs,
    compute_advantages,
    masked_whiten,
    scores_to_token_rewards,
)
from megarl.config import load_config


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE one row at a time over the response tokens only (padding skipped), float64."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, running = 0.0, 0.0
        for t in reversed(positions):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = float(values[b, t])
    return adv, (adv + values.double()) * mask.double()


def test_registry_holds_the_five_estimators_and_config_checks_the_name():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    with pytest.raises(ValueError, match=r"config key 'estimator': estimator must be one of .*got 'grp' \(did you mean 'grpo'\?\)"):
        load_config(AdvantageConfig, {"estimator": "grp"})
    with pytest.raises(ValueError, match="gamma must be in"):
        AdvantageConfig(gamma=1.5)
    assert load_config(AdvantageConfig, {"estimator": "gae", "lam": 0.95}).lam == 0.95


def test_group_estimators_hand_values_and_broadcast():
    # two groups of three; the scores come from token rewards (outcome reward on the last token)
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    group_ids = torch.tensor([7, 7, 7, 3, 3, 3])
    inputs = AdvantageInputs(response_mask=mask, token_rewards=scores_to_token_rewards(scores, mask), group_ids=group_ids)

    dr = compute_advantages(inputs, AdvantageConfig(estimator="dr_grpo"))
    expected_dr = torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, -1.0, 2.0])
    torch.testing.assert_close(dr.advantages, expected_dr[:, None] * mask, rtol=1e-6, atol=1e-6)
    assert dr.returns is None

    rloo = compute_advantages(inputs, AdvantageConfig(estimator="rloo"))
    expected_rloo = torch.tensor([1.0, -0.5, -0.5, -1.5, -1.5, 3.0])  # s_i - mean of the other two
    torch.testing.assert_close(rloo.advantages, expected_rloo[:, None] * mask, rtol=1e-6, atol=1e-6)

    grpo = compute_advantages(inputs, AdvantageConfig(estimator="grpo"))
    std0, std1 = torch.tensor([1.0, 0.0, 0.0]).std(), torch.tensor([2.0, 2.0, 5.0]).std()
    expected = torch.cat([expected_dr[:3] / (std0 + 1e-6), expected_dr[3:] / (std1 + 1e-6)])
    torch.testing.assert_close(grpo.advantages, expected[:, None] * mask, rtol=1e-5, atol=1e-6)

    # every estimator is the fused op's output broadcast over the response tokens
    for mode in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        out = compute_advantages(inputs, AdvantageConfig(estimator=mode, eps=1e-4))
        op = ops.group_advantages(scores, group_ids, mode, eps=1e-4)
        torch.testing.assert_close(out.advantages, op[:, None] * mask.to(op.dtype))
        assert torch.all(out.advantages[mask == 0] == 0)


def test_scores_and_token_rewards_inputs_agree():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    token_rewards = torch.tensor([[0.0, 0.5, 1.0, 9.0], [0.0, 0.0, 0.0, 9.0], [0.2, 0.0, 0.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    scores = torch.tensor([1.5, 0.0, 1.2, 0.0])  # masked sums: padding (the 9s) never counts
    group_ids = torch.tensor([0, 0, 1, 1])
    a = AdvantageInputs(response_mask=mask, token_rewards=token_rewards, group_ids=group_ids)
    b = AdvantageInputs(response_mask=mask, scores=scores, group_ids=group_ids)
    torch.testing.assert_close(a.sequence_scores(), scores)
    cfg = AdvantageConfig(estimator="dr_grpo")
    torch.testing.assert_close(compute_advantages(a, cfg).advantages, compute_advantages(b, cfg).advantages)
    placed = scores_to_token_rewards(scores, mask)
    torch.testing.assert_close(
        placed, torch.tensor([[0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.2], [0.0, 0.0, 0.0, 0.0]])
    )


def test_gae_hand_values_and_loop_reference():
    # gamma = lam = 1: A_t = (sum of future rewards) - V_t, returns = 1 everywhere
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    out = compute_advantages(
        AdvantageInputs(response_mask=mask, token_rewards=rewards, values=values),
        AdvantageConfig(estimator="gae", gae_whiten=False),
    )
    torch.testing.assert_close(out.advantages, torch.tensor([[0.5, 0.4, 0.3]]))
    torch.testing.assert_close(out.returns, torch.ones(1, 3))

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(5, 9, generator=g) > 0.25).float()
    mask[0, 4] = 0  # a hole in the middle of a response is skipped, not a reset
    rewards = torch.randn(5, 9, generator=g)
    values = torch.randn(5, 9, generator=g)
    inputs = AdvantageInputs(response_mask=mask, token_rewards=rewards, values=values)
    out = compute_advantages(inputs, AdvantageConfig(estimator="gae", gamma=0.9, lam=0.8, gae_whiten=False))
    ref_adv, ref_ret = gae_loop(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(out.advantages, ref_adv.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.returns * mask, ref_ret.float(), rtol=1e-5, atol=1e-5)

    whitened = compute_advantages(inputs, AdvantageConfig(estimator="gae", gamma=0.9, lam=0.8))
    sel = whitened.advantages[mask.bool()].double()
    assert abs(sel.mean().item()) < 1e-6 and sel.std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(whitened.advantages[mask == 0] == 0)
    torch.testing.assert_close(whitened.returns, out.returns)  # critic targets are never whitened


def test_masked_whiten_matches_hand_formula():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    y = masked_whiten(x, mask)
    # mean 2.5, unbiased var 5/3
    expected = (torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]]) - 2.5) / math.sqrt(5 / 3 + 1e-8) * mask
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="at least 2 response tokens"):
        masked_whiten(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


@pytest.mark.parametrize(
    "kwargs, estimator, pattern",
    [
        (dict(), "grpo", "exactly one of token_rewards"),
        (dict(scores=torch.zeros(2), token_rewards=torch.zeros(2, 3)), "grpo", "exactly one of token_rewards"),
        (dict(scores=torch.zeros(3)), "grpo", r"scores must be \[B\] = \[2\]"),
        (dict(token_rewards=torch.zeros(2, 4)), "grpo", "token_rewards must match response_mask"),
        (dict(scores=torch.zeros(2), values=torch.zeros(3, 3)), "gae", "values must match"),
        (dict(scores=torch.zeros(2), group_ids=torch.zeros(2)), "grpo", "group_ids must be an integer tensor"),
        (dict(scores=torch.zeros(2)), "grpo", r"'grpo' needs group_ids"),
        (dict(scores=torch.zeros(2)), "gae", r"'gae' needs values"),
    ],
)
def test_input_errors_name_the_field(kwargs, estimator, pattern):
    with pytest.raises(ValueError, match=pattern):
        inputs = AdvantageInputs(response_mask=torch.ones(2, 3), **kwargs)
        compute_advantages(inputs, AdvantageConfig(estimator=estimator))
