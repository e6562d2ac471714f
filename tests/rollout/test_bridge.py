"""WeightBridge: checksums and config errors (in this process), and ONE 4-rank torchrun launch
(tests/rollout/bridge_script.py, run by launch_script.py with megatron_engine_script.py) covering TP/PP in {1,2}x{1,2} and virtual PP 2, whose tp1pp1
layout also runs the one-process syncs into HFEngine / MegatronEngine (one per rank), so no
test calls init_parallel in the pytest process.

Tolerance: float32 on both sides; engine and trainer log-probs on the probe must agree within
1e-4 (measured: <= 1e-6 for transformers vs megatron, 0 for megatron vs megatron). Stale or
corrupt weights give differences of 1e-2 .. 1, a flipped bit in a checksum-ed tensor is exact.
"""

from __future__ import annotations

import json
import re

import pytest
from childproc import check_record
import torch

from megarl.rollout.bridge import (
    BridgeConfig,
    ProbeBatch,
    tensor_checksum,
)

ATOL = 1e-4
LAYOUTS = ["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2", "tp1pp2vpp2"]


# ---- pure parts ----------------------------------------------------------------------------------


def test_checksum_sees_every_bit_and_every_move():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 33, generator=g)
    assert tensor_checksum(x) == tensor_checksum(x.clone())
    flipped = x.clone()
    flipped.view(torch.int32)[100, 3] ^= 1  # lowest mantissa bit
    assert tensor_checksum(flipped) != tensor_checksum(x)
    swapped = x.clone()
    swapped[[10, 200]] = swapped[[200, 10]]  # same values, moved: a layout bug
    assert tensor_checksum(swapped) != tensor_checksum(x)
    assert tensor_checksum(x.view(33, 257)) != tensor_checksum(x)  # shape is part of it
    assert tensor_checksum(x.bfloat16()) != tensor_checksum(x)
    odd = torch.randn(7, generator=g).bfloat16()  # 14 bytes: not a whole number of int64 words
    odd2 = odd.clone()
    odd2.view(torch.int16)[6] ^= 1
    assert tensor_checksum(odd) != tensor_checksum(odd2)
    # a view at an odd offset and a non-contiguous tensor hash like their contiguous copies
    assert tensor_checksum(x[3:, 1]) == tensor_checksum(x[3:, 1].contiguous())
    assert tensor_checksum(x.t()) == tensor_checksum(x.t().contiguous())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bucket_mb=0), "bucket_mb"),
        (dict(verify_every=-1), "verify_every"),
        (dict(probe_atol=0), "probe_atol"),
        (dict(dtype="fp8"), "dtype"),
        (dict(probe_mode="sometimes"), "probe_mode"),
        (dict(probe_length=1), "probe_length"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BridgeConfig(**kwargs)


def test_probe_batch_checks_and_default():
    with pytest.raises(ValueError, match="needs >= 2"):
        ProbeBatch(((1,),))
    probe = ProbeBatch.random(100, num_sequences=5, length=10, seed=3)
    assert probe == ProbeBatch.random(100, num_sequences=5, length=10, seed=3)
    assert len({len(s) for s in probe.sequences}) > 1  # ragged, so padding is exercised
    assert all(0 <= t < 100 for s in probe.sequences for t in s)


# ---- one process: run by bridge_script.py in its tp1pp1 layout (one check per rank) --------------


def single(distributed, name: str) -> dict:
    """The result of one single-process check; its traceback if it crashed in the child."""
    return check_record(distributed, name, "bridge_script.py")


def assert_error(err, pattern: str, kind: str | None = None, type_name: str = "WeightSyncError") -> None:
    assert err is not None, f"nothing raised, expected {type_name} matching {pattern!r}"
    assert err["type"] == type_name and re.search(pattern, err["message"]), err
    if kind is not None:
        assert err["kind"] == kind, err


def test_sync_into_hf_engine_one_bucket_at_a_time(distributed):
    r = single(distributed, "sync_into_hf_engine")
    assert r["path"] == "gather"
    assert r["bytes"] == r["hf_bytes"] == sum(r["seen"])
    # each bucket fits the budget unless one tensor alone is larger (the 1000 x 64 embedding)
    assert max(r["seen"]) <= max(r["bucket_bytes"], r["biggest"])
    assert r["num_buckets"] == len(r["seen"]) > 5
    assert r["checksums_verified"] == r["num_tensors"] == r["state_tensors"]
    assert r["probe"] == "prompt_logprobs" and r["probe_max_abs_diff"] <= ATOL
    # the engine really holds the trainer's weights: its logits equal megatron's
    assert r["logits_max_abs_diff"] <= 2e-5


def test_bf16_engine_needs_the_dtype_and_then_checks_bits(distributed):
    r = single(distributed, "bf16_engine")
    assert_error(r["undeclared"], "set BridgeConfig.dtype", kind="checksum")
    assert r["undeclared"]["tensors"]
    assert r["checksums_verified"] == r["num_tensors"]
    assert 1e-4 < r["probe_max_abs_diff"] <= 0.1  # bf16 rounding, far from a stale engine


def test_broken_engines_are_reported(distributed):
    r = single(distributed, "broken_engines")
    assert_error(r["loads_half"], "stopped reading after 1 of", kind="stream")
    assert_error(r["raises"], "out of memory while loading", kind="engine")
    # never read by the engine: its sending checksum is still taken, the engine has none for it
    assert_error(r["skips_one"], r"engine does not hold 1 tensor\(s\): model.layers.1.mlp.up_proj.weight", kind="missing")
    assert r["skips_one"]["tensors"] == ["model.layers.1.mlp.up_proj.weight"]
    assert r["stale_after_failures"]  # a failed sync delivers no version
    assert_error(r["opaque"], "weight_checksums", type_name="ValueError")


def test_megatron_engine_shared_fast_and_tracked(distributed):
    r = single(distributed, "megatron_engine_paths")
    assert r["shared"] == dict(path="shared", bytes=0, probe_max_abs_diff=0.0)
    fast = r["fast"]
    assert fast["path"] == "fast" and fast["probe_max_abs_diff"] == 0.0
    assert fast["checksums_verified"] == fast["num_tensors"] == fast["num_params"]
    assert r["stale_after_step"]
    assert_error(r["verify_after_step"], "probe sequences")
    assert not r["stale_after_resync"]


# ---- 4 ranks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distributed(rollout_launch):
    """The records of bridge_script.py, run in the shared launch (conftest.py)."""
    return json.loads((rollout_launch / "bridge" / "results.json").read_text())


def _records(result, model=None):
    return [r for r in result["records"] if model is None or r["model"] == model]


def test_distributed_covers_all_layouts(distributed):
    seen = {(r["layout"], r["model"], r["rank"]) for r in _records(distributed)}
    assert seen == {(lay, m, rank) for lay in LAYOUTS for m in ("qwen2", "llama") for rank in range(4)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_distributed_sync_matches_trainer(distributed, layout):
    for r in _records(distributed):
        if r["layout"] != layout:
            continue
        where = f"{r['model']} {layout} rank {r['rank']}"
        assert r["stale_before"], where
        assert r["skipped_sync"]["ok"] and r["skipped_sync"]["max_abs_diff"] > 1e-2, (where, r["skipped_sync"])
        sync = r["sync"]
        assert sync["path"] == "gather" and sync["probe"] == "prompt_logprobs", where
        assert sync["checksums_verified"] == sync["tensors"] == (51 if r["model"] == "qwen2" else 38), (where, sync)
        assert sync["probe_max_abs_diff"] <= ATOL, (where, sync)
        assert not r["stale_after_sync"], where


@pytest.mark.parametrize("layout", LAYOUTS)
def test_distributed_engine_follows_optimizer_step(distributed, layout):
    for r in _records(distributed, "qwen2"):
        if r["layout"] != layout:
            continue
        where = f"{layout} rank {r['rank']}"
        assert r["stale_after_step"], where
        assert r["step_unsynced"]["ok"] and r["step_unsynced"]["max_abs_diff"] > 1e-2, (where, r["step_unsynced"])
        assert r["after_step_sync"]["probe_max_abs_diff"] <= ATOL, where
        assert r["after_step_sync"]["checksums_verified"] == 51, where
        assert not r["stale_after_resync"], where


@pytest.mark.parametrize("layout", LAYOUTS)
def test_distributed_corruption_named_on_its_model_parallel_group(distributed, layout):
    for model in ("qwen2", "llama"):
        recs = [r for r in _records(distributed, model) if r["layout"] == layout]
        assert sum(r["tampered_here"] for r in recs) == 1
        for r in recs:
            where = f"{model} {layout} rank {r['rank']}"
            if r["dp_rank"] == 0:  # the tampered rank's model-parallel group: every rank raises
                assert r["tamper"]["ok"], (where, r["tamper"])
                assert r["tamper"]["tensors"] == ["model.layers.3.mlp.down_proj.weight"], where
                assert "checksum mismatch for model.layers.3.mlp.down_proj.weight" in r["tamper"]["message"]
            else:  # other data-parallel replicas were not touched
                assert not r["tamper"]["raised"], where


@pytest.mark.parametrize("layout", LAYOUTS)
def test_distributed_megatron_engine_paths(distributed, layout):
    for r in _records(distributed, "qwen2"):
        if r["layout"] != layout:
            continue
        where = f"{layout} rank {r['rank']}"
        assert r["megatron_stale_probe"]["ok"], where
        fast, gathered = r["megatron_fast"], r["megatron_gather"]
        assert fast["path"] == "fast" and fast["probe_max_abs_diff"] == 0.0, (where, fast)
        assert fast["checksums_verified"] == fast["tensors"] > 0, (where, fast)
        assert gathered["path"] == "gather" and gathered["probe_max_abs_diff"] == 0.0, (where, gathered)
        assert gathered["checksums_verified"] == gathered["tensors"] == 51, (where, gathered)
        for key in ("megatron_generate_probe", "hf_generate_probe"):
            assert r[key]["probe"] == "generate" and r[key]["max_abs_diff"] <= ATOL, (where, key, r[key])


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "tp1pp1"])
def test_distributed_failure_on_one_rank_raises_on_its_whole_group(distributed, layout):
    """An engine failing on ONE rank (dp 0, tp 0, pp 0) while loading, in the probe, unreadable,
    or on another sync path: every rank of that model-parallel group raises the same error (the
    launch would hang otherwise: the ranks agree before each collective phase), the other
    data-parallel replica syncs, and the bridge works afterwards."""
    recs = [r for r in _records(distributed, "qwen2") if r["layout"] == layout]
    assert sum(r["culprit"] for r in recs) == 1
    for r in recs:
        where = f"{layout} rank {r['rank']}"
        if r["dp_rank"] != 0:
            for key in ("fails_loading", "fails_probe", "unreadable_here", "mixed_paths"):
                assert r[key] is None, (where, key, r[key])
        else:
            assert_error(r["fails_loading"], r"rank \d \(tp 0, pp 0\): FailsOn failed while loading bucket 1: "
                                             "RuntimeError: injected failure in update_weights", kind="engine")
            assert_error(r["fails_probe"], r"rank \d \(tp 0, pp 0\): FailsOn failed in the probe: RuntimeError: "
                                           "injected failure in prompt_logprobs", kind="engine")
            assert_error(r["unreadable_here"], r"rank \d \(tp 0, pp 0\): Opaque cannot be checksummed",
                         type_name="ValueError")
            assert_error(r["mixed_paths"], r"the ranks chose different sync paths \(this one: fast\)",
                         type_name="ValueError")
        assert r["after_failures"]["probe_max_abs_diff"] <= ATOL, where
        assert r["after_failures"]["checksums_verified"] == 51, where
