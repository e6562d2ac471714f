"""Loads the compiled extension megarl._C once; the fused ops fall back to torch without it."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("megarl")

_STATE: dict[str, object] = {}


def extension_loaded() -> bool:
    """True when megarl._C imported; logs once (a warning) when it did not.

    MEGARL_DISABLE_EXTENSION=1 forces the torch references (for comparisons and debugging).
    """
    if "loaded" not in _STATE:
        if os.environ.get("MEGARL_DISABLE_EXTENSION", "0") == "1":
            _STATE["loaded"] = False
            log.warning("megarl: MEGARL_DISABLE_EXTENSION=1, fused ops run on the torch references")
        else:
            try:
                from megarl import _C  # noqa: F401  (registers torch.ops.megarl.*)

                _STATE["loaded"] = True
            except ImportError as exc:
                _STATE["loaded"] = False
                log.warning(
                    "megarl: the compiled extension megarl._C is not available (%s); "
                    "fused ops run on their torch references. Build it with tools/install.",
                    exc,
                )
    return bool(_STATE["loaded"])


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether torch.ops.megarl.<op> has a kernel for the device type of ``device``."""
    if not extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    # cached: the registrations do not change once megarl._C has loaded, and callers such as the
    # weight bridge's checksum ask once per tensor
    kernels = _STATE.setdefault("kernels", {})
    if (op, key) not in kernels:
        kernels[(op, key)] = torch._C._dispatch_has_kernel_for_dispatch_key(f"megarl::{op}", key)
    return bool(kernels[(op, key)])
