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
    dict of tensors) runs on the last pipeline stage only. A micro-batch with "logits_from" k
    gets LM logits for positions k.. only ([b, S - k, V_local]; never under sequence
    parallelism, where the output layer's input is split along the sequence).
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
        layer = _lm_output_layer(model) if mb.get("logits_from") else None
        if layer is not None:
            layer._megarl_logits_from = int(mb["logits_from"])
        try:
            output = model(mb["input_ids"], mb["position_ids"], None)
        finally:
            if layer is not None:
                layer._megarl_logits_from = 0

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


def _slice_hidden(module, args, kwargs):
    """Forward pre-hook of the LM output layer: hidden [s, b, h] -> hidden[logits_from:]."""
    start = getattr(module, "_megarl_logits_from", 0)
    if start:
        args = (args[0][start:], *args[1:])
    return args, kwargs


def _lm_output_layer(model):
    """The LM output layer of a (DDP-wrapped) GPTModel chunk on the last stage, with the hook
    that lets a micro-batch's "logits_from" skip the logits of its leading positions
    (prompt tokens nobody reads); None for other chunks and heads."""
    m = model
    while not hasattr(m, "output_layer") and hasattr(m, "module"):
        m = m.module
    if getattr(m, "megarl_head", None) != "lm" or not getattr(m, "post_process", False):
        return None
    layer = m.output_layer
    if not getattr(layer, "_megarl_slice_hook", False):
        layer.register_forward_pre_hook(_slice_hidden, with_kwargs=True)
        layer._megarl_slice_hook = True
    return layer


def optimizer_step(model: TrainableModel) -> tuple[bool, float]:
    """One optimizer step on the accumulated gradients; returns (applied, grad_norm)."""
    ok, grad_norm, _ = model.optimizer.step()
    for c in model.chunks:
        c.zero_grad_buffer()
    model.optimizer.zero_grad()
    return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")


def _inner_optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", [opt]))


def _fp32_main_params(inner) -> list:
    """The fp32 master copies of bf16/fp16 params (distributed: this rank's shards), if any."""
    groups = getattr(inner, "shard_fp32_from_float16_groups", None) or getattr(inner, "fp32_from_float16_groups", None) or []
    return [p for g in groups for p in g]


def _save_atomic(obj, path: str) -> None:
    import os

    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_rank_state(path: str, model: TrainableModel, groups, prefix: str = "") -> None:
    """Writes this rank's state into directory `path`: the model shards
    ({prefix}model_tp{t}_pp{p}.pt, by DP rank 0) and, from every rank, its own optimizer state
    ({prefix}optim_rank{r}.pt: the torch Adam state over this rank's parameter shards and the
    fp32 master copies). Resuming needs the same world size and layout, so each rank reads back
    exactly what it wrote. `prefix` keeps several models apart in one directory ("critic_").
    """
    import os

    import torch.distributed as dist

    tag = f"tp{groups.tp_rank}_pp{groups.pp_rank}"
    if groups.dp_rank == 0:
        _save_atomic([m.state_dict() for m in model.modules], os.path.join(path, f"{prefix}model_{tag}.pt"))
    inners = _inner_optimizers(model.optimizer)
    _save_atomic(
        {
            "torch_optim": [inner.optimizer.state_dict() for inner in inners],
            "fp32_main": [[p.detach().clone() for p in _fp32_main_params(inner)] for inner in inners],
        },
        os.path.join(path, f"{prefix}optim_rank{dist.get_rank()}.pt"),
    )


def load_rank_state(path: str, model: TrainableModel, groups, prefix: str = "") -> None:
    import os

    import torch.distributed as dist

    tag = f"tp{groups.tp_rank}_pp{groups.pp_rank}"
    model_file = os.path.join(path, f"{prefix}model_{tag}.pt")
    if not os.path.isfile(model_file):
        raise ValueError(f"checkpoint {path} has no {os.path.basename(model_file)}: was it saved with another "
                         "tp/pp layout, or without this model?")
    states = torch.load(model_file, map_location="cpu", weights_only=False)
    for m, sd in zip(model.modules, states):
        m.load_state_dict(sd, strict=True)
    opt_state = torch.load(os.path.join(path, f"{prefix}optim_rank{dist.get_rank()}.pt"), map_location="cpu",
                           weights_only=False)
    inners = _inner_optimizers(model.optimizer)
    if len(opt_state["torch_optim"]) != len(inners):
        raise ValueError(f"checkpoint {path}: optimizer has {len(inners)} parts, the checkpoint {len(opt_state['torch_optim'])}")
    with torch.no_grad():
        for inner, sd, mains in zip(inners, opt_state["torch_optim"], opt_state["fp32_main"]):
            inner.optimizer.load_state_dict(sd)
            params = _fp32_main_params(inner)
            if len(params) != len(mains):
                raise ValueError(f"checkpoint {path}: {len(mains)} fp32 master tensors, the optimizer has {len(params)}")
            for p, saved in zip(params, mains):
                p.copy_(saved)
