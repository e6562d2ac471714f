"""Fused RL ops. Each public function is the one dispatch point for its op: the C++/CUDA kernel
in megarl._C when it is built for the input's device, the torch reference otherwise.

    gae(rewards, values, mask, gamma, lam) -> (advantages, returns)
    group_advantages(scores, group_ids, mode, eps=1e-6) -> advantages
    logprob_entropy(logits, targets, temperature=1.0, tp_group=None) -> (logprobs, entropy)
    logprob_entropy_from_hidden(hidden, weight, targets, temperature=1.0, tp_group=None, chunk_size=...)
    checksum(t) -> [2] int64 (sum, index-weighted sum of t's bytes as int64 words)
    copy_checksum(dst, src) -> [2] int64 (dst.copy_(src), then checksum(dst), in one pass on CPU)
"""

from megarl.ops.advantages import gae, gae_reference, group_advantages, group_advantages_reference
from megarl.ops.checksum import checksum, checksum_reference, copy_checksum, copy_checksum_reference
from megarl.ops.logprob_entropy import (
    logprob_entropy,
    logprob_entropy_from_hidden,
    logprob_entropy_reference,
)

__all__ = [
    "checksum",
    "checksum_reference",
    "copy_checksum",
    "copy_checksum_reference",
    "gae",
    "gae_reference",
    "group_advantages",
    "group_advantages_reference",
    "logprob_entropy",
    "logprob_entropy_from_hidden",
    "logprob_entropy_reference",
]
