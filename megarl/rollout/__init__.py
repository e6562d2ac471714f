"""Rollout engines (in-process megatron-core, vLLM, transformers) behind one interface.

The interface (SamplingParams, Completion, RolloutEngine) imports with torch alone; the engines
are exported lazily, so `import megarl.rollout` imports neither megatron, transformers nor vLLM:

    from megarl.rollout import MegatronEngine, SamplingParams
"""

from __future__ import annotations

import importlib

from megarl.rollout.engine import LOGPROBS_MODES, Completion, RolloutEngine, SamplingParams

_LAZY = {
    "MegatronEngine": "megarl.rollout.megatron_engine",
    "MegatronEngineConfig": "megarl.rollout.megatron_engine",
    "HFEngine": "megarl.rollout.hf_engine",
    "VLLMEngine": "megarl.rollout.vllm_engine",
    "VLLMEngineConfig": "megarl.rollout.vllm_engine",
}

__all__ = ["LOGPROBS_MODES", "Completion", "RolloutEngine", "SamplingParams", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
