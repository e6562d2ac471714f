"""Make megatron-core 0.16.1 run on a machine without CUDA.

megatron-core assumes a GPU in a few dozen places (`device="cuda"`, `torch.cuda.*` RNG calls,
`torch.cuda.synchronize`, `Tensor.type()` checks in DDP, `torch.cuda.Event` timers). The real
TP/PP/DP code paths are otherwise device-agnostic, so we redirect those calls to the CPU
instead of forking megatron. Every redirection is listed in `PATCHES` with the reason, and
`enable_cpu_compat()` logs the ones it applied.

Rules:
- It is a no-op when CUDA is available: GPU runs see megatron-core untouched.
- It touches private megatron names (`tensor_parallel.random._get_cuda_rng_state`,
  `inference.communication_utils._is_cuda`), so megatron-core is pinned exactly (0.16.1).
- It also hides `.cuda()` / `device="cuda"` mistakes in OUR code (they silently run on CPU),
  so tests of our code should not lean on it: code meant for both devices should take the
  device from its inputs.
- The device rewriting is a `TorchFunctionMode`, and torch keeps function modes per thread:
  it is active in the thread that called `enable_cpu_compat()` (the main thread, in practice).
  Another thread that runs megatron code must enter `cpu_device_mode()` itself.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

# name -> why it is needed (the megatron-core 0.16.1 call site that fails on CPU without it).
PATCHES: dict[str, str] = {
    "device-mode": "device='cuda'/int devices, Tensor.cuda(), .to('cuda') and pin_memory=True are "
    "rewritten to CPU (pipeline_parallel/schedules.py, optimizer, clip_grads, utils, inference)",
    "tensor-type": "Tensor.type() reports torch.cuda.* for CPU tensors, as DDP and "
    "DistributedOptimizer only accept torch.cuda.{Float,Half,BFloat16}Tensor params",
    "torch.cuda.current_device": "returns 'cpu': it is used as device= all over megatron "
    "(dot_product_attention.py, inference controllers, rotary embedding)",
    "torch.cuda.set_device": "no-op (static inference engine's async path)",
    "torch.cuda.synchronize": "no-op (p2p_communication.py with batch_p2p_sync, parallel_state)",
    "torch.cuda.rng": "torch.cuda.{get_rng_state,set_rng_state,manual_seed} use "
    "the CPU generator (model_parallel_cuda_manual_seed, CudaRNGStatesTracker)",
    "megatron.rng": "tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state use the CPU "
    "generator, so the model-parallel RNG tracker (dropout under TP) works",
    "torch.cuda.Event": "a perf_counter stand-in for the timing events of the static inference "
    "engine (text_generation_controller.py)",
    "megatron.inference._is_cuda": "inference/communication_utils._is_cuda only checks "
    "'not None' (PP broadcasts assert tensor.is_cuda)",
}

_applied: list[str] | None = None
_mode: "_CpuDeviceMode | None" = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # an int device means a CUDA ordinal to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CPU_TYPE_TO_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
}


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call in this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Runs for every torch call: keep the common path (nothing to rewrite) short.
        if kwargs:
            device = kwargs.get("device")
            if (device is not None and _is_cuda_device(device)) or kwargs.get("pin_memory"):
                kwargs = dict(kwargs)
                if device is not None and _is_cuda_device(device):
                    kwargs["device"] = "cpu"
                if kwargs.get("pin_memory"):
                    kwargs["pin_memory"] = False
        else:
            kwargs = {}
        if func in _TENSOR_METHODS:
            if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
                return args[0]  # a CPU tensor stays where it is
            if func is torch.Tensor.to:
                if len(args) > 1 and _is_cuda_device(args[1]):
                    args = (args[0], "cpu", *args[2:])
            elif func is torch.Tensor.type:
                if len(args) == 1 and not kwargs:
                    name = func(*args)
                    return _CPU_TYPE_TO_CUDA.get(name, name)
                if len(args) > 1 and isinstance(args[1], str) and args[1].startswith("torch.cuda."):
                    args = (args[0], "torch." + args[1][len("torch.cuda.") :], *args[2:])
        return func(*args, **kwargs)


_TENSOR_METHODS = frozenset({torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.to, torch.Tensor.type})


def cpu_device_mode() -> _CpuDeviceMode:
    """The device-rewriting mode, for threads that run megatron code (`with cpu_device_mode():`)."""
    return _CpuDeviceMode()


class _CpuEvent:
    """Stand-in for torch.cuda.Event: CPU work is synchronous, so wall time is the event time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end._t - self._t) * 1000.0


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _not_none(tensor) -> None:
    assert tensor is not None


def enable_cpu_compat() -> list[str]:
    """Apply the CPU redirections when CUDA is absent; return (and log) the names applied.

    Idempotent: a second call applies nothing new and returns the same list. With CUDA
    available it changes nothing and returns [].
    """
    global _applied, _mode
    if _applied is not None:
        return list(_applied)
    if torch.cuda.is_available():
        _applied = []
        return []

    applied: list[str] = []
    _mode = _CpuDeviceMode()
    _mode.__enter__()  # stays active for the life of the process (this thread)
    applied += ["device-mode", "tensor-type"]

    torch.cuda.current_device = lambda: "cpu"
    applied.append("torch.cuda.current_device")
    torch.cuda.set_device = lambda device: None
    applied.append("torch.cuda.set_device")
    torch.cuda.synchronize = lambda device=None: None
    applied.append("torch.cuda.synchronize")

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # not torch.manual_seed: it calls torch.cuda.manual_seed_all, which stays a lazy no-op
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    applied.append("torch.cuda.rng")

    torch.cuda.Event = _CpuEvent
    applied.append("torch.cuda.Event")

    try:
        import megatron.core.tensor_parallel.random as mrandom
    except ImportError:
        mrandom = None
    if mrandom is not None:
        mrandom._get_cuda_rng_state = _cpu_get_rng_state
        mrandom._set_cuda_rng_state = _cpu_set_rng_state
        applied.append("megatron.rng")
        import megatron.core.inference.communication_utils as comm_utils

        comm_utils._is_cuda = _not_none
        applied.append("megatron.inference._is_cuda")

    assert set(applied) <= set(PATCHES), set(applied) - set(PATCHES)
    _applied = applied
    log.info("megarl CPU compatibility layer active (no CUDA): patched %s", ", ".join(applied))
    return list(applied)


def is_active() -> bool:
    """True when the redirections are in effect (enabled and CUDA absent)."""
    return bool(_applied)
