"""MegatronEngine under TP / PP / virtual PP / sequence parallelism, in ONE launch (the tests run
it through launch_script.py, together with bridge_script.py; standalone:

    torchrun --standalone --nproc_per_node=4 tests/rollout/megatron_engine_script.py OUT.json)

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


def filtered_out(z_TV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean [T, V], True where top-k then top-p (on the distribution renormalised after
    top-k) remove a token: an independent reference of the filters, written like
    transformers' warpers (the k-th value and ties stay; the nucleus is the smallest
    probability-sorted prefix whose mass reaches top_p)."""
    out = torch.zeros_like(z_TV, dtype=torch.bool)
    if 0 < top_k < z_TV.shape[-1]:
        out |= z_TV < torch.topk(z_TV, top_k, dim=-1).values[:, -1:]
    if top_p < 1.0:
        probs = torch.softmax(z_TV.masked_fill(out, float("-inf")), dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop_sorted = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p
        out |= torch.zeros_like(out).scatter(-1, order, drop_sorted)
    return out


def reference_logprobs(logits_TV: torch.Tensor, tokens: list[int], temperature: float, top_k: int = 0,
                       top_p: float = 1.0, mode: str = "unfiltered") -> list[float]:
    """The documented convention (megarl.rollout.engine) in float64 from full logits [T, V]:
    greedy -> log softmax(logits); "unfiltered" -> log softmax(logits / T); "processed" ->
    log softmax over the tokens top-k / top-p keep."""
    z = logits_TV.double()
    if temperature > 0:
        z = z / temperature
        if mode == "processed":
            z = z.masked_fill(filtered_out(z, top_k, top_p), float("-inf"))
    return torch.log_softmax(z, dim=-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def trainer_logprobs(chunks, groups, spec, prompts, completions, temperature: float, vocab: int,
                     top_k: int = 0, top_p: float = 1.0, mode: str = "unfiltered") -> list[list[float]]:
    """Log-probs of each completion token from the trainer's forward: the trainer's own
    log softmax(logits / T) (megarl.ops.logprob_entropy) for "unfiltered", the float64
    reference with the filters for "processed"."""
    from megarl.ops import logprob_entropy

    seqs = [list(prompts[c.prompt_index]) + c.token_ids for c in completions]
    ids, lens = right_padded(seqs)
    logits = full_logits(chunks, groups, spec, ids)[..., :vocab]
    out = []
    for i, c in enumerate(completions):
        p = len(prompts[c.prompt_index])
        rows = logits[i, p - 1 : lens[i] - 1]
        if mode == "unfiltered":
            lp, _ = logprob_entropy(rows.contiguous(), torch.tensor(c.token_ids), temperature)
            out.append(lp.tolist())
        else:
            out.append(reference_logprobs(rows, c.token_ids, temperature, top_k, top_p, mode))
    return out


def max_diff(completions, ref) -> float:
    diffs = [abs(a - b) for c, r in zip(completions, ref) for a, b in zip(c.logprobs, r)]
    assert len(diffs) == sum(len(c.token_ids) for c in completions) > 0
    return max(diffs)


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
        want_processed = sampling.sample(full, u, t, k, p, "processed")
        rec = dict(case=f"T={t} top_k={k} top_p={p}")
        rec["processed_same_tokens"] = bool(torch.equal(want_processed[0], want[0]))
        for method in sampling.SAMPLING_METHODS:
            got = sampling.sample_vocab_parallel(shard, u, t, k, p, groups.tp_group, method)
            rec[method + "_equal"] = bool(torch.equal(got[0], want[0]))
            rec[method + "_lp_diff"] = (got[1] - want[1]).abs().max().item()
            got = sampling.sample_vocab_parallel(shard, u, t, k, p, groups.tp_group, method, "processed")
            rec[method + "_processed_equal"] = bool(torch.equal(got[0], want[0]))
            rec[method + "_processed_lp_diff"] = (got[1] - want_processed[1]).abs().max().item()
        # the candidate prefilter for top-p equals a full sort
        saved, sampling.NUCLEUS_CANDIDATES = sampling.NUCLEUS_CANDIDATES, 10**9
        rec["prefilter_equal"] = bool(torch.equal(sampling.sample(full, u, t, k, p)[0], want[0]))
        sampling.NUCLEUS_CANDIDATES = saved
        rec["padded_drawn"] = bool((want[0] >= vocab - 100).any())
        out.append(rec)
    return out


# ---- single-process checks (TP1 PP1), run inside the launch ---------------------------------------
#
# They used to run in the pytest process, where init_parallel switches on megarl's CPU
# compatibility layer for megatron-core for the rest of the session. Here each rank of the
# tp1pp1 layout (four independent TP1 PP1 replicas) runs its share of them on its own model
# (no collective is involved), and the results go to OUT.json for the tests to assert on.

GREEDY_SETTINGS = {"one-wave": dict(max_batch=64), "waves+always-compact": dict(max_batch=3, compact_below=1.0),
                   "waves+never-compact": dict(max_batch=4, compact_below=0.0), "prefill-groups": dict(prefill_tokens=16)}


def _sampling_settings():
    from megarl.rollout.engine import SamplingParams

    return {"t0.8": SamplingParams(n=3, temperature=0.8, max_new_tokens=8, seed=3),
            "topk-topp": SamplingParams(n=2, temperature=1.0, top_k=5, top_p=0.9, max_new_tokens=8, seed=4)}


def error_of(fn) -> dict | None:
    """{"type", "message"} of the exception fn raises, None if it returns."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type
        return {"type": type(e).__name__, "message": str(e)}
    return None


def _make_engine(ctx, tokenizer=None, **settings):
    from megarl.rollout.megatron_engine import MegatronEngine

    settings.setdefault("eos_token_ids", ())
    settings.setdefault("max_seq_len", 64)
    return MegatronEngine(ctx["chunks"], ctx["spec"], ctx["layout"], ctx["groups"],
                          tokenizer if tokenizer is not None else CharTokenizer(), **settings)


def _done(out) -> list[dict]:
    return [dict(prompt_index=c.prompt_index, token_ids=c.token_ids, text=c.text, logprobs=c.logprobs,
                 finish_reason=c.finish_reason, stop_reason=c.extra.get("stop_reason")) for c in out]


def check_greedy(ctx) -> dict:
    """Greedy == a naive full-recompute loop, for several batching settings."""
    from megarl.rollout.engine import SamplingParams

    prompts, spec = test_prompts(), ctx["spec"]
    ref = naive_greedy(ctx["chunks"], ctx["groups"], spec, prompts, 8, spec.vocab_size)
    runs = {name: _done(_make_engine(ctx, **kw).generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=8)))
            for name, kw in GREEDY_SETTINGS.items()}
    return dict(ref=ref, runs=runs)


def check_logprobs(ctx) -> dict:
    """Engine log-probs vs the trainer's forward, in both log-prob modes (same draws)."""
    prompts, spec = test_prompts(), ctx["spec"]
    out = {}
    for name, sp in _sampling_settings().items():
        engine = _make_engine(ctx, max_batch=4)  # several waves and a compaction on the way
        rec = {}
        for mode in ("unfiltered", "processed"):
            sp_mode = dataclasses.replace(sp, logprobs_mode=mode)
            done = engine.generate(prompts, sp_mode)
            ref = trainer_logprobs(ctx["chunks"], ctx["groups"], spec, prompts, done, sp.temperature, spec.vocab_size,
                                   sp.top_k, sp.top_p, mode)
            rec[mode] = dict(max_abs_diff=max_diff(done, ref), token_ids=[c.token_ids for c in done],
                             logprobs=[c.logprobs for c in done])
        out[name] = rec
    return out


def check_seeded(ctx) -> dict:
    from megarl.rollout.engine import SamplingParams

    prompts = test_prompts()
    engine = _make_engine(ctx)
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    a = engine.generate(prompts, sp)
    b = engine.generate(prompts, sp)
    c = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=8))
    waves = _make_engine(ctx, max_batch=2, compact_below=1.0).generate(prompts, sp)
    d = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8))
    e = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8))
    ids = lambda out: [x.token_ids for x in out]  # noqa: E731
    return dict(a=ids(a), b=ids(b), c=ids(c), waves=ids(waves), d=ids(d), e=ids(e),
                a_logprobs=[x.logprobs for x in a], b_logprobs=[x.logprobs for x in b])


