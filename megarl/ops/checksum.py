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

``copy_checksum(dst, src)`` copies and returns checksum(dst): the CPU kernel (csrc/checksum.cpp)
checksums each 64 KiB block right after copying it, while it is in cache, so the receiving side
of a sync reads the weights once; the CUDA kernel (csrc/cuda/checksum.cu) stores every word it
sums (same dtype, contiguous, 16-byte aligned; otherwise copy_ then the checksum kernel).
``copy_checksum`` is its dispatch point.
"""

from __future__ import annotations

import torch

from megarl import _ext

__all__ = ["checksum", "checksum_reference", "copy_checksum", "copy_checksum_reference"]


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


def copy_checksum_reference(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src), then checksum_reference(dst): [2] int64 of the bytes dst holds after the
    copy (in dst's dtype: a cast happens in the copy). Two passes over memory."""
    dst.copy_(src)
    return checksum_reference(dst)


def copy_checksum(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy src into dst and return the checksum of what dst then holds, as `checksum(dst)`.

    The loading side of a weight sync: an engine writes each received tensor with it and reports
    the result, so "what the engine stored" is checked without reading every weight back. The
    CPU kernel copies and checksums block by block while each block is in cache (one pass over
    memory, where copy + checksum is two); the CUDA kernel likewise for same-dtype contiguous
    tensors; other cases copy_, then checksum.

    Args:
        dst: tensor written in place (a parameter: call under torch.no_grad()); the one-pass
            kernel needs it contiguous, any other is copied into and then checksummed.
        src: same shape, same device, any dtype (cast like copy_) and strides; must not overlap dst.
    Returns:
        [2] int64 on dst's device: checksum(dst) after the copy.
    """
    for name, t in (("dst", dst), ("src", src)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"copy_checksum: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"copy_checksum: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"copy_checksum: src shape {tuple(src.shape)} does not match dst shape {tuple(dst.shape)}")
    if dst.device != src.device:
        raise ValueError(f"copy_checksum: dst ({dst.device}) and src ({src.device}) must be on one device")
    if dst.requires_grad and torch.is_grad_enabled():
        raise ValueError("copy_checksum: dst requires grad: call it under torch.no_grad()")
    if dst.is_contiguous() and not (dst.is_conj() or dst.is_neg()) and _ext.has_kernel("copy_checksum", dst.device):
        return torch.ops.megarl.copy_checksum(dst.detach(), src.detach())
    with torch.no_grad():
        dst.copy_(src)
    return checksum(dst)


def _register() -> None:
    @torch.library.register_fake("megarl::checksum")
    def _checksum_fake(t):
        return torch.empty(2, dtype=torch.int64, device=t.device)

    if hasattr(torch.ops.megarl, "copy_checksum"):
        @torch.library.register_fake("megarl::copy_checksum")
        def _copy_checksum_fake(dst, src):
            return torch.empty(2, dtype=torch.int64, device=dst.device)


if _ext.extension_loaded() and hasattr(torch.ops.megarl, "checksum"):
    _register()
