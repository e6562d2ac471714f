"""MegatronEngine (in-process rollout on the trainer's megatron-core model) and the sampling
functions it uses.

Single process here; TP / PP / virtual PP / sequence parallelism run in ONE 4-rank launch of
megatron_engine_script.py (test_distributed_layouts). The model is a random tiny Qwen2 (hidden
64, 4 layers, GQA 4/2 heads, vocab 1000 padded to 1024, tied embeddings), float32.

Log-prob tolerance: the engine's per-token log-probs equal the trainer's full forward
(megatron's pipeline schedule + megarl.ops.logprob_entropy) within LOGPROB_ATOL = 2e-4 in float32.
The model's logits reach |z| ~ 100, so float32 rounding of the two computation orders (KV-cache
decode vs full sequence, different SDPA kernels) alone is ~1e-5; a wrong position, mask or
cache row moves log-probs by O(0.1-10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import megatron_engine_script as h  # noqa: E402

from megarl.rollout.engine import RolloutEngine, SamplingParams  # noqa: E402
from megarl.rollout.sampling import sample, top_k_top_p_mask  # noqa: E402

LOGPROB_ATOL = 2e-4
ROOT = Path(__file__).resolve().parents[2]


# ---- sampling functions ---------------------------------------------------------------------------


def test_sample_matches_softmax_distribution_and_reports_unfiltered_logprobs():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    rows = 40000
    logits = z.expand(rows, -1)
    u = torch.rand(rows, generator=torch.Generator().manual_seed(0))
    tokens, lp = sample(logits, u, temperature=0.7)
    freq = torch.bincount(tokens, minlength=5).float() / rows
    probs = torch.softmax(z[0] / 0.7, -1)
    assert (freq - probs).abs().max() < 0.01
    assert torch.allclose(lp, torch.log_softmax(z[0] / 0.7, -1)[tokens], atol=1e-6)


def test_sample_top_k_top_p_restrict_support_only():
    z = torch.tensor([[3.0, 2.9, 1.0, 0.5, -2.0, 2.0]])
    rows = 4000
    u = torch.rand(rows, generator=torch.Generator().manual_seed(1))
    tokens, lp = sample(z.expand(rows, -1), u, temperature=1.0, top_k=3)
    assert set(tokens.tolist()) == {0, 1, 5}
    # log-probs are of the unfiltered distribution at the temperature (documented convention)
    assert torch.allclose(lp, torch.log_softmax(z[0], -1)[tokens], atol=1e-6)
    p = torch.softmax(z[0], -1)  # sorted: 0 (.42), 1 (.38), 5 (.16), ...
    assert p[0] < 0.5 < p[0] + p[1]
    tokens, _ = sample(z.expand(rows, -1), u, temperature=1.0, top_p=0.5)
    assert set(tokens.tolist()) == {0, 1}
    # renormalised within the nucleus: P(0) = p0 / (p0 + p1)
    assert abs((tokens == 0).float().mean() - p[0] / (p[0] + p[1])) < 0.03
    tokens, _ = sample(z.expand(rows, -1), u, temperature=1.0, top_k=2, top_p=0.3)
    assert set(tokens.tolist()) == {0}


def test_sample_greedy_ties_masked_vocab_and_edge_uniforms():
    low = torch.finfo(torch.float32).min
    z = torch.tensor([[1.0, 5.0, 5.0, low], [low, low, 0.0, low]])
    tokens, lp = sample(z, torch.zeros(2), temperature=0.0)
    assert tokens.tolist() == [1, 2]  # lowest id on ties
    assert torch.allclose(lp, torch.log_softmax(z, -1).gather(1, tokens[:, None]).squeeze(1))
    for u in (0.0, 1.0 - 2**-24, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()):
        tokens, _ = sample(z, torch.full((2,), u), temperature=1.0)
        assert tokens[0] in (0, 1, 2) and tokens[1] == 2  # never a masked (padded) entry
    assert top_k_top_p_mask(z, 0, 1.0) is None


def test_prefill_groups_minimise_padding_within_budget():
    from megarl.rollout.megatron_engine import prefill_groups

    assert prefill_groups([5, 6, 7], 1000) == [(0, 3)]  # padding cheaper than another forward
    assert prefill_groups([10] * 4 + [500] * 4, 10**6) == [(0, 4), (4, 8)]
    groups = prefill_groups(list(range(1, 41)), 64, overhead_tokens=0)
    assert groups[0][0] == 0 and groups[-1][1] == 40
    assert all(a < b and (b - a == 1 or (b - a) * (b) <= 64) for a, b in groups)  # lens[b-1] == b
    assert all(x[1] == y[0] for x, y in zip(groups, groups[1:]))
    assert prefill_groups([300], 16) == [(0, 1)]  # a prompt longer than the budget goes alone


# ---- the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel, single_process_world

    torch.set_num_threads(1)
    with single_process_world():
        layout = ParallelLayout()
        groups = init_parallel(layout, seed=1234)
        spec = h.tiny_spec()
        state = h.random_hf_state(spec, seed=11)
        chunks = h.build(spec, layout, groups, state)
        try:
            yield dict(layout=layout, groups=groups, spec=spec, state=state, chunks=chunks)
        finally:
            destroy_parallel()


def make_engine(world, tokenizer=None, **settings):
    from megarl.rollout.megatron_engine import MegatronEngine

    settings.setdefault("eos_token_ids", ())
    settings.setdefault("max_seq_len", 64)
    return MegatronEngine(world["chunks"], world["spec"], world["layout"], world["groups"],
                          tokenizer if tokenizer is not None else h.CharTokenizer(), **settings)


PROMPTS = h.test_prompts()


def test_is_a_rollout_engine(world):
    assert isinstance(make_engine(world), RolloutEngine)


@pytest.mark.parametrize("settings", [dict(max_batch=64), dict(max_batch=3, compact_below=1.0),
                                      dict(max_batch=4, compact_below=0.0), dict(prefill_tokens=16)],
                         ids=["one-wave", "waves+always-compact", "waves+never-compact", "prefill-groups"])
def test_greedy_equals_full_recompute_loop(world, settings):
    engine = make_engine(world, **settings)
    out = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    ref = h.naive_greedy(world["chunks"], world["groups"], world["spec"], PROMPTS, 8, world["spec"].vocab_size)
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(2)]
    assert [c.token_ids for c in out] == [r for r in ref for _ in range(2)]
    assert all(c.finish_reason == "length" for c in out)
    assert len(set(tuple(r) for r in ref)) == len(ref)  # the model does not collapse to one answer


@pytest.mark.parametrize("sampling", [
    SamplingParams(n=3, temperature=0.8, max_new_tokens=8, seed=3),
    SamplingParams(n=2, temperature=1.0, top_k=5, top_p=0.9, max_new_tokens=8, seed=4),
], ids=["t0.8", "topk-topp"])
def test_logprobs_equal_trainer_forward(world, sampling):
    engine = make_engine(world, max_batch=4)  # several waves and a compaction on the way
    out = engine.generate(PROMPTS, sampling)
    ref = h.trainer_logprobs(world["chunks"], world["groups"], world["spec"], PROMPTS, out,
                             sampling.temperature, world["spec"].vocab_size)
    diffs = [abs(a - b) for c, r in zip(out, ref) for a, b in zip(c.logprobs, r)]
    assert len(diffs) == sum(len(c.token_ids) for c in out) > 0
    assert max(diffs) < LOGPROB_ATOL


def test_seeded_sampling_is_reproducible(world):
    engine = make_engine(world)
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    a = engine.generate(PROMPTS, sp)
    b = engine.generate(PROMPTS, sp)
    c = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=8))
    ids = lambda out: [x.token_ids for x in out]  # noqa: E731
    assert ids(a) == ids(b) and [x.logprobs for x in a] == [x.logprobs for x in b]
    # each completion has its own stream: batching (waves, compaction) does not change it
    assert ids(make_engine(world, max_batch=2, compact_below=1.0).generate(PROMPTS, sp)) == ids(a)
    assert ids(a) != ids(c)
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1  # the n samples of a prompt differ
    # no seed: every call draws afresh (from the engine's base seed and call counter)
    d = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8))
    e = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8))
    assert ids(d) != ids(e)


def test_filters_that_keep_one_token_are_greedy(world):
    engine = make_engine(world)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    for sp in (SamplingParams(temperature=1.0, top_k=1, max_new_tokens=6, seed=1),
               SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=6, seed=2)):
        assert [c.token_ids for c in engine.generate(PROMPTS, sp)] == [c.token_ids for c in greedy]


def test_finish_reasons_eos_stop_strings_length(world):
    tok = h.CharTokenizer()
    ref = make_engine(world).generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    eos = ref[0].token_ids[3]
    out = make_engine(world, eos_token_ids=(eos,)).generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    for c, r in zip(out, ref):
        if eos in r.token_ids:
            k = r.token_ids.index(eos)
            assert c.token_ids == r.token_ids[: k + 1]  # EOS kept in token_ids
            assert (c.finish_reason, c.extra["stop_reason"]) == ("stop", eos)
        else:
            assert c.token_ids == r.token_ids and c.finish_reason == "length"
    assert out[0].text == tok.decode(ref[0].token_ids[:4])
    # a special (skipped) EOS does not appear in the text
    special = make_engine(world, tokenizer=h.CharTokenizer(special={eos}), eos_token_ids=(eos,))
    assert special.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=10))[0].text == \
        tok.decode(ref[0].token_ids[:3])

    text = tok.decode(ref[1].token_ids)
    stop = text[4:6]
    out = make_engine(world).generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, stop=(stop, "zzzz")))
    for c, r in zip(out, ref):
        full = tok.decode(r.token_ids)
        cut = full.find(stop)
        if cut >= 0:
            # token_ids end with the token completing the stop string; the text ends before it
            assert c.token_ids == r.token_ids[: cut + len(stop)]
            assert c.text == full[:cut]
            assert (c.finish_reason, c.extra["stop_reason"]) == ("stop", stop)
        else:
            assert c.token_ids == r.token_ids and c.text == full and c.finish_reason == "length"
    assert out[1].finish_reason == "stop"

    out = make_engine(world).generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_new_tokens=3, logprobs=False, seed=0))
    assert out[0].logprobs is None and len(out[0].token_ids) == 3 and out[0].finish_reason == "length"


def test_engine_follows_in_place_weight_changes(world):
    """Colocated: the engine IS the trainer's model, so an optimizer step needs no sync."""
    engine = make_engine(world)
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=5)
    before = engine.generate(PROMPTS, sp)
    params = [p for c in world["chunks"] for p in c.parameters()]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean())
        after = engine.generate(PROMPTS, sp)
        ref = h.trainer_logprobs(world["chunks"], world["groups"], world["spec"], PROMPTS, after, 1.0,
                                 world["spec"].vocab_size)
        assert max(abs(a - b) for c, r in zip(after, ref) for a, b in zip(c.logprobs, r)) < LOGPROB_ATOL
        assert [c.logprobs for c in after] != [c.logprobs for c in before]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def test_update_weights_loads_hf_buckets_into_another_model(world):
    from megarl.rollout.megatron_engine import MegatronEngine

    spec, layout, groups = world["spec"], world["layout"], world["groups"]
    other = h.build(spec, layout, groups, h.random_hf_state(spec, seed=99))
    engine = MegatronEngine(other, spec, layout, groups, h.CharTokenizer(), eos_token_ids=())
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    want = [c.token_ids for c in make_engine(world).generate(PROMPTS, sp)]
    assert [c.token_ids for c in engine.generate(PROMPTS, sp)] != want
    names = sorted(world["state"])
    half = len(names) // 2
    engine.update_weights(iter([{n: world["state"][n] for n in names[:half]},
                                {n: world["state"][n] for n in names[half:]}]))
    assert [c.token_ids for c in engine.generate(PROMPTS, sp)] == want

    with pytest.raises(ValueError, match="model.norm.weight"):
        engine.update_weights([{n: world["state"][n] for n in names if n != "model.norm.weight"}])
    with pytest.raises(ValueError, match="bucket 0 is a list"):
        engine.update_weights([list(world["state"].items())])


