"""The interface every rollout engine implements.

Prompts go in as token ids; completions come back with token ids, text, per-token log-probs and
why generation stopped. Weights arrive as buckets of HF-named full tensors (see
megarl.rollout.bridge).

One convention for every engine (MegatronEngine, HFEngine, VLLMEngine), set per call in
SamplingParams with the same defaults everywhere:

  * logprobs_mode="unfiltered" (default): the log-prob of each sampled token under
    log softmax(logits / temperature) over the WHOLE vocabulary; top-k / top-p only decide which
    tokens can be drawn. This is what an RL trainer recomputes from its own logits
    (megarl.ops.logprob_entropy(logits, tokens, temperature)), so engine and trainer log-probs
    are comparable for importance-sampling corrections whatever the filters.
    logprobs_mode="processed": the log-prob under the distribution actually sampled from:
    temperature, then top-k, then top-p, renormalised over the kept tokens (vLLM's
    "processed_logprobs"). The two are equal when top-k and top-p are off.
    Greedy decoding (temperature 0) reports log softmax(logits) in both modes (the sampling
    distribution is a point mass; the model's own distribution is the useful number).
    Note vLLM's "raw_logprobs" is log softmax(logits) BEFORE temperature: neither mode here.
  * include_stop_str_in_output=False (default, as vLLM): a completion ended by a stop string
    keeps every generated token in token_ids (up to and including the one that completes the
    stop string) and its text ends just BEFORE the stop string; True: the text ends just AFTER
    it (characters of the last token beyond the stop string are dropped either way).
    EOS ends a completion and stays in token_ids; text is decoded without special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

LOGPROBS_MODES = ("unfiltered", "processed")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature == 0 means greedy; top_k <= 0 and top_p >= 1 disable those filters.

    logprobs: report per-token log-probs; logprobs_mode: "unfiltered" or "processed" and
    include_stop_str_in_output: see the module docstring (the same meaning in every engine).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True
    logprobs_mode: str = "unfiltered"
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a tuple of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"SamplingParams.logprobs_mode must be one of {LOGPROBS_MODES}, "
                             f"got {self.logprobs_mode!r}")
        for name in ("logprobs", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    token_ids: the generated ids (stop string included, EOS included when it ended generation).
    logprobs: [len(token_ids)] log-probs of those ids (SamplingParams.logprobs_mode says of which
    distribution), or None.
    text: the decoded token_ids (no special tokens), cut at a stop string as
    SamplingParams.include_stop_str_in_output says.
    finish_reason: "stop" (EOS or a stop string) or "length" (max_new_tokens reached).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str
    extra: dict = field(default_factory=dict)


def cut_at_stop(text: str, stop: str, include: bool) -> str:
    """The text of a completion ended by `stop`, as vLLM cuts it: just before the first
    occurrence of the stop string, or just after it with include (anything the last token
    decoded to beyond the stop string is dropped either way). The first occurrence is the one
    that ended generation: matching runs after every token. Unchanged if `stop` is not in
    `text` (a stop string made of special tokens, which the text does not show)."""
    at = text.find(stop)
    if at < 0:
        return text
    return text[: at + len(stop)] if include else text[:at]


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
