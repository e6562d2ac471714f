"""WeightBridge: checksums, config errors, one-process syncs into HFEngine / MegatronEngine, and
ONE 4-rank torchrun launch (tests/rollout/bridge_script.py) covering TP/PP in {1,2}x{1,2} and
virtual PP 2.

Tolerance: float32 on both sides; engine and trainer log-probs on the probe must agree within
1e-4 (measured: <= 1e-6 for transformers vs megatron, 0 for megatron vs megatron). Stale or
corrupt weights give differences of 1e-2 .. 1, a flipped bit in a checksum-ed tensor is exact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarl.rollout.bridge import (
    BridgeConfig,
    ProbeBatch,
    WeightBridge,
    WeightSyncError,
    tensor_checksum,
)

HERE = Path(__file__).parent
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


# ---- one process ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """TP1 PP1 megatron state in this process, and a tiny Qwen2 HF directory."""
    sys.path.insert(0, str(HERE))
    from bridge_script import save_tiny_model

    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel, single_process_world

    path = tmp_path_factory.mktemp("tiny-qwen2")
    save_tiny_model(path, "qwen2", seed=0)
    with single_process_world():
        layout = ParallelLayout()
        groups = init_parallel(layout, seed=5)
        try:
            yield path, layout, groups
        finally:
            destroy_parallel()


def _trainer(world, salt=0):
    from bridge_script import randomise

    from megarl.models.builder import build_model
    from megarl.models.hf_config import arch_spec

    path, layout, groups = world
    spec = arch_spec(path)
    chunks = build_model(spec, layout, groups=groups)
    randomise(chunks, spec, layout, groups, salt=salt)
    return spec, chunks


def test_sync_into_hf_engine_one_bucket_at_a_time(world):
    from megarl.rollout.hf_engine import HFEngine

    path, layout, groups = world
    spec, chunks = _trainer(world)
    engine = HFEngine(path)
    bucket_mb = 0.03
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(bucket_mb=bucket_mb, probe_atol=ATOL))
    seen = []
    bridge.add_transit_hook(lambda b: seen.append(sum(t.numel() * t.element_size() for t in b.values())))
    report = bridge.sync(engine)
    assert report.path == "gather"
    hf_bytes = sum(p.numel() for p in engine.model.parameters()) * 4
    assert report.bytes == hf_bytes == sum(seen)
    # each bucket fits the budget unless one tensor alone is larger (the 1000 x 64 embedding)
    biggest = max(t.numel() * 4 for t in engine.model.state_dict().values())
    assert max(seen) <= max(bucket_mb * 2**20, biggest)
    assert report.num_buckets == len(seen) > 5
    assert report.checksums_verified == report.num_tensors == len(engine.model.state_dict())
    assert report.probe == "prompt_logprobs" and report.probe_max_abs_diff <= ATOL
    # the engine really holds the trainer's weights: its logits equal megatron's
    ids = torch.tensor([[5, 17, 300, 42, 999, 7]])
    with torch.no_grad():
        hf = engine.model(ids).logits
        mc = chunks[0](ids, torch.arange(6)[None], None)[..., : spec.vocab_size]
    torch.testing.assert_close(hf, mc, rtol=0, atol=2e-5)


def test_bf16_engine_needs_the_dtype_and_then_checks_bits(world):
    from megarl.rollout.hf_engine import HFEngine

    path, layout, groups = world
    spec, chunks = _trainer(world, salt=1)
    engine = HFEngine(path, dtype=torch.bfloat16)
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(verify_every=0))
    with pytest.raises(WeightSyncError, match="set BridgeConfig.dtype") as err:
        bridge.sync(engine)
    assert err.value.kind == "checksum" and err.value.tensors
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(dtype="bfloat16", probe_atol=0.1))
    report = bridge.sync(engine)
    assert report.checksums_verified == report.num_tensors
    assert 1e-4 < report.probe_max_abs_diff <= 0.1  # bf16 rounding, far from a stale engine


class _LoadsHalf:
    """A broken engine: reads the first bucket only (as an engine that drops a stream would)."""

    def __init__(self, inner):
        self.inner = inner
        self.model = inner.model

    def update_weights(self, buckets):
        for bucket in buckets:
            self.inner.update_weights([bucket])
            return


class _Raises(_LoadsHalf):
    def update_weights(self, buckets):
        next(iter(buckets))
        raise ValueError("out of memory while loading")


def test_broken_engines_are_reported(world):
    from megarl.rollout.hf_engine import HFEngine

    path, layout, groups = world
    spec, chunks = _trainer(world, salt=2)
    inner = HFEngine(path)
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(bucket_mb=0.03))
    with pytest.raises(WeightSyncError, match="stopped reading after 1 of") as err:
        bridge.sync(_LoadsHalf(inner))
    assert err.value.kind == "stream"
    with pytest.raises(WeightSyncError, match="out of memory while loading") as err:
        bridge.sync(_Raises(inner))
    assert err.value.kind == "engine"
    assert bridge.is_stale()  # a failed sync delivers no version
    with pytest.raises(ValueError, match="weight_checksums"):
        bridge.sync(type("Opaque", (), {"update_weights": lambda self, b: [*b]})())


def test_megatron_engine_shared_fast_and_tracked(world):
    from megarl.models.builder import build_model
    from megarl.rollout.megatron_engine import MegatronEngine

    path, layout, groups = world
    spec, chunks = _trainer(world, salt=3)
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(probe_atol=ATOL))
    shared = MegatronEngine(chunks, spec, layout, groups, max_batch=4, max_seq_len=64)
    report = bridge.sync(shared)
    assert report.path == "shared" and report.bytes == 0 and report.probe_max_abs_diff == 0.0

    copy = MegatronEngine(build_model(spec, layout, groups=groups), spec, layout, groups, max_batch=4, max_seq_len=64)
    opt = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=0.1)
    bridge.track_optimizer(opt)
    report = bridge.sync(copy)
    assert report.path == "fast" and report.probe_max_abs_diff == 0.0
    assert report.checksums_verified == report.num_tensors == sum(1 for c in chunks for _ in c.parameters())
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert bridge.is_stale()
    with pytest.raises(WeightSyncError, match="probe sequences"):
        bridge.verify(copy)
    bridge.sync(copy)
    assert not bridge.is_stale()


# ---- 4 ranks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge-dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(HERE / "bridge_script.py"), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    try:
        log, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("bridge_script.py timed out:\n" + log[-5000:])
    assert proc.returncode == 0, log[-8000:]
    return json.loads((out / "results.json").read_text())


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