def check_filters_greedy(ctx) -> dict:
    from megarl.rollout.engine import SamplingParams

    prompts = test_prompts()
    engine = _make_engine(ctx)
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    out = dict(greedy=[c.token_ids for c in greedy])
    for name, sp in {"top_k=1": SamplingParams(temperature=1.0, top_k=1, max_new_tokens=6, seed=1),
                     "top_p=1e-6": SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=6, seed=2)}.items():
        out[name] = [c.token_ids for c in engine.generate(prompts, sp)]
    return out


def check_finish(ctx) -> dict:
    """EOS, a special EOS, stop strings under both include_stop_str_in_output settings, length."""
    from megarl.rollout.engine import SamplingParams

    prompts = test_prompts()
    tok = CharTokenizer()
    ref = _make_engine(ctx).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10))
    eos = ref[0].token_ids[3]
    out = dict(ref=[c.token_ids for c in ref], eos=eos)
    out["eos_run"] = _done(_make_engine(ctx, eos_token_ids=(eos,)).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=10)))
    special = _make_engine(ctx, tokenizer=CharTokenizer(special={eos}), eos_token_ids=(eos,))
    out["special_text"] = special.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=10))[0].text
    stop = tok.decode(ref[1].token_ids)[4:6]
    out["stop"] = stop
    for include in (False, True):
        sp = SamplingParams(temperature=0.0, max_new_tokens=10, stop=(stop, "zzzz"), include_stop_str_in_output=include)
        out[f"stop_run_include={include}"] = _done(_make_engine(ctx).generate(prompts, sp))
    nolp = _make_engine(ctx).generate(prompts[:1], SamplingParams(temperature=1.0, max_new_tokens=3, logprobs=False, seed=0))
    out["nolp"] = _done(nolp)
    return out


