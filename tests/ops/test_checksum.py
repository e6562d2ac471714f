"""megarl.ops.checksum: the reference against the definition written out on Python ints, the
compiled kernels (CPU here, CUDA where present) bit-exact against the reference over dtypes,
sizes, layouts and thread counts, and what the checksum sees (a flipped bit, moved data)."""

from __future__ import annotations

import pytest
import torch

from megarl import _ext, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MASK64 = 2**64 - 1
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]
# 0, sub-word, one word, not a multiple of the 8 CPU lanes, around 8 KiB, and (for 2-byte and
# wider dtypes) over one 256 KiB CPU task, so several tasks on two threads
CPU_TASK_WORDS = 1 << 15
NUMELS = [0, 1, 3, 7, 8, 9, 1023, 1025, 4097, (1 << 16) + 5, (1 << 21) + 13]


def _device_param(device: str):
    return pytest.param(device, marks=pytest.mark.gpu) if device == "cuda" else device


def _require_kernel(device: str) -> None:
    assert _ext.has_kernel("checksum", device), (
        f"megarl._C has no {device} kernel for megarl::checksum: build the extension (tools/install); "
        "comparing the reference with itself would prove nothing"
    )


def _python_checksum(t: torch.Tensor) -> tuple[int, int]:
    """The definition on Python ints: bytes zero-padded to words, little-endian, index from 1,
    the weighted sum over words with their 32-bit halves swapped."""
    data = bytes(t.contiguous().view(-1).view(torch.uint8).tolist()) if t.numel() else b""
    data += b"\0" * (-len(data) % 8)
    s = w = 0
    for i in range(len(data) // 8):
        word = int.from_bytes(data[8 * i : 8 * i + 8], "little")
        s += word
        w += (i + 1) * (((word << 32) | (word >> 32)) & MASK64)
    return s & MASK64, w & MASK64


def _unsigned(x: torch.Tensor) -> tuple[int, int]:
    a, b = x.tolist()
    return a & MASK64, b & MASK64


def _random(numel: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point or dtype.is_complex:
        x = torch.randn(numel, generator=g, dtype=torch.float64) * 100
        return x.to(dtype).to(device)
    if dtype == torch.bool:
        return (torch.rand(numel, generator=g) > 0.5).to(device)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), (numel,), generator=g, dtype=torch.int64).to(
        dtype).to(device)


# ---------------------------------------------------------------------------------------------
# the reference is the definition


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 8, 9, 100])
def test_reference_is_the_definition(dtype, numel):
    x = _random(numel, dtype, seed=numel)
    assert _unsigned(ops.checksum_reference(x)) == _python_checksum(x)


def test_reference_wraps_modulo_2_64():
    # words of all ones (swapping halves keeps them): sum = -n, weighted = -(1 + .. + n) mod 2^64;
    # and huge positive words
    x = torch.full((5,), -1, dtype=torch.int64)
    assert _unsigned(ops.checksum_reference(x)) == ((-5) & MASK64, (-15) & MASK64)
    y = torch.full((3,), 2**63 - 1, dtype=torch.int64)
    assert _unsigned(ops.checksum_reference(y)) == _python_checksum(y)


def test_reference_hand_values():
    # two words 1 and 2, then 3 bytes (1, 0, 2) padded to the word 1 + 2 * 65536; swapped halves
    # multiply each by 2^32
    x = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2], dtype=torch.uint8)
    tail = 1 + 2 * 65536
    assert _unsigned(ops.checksum_reference(x)) == (1 + 2 + tail, (1 * 1 + 2 * 2 + 3 * tail) << 32)


# ---------------------------------------------------------------------------------------------
# kernels against the reference, bit for bit


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", NUMELS)
def test_kernel_equals_reference(device, dtype, numel):
    _require_kernel(device)
    x = _random(numel, dtype, seed=numel, device=device)
    got = torch.ops.megarl.checksum(x)
    assert got.dtype == torch.int64 and got.shape == (2,) and got.device == x.device
    assert torch.equal(got, ops.checksum_reference(x)), (dtype, numel)
    assert torch.equal(ops.checksum(x), got)  # the dispatch point runs the kernel


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
def test_kernel_layouts(device):
    """Non-contiguous inputs are checksummed as their contiguous copy; misaligned starts too."""
    _require_kernel(device)
    x = _random(257 * 33, torch.float32, seed=3, device=device).view(257, 33)
    cases = {
        "transposed": x.t(),
        "column": x[3:, 1],
        "strided rows": x[::3],
        "expanded (stride 0)": x[0].expand(5, 33),
        "misaligned start (4 bytes)": x.view(-1)[1:],
        "misaligned start (2 bytes)": x.bfloat16().view(-1)[1:1001],
        "odd byte start": x.view(-1).view(torch.uint8)[3:5000],
        "0-d": x[2, 2],
        "channels_last": _random(2 * 3 * 4 * 5, torch.float32, device=device).view(2, 3, 4, 5).to(
            memory_format=torch.channels_last),
    }
    c = torch.randn(40, dtype=torch.complex64, device=device)
    cases["conj view"] = c.conj()
    cases["neg view"] = torch._neg_view(x[:7])
    for name, t in cases.items():
        want = ops.checksum_reference(t.resolve_conj().resolve_neg().contiguous())
        assert torch.equal(torch.ops.megarl.checksum(t), want), name
        assert torch.equal(ops.checksum(t), want), name
    assert not torch.equal(ops.checksum(c.conj()), ops.checksum(c))  # the view's values, not its storage