def test_sleep_frees_cache_and_wake_restores(world):
    engine = make_engine(world)
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    first = engine.generate(PROMPTS, sp)
    assert engine._kv is not None
    engine.sleep()
    assert engine._kv is None
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, sp)
    engine.wake()
    assert [c.token_ids for c in engine.generate(PROMPTS, sp)] == [c.token_ids for c in first]


def test_bad_input_is_a_clear_error(world):
    from megarl.rollout.megatron_engine import MegatronEngine, MegatronEngineConfig

    engine = make_engine(world)
    sp = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], sp)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], sp)
    with pytest.raises(ValueError, match=r"prompt 0 has token 1000"):
        engine.generate([[1, 1000]], sp)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        engine.generate([[1] * 61], sp)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        MegatronEngine(world["chunks"], world["spec"], world["layout"], world["groups"], None,
                       eos_token_ids=()).generate([[1]], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="unknown settings"):
        make_engine(world, max_batches=3)
    with pytest.raises(ValueError, match="tp_sampling"):
        MegatronEngineConfig(tp_sampling="magic")
    with pytest.raises(ValueError, match="max_batch"):
        MegatronEngineConfig(max_batch=0)
    with pytest.raises(ValueError, match="EOS token id"):
        make_engine(world, eos_token_ids=(5000,))