def check_in_place(ctx) -> dict:
    """Colocated: the engine IS the trainer's model, so an optimizer step needs no sync."""
    from megarl.rollout.engine import SamplingParams

    prompts, spec = test_prompts(), ctx["spec"]
    engine = _make_engine(ctx)
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=5)
    before = engine.generate(prompts, sp)
    params = [p for c in ctx["chunks"] for p in c.parameters()]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean())
        after = engine.generate(prompts, sp)
        ref = trainer_logprobs(ctx["chunks"], ctx["groups"], spec, prompts, after, 1.0, spec.vocab_size)
        return dict(max_abs_diff=max_diff(after, ref),
                    changed=[c.logprobs for c in after] != [c.logprobs for c in before])
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def check_update_weights(ctx) -> dict:
    from megarl.rollout.engine import SamplingParams
    from megarl.rollout.megatron_engine import MegatronEngine

    prompts, spec, layout, groups, state = test_prompts(), ctx["spec"], ctx["layout"], ctx["groups"], ctx["state"]
    other = build(spec, layout, groups, random_hf_state(spec, seed=99))
    engine = MegatronEngine(other, spec, layout, groups, CharTokenizer(), eos_token_ids=())
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    want = [c.token_ids for c in _make_engine(ctx).generate(prompts, sp)]
    out = dict(differs_before=[c.token_ids for c in engine.generate(prompts, sp)] != want)
    names = sorted(state)
    half = len(names) // 2
    engine.update_weights(iter([{n: state[n] for n in names[:half]}, {n: state[n] for n in names[half:]}]))
    out["equal_after"] = [c.token_ids for c in engine.generate(prompts, sp)] == want
    out["missing"] = error_of(lambda: engine.update_weights([{n: state[n] for n in names if n != "model.norm.weight"}]))
    out["not_a_mapping"] = error_of(lambda: engine.update_weights([list(state.items())]))
    return out


