"""megarl.procmem: this process's memory counters."""

from __future__ import annotations

import pytest
import torch

from megarl.procmem import reset_peak, status_bytes


def test_peak_follows_an_allocation_and_resets():
    reset_peak()
    base = status_bytes("VmRSS")
    assert 0 < base <= status_bytes("VmHWM")
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert status_bytes("VmHWM") - base >= 60 << 20
    del x
    reset_peak()
    assert status_bytes("VmHWM") - status_bytes("VmRSS") < 16 << 20


def test_unknown_field_is_named():
    with pytest.raises(RuntimeError, match="NoSuchField not in /proc/self/status"):
        status_bytes("NoSuchField")