# ---- TP / PP / VPP / SP: one 4-rank launch ------------------------------------------------------


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_engine") / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(ROOT / "tests" / "rollout" / "megatron_engine_script.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def test_distributed_layouts(distributed):
    recs = distributed["records"]
    layouts = {r["layout"] for r in recs}
    assert layouts == {"tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2", "tp1pp2vpp2", "tp2pp1sp"}
    base = next(r for r in recs if r["layout"] == "tp1pp1" and r["rank"] == 0)
    for r in recs:
        where = f"{r['layout']} rank {r['rank']}"
        assert r["greedy"] == r["naive"], f"{where}: greedy != full-recompute loop"
        assert r["greedy"] == base["greedy"], f"{where}: greedy differs from the single-process layout"
        for key, tokens in r["samples"].items():
            # same seed -> same tokens, whatever the layout and TP sampling method
            assert tokens == base["samples"][key.split("_")[0]], f"{where}: {key} samples differ from tp1pp1"
        assert r["logprob_max_abs_diff"] < LOGPROB_ATOL, where
        if r["layout"] in ("tp2pp1", "tp2pp2"):
            assert set(r["samples"]) == {"plain", "topk", "plain_gather", "topk_gather"}
            assert r["logprob_diff_between_methods"] < 1e-5, where
        assert r["unseeded"][0] != r["unseeded"][1], where
        assert r["sp_restored"] and r["training_restored"], where
    checks = [c for r in recs if "sampling_fn" in r for c in r["sampling_fn"]]
    assert len(checks) == 6 * 4  # tp2pp1: every rank
    for c in checks:
        assert c["gather_equal"] and c["gather_free_equal"] and c["prefilter_equal"], c
        assert c["gather_lp_diff"] < 1e-5 and c["gather_free_lp_diff"] < 1e-5, c
        assert not c["padded_drawn"], c
    # every rank of a model-parallel group returned the same unseeded draws
    for layout in layouts:
        group = [r for r in recs if r["layout"] == layout]
        for r in group:
            mates = [m for m in group if m["dp_rank"] == r["dp_rank"]]
            assert all(m["unseeded"] == r["unseeded"] for m in mates), layout


@pytest.mark.slow
def test_rollout_benchmark_quick_run():
    """benchmarks/rollout.py --quick (SmolLM2-135M, 4 prompts x 8 tokens, ~1-3 min): it runs,
    both engines make every token, and greedy SmolLM2 agrees with transformers."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stdout, proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| megarl |"))
    assert float(row.split("|")[-2]) >= 0.9  # fraction of greedy tokens equal to transformers'
    assert "megarl / transformers tokens/s:" in proc.stdout