def check_sleep_wake(ctx) -> dict:
    from megarl.rollout.engine import SamplingParams

    prompts = test_prompts()
    engine = _make_engine(ctx)
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    first = engine.generate(prompts, sp)
    out = dict(cache_before=engine._kv is not None)
    engine.sleep()
    out["cache_asleep"] = engine._kv is not None
    out["asleep_error"] = error_of(lambda: engine.generate(prompts, sp))
    engine.wake()
    out["same_after_wake"] = [c.token_ids for c in engine.generate(prompts, sp)] == [c.token_ids for c in first]
    return out


def check_bad_input(ctx) -> dict:
    from megarl.rollout.engine import RolloutEngine, SamplingParams
    from megarl.rollout.megatron_engine import MegatronEngine, MegatronEngineConfig

    engine = _make_engine(ctx)
    sp = SamplingParams(max_new_tokens=4)
    no_tok = MegatronEngine(ctx["chunks"], ctx["spec"], ctx["layout"], ctx["groups"], None, eos_token_ids=())
    return {
        "is_rollout_engine": isinstance(engine, RolloutEngine),
        "no prompts": error_of(lambda: engine.generate([], sp)),
        "prompt 1 is empty": error_of(lambda: engine.generate([[1, 2], []], sp)),
        "prompt 0 has token 1000": error_of(lambda: engine.generate([[1, 1000]], sp)),
        "max_seq_len 64": error_of(lambda: engine.generate([[1] * 61], sp)),
        "needs a tokenizer": error_of(lambda: no_tok.generate([[1]], SamplingParams(stop=("x",)))),
        "unknown settings": error_of(lambda: _make_engine(ctx, max_batches=3)),
        "tp_sampling": error_of(lambda: MegatronEngineConfig(tp_sampling="magic")),
        "max_batch": error_of(lambda: MegatronEngineConfig(max_batch=0)),
        "EOS token id": error_of(lambda: _make_engine(ctx, eos_token_ids=(5000,))),
    }


# ---- HFEngine vs MegatronEngine on the same model ---------------------------------------------------

CROSS_SETTINGS = {  # name: (temperature, top_k, top_p)
    "T0.8": (0.8, 0, 1.0), "T1.2-topk3": (1.2, 3, 1.0), "T1-topp0.7": (1.0, 0, 0.7),
    "T1.5-topk8-topp0.6": (1.5, 8, 0.6),
}  # filters that cut real probability mass, so the two log-prob modes differ by >> the tolerance


