"""MegatronEngine under TP / PP / virtual PP / sequence parallelism, in ONE launch:

    torchrun --standalone --nproc_per_node=4 tests/rollout/megatron_engine_script.py OUT.json

For each layout (megatron's parallel state re-initialised in between) every rank loads the same
random tiny model (HF-named tensors through megarl.models.mappings) and checks, against the
trainer-side forward (megatron's forward-only pipeline schedule over the full sequences, no KV
cache):
  * greedy generation == a naive full-recompute greedy loop;
  * the engine's log-probs (temperature 0.8) == the trainer's log-probs of the same tokens;
  * sampled tokens == the single-process run's (same seed), with and without top-k/top-p, and
    for both TP sampling methods under TP;
  * every rank of a model-parallel group returns the same completions.
Rank 0 writes the measurements to OUT.json; tests/rollout/test_megatron_engine.py asserts.

The helpers here are also imported by the single-process tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist

VOCAB = 1000  # padded to 1024 (128 * tp): the padded rows are exercised under TP 1 and 2


def tiny_spec(num_layers: int = 4, tied: bool = True, vocab: int = VOCAB):
    from megarl.models.hf_config import arch_spec

    return arch_spec({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
        "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "initializer_range": 0.2,
    })


def random_hf_state(spec, seed: int) -> dict[str, torch.Tensor]:
    """HF-named random weights, scaled so every layer changes the residual stream a lot: greedy
    continuations vary (no copy-the-last-token attractor) and sampling is peaked but not
    deterministic; norms and biases are non-trivial."""
    from megarl.models.mappings import hf_names, hf_shape

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in hf_names(spec):
        shape = hf_shape(spec, name)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.2 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name or name == "lm_head.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = 3.0 * torch.randn(shape, generator=g) / shape[-1] ** 0.5
        state[name] = t
    return state


def build(spec, layout, groups, state):
    from megarl.models.builder import build_model
    from megarl.models.mappings import load_hf_state_into

    chunks = build_model(spec, layout, groups=groups, backend="local")
    load_hf_state_into(chunks, spec, layout, state.items())
    return chunks


class CharTokenizer:
    """One character per token id (a-z and space), enough for stop-string tests; ids in
    `special` decode to nothing with skip_special_tokens."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz "

    def __init__(self, special=()):
        self.special = set(special)
        self.eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.ALPHABET[i % len(self.ALPHABET)] for i in ids
                       if not (skip_special_tokens and i in self.special))


def full_logits(chunks, groups, spec, ids_BS: torch.Tensor) -> torch.Tensor:
    """The trainer's forward: megatron's forward-only pipeline schedule over whole sequences,
    full-vocab logits [B, S, V_padded] (TP shards gathered) on EVERY rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    layout = groups.layout
    batch, seq = ids_BS.shape
    if layout.sequence_parallel and seq % layout.tp:
        # sequence parallelism splits the sequence over TP ranks; right padding is harmless
        extra = layout.tp - seq % layout.tp
        return full_logits(chunks, groups, spec, torch.cat([ids_BS, ids_BS[:, :extra]], dim=1))[:, :seq]
    num_mb = layout.pp if layout.vpp else 1  # interleaving wants microbatches divisible by pp
    padded_b = -(-batch // num_mb) * num_mb
    ids = torch.cat([ids_BS, ids_BS[:1].expand(padded_b - batch, seq)]) if padded_b > batch else ids_BS
    mbs = padded_b // num_mb
    batches = list(ids.view(num_mb, mbs, seq))

    def step(data_iter, model):
        x = next(data_iter)
        pos = torch.arange(seq).unsqueeze(0).expand_as(x)
        out = model(x, pos, None)
        return out, lambda output, non_loss_data=False: output.detach()

    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=num_mb, seq_length=seq, micro_batch_size=mbs,
            forward_only=True, collect_non_loss_data=True,
        )
    for c, m in zip(chunks, modes):
        c.train(m)
    if groups.is_last_pp_stage:
        local = torch.cat(outs, dim=0)[:batch].contiguous()
        if layout.tp > 1:
            parts = [torch.empty_like(local) for _ in range(layout.tp)]
            dist.all_gather(parts, local, group=groups.tp_group)
            local = torch.cat(parts, dim=-1)
    else:
        local = None
    if layout.pp > 1:
        from megarl.models.hf_config import padded_vocab_size

        shape = (batch, seq, padded_vocab_size(spec, layout.tp))
        buf = local if local is not None else torch.empty(shape)
        dist.broadcast(buf, src=groups.pp_ranks[-1], group=groups.pp_group)
        local = buf
    return local


def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """Right padding never changes earlier positions of a causal model."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, [len(s) for s in seqs]


