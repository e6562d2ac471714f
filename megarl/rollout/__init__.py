"""Rollout engines (in-process megatron-core, vLLM, transformers) behind one interface."""

from megarl.rollout.engine import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