def save_hf_model(path, spec, state) -> None:
    """The tiny model as an HF directory (transformers Qwen2, the same weights) with a word-level
    tokenizer "t0".."t999" whose only special token is the EOS "t2"."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      architectures=["Qwen2ForCausalLM"], bos_token_id=None, eos_token_id=2, pad_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t2").save_pretrained(path)


def hf_model_dir(work_dir):
    from pathlib import Path

    return Path(work_dir) / "hf-tiny-qwen2"


def check_cross_engine(ctx, work_dir, settings=None, greedy_and_stops: bool = True) -> dict:
    """HFEngine (transformers) and MegatronEngine on the same weights (saved by `run`): greedy
    token ids, text under both stop-string settings, and log-probs in both modes for
    CROSS_SETTINGS (or `settings`) against one float64 reference (the transformers model's full
    forward), plus directly against each other where their samples share a prefix."""
    from megarl.rollout.hf_engine import HFEngine
    from megarl.rollout.megatron_engine import MegatronEngine

    hf = HFEngine(hf_model_dir(work_dir), max_batch_size=8)
    meg = MegatronEngine(ctx["chunks"], ctx["spec"], ctx["layout"], ctx["groups"], hf.tokenizer,
                         eos_token_ids=hf.eos_token_ids, max_seq_len=64)
    engines = {"hf": hf, "megatron": meg}
    prompts = test_prompts()
    out = {}

    if greedy_and_stops:
        _cross_greedy_and_stops(engines, prompts, out)
    out["logprobs"] = _cross_logprobs(hf, engines, prompts, settings or list(CROSS_SETTINGS))
    return out


def _cross_greedy_and_stops(engines, prompts, out) -> None:
    from megarl.rollout.engine import SamplingParams

    # greedy, also with (ignored) filters set
    for name, sp in {"greedy": SamplingParams(temperature=0.0, max_new_tokens=10),
                     "greedy-filters-set": SamplingParams(temperature=0.0, top_k=5, top_p=0.5, max_new_tokens=10,
                                                          logprobs_mode="processed")}.items():
        out[name] = {e: _done(engine.generate(prompts, sp)) for e, engine in engines.items()}

    # stop strings: one that starts and ends inside tokens, one that never matches
    full = out["greedy"]["hf"][1]["text"]
    stop = full[5:12]
    out["stop"] = stop
    for include in (False, True):
        sp = SamplingParams(temperature=0.0, max_new_tokens=10, stop=("zzzz", stop), include_stop_str_in_output=include)
        out[f"stop_include={include}"] = {e: _done(engine.generate(prompts, sp)) for e, engine in engines.items()}


def _cross_logprobs(hf, engines, prompts, settings) -> dict:
    """log-probs: every engine x mode x filter setting."""
    from megarl.rollout.engine import SamplingParams

    def reference(done, temperature, top_k, top_p, mode):
        seqs = [prompts[c["prompt_index"]] + c["token_ids"] for c in done]
        ref = []
        with torch.no_grad():
            for c, seq in zip(done, seqs):
                logits = hf.model(torch.tensor([seq])).logits[0]
                p = len(prompts[c["prompt_index"]])
                ref.append(reference_logprobs(logits[p - 1 : len(seq) - 1], c["token_ids"], temperature, top_k,
                                              top_p, mode))
        return ref

    lp = {}
    for name in settings:
        t, k, p = CROSS_SETTINGS[name]
        runs = {}
        for mode in ("unfiltered", "processed"):
            sp = SamplingParams(n=2, temperature=t, top_k=k, top_p=p, max_new_tokens=8, seed=21, logprobs_mode=mode)
            runs[mode] = {e: _done(engine.generate(prompts, sp)) for e, engine in engines.items()}
            rec = {}
            for e, done in runs[mode].items():
                ref = reference(done, t, k, p, mode)
                rec[f"{e}_vs_reference"] = max(abs(a - b) for c, r in zip(done, ref) for a, b in zip(c["logprobs"], r))
            # where both engines drew the same tokens so far, they must report the same numbers
            shared = []
            for a, b in zip(runs[mode]["hf"], runs[mode]["megatron"]):
                for x, y, la, lb in zip(a["token_ids"], b["token_ids"], a["logprobs"], b["logprobs"]):
                    if x != y:
                        break
                    shared.append(abs(la - lb))
            rec["shared_positions"] = len(shared)
            rec["hf_vs_megatron_shared"] = max(shared, default=0.0)
            lp[f"{name}/{mode}"] = rec
        for e in engines:  # the mode changes the reported numbers only, never the draws
            a, b = runs["unfiltered"][e], runs["processed"][e]
            lp[f"{name}/modes"] = lp.get(f"{name}/modes", {})
            lp[f"{name}/modes"][f"{e}_same_tokens"] = [c["token_ids"] for c in a] == [c["token_ids"] for c in b]
            lp[f"{name}/modes"][f"{e}_gap"] = max(abs(x - y) for c, d in zip(a, b)
                                                   for x, y in zip(c["logprobs"], d["logprobs"]))
    return lp


def check_cross_engine_first(ctx, work_dir) -> dict:
    """Greedy, stop strings and the first half of the log-prob settings."""
    return check_cross_engine(ctx, work_dir, list(CROSS_SETTINGS)[:2])


def check_cross_engine_logprobs(ctx, work_dir) -> dict:
    """The second half of the cross-engine log-prob settings (on another rank, for balance)."""
    return check_cross_engine(ctx, work_dir, list(CROSS_SETTINGS)[2:], greedy_and_stops=False)


SINGLE_CHECKS = {  # rank of the tp1pp1 layout -> its share of the single-process checks
    0: ("cross_engine_first",),
    1: ("greedy", "logprobs", "in_place"),
    2: ("seeded", "filters_greedy", "finish", "bad_input"),
    3: ("cross_engine_logprobs", "update_weights", "sleep_wake"),
}


def run_single_checks(ctx, rank: int, work_dir) -> dict:
    import traceback

    out = {}
    for name in SINGLE_CHECKS.get(rank, ()):
        fn = globals()["check_" + name]
        t0 = time.time()
        try:
            out[name] = fn(ctx, work_dir) if name.startswith("cross_engine") else fn(ctx)
        except Exception:  # noqa: BLE001 - reported to the test that owns the check
            out[name] = {"crashed": traceback.format_exc()}
        out[name + "_seconds"] = round(time.time() - t0, 2)
    return out


def layout_name(layout) -> str:
    name = f"tp{layout.tp}pp{layout.pp}"
    if layout.vpp:
        name += f"vpp{layout.vpp}"
    if layout.sequence_parallel:
        name += "sp"
    return name


def run(out_path: str, rank: int, world: int) -> None:
    """Every check, on an initialised 4-rank world; rank 0 writes out_path (JSON)."""
    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel
    from megarl.rollout.engine import SamplingParams
    from megarl.rollout.megatron_engine import MegatronEngine

    out_path = str(out_path)
    assert world == 4, "run with --nproc_per_node=4"
    t_start = time.time()
    spec = tiny_spec()
    state = random_hf_state(spec, seed=11)
    work_dir = os.path.dirname(os.path.abspath(out_path))
    if rank == 0:  # transformers' save_pretrained writes on global rank 0 only
        save_hf_model(hf_model_dir(work_dir), spec, state)
    dist.barrier()
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
    topk_processed = dataclasses.replace(topk_params, logprobs_mode="processed")
    records = []
    single: dict = {}
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
        # processed log-probs: the same draws, the filtered distribution's numbers
        processed = engine.generate(prompts, topk_processed)
        rec["processed_same_tokens"] = [c.token_ids for c in processed] == rec["samples"]["topk"]
        lp_ref = trainer_logprobs(chunks, groups, spec, prompts, processed, 0.8, spec.vocab_size, 20, 0.9,
                                  "processed")
        rec["processed_logprob_max_abs_diff"] = max_diff(processed, lp_ref)
        a = engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=4))
        b = engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=4))
        rec["unseeded"] = [[c.token_ids for c in a], [c.token_ids for c in b]]
        if layout_name(layout) == "tp2pp1":
            rec["sampling_fn"] = sampling_function_check(groups)
        rec["sp_restored"] = bool(chunks[0].config.sequence_parallel) == layout.sequence_parallel
        rec["training_restored"] = all(c.training for c in chunks)
        if layout_name(layout) == "tp1pp1":
            ctx = dict(layout=layout, groups=groups, spec=spec, state=state, chunks=chunks)
            single.update(run_single_checks(ctx, rank, work_dir))
        rec["seconds"] = round(time.time() - t0, 2)
        records.append(rec)
        del engine, chunks
        destroy_parallel()

    gathered = [None] * world if rank == 0 else None
    dist.gather_object((records, single), gathered, dst=0)
    if rank == 0:
        result = dict(records=[r for rs, _ in gathered for r in rs], single={k: v for _, s in gathered for k, v in s.items()},
                      total_seconds=round(time.time() - t_start, 2))
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, out_path)
    dist.barrier()


def main() -> int:
    from megarl.parallel.groups import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed()
    run(sys.argv[1], rank, world)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