def naive_greedy(chunks, groups, spec, prompts: list[list[int]], max_new: int, vocab: int) -> list[list[int]]:
    """Full recompute every step: forward the whole sequences, argmax at each row's last token."""
    seqs = [list(p) for p in prompts]
    for _ in range(max_new):
        ids, lens = right_padded(seqs)
        logits = full_logits(chunks, groups, spec, ids)[..., :vocab]
        for i, n in enumerate(lens):
            seqs[i].append(int(torch.argmax(logits[i, n - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def trainer_logprobs(chunks, groups, spec, prompts, completions, temperature: float, vocab: int) -> list[list[float]]:
    """log softmax(logits / T) of each completion token from the trainer's forward."""
    from megarl.ops import logprob_entropy

    seqs = [list(prompts[c.prompt_index]) + c.token_ids for c in completions]
    ids, lens = right_padded(seqs)
    logits = full_logits(chunks, groups, spec, ids)[..., :vocab]
    out = []
    for i, c in enumerate(completions):
        p = len(prompts[c.prompt_index])
        rows = logits[i, p - 1 : lens[i] - 1]
        lp, _ = logprob_entropy(rows.contiguous(), torch.tensor(c.token_ids), temperature)
        out.append(lp.tolist())
    return out


def test_prompts(vocab: int = VOCAB, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7)]


def sampling_function_check(groups) -> list[dict]:
    """sample_vocab_parallel (both methods) on TP shards vs `sample` on the whole vocabulary,
    including padded (lowest-value) entries and a top-p nucleus larger than the candidates."""
    from megarl.rollout import sampling

    vocab = 4096
    g = torch.Generator().manual_seed(0)
    full = 3 * torch.randn(64, vocab, generator=g)
    full[:, vocab - 100:] = torch.finfo(torch.float32).min
    u = torch.rand(64, generator=g)
    local = vocab // groups.layout.tp
    shard = full[:, groups.tp_rank * local:(groups.tp_rank + 1) * local].contiguous()
    out = []
    for t, k, p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 1.0), (0.7, 20, 0.8), (0.7, 0, 0.9), (3.0, 0, 0.95)):
        want = sampling.sample(full, u, t, k, p)
        rec = dict(case=f"T={t} top_k={k} top_p={p}")
        for method in sampling.SAMPLING_METHODS:
            got = sampling.sample_vocab_parallel(shard, u, t, k, p, groups.tp_group, method)
            rec[method + "_equal"] = bool(torch.equal(got[0], want[0]))
            rec[method + "_lp_diff"] = (got[1] - want[1]).abs().max().item()
        # the candidate prefilter for top-p equals a full sort
        saved, sampling.NUCLEUS_CANDIDATES = sampling.NUCLEUS_CANDIDATES, 10**9
        rec["prefilter_equal"] = bool(torch.equal(sampling.sample(full, u, t, k, p)[0], want[0]))
        sampling.NUCLEUS_CANDIDATES = saved
        rec["padded_drawn"] = bool((want[0] >= vocab - 100).any())
        out.append(rec)
    return out


def layout_name(layout) -> str:
    name = f"tp{layout.tp}pp{layout.pp}"
    if layout.vpp:
        name += f"vpp{layout.vpp}"
    if layout.sequence_parallel:
        name += "sp"
    return name


def main() -> int:
    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_distributed, init_parallel
    from megarl.rollout.engine import SamplingParams
    from megarl.rollout.megatron_engine import MegatronEngine

    out_path = sys.argv[1]
    torch.set_num_threads(1)
    rank, world = init_distributed()
    assert world == 4, "run with --nproc_per_node=4"
    t_start = time.time()
    spec = tiny_spec()
    state = random_hf_state(spec, seed=11)
    prompts = test_prompts()
    max_new = 10
    layouts = [
        ParallelLayout(tp=1, pp=1),
        ParallelLayout(tp=2, pp=1),
        ParallelLayout(tp=1, pp=2),
        ParallelLayout(tp=2, pp=2),
        ParallelLayout(tp=1, pp=2, vpp=2),
        ParallelLayout(tp=2, pp=1, sequence_parallel=True),
    ]
    sample_params = SamplingParams(n=2, temperature=0.8, max_new_tokens=max_new, seed=5)
    topk_params = SamplingParams(n=2, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=max_new, seed=6)
    records = []
    for layout in layouts:
        t0 = time.time()
        groups = init_parallel(layout, seed=1234)
        chunks = build(spec, layout, groups, state)
        rec = dict(layout=layout_name(layout), rank=rank, tp_rank=groups.tp_rank, pp_rank=groups.pp_rank,
                   dp_rank=groups.dp_rank)
        engine = MegatronEngine(chunks, spec, layout, groups, CharTokenizer(), eos_token_ids=(),
                                max_batch=16, max_seq_len=64, prefill_tokens=24)
        greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new))
        rec["greedy"] = [c.token_ids for c in greedy]
        rec["naive"] = naive_greedy(chunks, groups, spec, prompts, max_new, spec.vocab_size)

        runs = {"plain": engine.generate(prompts, sample_params), "topk": engine.generate(prompts, topk_params)}
        if layout.tp > 1 and not layout.sequence_parallel:
            # the other TP sampling method must draw the same tokens
            engine.config = dataclasses.replace(engine.config, tp_sampling="gather")
            runs["plain_gather"] = engine.generate(prompts, sample_params)
            runs["topk_gather"] = engine.generate(prompts, topk_params)
            rec["logprob_diff_between_methods"] = max(
                abs(a - b) for c1, c2 in zip(runs["plain"], runs["plain_gather"]) if c1.token_ids == c2.token_ids
                for a, b in zip(c1.logprobs, c2.logprobs))
        rec["samples"] = {k: [c.token_ids for c in v] for k, v in runs.items()}
        lp_ref = trainer_logprobs(chunks, groups, spec, prompts, runs["plain"], 0.8, spec.vocab_size)
        rec["logprob_max_abs_diff"] = max(abs(a - b) for c, ref in zip(runs["plain"], lp_ref)
                                          for a, b in zip(c.logprobs, ref))
        a = engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=4))
        b = engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=4))
        rec["unseeded"] = [[c.token_ids for c in a], [c.token_ids for c in b]]
        if layout_name(layout) == "tp2pp1":
            rec["sampling_fn"] = sampling_function_check(groups)
        rec["sp_restored"] = bool(chunks[0].config.sequence_parallel) == layout.sequence_parallel
        rec["training_restored"] = all(c.training for c in chunks)
        rec["seconds"] = round(time.time() - t0, 2)
        records.append(rec)
        del engine, chunks
        destroy_parallel()

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank == 0:
        result = dict(records=[r for rs in gathered for r in rs], total_seconds=round(time.time() - t_start, 2))
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
