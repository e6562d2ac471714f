"""Pure functions reading head outputs (no megatron). Head modules inside megatron models are
tested in megatron_checks.py (single process) and the 4-rank parity launch."""

from __future__ import annotations

import pytest
import torch

from megarl.models.heads import (
    last_token_index,
    last_token_scores,
    prm_positive_probs,
    prm_step_scores,
    step_scores_list,
    values_from_output,
)


def test_last_token_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    scores = torch.arange(20.0).reshape(4, 5, 1)
    assert last_token_scores(scores, mask).tolist() == [2.0, 9.0, 14.0, 16.0]
    assert last_token_scores(scores.squeeze(-1), mask.bool()).tolist() == [2.0, 9.0, 14.0, 16.0]


def test_last_token_errors():
    with pytest.raises(ValueError, match="rows \\[1\\] have no tokens"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="differ"):
        last_token_scores(torch.zeros(2, 3, 1), torch.ones(2, 4))


def test_prm_step_scores_at_separators():
    sep = 7
    ids = torch.tensor([[1, 2, sep, 3, sep, 0], [4, sep, 5, 6, 0, 0]])
    logits = torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(0))
    probs, step_mask = prm_step_scores(logits, ids, sep)
    expect = torch.softmax(logits, -1)[..., 1]
    assert step_mask.tolist() == (ids == sep).tolist()
    assert torch.allclose(probs[step_mask], expect[ids == sep])
    assert (probs[~step_mask] == 0).all()
    steps = step_scores_list(probs, step_mask)
    assert [len(s) for s in steps] == [2, 1]
    assert torch.allclose(steps[0], expect[0, [2, 4]]) and torch.allclose(steps[1], expect[1, [1]])
    # Qwen2.5-Math-PRM reads P(positive) = softmax over the 2 classes, index 1
    assert torch.allclose(prm_positive_probs(torch.tensor([[[0.0, 0.0]]])), torch.tensor([[0.5]]))


def test_prm_and_value_shape_errors():
    with pytest.raises(ValueError, match="2 classes"):
        prm_positive_probs(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="do not match"):
        prm_step_scores(torch.zeros(1, 3, 2), torch.zeros(1, 4, dtype=torch.long), 7)
    assert values_from_output(torch.zeros(2, 3, 1)).shape == (2, 3)
    with pytest.raises(ValueError, match="\\[B, S, 1\\]"):
        values_from_output(torch.zeros(2, 3, 2))
