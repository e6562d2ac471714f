"""WeightBridge under TP/PP/virtual PP on 4 CPU ranks (gloo), in ONE launch (the tests run it
through launch_script.py, together with megatron_engine_script.py; standalone:

    torchrun --standalone --nproc_per_node=4 tests/rollout/bridge_script.py OUT_DIR)

For each layout (tp, pp) in {1,2}x{1,2} and (tp1, pp2, vpp2), and two tiny random models
(Qwen2 with untied embeddings and QKV biases; Llama with tied embeddings), every rank owns an
HFEngine (transformers) and:
  1. before any sync the engine is stale and the probe says so (WeightSyncError "probe");
  2. after sync() the engine's log-probs on the probe equal the trainer's (float32);
  3. (Qwen2) after an Adam step on the megatron params the bridge reports stale, the probe fails,
     and the next sync brings the engine back to the trainer's log-probs;
  4. a tensor corrupted in transit on one rank of the first model-parallel group is named by a
     WeightSyncError on every rank of that group, and on no other rank;
  5. (Qwen2) a MegatronEngine over its own copy of the model: the fast path (shard copies), the
     gather path through its HF update_weights, and the generate probe.
In the tp1pp1 layout each rank also runs one single-process check (check_* below: syncs into
HFEngine and MegatronEngine, bf16, broken engines), so that no test calls init_parallel in the
pytest process.
Rank 0 writes OUT_DIR/results.json; tests/rollout/test_bridge.py asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from megarl.models.builder import build_model
from megarl.models.hf_config import arch_spec
from megarl.models.mappings import find_mcore, normalize_mcore_name, to_global_name
from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_distributed, init_parallel
from megarl.rollout.bridge import BridgeConfig, WeightBridge, WeightSyncError

LAYOUTS = [
    ParallelLayout(tp=1, pp=1),
    ParallelLayout(tp=2, pp=1),
    ParallelLayout(tp=1, pp=2),
    ParallelLayout(tp=2, pp=2),
    ParallelLayout(tp=1, pp=2, vpp=2),
]
VOCAB = 1000  # not a multiple of 128 * tp: vocab padding is exercised
TAMPERED = "model.layers.3.mlp.down_proj.weight"  # lives on the last pipeline stage


def layout_name(layout: ParallelLayout) -> str:
    return f"tp{layout.tp}pp{layout.pp}" + (f"vpp{layout.vpp}" if layout.vpp else "")


def save_tiny_model(path: Path, arch: str, seed: int) -> None:
    """A tiny random HF model with a word-level tokenizer (HFEngine needs one; no download)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"], **common)
        cls = Qwen2ForCausalLM
    else:
        cfg = LlamaConfig(tie_word_embeddings=True, architectures=["LlamaForCausalLM"], **common)
        cls = LlamaForCausalLM
    torch.manual_seed(seed)
    cls(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t3").save_pretrained(path)


def _seed(name: str, salt: int) -> int:
    return zlib.crc32(name.encode()) * 31 + salt


def global_params(chunks, spec, layout, groups):
    """(global megatron name, mapping kind, param) of this rank's chunks."""
    for c in chunks:
        vp = c.vp_stage if c.vp_stage is not None else 0
        for local, p in c.named_parameters():
            name = to_global_name(spec, layout, groups.pp_rank, vp, normalize_mcore_name(local))
            yield name, find_mcore(spec, name)[0].kind, p


def randomise(chunks, spec, layout, groups, salt: int) -> None:
    """Non-trivial norms and biases (megatron initialises them to 1 and 0, which would hide a
    misplaced norm or bias), identical on the TP ranks that replicate a tensor."""
    with torch.no_grad():
        for name, kind, p in global_params(chunks, spec, layout, groups):
            g = torch.Generator().manual_seed(_seed(name, salt * 10 + (groups.tp_rank if kind != "replicated" else 0)))
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def adam_step(chunks, spec, layout, groups, salt: int) -> torch.optim.Optimizer:
    """One real Adam step on the megatron params with synthetic gradients (replicated tensors get
    the same gradient on every TP rank, as after megatron's gradient all-reduce)."""
    params = list(global_params(chunks, spec, layout, groups))
    opt = torch.optim.Adam([p for _, _, p in params], lr=3e-2)
    for name, kind, p in params:
        g = torch.Generator().manual_seed(_seed(name, 7 + salt * 10 + (groups.tp_rank if kind != "replicated" else 0)))
        p.grad = torch.randn(p.shape, generator=g)
    return opt


def expect_error(fn, kind: str) -> dict:
    try:
        fn()
    except WeightSyncError as e:
        return dict(raised=True, kind=e.kind, tensors=e.tensors, max_abs_diff=e.max_abs_diff,
                    message=str(e)[:2000], ok=e.kind == kind)
    return dict(raised=False, ok=False)


def run_model(name: str, model_dir: Path, engine, layout, groups, records: list, rank: int) -> None:
    from megarl.rollout.megatron_engine import MegatronEngine

    spec = arch_spec(model_dir)
    rec = dict(model=name, layout=layout_name(layout), rank=rank, tp_rank=groups.tp_rank,
               pp_rank=groups.pp_rank, dp_rank=groups.dp_rank)
    t0 = time.perf_counter()
    chunks = build_model(spec, layout, groups=groups)
    randomise(chunks, spec, layout, groups, salt=len(records))
    config = BridgeConfig(bucket_mb=0.05, probe_atol=1e-4)  # tiny buckets: many per stage
    bridge = WeightBridge(chunks, spec, layout, groups, config)

    # 1. a never-synced engine: stale, and the probe catches it
    rec["stale_before"] = bridge.is_stale()
    rec["skipped_sync"] = expect_error(lambda: bridge.verify(engine), "probe")

    # 2. sync, then the engine's log-probs equal the trainer's
    report = bridge.sync(engine)
    rec["sync"] = dict(path=report.path, buckets=report.num_buckets, tensors=report.num_tensors,
                       checksums_verified=report.checksums_verified, probe=report.probe,
                       probe_max_abs_diff=report.probe_max_abs_diff)
    rec["stale_after_sync"] = bridge.is_stale()

    # 3. the trainer steps; the engine is stale until the next sync
    if name == "qwen2":
        opt = adam_step(chunks, spec, layout, groups, salt=len(records))
        bridge.track_optimizer(opt)
        opt.step()
        rec["stale_after_step"] = bridge.is_stale()
        rec["step_unsynced"] = expect_error(lambda: bridge.verify(engine), "probe")
        report = bridge.sync(engine)
        rec["after_step_sync"] = dict(probe_max_abs_diff=report.probe_max_abs_diff,
                                      checksums_verified=report.checksums_verified)
        rec["stale_after_resync"] = bridge.is_stale()

    # 4. corruption in transit on one rank of data-parallel replica 0
    tamper_here = groups.dp_rank == 0 and groups.tp_rank == layout.tp - 1 and groups.pp_rank == layout.pp - 1

    def tamper(bucket):
        if tamper_here and TAMPERED in bucket:
            t = bucket[TAMPERED].clone()
            t[5, 7] += 1e-6
            bucket[TAMPERED] = t

    remove = bridge.add_transit_hook(tamper)
    rec["tampered_here"] = tamper_here
    rec["tamper"] = expect_error(lambda: bridge.sync(engine), "checksum")
    remove()
    bridge.sync(engine)  # repair

    # 5. MegatronEngine over its own copy of the model
    if name == "qwen2":
        copy = build_model(spec, layout, groups=groups)
        meng = MegatronEngine(copy, spec, layout, groups, max_batch=8, max_seq_len=64)
        rec["megatron_stale_probe"] = expect_error(lambda: bridge.verify(meng), "probe")
        report = bridge.sync(meng)
        rec["megatron_fast"] = dict(path=report.path, checksums_verified=report.checksums_verified,
                                    tensors=report.num_tensors, probe=report.probe,
                                    probe_max_abs_diff=report.probe_max_abs_diff)
        randomise(copy, spec, layout, groups, salt=99)  # make it stale again
        gathered = WeightBridge(chunks, spec, layout, groups, BridgeConfig(bucket_mb=0.05, probe_atol=1e-4,
                                                                          fast_path=False))
        report = gathered.sync(meng)
        rec["megatron_gather"] = dict(path=report.path, checksums_verified=report.checksums_verified,
                                      tensors=report.num_tensors, probe=report.probe,
                                      probe_max_abs_diff=report.probe_max_abs_diff)
        gen = WeightBridge(chunks, spec, layout, groups, BridgeConfig(probe_atol=1e-4, probe_mode="generate"))
        kind, diff = gen.verify(meng)
        rec["megatron_generate_probe"] = dict(probe=kind, max_abs_diff=diff)
        kind, diff = gen.verify(engine)
        rec["hf_generate_probe"] = dict(probe=kind, max_abs_diff=diff)
    # 6. an engine that fails on ONE rank of the model-parallel group (dp replica 0, tp 0, pp 0):
    # every rank of that group raises the same error, none hangs in a collective
    if name == "qwen2" and layout.tp * layout.pp > 1:
        culprit = groups.dp_rank == 0 and groups.tp_rank == 0 and groups.pp_rank == 0
        rec["culprit"] = culprit
        # into a MegatronEngine by the gather path: its read-back is collective over its groups
        rec["fails_loading"] = error_record(lambda: gathered.sync(FailsOn(meng, culprit, "update_weights")))
        rec["fails_probe"] = error_record(lambda: bridge.sync(FailsOn(engine, culprit, "prompt_logprobs")))
        # an engine the bridge cannot checksum on one rank only: a ValueError on all, before any bucket
        rec["unreadable_here"] = error_record(
            lambda: bridge.sync(FailsOn(engine, False, None) if not culprit else type("Opaque", (), {
                "update_weights": lambda self, b: [*b]})()))
        # different sync paths in one group (fast into a MegatronEngine copy here, gather elsewhere)
        rec["mixed_paths"] = error_record(lambda: bridge.sync(meng if culprit else engine))
        report = bridge.sync(engine)  # and the bridge still works afterwards
        rec["after_failures"] = dict(probe_max_abs_diff=report.probe_max_abs_diff,
                                     checksums_verified=report.checksums_verified)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    records.append(rec)


class FailsOn:
    """Wraps an engine; on the culprit rank its `method` raises (update_weights after taking one
    bucket). Everything else is the inner engine's, so the bridge treats it as that engine."""

    def __init__(self, inner, culprit: bool, method: str | None):
        self.inner, self.culprit, self.method = inner, culprit, method

    def __getattr__(self, name):
        if self.culprit and name == self.method:
            def fail(arg):
                if name == "update_weights":
                    next(iter(arg))
                raise RuntimeError(f"injected failure in {name}")
            return fail
        return getattr(self.inner, name)


# ---- single-process checks (TP1 PP1), run inside the launch ---------------------------------------
#
# They used to run in the pytest process, where init_parallel switches on megarl's CPU
# compatibility layer for megatron-core for the rest of the session. In the tp1pp1 layout every
# rank is an independent TP1 PP1 replica; each runs one of these checks (no collective crosses
# ranks) and the results go to results.json["single"].

SINGLE_ATOL = 1e-4


def error_record(fn) -> dict | None:
    """What fn raised (type, WeightSyncError fields, message), None if it returned."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type
        return dict(type=type(e).__name__, kind=getattr(e, "kind", None), tensors=getattr(e, "tensors", None),
                    message=str(e)[:2000])
    return None


def _trainer(model_dir, layout, groups, salt: int):
    spec = arch_spec(model_dir)
    chunks = build_model(spec, layout, groups=groups)
    randomise(chunks, spec, layout, groups, salt=salt)
    return spec, chunks


def check_sync_into_hf_engine(model_dir, layout, groups) -> dict:
    """A sync into HFEngine streams buckets one at a time within the budget, verifies every
    tensor, and leaves the engine's logits equal to megatron's."""
    from megarl.rollout.hf_engine import HFEngine

    spec, chunks = _trainer(model_dir, layout, groups, salt=0)
    engine = HFEngine(model_dir)
    bucket_mb = 0.03
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(bucket_mb=bucket_mb, probe_atol=SINGLE_ATOL))
    seen = []
    bridge.add_transit_hook(lambda b: seen.append(sum(t.numel() * t.element_size() for t in b.values())))
    report = bridge.sync(engine)
    ids = torch.tensor([[5, 17, 300, 42, 999, 7]])
    with torch.no_grad():
        hf = engine.model(ids).logits
        mc = chunks[0](ids, torch.arange(6)[None], None)[..., : spec.vocab_size]
    return dict(path=report.path, bytes=report.bytes, seen=seen, bucket_bytes=bucket_mb * 2**20,
                hf_bytes=sum(p.numel() for p in engine.model.parameters()) * 4,
                biggest=max(t.numel() * 4 for t in engine.model.state_dict().values()),
                num_buckets=report.num_buckets, checksums_verified=report.checksums_verified,
                num_tensors=report.num_tensors, state_tensors=len(engine.model.state_dict()),
                probe=report.probe, probe_max_abs_diff=report.probe_max_abs_diff,
                logits_max_abs_diff=(hf - mc).abs().max().item())


def check_bf16_engine(model_dir, layout, groups) -> dict:
    """A bf16 engine fails the checksum with the dtype hint, then passes with BridgeConfig.dtype."""
    from megarl.rollout.hf_engine import HFEngine

    spec, chunks = _trainer(model_dir, layout, groups, salt=1)
    engine = HFEngine(model_dir, dtype=torch.bfloat16)
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(verify_every=0))
    out = dict(undeclared=error_record(lambda: bridge.sync(engine)))
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(dtype="bfloat16", probe_atol=0.1))
    report = bridge.sync(engine)
    out.update(checksums_verified=report.checksums_verified, num_tensors=report.num_tensors,
               probe_max_abs_diff=report.probe_max_abs_diff)
    return out


class LoadsHalf:
    """A broken engine: reads the first bucket only (as an engine that drops a stream would)."""

    def __init__(self, inner):
        self.inner = inner
        self.model = inner.model

    def update_weights(self, buckets):
        for bucket in buckets:
            self.inner.update_weights([bucket])
            return


class SkipsOne(LoadsHalf):
    """A broken engine: loads every bucket but never reads one tensor of it."""

    SKIPPED = "model.layers.1.mlp.up_proj.weight"

    def update_weights(self, buckets):
        self.inner.update_weights({n: t for n, t in b.items() if n != self.SKIPPED} for b in buckets)

    def loaded_checksums(self, names):
        return self.inner.loaded_checksums(names)


class Raises(LoadsHalf):
    def update_weights(self, buckets):
        next(iter(buckets))
        raise ValueError("out of memory while loading")


def check_broken_engines(model_dir, layout, groups) -> dict:
    from megarl.rollout.hf_engine import HFEngine

    spec, chunks = _trainer(model_dir, layout, groups, salt=2)
    inner = HFEngine(model_dir)
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(bucket_mb=0.03))
    out = dict(loads_half=error_record(lambda: bridge.sync(LoadsHalf(inner))),
               raises=error_record(lambda: bridge.sync(Raises(inner))))
    out["skips_one"] = error_record(lambda: bridge.sync(SkipsOne(inner)))
    out["stale_after_failures"] = bridge.is_stale()  # a failed sync delivers no version
    out["opaque"] = error_record(lambda: bridge.sync(type("Opaque", (), {"update_weights": lambda self, b: [*b]})()))
    return out


def check_megatron_engine_paths(model_dir, layout, groups) -> dict:
    """MegatronEngine on the trainer's own chunks (shared), on a copy (fast path), and staleness
    after an SGD step."""
    from megarl.rollout.megatron_engine import MegatronEngine

    spec, chunks = _trainer(model_dir, layout, groups, salt=3)
    bridge = WeightBridge(chunks, spec, layout, groups, BridgeConfig(probe_atol=SINGLE_ATOL))
    shared = MegatronEngine(chunks, spec, layout, groups, max_batch=4, max_seq_len=64)
    report = bridge.sync(shared)
    out = dict(shared=dict(path=report.path, bytes=report.bytes, probe_max_abs_diff=report.probe_max_abs_diff))
    copy = MegatronEngine(build_model(spec, layout, groups=groups), spec, layout, groups, max_batch=4, max_seq_len=64)
    opt = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=0.1)
    bridge.track_optimizer(opt)
    report = bridge.sync(copy)
    out["fast"] = dict(path=report.path, probe_max_abs_diff=report.probe_max_abs_diff,
                       checksums_verified=report.checksums_verified, num_tensors=report.num_tensors,
                       num_params=sum(1 for c in chunks for _ in c.parameters()))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    out["stale_after_step"] = bridge.is_stale()
    out["verify_after_step"] = error_record(lambda: bridge.verify(copy))
    bridge.sync(copy)
    out["stale_after_resync"] = bridge.is_stale()
    return out


SINGLE_CHECKS = ("sync_into_hf_engine", "bf16_engine", "broken_engines", "megatron_engine_paths")  # by rank


def run_single_check(model_dir, layout, groups, rank: int) -> dict:
    import traceback

    if rank >= len(SINGLE_CHECKS):
        return {}
    name = SINGLE_CHECKS[rank]
    t0 = time.perf_counter()
    try:
        result = globals()["check_" + name](model_dir, layout, groups)
    except Exception:  # noqa: BLE001 - reported to the test that owns the check
        result = {"crashed": traceback.format_exc()}
    return {name: result, name + "_seconds": round(time.perf_counter() - t0, 2)}


def run(out_dir, rank: int, world: int) -> None:
    """Every check, on an initialised 4-rank world; rank 0 writes OUT_DIR/results.json."""
    out_dir = Path(out_dir)
    assert world == 4, "run with --nproc_per_node=4"
    t_start = time.perf_counter()
    dirs = {"qwen2": out_dir / "qwen2", "llama": out_dir / "llama"}
    if rank == 0:
        for i, (arch, path) in enumerate(dirs.items()):
            save_tiny_model(path, arch, seed=i)
    dist.barrier()
    from megarl.rollout.hf_engine import HFEngine

    engines = {name: HFEngine(path) for name, path in dirs.items()}
    records: list[dict] = []
    single: dict = {}
    layout_seconds = {}
    for layout in LAYOUTS:
        t0 = time.perf_counter()
        groups = init_parallel(layout, seed=1234)
        for name, path in dirs.items():
            run_model(name, path, engines[name], layout, groups, records, rank)
        if layout_name(layout) == "tp1pp1":
            single.update(run_single_check(dirs["qwen2"], layout, groups, rank))
        destroy_parallel()
        layout_seconds[layout_name(layout)] = round(time.perf_counter() - t0, 2)

    gathered = [None] * world if rank == 0 else None
    dist.gather_object((records, single), gathered, dst=0)
    if rank == 0:
        result = dict(records=[r for rs, _ in gathered for r in rs], layout_seconds=layout_seconds,
                      single={k: v for _, s in gathered for k, v in s.items()},
                      total_seconds=round(time.perf_counter() - t_start, 2))
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out_dir / "results.json")
    dist.barrier()


def main() -> int:
    torch.set_num_threads(1)
    rank, world = init_distributed()
    run(sys.argv[1], rank, world)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
