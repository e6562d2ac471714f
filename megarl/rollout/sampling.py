"""Batched next-token sampling as pure tensor functions: temperature, top-k, top-p, greedy, and
the log-prob of the chosen token, on full-vocabulary logits or on tensor-parallel vocab shards.

One draw per row: a uniform u in [0, 1) per row (from a seeded torch.Generator, drawn by the
caller) picks the token by inverting the CDF of the (filtered) sampling distribution, walked in
token-id order. The same u gives the same token whether the vocabulary is whole or split over
TP ranks (up to float32 rounding at a CDF boundary), so a seeded run does not depend on the
parallel layout.

Conventions (shared by every function here):
  * temperature == 0 is greedy: argmax, the lowest token id on ties (torch.argmax);
  * filters apply to z = logits / temperature: top-k keeps the k largest z (top_k <= 0: off),
    then top-p keeps the smallest prefix of the probability-sorted tokens whose mass reaches
    top_p (always at least one token; top_p >= 1: off), on the distribution renormalised after
    top-k, as vLLM orders them;
  * the returned log-prob depends on `logprobs_mode` (megarl.rollout.engine.LOGPROBS_MODES):
    "unfiltered" (default): log softmax(z)[token] over the whole vocabulary at the temperature,
    what the trainer recomputes from its own logits (filtering only decides which tokens can
    be drawn); "processed": log softmax over the tokens the filters kept, i.e. the distribution
    the token was drawn from (vLLM's "processed_logprobs"). Greedy reports log softmax(logits)
    (temperature 1) in both modes;
  * a logit of the dtype's lowest value or -inf (padded vocabulary rows) has probability 0.

top-p without top-k looks for the nucleus among the NUCLEUS_CANDIDATES most likely tokens
first and sorts the whole vocabulary only when a row's nucleus is larger (exact either way: a
full sort of a 49k vocabulary costs more than a decode step's sampling should).

Shapes: logits [B, V] (or a shard [B, V_local] holding global ids [rank * V_local,
(rank + 1) * V_local)), u [B] float -> tokens [B] int64 (global ids), logprobs [B] float32.
"""

from __future__ import annotations

import torch

from megarl.rollout.engine import LOGPROBS_MODES

SAMPLING_METHODS = ("gather", "gather_free")
NUCLEUS_CANDIDATES = 1024


