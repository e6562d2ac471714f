"""The rollout engine of the RL loop, and how the trained weights reach it.

rollout.engine:
  "megatron"  MegatronEngine on the actor's own modules: colocated, shared storage, nothing to
              copy after an update (the CPU default; TP/PP collectives as in training).
  "hf"        an HFEngine (transformers) per rank, holding its own HF-layout copy of the model.
  "vllm"      a VLLMEngine per rank (rollout.vllm: VLLMEngineConfig; vLLM is an optional extra).

With a separate engine, a WeightBridge (megarl.rollout.bridge, config rollout.bridge) syncs the
actor into it once at start (after a resume too) and after every step's updates: buckets
gathered over TP and broadcast over PP, every tensor checksummed on both sides, and the log-prob
probe every rollout.bridge.verify_every syncs; a failed check raises WeightSyncError naming the
tensor or probe. With rollout.sleep the engine sleeps while the actor trains (frees its memory
on GPU) and wakes for the sync.
"""

from __future__ import annotations

import torch


def make_engine(cfg, actor_modules, spec, layout, groups, tokenizer, hf_dir: str, dtype: torch.dtype):
    """(engine, bridge or None) for RolloutConfig `cfg`."""
    from megarl.rollout.bridge import WeightBridge

    if cfg.engine == "megatron":
        from megarl.rollout.megatron_engine import MegatronEngine

        return MegatronEngine(actor_modules, spec, layout, groups, tokenizer), None
    if cfg.engine == "hf":
        from megarl.rollout.hf_engine import HFEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = HFEngine(hf_dir, dtype=dtype, device=device)
    elif cfg.engine == "vllm":
        from megarl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(hf_dir, config=cfg.vllm)
    else:
        raise ValueError(f"rollout.engine must be 'megatron', 'hf' or 'vllm', got {cfg.engine!r}")
    return engine, WeightBridge(actor_modules, spec, layout, groups, config=cfg.bridge)


def sync_metrics(report) -> dict[str, float]:
    """The metrics of one WeightBridge sync (per rank; rank 0 logs its own)."""
    out = {
        "sync/seconds": report.seconds,
        "sync/bytes": float(report.bytes),
        "sync/buckets": float(report.num_buckets),
        "sync/checksum_s": report.checksum_s,
        "sync/checksums_verified": float(report.checksums_verified),
    }
    if report.probe_max_abs_diff is not None:
        out["sync/probe_max_abs_diff"] = report.probe_max_abs_diff
    return out