def test_cpu_kernel_independent_of_thread_count():
    _require_kernel("cpu")
    x = _random(6 * CPU_TASK_WORDS + 3, torch.float64, seed=5)  # 6 tasks and a bit
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.megarl.checksum(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.equal(results[0], ops.checksum_reference(x))


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
def test_opcheck(device):
    _require_kernel(device)
    for x in (torch.randn(1000, device=device), torch.randn(7, device=device).bfloat16(),
              torch.zeros(0, device=device)):
        torch.library.opcheck(torch.ops.megarl.checksum.default, (x,))


# ---------------------------------------------------------------------------------------------
# what it sees


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
def test_every_single_bit_flip_changes_the_sum(device):
    x = _random(11, torch.bfloat16, seed=7, device=device)  # 22 bytes: two words and a 6-byte tail
    base = ops.checksum(x)
    raw = x.view(torch.uint8)
    for byte in range(raw.numel()):
        for bit in range(8):
            y = raw.clone()
            y[byte] ^= 1 << bit
            got = ops.checksum(y.view(torch.bfloat16))
            assert got[0] != base[0], (byte, bit)


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
def test_bit_flips_in_a_large_tensor(device):
    x = _random(4 * CPU_TASK_WORDS + 13, torch.float32, seed=8, device=device)  # 3 CPU tasks
    base = ops.checksum(x)
    raw = x.view(torch.int32)
    boundary = 2 * CPU_TASK_WORDS  # first int32 of the second task
    for pos in (0, 1, 12345, boundary - 1, boundary, raw.numel() - 1):
        for bit in (0, 17, 31):
            y = raw.clone()
            y[pos] ^= 1 << bit
            assert not torch.equal(ops.checksum(y.view(torch.float32)), base), (pos, bit)


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
def test_moved_data_changes_the_weighted_sum(device):
    # fp32 rows of 576 (2304 bytes, ~3.5 rows per 8 KiB): two adjacent rows swapped - the previous
    # definition (8 KiB blocks weighted by block index) could not see a move inside a block
    x = _random(40 * 576, torch.float32, seed=9, device=device).view(40, 576)
    base = ops.checksum(x)
    swapped = x.clone()
    swapped[[4, 5]] = swapped[[5, 4]]
    got = ops.checksum(swapped)
    assert got[0] == base[0] and got[1] != base[1]  # same bytes, moved
    # two single elements swapped, near and far, in a 16-bit tensor
    h = _random(100_003, torch.float16, seed=10, device=device)
    for i, j in ((0, 1), (10, 14), (7, 90_001)):
        if h[i] == h[j]:
            continue
        y = h.clone()
        y[[i, j]] = y[[j, i]]
        assert ops.checksum(y)[1] != ops.checksum(h)[1], (i, j)
    # a tensor rotated by one word
    w = _random(4096, torch.int64, seed=11, device=device)
    assert ops.checksum(torch.roll(w, 1))[1] != ops.checksum(w)[1]


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
def test_sign_flips_in_even_numbers_of_words(device):
    """Bit 63 is worth 2^63 times any weight mod 2^64: two such flips cancel in a plain weighted
    sum. The weighted sum over half-swapped words sees them."""
    x = _random(64, torch.float32, seed=13, device=device)
    y = x.clone()
    y[1::2] = -y[1::2]  # the high float32 of every word: bit 63 of 32 words
    assert not torch.equal(ops.checksum(y), ops.checksum(x))
    c = torch.randn(40, dtype=torch.complex64, device=device)
    assert not torch.equal(ops.checksum(c.conj().resolve_conj()), ops.checksum(c))
    assert not torch.equal(ops.checksum(-x), ops.checksum(x))


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="t must be a torch.Tensor, got list"):
        ops.checksum([1, 2, 3])
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(ValueError, match="dense"):
        ops.checksum(sparse)
    _require_kernel("cpu")
    with pytest.raises((ValueError, NotImplementedError, RuntimeError)):
        torch.ops.megarl.checksum(sparse)


def test_reference_fallback_without_extension(monkeypatch):
    """With the extension off, the dispatch point gives the reference's (equal) answer."""
    x = _random(1001, torch.float32, seed=12)
    want = ops.checksum(x)
    monkeypatch.setitem(_ext._STATE, "loaded", False)
    assert not _ext.has_kernel("checksum", "cpu")
    assert torch.equal(ops.checksum(x), want)


