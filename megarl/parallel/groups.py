"""Parallel layout (TP/PP/virtual-PP/DP) and explicit process-group handles.

megatron-core keeps its process groups in module globals (`parallel_state`) and reads them
internally; we let it, but OUR code receives the groups as arguments: `init_parallel` returns a
`ParallelGroups` object holding every handle a caller needs (tp/pp/dp groups, ranks, and
megatron's `ProcessGroupCollection` to pass to its modules).

Rank order is megatron's default "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent, pipeline
stages are the outermost dimension.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """How a model is split: tensor (`tp`), pipeline (`pp`) and virtual-pipeline (`vpp` model
    chunks per pipeline rank) parallel sizes. Data parallelism takes the remaining ranks:
    `dp = world_size // (tp * pp)` (see `data_parallel_size`)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelLayout.{name} must be an int >= 1, got {value!r}")
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or isinstance(self.vpp, bool) or self.vpp < 2:
                raise ValueError(f"ParallelLayout.vpp must be None or an int >= 2, got {self.vpp!r}")
            if self.pp < 2:
                raise ValueError(f"ParallelLayout.vpp={self.vpp} needs pp >= 2, got pp={self.pp}")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("ParallelLayout.sequence_parallel needs tp >= 2")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def num_chunks(self) -> int:
        """Model chunks per pipeline rank (1 without virtual pipelining)."""
        return self.vpp or 1

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp}"
            )
        return world_size // self.model_parallel_size


@dataclass(frozen=True)
class ParallelGroups:
    """Explicit handles for one rank. Pass these (not megatron's globals) to our code."""

    layout: ParallelLayout
    world_size: int
    rank: int
    dp: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    embd_group: Any  # first + last pipeline stage, for tied embeddings (None off those stages)
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_ranks: tuple[int, ...]  # global ranks of this rank's tp group, in tp-rank order
    pp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    pg_collection: Any  # megatron.core.process_groups_config.ProcessGroupCollection

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


def _on_cuda() -> bool:
    return torch.cuda.is_available()


def init_parallel(layout: ParallelLayout, *, seed: int) -> ParallelGroups:
    """Initialise megatron's model-parallel state on the current torch.distributed world.

    torch.distributed must already be initialised (`init_distributed()` under torchrun, or
    `single_process_world()`). Seeds follow megatron's training loop: the CPU generator gets
    `seed + 100 * pp_rank` (same on all tp/dp ranks of a stage, so CPU-initialised weight
    shards agree), and megatron's model-parallel RNG tracker is seeded from it.
    Call `destroy_parallel()` before initialising another layout in the same processes.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "init_parallel needs torch.distributed initialised: use init_distributed() under "
            "torchrun, or single_process_world() for a one-process run"
        )
    if not _on_cuda():
        from megarl.parallel.cpu_compat import enable_cpu_compat

        enable_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if ps.model_parallel_is_initialized():
        raise RuntimeError("megatron model parallel state is already initialised: call destroy_parallel() first")
    world_size = dist.get_world_size()
    dp = layout.data_parallel_size(world_size)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
    )
    pp_rank = ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed + 100 * pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * pp_rank)

    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    dp_group = ps.get_data_parallel_group()
    embd_group = ps.get_embedding_group(check_initialized=False)
    return ParallelGroups(
        layout=layout,
        world_size=world_size,
        rank=dist.get_rank(),
        dp=dp,
        tp_group=tp_group,
        pp_group=pp_group,
        dp_group=dp_group,
        embd_group=embd_group if ps.is_rank_in_embedding_group() else None,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=pp_rank,
        dp_rank=ps.get_data_parallel_rank(),
        tp_ranks=tuple(dist.get_process_group_ranks(tp_group)),
        pp_ranks=tuple(dist.get_process_group_ranks(pp_group)),
        dp_ranks=tuple(dist.get_process_group_ranks(dp_group)),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_parallel() -> None:
    """Tear down megatron's model-parallel state (the torch.distributed world stays up)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment; returns (rank, world_size).

    The backend defaults to nccl with CUDA, gloo without. Already initialised: returns as is.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"init_distributed: environment variables {missing} are not set; launch with torchrun "
            "or use single_process_world()"
        )
    import datetime

    if backend is None:
        backend = "nccl" if _on_cuda() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_world(backend: str | None = None) -> Iterator[None]:
    """A torch.distributed world of size 1 on a free local port, for tools and tests.

    If a world is already initialised it is used as is and left alone on exit.
    """
    if dist.is_initialized():
        yield
        return
    if backend is None:
        backend = "nccl" if _on_cuda() else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
