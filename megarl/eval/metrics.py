"""Evaluation metrics as pure functions over per-problem sample results.

Inputs are per problem, samples in generation order:
    correct[p][s]  bool, sample s of problem p was graded correct
    answers[p][s]  the extracted answer string or None (for maj@k)
    scores[p][s]   a reward-model score (for RM@k)
All functions return a fraction in [0, 1] averaged over problems (each problem weighs the same).

    accuracy(correct)            mean correctness of the first sample: greedy pass@1 when that
                                 sample was decoded greedily
    avg_at_k(correct, k)         mean correctness over the first k samples ("mean accuracy over
                                 k samples", the AIME/AMC convention of the 1-shot RLVR paper)
    pass_at_k(correct, k)        unbiased pass@k of Chen et al. 2021 from all n >= k samples:
                                 1 - C(n - c, k) / C(n, k), computed as a stable product
    maj_at_k(answers, correct, k, equiv)
                                 the most frequent answer among the first k (answers grouped by
                                 `equiv`; ties go to the answer that appeared first) is correct
    rm_at_k(scores, correct, k)  the first-k sample with the highest score is correct (best-of-k)
    macro_average(per_benchmark) unweighted mean over benchmarks of each metric they all have
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence


def _check(rows: Sequence[Sequence], k: int | None, name: str) -> None:
    if not rows:
        raise ValueError(f"{name}: no problems")
    if k is not None:
        if k < 1:
            raise ValueError(f"{name}: k must be >= 1, got {k}")
        short = [i for i, r in enumerate(rows) if len(r) < k]
        if short:
            raise ValueError(f"{name}: problem {short[0]} has {len(rows[short[0]])} samples, fewer than k={k}")


def accuracy(correct: Sequence[Sequence[bool]]) -> float:
    """Mean correctness of each problem's first sample."""
    _check(correct, 1, "accuracy")
    return sum(bool(c[0]) for c in correct) / len(correct)


def avg_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of the fraction correct among the first k samples."""
    _check(correct, k, "avg_at_k")
    return sum(sum(map(bool, c[:k])) / k for c in correct) / len(correct)


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k samples drawn without replacement from n is correct).

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms big binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k, each problem using all of its samples."""
    _check(correct, k, "pass_at_k")
    return sum(pass_at_k_single(len(c), sum(map(bool, c)), k) for c in correct) / len(correct)


def _normalized(a: str) -> str:
    return " ".join(a.split())


def majority_index(answers: Sequence[str | None], equiv: Callable[[str, str], bool] | None = None) -> int | None:
    """Index of the first member of the largest answer group (None answers do not vote).

    Groups are formed by comparing each answer with the first member of each existing group, so
    `equiv` is called O(k * groups) times. Default grouping: whitespace-normalised equality.
    """
    same = equiv or (lambda a, b: _normalized(a) == _normalized(b))
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if same(a, answers[g[0]]):
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    best = max(groups, key=len)  # max keeps the first of equal-sized groups: first seen wins
    return best[0]


def maj_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]],
    k: int,
    equiv: Callable[[str, str], bool] | None = None,
) -> float:
    """Fraction of problems whose majority answer among the first k samples is correct."""
    _check(answers, k, "maj_at_k")
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answer rows but {len(correct)} correctness rows")
    hits = 0
    for a, c in zip(answers, correct):
        i = majority_index(a[:k], equiv)
        hits += i is not None and bool(c[i])
    return hits / len(answers)


def rm_at_k(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]], k: int) -> float:
    """Fraction of problems whose highest-scored sample among the first k is correct."""
    _check(scores, k, "rm_at_k")
    if len(scores) != len(correct):
        raise ValueError(f"rm_at_k: {len(scores)} score rows but {len(correct)} correctness rows")
    hits = 0
    for s, c in zip(scores, correct):
        first_k = list(s[:k])
        best = first_k.index(max(first_k))  # ties: the earliest sample
        hits += bool(c[best])
    return hits / len(scores)


def macro_average(per_benchmark: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """For each metric that every benchmark reports, its unweighted mean over benchmarks."""
    if not per_benchmark:
        return {}
    rows = list(per_benchmark.values())
    common = [m for m in rows[0] if all(m in r for r in rows[1:])]
    return {m: sum(r[m] for r in rows) / len(rows) for m in common}
