"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from megarl.eval.metrics import (
    accuracy,
    avg_at_k,
    macro_average,
    maj_at_k,
    majority_index,
    pass_at_k,
    pass_at_k_single,
    rm_at_k,
)

T, F = True, False


def test_accuracy_and_avg():
    correct = [[T, F, F, F], [F, T, T, T], [T, T, T, T]]
    assert accuracy(correct) == pytest.approx(2 / 3)
    # (1/4 + 3/4 + 4/4) / 3
    assert avg_at_k(correct, 4) == pytest.approx(2 / 3)
    # first two samples: (1/2 + 1/2 + 2/2) / 3
    assert avg_at_k(correct, 2) == pytest.approx(2 / 3)
    assert avg_at_k(correct, 1) == accuracy(correct)


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k_single(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k_single(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k_single(8, 0, 4) == 0.0
    assert pass_at_k_single(8, 5, 4) == 1.0  # n - c < k
    assert pass_at_k_single(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the mean
    # Matches the binomial form wherever both are finite, and stays finite for large n.
    for n, c, k in [(20, 3, 5), (100, 7, 10), (64, 1, 32)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k_single(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert 0 < pass_at_k_single(10_000, 1, 100) < 1
    correct = [[T, F, F, F], [F, F, F, F]]
    assert pass_at_k(correct, 2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="fewer than k"):
        pass_at_k(correct, 5)
    with pytest.raises(ValueError):
        pass_at_k_single(3, 4, 1)


def test_majority_vote():
    # Largest group wins; None does not vote; ties go to the answer seen first.
    assert majority_index(["1", "2", "2", None, None, None]) == 1
    assert majority_index(["3", "4", "4", "3"]) == 0
    assert majority_index([None, None]) is None
    assert majority_index(["1/2", "0.5", "2"], equiv=lambda a, b: eval(a) == eval(b)) == 0
    answers = [["5", "7", "7"], ["1", "2", "3"], [None, None, "9"], [None, None, None]]
    correct = [[T, F, F], [T, F, F], [F, F, T], [F, F, F]]
    # problem 0: majority 7 (wrong); 1: tie -> "1" (right); 2: "9" (right); 3: no answer
    assert maj_at_k(answers, correct, 3) == pytest.approx(2 / 4)
    # first sample only: 5 right, 1 right, None, None
    assert maj_at_k(answers, correct, 1) == pytest.approx(2 / 4)


def test_rm_at_k():
    scores = [[0.1, 0.9, 0.3], [2.0, 2.0, -1.0], [0.0, 0.5, 0.7]]
    correct = [[F, T, F], [F, T, T], [T, T, F]]
    # 0: best is sample 1 (right); 1: tie -> sample 0 (wrong); 2: sample 2 (wrong)
    assert rm_at_k(scores, correct, 3) == pytest.approx(1 / 3)
    # first two: 0 -> sample 1 right; 1 -> sample 0 wrong; 2 -> sample 1 right
    assert rm_at_k(scores, correct, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rows"):
        rm_at_k(scores, correct[:2], 2)


def test_macro_average_is_unweighted_over_benchmarks():
    per = {"a": {"pass@1": 0.5, "avg@8": 0.2}, "b": {"pass@1": 1.0}, "c": {"pass@1": 0.0, "maj@8": 1.0}}
    assert macro_average(per) == {"pass@1": pytest.approx(0.5)}
    assert macro_average({}) == {}
