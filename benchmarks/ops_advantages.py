"""Benchmark cases for gae and group_advantages (run by benchmarks/ops.py).

Baselines are the way RL libraries compute these today:
  * gae: a Python loop over t on [B] torch tensors (verl's compute_gae_advantage_return,
    OpenRLHF's and TRL's get_advantages_and_returns have this shape), masked as verl masks;
  * group_advantages: verl's GRPO estimator style (a Python dict of per-group score lists, a
    torch mean/std per group, a Python loop writing each advantage), and a vectorised torch
    version (torch.unique + scatter_add) as the strongest pure-torch baseline.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Case  # noqa: E402


def gae_python_loop(rewards, values, mask, gamma, lam):
    """Backward loop over t, mask blended in by multiplication (the verl formulation)."""
    with torch.no_grad():
        m = mask.to(rewards.dtype)
        next_values = torch.zeros_like(rewards[:, 0])
        last = torch.zeros_like(rewards[:, 0])
        reversed_advantages = []
        for t in reversed(range(rewards.shape[1])):
            delta = rewards[:, t] + gamma * next_values - values[:, t]
            candidate = delta + gamma * lam * last
            next_values = values[:, t] * m[:, t] + (1 - m[:, t]) * next_values
            last = candidate * m[:, t] + (1 - m[:, t]) * last
            reversed_advantages.append(last * m[:, t])
        advantages = torch.stack(reversed_advantages[::-1], dim=1)
        return advantages, advantages + values


def grpo_per_group_loop(scores, index, eps=1e-6):
    """GRPO advantages the verl way: group lists in a dict, per-group torch stats, per-item loop."""
    scores = scores.clone()
    by_group = defaultdict(list)
    mean, std = {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            by_group[index[i]].append(scores[i])
        for gid, members in by_group.items():
            if len(members) == 1:
                mean[gid], std[gid] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                stacked = torch.stack(members)
                mean[gid], std[gid] = stacked.mean(), stacked.std()
        for i in range(scores.shape[0]):
            scores[i] = (scores[i] - mean[index[i]]) / (std[index[i]] + eps)
    return scores


def grpo_scatter(scores, group_ids, eps=1e-6):
    """GRPO advantages, vectorised torch: unique ids, scatter-add sums, gather back."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(scores.dtype)
    mean = torch.zeros_like(n).scatter_add_(0, inverse, scores) / n
    d = scores - mean[inverse]
    var = torch.zeros_like(n).scatter_add_(0, inverse, d * d) / (n - 1).clamp(min=1)
    adv = d / (var.sqrt()[inverse] + eps)
    return torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))


def _gae_cases(device, B, T, gen):
    from megarl.ops import gae, gae_reference

    rewards = torch.randn(B, T, generator=gen, device=device) * 0.1
    values = torch.randn(B, T, generator=gen, device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # right padding
    gamma, lam = 1.0, 0.95
    shape = f"B={B} T={T} float32"
    bytes_moved = B * T * (4 + 4 + 1 + 4 + 4)  # read r, v, mask; write advantages, returns

    r_leaf, v_leaf = rewards.clone().requires_grad_(True), values.clone().requires_grad_(True)
    g_adv, g_ret = torch.randn(B, T, generator=gen, device=device), torch.randn(B, T, generator=gen, device=device)

    def fwd_bwd(fn):
        def run():
            adv, ret = fn(r_leaf, v_leaf, mask, gamma, lam)
            return torch.autograd.grad([adv, ret], [r_leaf, v_leaf], [g_adv, g_ret])

        return run

    return [
        Case(
            op="gae fwd",
            shape=shape,
            baseline=lambda: gae_python_loop(rewards, values, mask, gamma, lam),
            megarl=lambda: gae(rewards, values, mask, gamma, lam),
            baseline_name="Python loop over t (verl)",
            target=">=100x",
            bytes_moved=bytes_moved,
        ),
        Case(
            op="gae fwd+bwd",
            shape=shape,
            baseline=fwd_bwd(gae_reference),
            megarl=fwd_bwd(gae),
            baseline_name="autograd through the loop",
            bytes_moved=2 * bytes_moved,
        ),
    ]


def _group_cases(device, num_groups, group_size, gen, with_loop=True):
    from megarl.ops import group_advantages

    N = num_groups * group_size
    scores = torch.randint(0, 2, (N,), generator=gen, device=device).to(torch.float32)  # 0/1 rewards
    group_ids = torch.arange(num_groups, device=device).repeat_interleave(group_size) * 7919 + 12345
    index = group_ids.cpu().numpy()  # verl passes a numpy array of ids
    perm = torch.randperm(N, generator=gen, device=device)
    shuffled_scores, shuffled_ids = scores[perm], group_ids[perm]
    shape = f"N={N} groups of {group_size} float32"
    bytes_moved = N * (4 + 8 + 4)
    cases = []
    if with_loop:
        cases.append(
            Case(
                op="group_advantages grpo",
                shape=shape,
                baseline=lambda: grpo_per_group_loop(scores, index),
                megarl=lambda: group_advantages(scores, group_ids, "grpo"),
                baseline_name="per-group Python loop (verl)",
                target=">=200x",
                bytes_moved=bytes_moved,
            )
        )
    cases += [
        Case(
            op="group_advantages grpo",
            shape=shape,
            baseline=lambda: grpo_scatter(scores, group_ids),
            megarl=lambda: group_advantages(scores, group_ids, "grpo"),
            baseline_name="vectorised torch (unique + scatter_add)",
            target=">1x",
            bytes_moved=bytes_moved,
        ),
        Case(
            op="group_advantages grpo",
            shape=shape + ", shuffled ids",
            baseline=lambda: grpo_scatter(shuffled_scores, shuffled_ids),
            megarl=lambda: group_advantages(shuffled_scores, shuffled_ids, "grpo"),
            baseline_name="vectorised torch (unique + scatter_add)",
            target=">1x",
            bytes_moved=bytes_moved,
        ),
    ]
    return cases


def cases(device: torch.device, quick: bool) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    if quick:
        return _gae_cases(device, 8, 256, gen) + _group_cases(device, 128, 8, gen)
    return _gae_cases(device, 64, 4096, gen) + _group_cases(device, 8192, 8, gen)
