"""The cross-rank pieces at world size 2 (gloo, one spawn) against the unsharded computation:
GAE whitening, reinforce_pp normalisation, global token/sequence counts, actor-loss gradients summed over DP ranks, and the
HAPO history MIN-merge."""

from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarl.algorithms import (
    ActorLossConfig,
    AdvantageConfig,
    AdvantageInputs,
    HapoHistory,
    KLConfig,
    compute_actor_loss,
    compute_advantages,
    count_tokens_and_seqs,
)

WORLD = 2


def _batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 6, 1, 5, 6, 2, 4, 6])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(8, 6, generator=g)
    values = torch.randn(8, 6, generator=g)
    base = -torch.rand(8, 6, generator=g) - 0.1
    old = base + 0.05 * torch.randn(8, 6, generator=g)
    ref = base + 0.05 * torch.randn(8, 6, generator=g)
    adv = torch.randn(8, 6, generator=g)
    return mask, rewards, values, base, old, ref, adv


def _actor_grad(rows, mask, base, old, ref, adv, cfg, counts, group=None):
    w = torch.tensor(1.0, requires_grad=True)  # a parameter every rank shares
    logp = w * base[rows]
    out = compute_actor_loss(
        logp, old[rows], adv[rows], mask[rows], cfg, ref_logp_BT=ref[rows], entropy_BT=-logp, **counts
    )
    out.loss.backward()
    loss, grad = out.loss.detach().clone(), w.grad.clone()
    if group is not None:
        dist.all_reduce(loss, group=group)
        dist.all_reduce(grad, group=group)
    return loss, grad


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    group = dist.new_group([0, 1])
    try:
        mask, rewards, values, base, old, ref, adv = _batch()
        rows = slice(0, 3) if rank == 0 else slice(3, 8)  # uneven shards

        # GAE whitened over both ranks == whitened over the whole batch
        cfg = AdvantageConfig(estimator="gae", gamma=0.95, lam=0.9)
        whole = compute_advantages(AdvantageInputs(response_mask=mask, token_rewards=rewards, values=values), cfg)
        local = compute_advantages(
            AdvantageInputs(response_mask=mask[rows], token_rewards=rewards[rows], values=values[rows], process_group=group),
            cfg,
        )
        torch.testing.assert_close(local.advantages, whole.advantages[rows])
        torch.testing.assert_close(local.returns, whole.returns[rows])

        # reinforce_pp's batch normalisation spans both ranks (groups 1 and 4 have one member)
        scores = rewards[:, 0]
        group_ids = torch.tensor([0, 0, 1, 2, 2, 3, 3, 4])
        cfg = AdvantageConfig(estimator="reinforce_pp")
        whole = compute_advantages(AdvantageInputs(response_mask=mask, scores=scores, group_ids=group_ids), cfg)
        local = compute_advantages(
            AdvantageInputs(response_mask=mask[rows], scores=scores[rows], group_ids=group_ids[rows], process_group=group),
            cfg,
        )
        torch.testing.assert_close(local.advantages, whole.advantages[rows])
        assert local.advantages[2 if rank == 0 else 4].abs().max() == 0

        # global counts, then the actor loss: per-rank losses and gradients sum to the unsharded ones
        micro = [mask[rows][:1], mask[rows][1:]]
        counts = count_tokens_and_seqs(micro, process_group=group)
        assert counts == (int(mask.sum()), 8), counts
        kwargs = dict(zip(("global_num_tokens", "global_num_seqs"), counts))
        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            acfg = ActorLossConfig(
                dual_clip=3.0, entropy_coef=0.01, kl=KLConfig(placement="loss", coef=0.1), agg_mode=mode, max_response_len=6
            )
            full_loss, full_grad = _actor_grad(slice(0, 8), mask, base, old, ref, adv, acfg, kwargs)
            dp_loss, dp_grad = _actor_grad(rows, mask, base, old, ref, adv, acfg, kwargs, group)
            torch.testing.assert_close(dp_loss, full_loss)
            torch.testing.assert_close(dp_grad, full_grad)

        # HAPO: each rank sees its own responses; after the MIN merge both hold the global history
        ids = torch.tensor([0, 1, 2, 0, 3, 1, 2, 3])
        lengths = torch.tensor([40, 30, 20, 10, 50, 60, 15, 5])
        correct = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
        hist = HapoHistory(num_prompts=5)
        hist.update(ids[rows], lengths[rows], correct[rows])
        hist.all_reduce_min(group)
        assert hist.lookup(torch.arange(5)).tolist() == [10.0, 30.0, 15.0, 50.0, math.inf]
        dist.barrier(group)
    finally:
        dist.destroy_process_group()


def test_cross_rank_algorithms_match_unsharded(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