def scaled_logits(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = logits / temperature in float32 or float64 (temperature 0 -> 1: greedy log-probs
    are of the raw distribution)."""
    z = logits_BV if logits_BV.dtype in (torch.float32, torch.float64) else logits_BV.float()
    if temperature not in (0.0, 1.0):
        z = z / temperature
    return z


def _top_k_active(top_k: int, vocab: int) -> bool:
    return 0 < top_k < vocab


def _candidates(z_BV: torch.Tensor, top_k: int, top_p: float, lse_B: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [B, C] sorted by descending z, holding every token the filters can keep."""
    vocab = z_BV.shape[-1]
    if _top_k_active(top_k, vocab):
        return torch.topk(z_BV, top_k, dim=-1)
    if vocab > NUCLEUS_CANDIDATES:
        vals, ids = torch.topk(z_BV, NUCLEUS_CANDIDATES, dim=-1)
        if bool((torch.exp(vals - lse_B[:, None]).sum(-1) >= top_p).all()):
            return vals, ids
    return torch.sort(z_BV, dim=-1, descending=True)


def _keep(vals_BC: torch.Tensor, top_k_active: bool, top_p: float, lse_B: torch.Tensor) -> torch.Tensor | None:
    """Boolean [B, C] over descending candidates: kept by top-p (None: all kept)."""
    if top_p >= 1.0:
        return None
    # after top-k the distribution is renormalised over the k tokens; else the true one
    probs = torch.softmax(vals_BC, dim=-1) if top_k_active else torch.exp(vals_BC - lse_B[:, None])
    return (torch.cumsum(probs, dim=-1) - probs) < top_p  # the first token is always kept


def _inverse_cdf(weights_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalised non-negative weights with one uniform per row."""
    cdf = torch.cumsum(weights_BV, dim=-1)
    total = cdf[:, -1:]
    # u * total rounds up to total for u close to 1: stay strictly below it
    target = torch.minimum(u_B.to(cdf.dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target, right=True)
    return idx.squeeze(-1).clamp_(max=weights_BV.shape[-1] - 1)


def _check_mode(logprobs_mode: str) -> None:
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")


def _kept_lse(vals_BC: torch.Tensor, keep_BC: torch.Tensor | None) -> torch.Tensor:
    """logsumexp [B] over the candidates the filters kept: the normaliser of the processed
    (filtered, renormalised) distribution."""
    if keep_BC is not None:
        vals_BC = vals_BC.masked_fill(~keep_BC, float("-inf"))
    return torch.logsumexp(vals_BC, dim=-1)


def _draw(vals_BC: torch.Tensor, ids_BC: torch.Tensor, keep_BC: torch.Tensor | None, u_B: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B], their z [B]) drawn among candidates, walking the CDF in id order: the
    partial sums then equal those of the full masked vocabulary (zeros add nothing)."""
    order = torch.argsort(ids_BC, dim=-1)
    vals, ids = vals_BC.gather(-1, order), ids_BC.gather(-1, order)
    weights = torch.exp(vals - vals.max(dim=-1, keepdim=True).values)
    if keep_BC is not None:
        weights = weights * keep_BC.gather(-1, order)
    pick = _inverse_cdf(weights, u_B).unsqueeze(-1)
    return ids.gather(-1, pick).squeeze(-1), vals.gather(-1, pick).squeeze(-1)


def top_k_top_p_mask(z_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """Boolean [B, V]: True where a token is filtered OUT; None when no filter is active."""
    vocab = z_BV.shape[-1]
    if not _top_k_active(top_k, vocab) and top_p >= 1.0:
        return None
    lse = torch.logsumexp(z_BV, dim=-1)
    vals, ids = _candidates(z_BV, top_k, top_p, lse)
    keep = _keep(vals, _top_k_active(top_k, vocab), top_p, lse)
    removed = torch.ones_like(z_BV, dtype=torch.bool)
    removed.scatter_(-1, ids, torch.zeros_like(ids, dtype=torch.bool) if keep is None else ~keep)
    return removed


def sample(logits_BV: torch.Tensor, u_B: torch.Tensor, temperature: float, top_k: int = 0,
           top_p: float = 1.0, logprobs_mode: str = "unfiltered") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] and their log-probs [B] from full-vocabulary logits [B, V] (see module doc)."""
    _check_mode(logprobs_mode)
    z = scaled_logits(logits_BV, temperature)
    lse = torch.logsumexp(z, dim=-1)
    vocab = z.shape[-1]
    if temperature == 0.0:
        tokens = torch.argmax(z, dim=-1)
        tok_z = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    elif not _top_k_active(top_k, vocab) and top_p >= 1.0:
        tokens = _inverse_cdf(torch.exp(z - z.max(dim=-1, keepdim=True).values), u_B)
        tok_z = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        vals, ids = _candidates(z, top_k, top_p, lse)
        keep = _keep(vals, _top_k_active(top_k, vocab), top_p, lse)
        tokens, tok_z = _draw(vals, ids, keep, u_B)
        if logprobs_mode == "processed":
            lse = _kept_lse(vals, keep)
    return tokens, (tok_z - lse).float()


def _gather_rows(x_BK: torch.Tensor, group) -> torch.Tensor:
    """All-gather [B, K] per rank -> [world, B, K] in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = torch.empty((world * x_BK.shape[0], *x_BK.shape[1:]), dtype=x_BK.dtype, device=x_BK.device)
    dist.all_gather_into_tensor(out, x_BK.contiguous(), group=group)
    return out.view(world, *x_BK.shape)


def _combine_lse(m_WB: torch.Tensor, s_WB: torch.Tensor) -> torch.Tensor:
    """Global logsumexp from per-shard (max m, sum exp(z - m)) pairs [W, B] -> [B]."""
    big = m_WB.max(dim=0).values
    return big + torch.log((s_WB * torch.exp(m_WB - big)).sum(dim=0))


def sample_vocab_parallel(logits_BV: torch.Tensor, u_B: torch.Tensor, temperature: float,
                          top_k: int, top_p: float, tp_group, method: str = "gather_free",
                          logprobs_mode: str = "unfiltered") -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` on vocabulary shards: each TP rank passes its [B, V_local] slice (rank order =
    vocab order), all ranks get the same tokens (global ids) and log-probs.

    method="gather": all-gather the shards and call `sample` (B x V_global floats per rank).
    method="gather_free": exchange per-row statistics only: O(B x world) floats, O(B x k x
    world) with top-k, O(B x NUCLEUS_CANDIDATES x world) with top-p alone (falling back to
    "gather" when a row's nucleus is larger). Both methods draw with the same u and agree up
    to float rounding at a CDF boundary.
    """
    import torch.distributed as dist

    if method not in SAMPLING_METHODS:
        raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {method!r}")
    _check_mode(logprobs_mode)
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    if world == 1:
        return sample(logits_BV, u_B, temperature, top_k, top_p, logprobs_mode)
    rank = dist.get_rank(tp_group)
    batch, v_local = logits_BV.shape
    vocab = world * v_local

    def gathered() -> tuple[torch.Tensor, torch.Tensor]:
        full = _gather_rows(logits_BV, tp_group)  # [W, B, V_local]
        return sample(full.permute(1, 0, 2).reshape(batch, vocab), u_B, temperature, top_k, top_p, logprobs_mode)

    if method == "gather":
        return gathered()
    z = scaled_logits(logits_BV, temperature)
    start = rank * v_local
    # clamped: a shard that is all padding (-inf) must not give exp(-inf - -inf) = NaN
    m = z.max(dim=-1).values.clamp(min=torch.finfo(z.dtype).min)
    e = torch.exp(z - m.unsqueeze(-1))
    if temperature == 0.0:
        arg = torch.argmax(z, dim=-1)
        stats = _gather_rows(torch.stack([m, e.sum(-1), (arg + start).to(z.dtype)], dim=-1), tp_group)
        lse = _combine_lse(stats[..., 0], stats[..., 1])
        best = torch.argmax(stats[..., 0], dim=0)  # first rank with the max = lowest id on ties
        rows = torch.arange(batch, device=z.device)
        return stats[best, rows, 2].long(), (stats[best, rows, 0] - lse).float()

    k_active = _top_k_active(top_k, vocab)
    if k_active or top_p < 1.0:
        k = min(top_k if k_active else NUCLEUS_CANDIDATES, v_local)
        vals, idx = torch.topk(z, k, dim=-1)
        stats = _gather_rows(torch.cat([m[:, None], e.sum(-1, keepdim=True), vals,
                                        (idx + start).to(z.dtype)], dim=-1), tp_group)  # [W, B, 2+2k]
        lse = _combine_lse(stats[..., 0], stats[..., 1])
        cand = stats[..., 2:2 + k].permute(1, 0, 2).reshape(batch, world * k)
        cand_id = stats[..., 2 + k:].permute(1, 0, 2).reshape(batch, world * k)
        vals, order = torch.topk(cand, top_k, dim=-1) if k_active and top_k < world * k \
            else torch.sort(cand, dim=-1, descending=True)
        ids = cand_id.gather(-1, order)
        if not k_active and not bool((torch.exp(vals - lse[:, None]).sum(-1) >= top_p).all()):
            return gathered()  # a nucleus beyond the candidates: decided identically on all ranks
        keep = _keep(vals, k_active, top_p, lse)
        tokens, tok_z = _draw(vals, ids, keep, u_B)
        if logprobs_mode == "processed":
            lse = _kept_lse(vals, keep)
        return tokens.long(), (tok_z - lse).float()

    # Plain sampling: shard masses place u on one rank, which inverts its local CDF.
    cdf = torch.cumsum(e, dim=-1)
    stats = _gather_rows(torch.stack([m, cdf[:, -1]], dim=-1), tp_group)  # [W, B, 2]
    m_all, s_all = stats[..., 0], stats[..., 1]
    big = m_all.max(dim=0).values
    mass = s_all * torch.exp(m_all - big)  # [W, B], identical on every rank
    ends = torch.cumsum(mass, dim=0)
    total = ends[-1]
    target = torch.minimum(u_B.to(z.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    owner = (ends <= target.unsqueeze(0)).sum(dim=0).clamp_(max=world - 1)  # [B]
    mine = owner == rank
    before = ends[rank] - mass[rank]
    local_target = ((target - before) / torch.exp(m - big)).clamp_(min=0.0)
    local_target = torch.minimum(local_target, torch.nextafter(cdf[:, -1], torch.zeros_like(m)))
    idx = torch.searchsorted(cdf, local_target.unsqueeze(-1), right=True).squeeze(-1).clamp_(max=v_local - 1)
    # exactly one rank owns each row: a SUM all-reduce delivers its (token, z) to every rank
    out = torch.stack([torch.where(mine, (idx + start).to(z.dtype), 0.0),
                       torch.where(mine, z.gather(-1, idx.unsqueeze(-1)).squeeze(-1), 0.0)], dim=-1)
    dist.all_reduce(out, group=tp_group)
    lse = big + torch.log(total)
    return out[:, 0].long(), (out[:, 1] - lse).float()