def test_meta_tensor_fake_kernel():
    _require_kernel("cpu")
    out = torch.ops.megarl.checksum(torch.empty(10, device="meta"))
    assert out.shape == (2,) and out.dtype == torch.int64 and out.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# copy_checksum: dst.copy_(src), then checksum(dst), fused


def _copy_cases(device: str) -> dict[str, tuple[torch.Tensor, torch.dtype]]:
    """(src, dst dtype) pairs: the memcpy cases (contiguous, 2-D row-strided), the ATen slab
    cases (casts, transposes, 3-D strided), tails that are not whole words, several blocks."""
    x = _random(300 * 40, torch.float32, seed=21, device=device).view(300, 40)
    big = _random((1 << 20) + 7, torch.float32, seed=22, device=device)  # 4 MiB + 28 B: many blocks, a tail
    cases = {
        "contiguous": (x, torch.float32),
        "row slice (gate of gate_up)": (x[:150], torch.float32),
        "row-strided 2-D": (x[::2], torch.float32),
        "column slice 2-D": (x[:, 3:19], torch.float32),
        "transposed": (x.t(), torch.float32),
        "3-D block slice (q of fused qkv)": (x.view(3, 100, 40)[:, 10:50], torch.float32),
        "cast to bf16": (x, torch.bfloat16),
        "cast with odd rows (bf16, 7 columns)": (x[:, :7], torch.bfloat16),
        "int8 odd length": (_random(1001, torch.int8, seed=2, device=device), torch.int8),
        "0-d": (x[3, 3], torch.float32),
        "1 element": (x.view(-1)[:1], torch.float64),
        "empty": (x[:0], torch.float32),
        "large with tail": (big, torch.float32),
        "large cast": (big, torch.float16),
    }
    return cases


@pytest.mark.parametrize("device", [_device_param(d) for d in DEVICES])
def test_copy_checksum_equals_copy_then_checksum(device):
    if device == "cpu":
        assert _ext.has_kernel("copy_checksum", "cpu"), "build the extension (tools/install)"
    for name, (src, dtype) in _copy_cases(device).items():
        dst = torch.full(src.shape, 7, dtype=dtype, device=device)
        want_dst = torch.empty(src.shape, dtype=dtype, device=device)
        want = ops.copy_checksum_reference(want_dst, src)
        got = ops.copy_checksum(dst, src)
        assert got.dtype == torch.int64 and got.shape == (2,) and got.device == dst.device, name
        assert torch.equal(dst, want_dst), name
        assert torch.equal(got, want), name
        assert torch.equal(got, ops.checksum(dst)), name  # what dst holds, not what src held
        if device == "cpu" and dst.is_contiguous():
            dst2 = torch.zeros_like(dst)
            assert torch.equal(torch.ops.megarl.copy_checksum(dst2, src), want), name


def test_copy_checksum_independent_of_thread_count():
    src = _random(5 * CPU_TASK_WORDS + 3, torch.float64, seed=6)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            dst = torch.empty_like(src)
            results.append(ops.copy_checksum(dst, src))
            assert torch.equal(dst, src)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)
    assert torch.equal(results[0], ops.checksum_reference(src))


def test_copy_checksum_non_contiguous_dst_and_grad():
    src = torch.randn(6, 8)
    dst = torch.zeros(8, 6).t()  # not contiguous: copy, then checksum of its values
    assert torch.equal(ops.copy_checksum(dst, src), ops.checksum_reference(src))
    assert torch.equal(dst, src)
    p = torch.nn.Parameter(torch.zeros(6, 8))
    with pytest.raises(ValueError, match="torch.no_grad"):
        ops.copy_checksum(p, src)
    with torch.no_grad():
        assert torch.equal(ops.copy_checksum(p, src), ops.checksum_reference(src))
    assert torch.equal(p.detach(), src)


def test_copy_checksum_errors_name_the_argument():
    with pytest.raises(ValueError, match="src must be a torch.Tensor"):
        ops.copy_checksum(torch.zeros(3), [1, 2, 3])
    with pytest.raises(ValueError, match=r"src shape \(4,\) does not match dst shape \(3,\)"):
        ops.copy_checksum(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="dense"):
        ops.copy_checksum(torch.zeros(3, 3), torch.eye(3).to_sparse())
    _require_kernel("cpu")
    x = torch.zeros(16)
    with pytest.raises(ValueError, match="share memory"):
        torch.ops.megarl.copy_checksum(x, x)
    with pytest.raises(ValueError, match="dst must be contiguous"):
        torch.ops.megarl.copy_checksum(torch.zeros(4, 4).t(), torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"src shape \[5\] does not match dst shape \[4\]"):
        torch.ops.megarl.copy_checksum(torch.zeros(4), torch.zeros(5))


def test_copy_checksum_opcheck():
    _require_kernel("cpu")
    torch.library.opcheck(torch.ops.megarl.copy_checksum.default, (torch.zeros(100), torch.randn(100)))
