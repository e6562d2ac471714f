"""Reward-shaping math with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megarl.algorithms import (
    FormatRewardConfig,
    HapoConfig,
    HapoHistory,
    PrmShapingConfig,
    format_reward,
    format_rewards,
    hapo_length_reward,
    prm_clip,
    prm_delta,
    qwen_math_shaping,
    shape_prm_rewards,
    step_rewards_to_token_rewards,
)
from megarl.config import load_config


@pytest.mark.parametrize(
    "text, boxed, answer_is",
    [
        ("so x = 3, hence \\boxed{3}.", True, False),
        ("\\boxed{\\frac{1}{2}} and more text", True, False),
        ("\\boxed{ }", False, False),
        ("\\boxed{\\frac{1}{2}", False, False),  # unbalanced
        ("\\fbox{12.8}", True, False),
        ("12 + 30 = 42. The answer is 42.", False, True),
        ("The final answer is: $\\frac{4}{3}$", False, True),
        ("the answer is 7\n", False, True),
        ("The answer is 42. Let me double check: 6 * 7 = 42.", False, False),  # not at the end
        ("The answer is.", False, False),
        ("Therefore \\boxed{5}. The answer is 5.", True, True),
        ("I don't know", False, False),
    ],
)
def test_format_reward_styles(text, boxed, answer_is):
    assert format_reward(text, FormatRewardConfig(style="boxed")) == float(boxed)
    assert format_reward(text, FormatRewardConfig(style="answer_is")) == float(answer_is)
    assert format_reward(text, FormatRewardConfig(style="either", present=0.5, absent=-1.0)) == (
        0.5 if boxed or answer_is else -1.0
    )


def test_format_rewards_batch():
    out = format_rewards(["\\boxed{1}", "no"], FormatRewardConfig())
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0]


def test_qwen_math_shaping_hand_values():
    rm = torch.tensor([0.0, 0.0, 2.0, -40.0, 40.0])
    rv = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    out = qwen_math_shaping(rm, rv, alpha=0.5)
    sig1 = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5, sig1, 0.0, 0.0]), atol=1e-6, rtol=0)
    # every correct response outranks every incorrect one
    assert out[[0, 2, 3]].min() >= out[[1, 4]].max()
    with pytest.raises(ValueError, match="must match"):
        qwen_math_shaping(rm, rv[:2])


def test_hapo_length_reward_hand_values():
    h = torch.tensor([100.0] * 8 + [math.inf, math.inf])
    lengths = torch.tensor([50, 100, 150, 250, 50, 150, 300, 200, 10, 10])
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    r = hapo_length_reward(lengths, correct, h, weight=1.0)
    c = math.cos(math.pi / 4)
    expected = [c, 0.0, -0.7, -0.7, 0.0, -c, -1.0, -0.7, 0.0, 0.0]
    torch.testing.assert_close(r, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(hapo_length_reward(lengths, correct, h, weight=0.5), 0.5 * r)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        hapo_length_reward(lengths, correct, h, weight=1.5)
    with pytest.raises(ValueError, match=r"config key 'weight': weight must be in \[0, 1\]"):
        load_config(HapoConfig, {"weight": -0.1})


def test_hapo_history_update_lookup_state():
    hist = HapoHistory(num_prompts=4)
    ids = torch.tensor([2, 2, 2, 0, 3])
    assert torch.isinf(hist.lookup(ids)).all()
    hist.update(ids, torch.tensor([30, 20, 10, 7, 5]), torch.tensor([1, 1, 0, 1, 0]))
    assert hist.lookup(torch.tensor([0, 1, 2, 3])).tolist() == [7.0, math.inf, 20.0, math.inf]
    hist.update(torch.tensor([2, 2]), torch.tensor([25, 15]), torch.tensor([True, True]))
    assert hist.lookup(torch.tensor([2])).tolist() == [15.0]

    fresh = HapoHistory(num_prompts=4)
    fresh.load_state_dict(hist.state_dict())
    assert torch.equal(fresh.min_length, hist.min_length)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(4,\)"):
        fresh.load_state_dict({"min_length": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"prompt_ids must be in \[0, 4\)"):
        hist.lookup(torch.tensor([4]))
    with pytest.raises(ValueError, match="must all be"):
        hist.update(torch.tensor([1]), torch.tensor([1, 2]), torch.tensor([True]))


def test_prm_clip_and_delta_hand_values():
    r = torch.tensor([[0.9, 0.4, 0.7, 0.0], [0.2, 0.8, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(
        prm_clip(r, eta=0.5, step_mask_BK=mask), torch.tensor([[0.0, -0.1, 0.0, 0.0], [-0.3, 0.0, 0.0, 0.0]])
    )
    delta = prm_delta(r, mask)
    torch.testing.assert_close(delta, torch.tensor([[0.5, -0.3, 0.7, 0.0], [-0.6, 0.8, 0.0, 0.0]]))
    # the return from step k telescopes to r_k
    returns = delta.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(returns * mask, r * mask)

    clip_delta = shape_prm_rewards(r, PrmShapingConfig(refinement="clip_delta", eta=0.5), mask)
    torch.testing.assert_close(clip_delta, torch.tensor([[0.1, -0.1, 0.0, 0.0], [-0.3, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(shape_prm_rewards(r, PrmShapingConfig(refinement="none"), mask), r * mask)
    with pytest.raises(ValueError, match="prefix"):
        prm_delta(r, torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]]))


def test_step_rewards_to_token_rewards():
    steps = torch.tensor([[0.5, -0.25, 1.0], [2.0, 0.0, 0.0]])
    ends = torch.tensor([[1, 4, 4], [0, 99, 99]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = step_rewards_to_token_rewards(steps, ends, num_tokens=5, step_mask_BK=mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.75], [2.0, 0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"must be in \[0, 5\)"):
        step_rewards_to_token_rewards(steps, ends, num_tokens=5)
