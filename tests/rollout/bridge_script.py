"""WeightBridge under TP/PP/virtual PP on 4 CPU ranks (gloo), in ONE launch:

    torchrun --standalone --nproc_per_node=4 tests/rollout/bridge_script.py OUT_DIR

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
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    records.append(rec)


def main() -> int:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank, world = init_distributed()
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
    layout_seconds = {}
    for layout in LAYOUTS:
        t0 = time.perf_counter()
        groups = init_parallel(layout, seed=1234)
        for name, path in dirs.items():
            run_model(name, path, engines[name], layout, groups, records, rank)
        destroy_parallel()
        layout_seconds[layout_name(layout)] = round(time.perf_counter() - t0, 2)

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank == 0:
        result = dict(records=[r for rs in gathered for r in rs], layout_seconds=layout_seconds,
                      total_seconds=round(time.perf_counter() - t_start, 2))
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out_dir / "results.json")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
