"""The interface every rollout engine implements.

Prompts go in as token ids; completions come back with token ids, text, the per-token
log-probs of the sampling distribution (after temperature / top-p / top-k) and why generation
stopped. Weights arrive as buckets of HF-named full tensors (see megarl.rollout.bridge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature == 0 means greedy; top_k <= 0 and top_p >= 1 disable those filters."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    token_ids: the generated ids (stop string included, EOS included when it ended generation).
    logprobs: [len(token_ids)] log-probs of those ids under the sampling distribution, or None.
    finish_reason: "stop" (EOS or a stop string) or "length" (max_new_tokens reached).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str
    extra: dict = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, ordered prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""
        ...

    def update_weights(self, buckets: Iterable[dict[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors, bucket by bucket."""
        ...

    def sleep(self) -> None:
        """Release weights/KV-cache memory while the trainer runs (colocated mode)."""
        ...

    def wake(self) -> None:
        """Take the memory back before the next generate/update_weights."""
        ...
