"""CPU compatibility layer and process-group checks, run in a child pytest process by
test_cpu_compat.py (the layer patches torch process-wide, so it must not leak into the session)."""

from __future__ import annotations

import threading

import pytest
import torch

from megarl.parallel import cpu_compat
from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel, single_process_world


@pytest.fixture(scope="module", autouse=True)
def compat():
    assert not torch.cuda.is_available(), "these checks are for machines without CUDA"
    applied = cpu_compat.enable_cpu_compat()
    return applied


def test_applies_every_patch_once(compat, caplog):
    assert set(compat) == set(cpu_compat.PATCHES)
    assert cpu_compat.is_active()
    assert cpu_compat.enable_cpu_compat() == compat  # idempotent


def test_cuda_devices_become_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.device("cuda", 1)).device.type == "cpu"
    assert torch.ones(2, device=0).device.type == "cpu"
    assert torch.tensor([1.0], device="cuda:0", pin_memory=False).device.type == "cpu"
    assert torch.empty(3, pin_memory=True).device.type == "cpu"
    t = torch.arange(3.0)
    assert t.cuda() is t and t.pin_memory() is t
    assert t.to("cuda").device.type == "cpu" and t.to("cuda", torch.float16).dtype == torch.float16
    assert t.to(device="cuda").device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    torch.cuda.set_device(0)


def test_tensor_type_reports_cuda_for_megatron_ddp():
    t = torch.zeros(2)
    assert t.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert t.type("torch.cuda.HalfTensor").dtype == torch.float16
    assert t.type(torch.float64).dtype == torch.float64


def test_cuda_rng_is_the_cpu_generator():
    torch.cuda.manual_seed(5)
    a = torch.rand(3)
    state = torch.cuda.get_rng_state()
    b = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), b)
    torch.cuda.manual_seed(5)
    assert torch.equal(torch.rand(3), a)


def test_megatron_rng_tracker_forks():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        inside = torch.rand(4)
    outside = torch.rand(4)
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    with tracker.fork():
        assert torch.equal(torch.rand(4), inside)  # the model-parallel stream is reproducible
    assert torch.equal(torch.rand(4), outside)  # and separate from the default stream
    assert not torch.equal(inside, outside)


def test_event_stand_in_and_inference_is_cuda():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sum(range(10000))
    end.record()
    end.synchronize()
    assert end.elapsed_time(start) <= 0 <= start.elapsed_time(end)
    from megatron.core.inference import communication_utils

    communication_utils._is_cuda_contiguous(torch.zeros(2))  # asserted tensor.is_cuda before
    with pytest.raises(AssertionError):
        communication_utils._is_cuda(None)


def test_device_mode_is_per_thread():
    """Documented limit: another thread must enter cpu_device_mode() itself."""
    results = {}

    def bare():
        try:
            torch.zeros(1, device="cuda")
            results["bare"] = "ok"
        except (AssertionError, RuntimeError):
            results["bare"] = "raised"

    def wrapped():
        with cpu_compat.cpu_device_mode():
            results["wrapped"] = torch.zeros(1, device="cuda").device.type

    for fn in (bare, wrapped):
        th = threading.Thread(target=fn)
        th.start()
        th.join()
    assert results == {"bare": "raised", "wrapped": "cpu"}


def test_parallel_groups_single_process():
    with single_process_world():
        layout = ParallelLayout()
        g = init_parallel(layout, seed=3)
        assert (g.world_size, g.rank, g.dp, g.tp_rank, g.pp_rank, g.dp_rank) == (1, 0, 1, 0, 0, 0)
        assert g.tp_ranks == g.pp_ranks == g.dp_ranks == (0,)
        assert g.is_first_pp_stage and g.is_last_pp_stage
        assert g.tp_group.size() == 1 and g.pg_collection.tp is g.tp_group
        with pytest.raises(RuntimeError, match="already initialised"):
            init_parallel(layout, seed=3)
        destroy_parallel()
        with pytest.raises(ValueError, match="not divisible by tp\\*pp"):
            init_parallel(ParallelLayout(tp=2), seed=3)
        g = init_parallel(layout, seed=3)  # re-initialisable after destroy
        destroy_parallel()
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        init_parallel(layout, seed=3)
