"""Benchmark cases for checksum (run by benchmarks/ops.py).

Baselines, on the same bytes: the torch reference (megarl.ops.checksum_reference: an index
vector, a product and two reductions) and a plain copy of the tensor into a warm buffer (the
bandwidth bound the weight bridge is measured against: a checksum reads the bytes once, a copy
reads and writes them). On a GPU the row's GB/s is the bytes read over the time.

copy_checksum (the engine side of a sync: copy, then checksum what was written) against copy_
followed by checksum on the same tensors, and against copy_ alone (its floor); the copies go
into a fresh destination as big as the source, as an engine's weights are.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Case  # noqa: E402


def cases(device, quick: bool) -> list[Case]:
    from megarl.ops import checksum, checksum_reference, copy_checksum

    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    numels = [1 << 16] if quick else [1 << 20, 64 << 20]  # fp32: 256 KiB / 4 MiB and 256 MiB
    for numel in numels:
        x = torch.randn(numel, generator=gen, device=device)
        buf = torch.empty_like(x)
        shape = f"{x.nbytes >> 10} KiB float32" if x.nbytes < (1 << 20) else f"{x.nbytes >> 20} MiB float32"
        out += [
            Case(op="checksum", shape=shape, baseline=lambda x=x: checksum_reference(x), megarl=lambda x=x: checksum(x),
                 baseline_name="torch reference", bytes_moved=x.nbytes),
            Case(op="checksum", shape=shape, baseline=lambda x=x, buf=buf: buf.copy_(x),
                 megarl=lambda x=x: checksum(x), baseline_name="copy of the same bytes",
                 target=">= 1x (one read vs read + write)", bytes_moved=x.nbytes),
            Case(op="copy_checksum", shape=shape, baseline=lambda x=x, buf=buf: checksum(buf.copy_(x)),
                 megarl=lambda x=x, buf=buf: copy_checksum(buf, x), baseline_name="copy_ then checksum",
                 target="> 1x (one pass vs two)", bytes_moved=x.nbytes),
            Case(op="copy_checksum", shape=shape, baseline=lambda x=x, buf=buf: buf.copy_(x),
                 megarl=lambda x=x, buf=buf: copy_checksum(buf, x), baseline_name="copy_ alone",
                 target="~1x (the checksum rides on the copy)", bytes_moved=x.nbytes),
        ]
    # a bf16 tensor of odd length (a tail word) at an odd byte offset: the unaligned CUDA path
    y = torch.randn((1 << 16) + 3 if quick else (16 << 20) + 3, generator=gen, device=device).bfloat16()
    odd = y.view(torch.uint8)[1:]
    out.append(Case(op="checksum", shape=f"{odd.numel()} B at an odd offset", baseline=lambda: checksum_reference(odd),
                    megarl=lambda: checksum(odd), baseline_name="torch reference", bytes_moved=odd.numel()))
    return out
