"""Checksum of a tensor's exact bytes, fused: what the weight bridge compares on both sides of a
sync (megarl.rollout.bridge.tensor_checksum).

The bytes of the tensor in row-major (contiguous) order, zero-padded to a multiple of 8, read
as n little-endian int64 words w_1 .. w_n (native byte order; every supported device is
little-endian)::

    sum      = w_1 + w_2 + ... + w_n                          (mod 2**64)
    weighted = 1*swap(w_1) + 2*swap(w_2) + ... + n*swap(w_n)  (mod 2**64)

with swap(w) exchanging the word's two 32-bit halves, returned as an int64 tensor [2] =
(sum, weighted) on the input's device (two's complement of the unsigned values). Integer sums
wrap, so the result does not depend on reduction order: the reference, the CPU kernel (any
thread count) and the CUDA kernel agree bit for bit. Any single changed bit changes `sum`; a
word moved to another index (a permuted layout, two rows swapped) changes `weighted`. The swap:
mod 2**64 a change of bit 63 is worth 2**63 times any weight, so flips of bit 63 in an even
number of words (the sign of every other float32, the conjugate of a complex64 tensor) would
cancel in both sums; swapped, they are bit-31 changes, which the weights keep apart. dtype and
shape are not part of it (tensor_checksum adds them).

Kernels: csrc/checksum.cpp (one read of the tensor, at::parallel_for over 4 MiB chunks, the
weighted sum by running sums: additions only), csrc/cuda/checksum.cu (grid-stride loop, warp
reduction, one 64-bit atomicAdd pair per block). ``checksum`` is the one dispatch point.
"""

from __future__ import annotations

import torch

from megarl import _ext

__all__ = ["checksum", "checksum_reference"]


def checksum_reference(t: torch.Tensor) -> torch.Tensor:
    """[2] int64 (sum, weighted) of the tensor's bytes as int64 words; see the module docstring.

    Plain torch; allocates the words' index vector and their product (several passes): the
    compiled kernels compute the same numbers in one read.
    """
    raw = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    pad = -raw.numel() % 8
    if pad or raw.storage_offset() % 8:  # int64 view needs whole, 8-byte aligned words
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int64)
    swapped = (words << 32) | ((words >> 32) & 0xFFFFFFFF)  # >> is arithmetic: keep the low half
    index = torch.arange(1, words.numel() + 1, dtype=torch.int64, device=words.device)
    return torch.stack([words.sum(), (swapped * index).sum()])


def _check_input(t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"checksum: t must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"checksum: t must be a dense (strided) tensor, got layout {t.layout}")


def checksum(t: torch.Tensor) -> torch.Tensor:
    """(sum, weighted) of the tensor's bytes as int64 words; see ``checksum_reference``.

    Args:
        t: any dense tensor, any dtype, any strides (a non-contiguous one is checksummed as its
            contiguous copy, a conjugate or negative view as its resolved values).
    Returns:
        [2] int64 on t's device.
    """
    _check_input(t)
    t = t.detach()
    if _ext.has_kernel("checksum", t.device):
        return torch.ops.megarl.checksum(t)
    return checksum_reference(t)


def _register() -> None:
    @torch.library.register_fake("megarl::checksum")
    def _checksum_fake(t):
        return torch.empty(2, dtype=torch.int64, device=t.device)


if _ext.extension_loaded() and hasattr(torch.ops.megarl, "checksum"):
    _register()
