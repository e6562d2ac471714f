"""The megatron-core side of training: wrapping model chunks for DDP + the (distributed)
optimizer, running micro-batches through the pipeline schedule, and saving/loading a rank's
model and optimizer state.

Loss scaling convention. Our losses are already normalised by GLOBAL token/sequence counts
(megarl.algorithms.losses.aggregate), so the gradient we want is the plain SUM of every
micro-batch's loss over micro-batches and data-parallel ranks. megatron's schedule divides each
micro-batch loss by the number of micro-batches and its DDP averages gradients over the DP group;
`run_microbatches` multiplies the loss by (num_microbatches * dp) to undo both, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class TrainableModel:
    """Model chunks wrapped in megatron DDP, their optimizer, and the unwrapped chunks (the
    modules the rollout engine and the reference forward use)."""

    chunks: list  # DDP-wrapped, one per virtual-pipeline stage
    modules: list  # the GPTModel chunks inside
    optimizer: Any


def wrap_for_training(modules: list, groups, *, lr: float, weight_decay: float, beta1: float,
                      beta2: float, eps: float, clip_grad: float, use_distributed_optimizer: bool,
                      bf16: bool = False) -> TrainableModel:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    chunks = [
        DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m,
                                disable_bucketing=i > 0, pg_collection=groups.pg_collection)
        for i, m in enumerate(modules)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        adam_beta1=beta1,
        adam_beta2=beta2,
        adam_eps=eps,
        clip_grad=clip_grad,
        use_distributed_optimizer=use_distributed_optimizer,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    config = modules[0].config
    config.finalize_model_grads_func = finalize_model_grads
    return TrainableModel(chunks=chunks, modules=modules, optimizer=optimizer)


LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict]]


def run_microbatches(chunks: list, microbatches: list[dict], loss_fn: LossFn, *, dp: int,
                     forward_only: bool) -> list[dict]:
    """Runs every micro-batch through megatron's (pipeline) schedule.

    microbatches: dicts with "input_ids" [b, S] and "position_ids" [b, S] (equal shapes for all,
    which pipeline communication requires) plus whatever loss_fn reads.
    loss_fn(mb, output [b, S, V_local or 1]) -> (scalar loss normalised by global counts,
    dict of tensors) runs on the last pipeline stage only.
    Returns the dicts loss_fn produced, in micro-batch order, on the last stage ([] elsewhere).
    With forward_only=False gradients accumulate into the DDP grad buffers (the caller steps
    the optimizer).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_mb = len(microbatches)
    assert num_mb > 0
    mbs, seq = microbatches[0]["input_ids"].shape
    scale = float(num_mb * dp)

    def step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["input_ids"], mb["position_ids"], None)

        def finish(out):
            loss, extra = loss_fn(mb, out)
            return loss * scale, extra

        return output, finish

    its = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    fwd_bwd = get_forward_backward_func()
    with torch.set_grad_enabled(not forward_only):
        out = fwd_bwd(
            forward_step_func=step,
            data_iterator=its,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=num_mb,
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
    return list(out) if out else []


def optimizer_step(model: TrainableModel) -> tuple[bool, float]:
    """One optimizer step on the accumulated gradients; returns (applied, grad_norm)."""
    ok, grad_norm, _ = model.optimizer.step()
    for c in model.chunks:
        c.zero_grad_buffer()
    model.optimizer.zero_grad()
    return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")


def zero_grads(model: TrainableModel) -> None:
    for c in model.chunks:
        c.zero_grad_buffer()
    model.optimizer.zero_grad()


def model_state(modules: list) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items() if v is not None} for m in modules]


def save_rank_state(path: str, model: TrainableModel, groups) -> None:
    """Writes this rank's model shards (DP rank 0 only) and optimizer state into directory `path`.

    Files: model_tp{t}_pp{p}.pt (one per model-parallel rank), optim_param_state_tp{t}_pp{p}.pt
    (the distributed optimizer's parameter state gathered to DP rank 0), optim_tp{t}_pp{p}.pt.
    """
    import os

    tag = f"tp{groups.tp_rank}_pp{groups.pp_rank}"
    opt = model.optimizer
    if hasattr(opt, "save_parameter_state"):
        opt.save_parameter_state(os.path.join(path, f"optim_param_state_{tag}.pt"))  # collective over DP
    if groups.dp_rank == 0:
        torch.save([m.state_dict() for m in model.modules], os.path.join(path, f"model_{tag}.pt"))
        torch.save(opt.state_dict(), os.path.join(path, f"optim_{tag}.pt"))


def load_rank_state(path: str, model: TrainableModel, groups) -> None:
    import os

    tag = f"tp{groups.tp_rank}_pp{groups.pp_rank}"
    model_file = os.path.join(path, f"model_{tag}.pt")
    if not os.path.isfile(model_file):
        raise ValueError(f"checkpoint {path} has no {os.path.basename(model_file)}: was it saved with another tp/pp layout?")
    states = torch.load(model_file, map_location="cpu", weights_only=False)
    for m, sd in zip(model.modules, states):
        m.load_state_dict(sd, strict=True)
    opt = model.optimizer
    opt_sd = torch.load(os.path.join(path, f"optim_{tag}.pt"), map_location="cpu", weights_only=False)
    with torch.no_grad():
        if hasattr(opt, "save_parameter_state"):
            opt._init_optimizer_states_with_dummy_values()
        opt.load_state_dict(opt_sd)
        if hasattr(opt, "load_parameter_state"):
            opt.load_parameter_state(os.path.join(path, f"optim_param_state_{tag}.pt"))
