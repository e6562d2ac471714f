"""`megarl plan`: per-GPU memory of an RL training layout, and the best layouts for a model.

    megarl plan --hf-config qwen2.5-math-7b --tp 2 --dp 4 --seq-len 4096 --micro-batch 1
    megarl plan --hf-config path/to/config.json --best --nodes 1 2
    megarl plan                 # best layouts of Qwen2.5-Math 1.5B / 7B / 72B on 1, 2, 4 nodes

With --tp/--pp/--dp (any of them; the others default to 1) it prints the component table of
that layout; without them, or with --best, the best layouts (see megarl.models.plan.best_layouts
for the search and the cost model). docs/plan.md explains every number.
"""

from __future__ import annotations

import argparse
import sys

HELP = "per-GPU memory plan (weights, grads, optimizer, activations, engine KV cache) and best TP/PP/DP layouts"

# PlanConfig field -> the flag that sets it, so errors from the planner name the flag.
_FLAGS = {
    "tp": "--tp",
    "pp": "--pp",
    "dp": "--dp",
    "seq_len": "--seq-len",
    "micro_batch": "--micro-batch",
    "num_microbatches": "--num-microbatches",
    "recompute": "--recompute",
    "kernels": "--kernels",
    "logprob": "--logprob",
    "engine": "--engine",
    "engine_mem_frac": "--engine-mem-frac",
    "engine_tp": "--engine-tp",
    "gpus_per_node": "--gpus-per-node",
    "gpu_memory_gib": "--gpu-memory-gib",
    "runtime_overhead_gib": "--overhead-gib",
    "gpus": "--nodes",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-config", metavar="NAME|PATH",
                        help="a known model (qwen2.5-math-1.5b, qwen2.5-math-7b, qwen2.5-math-72b) "
                             "or a config.json path")
    parser.add_argument("--tp", type=int, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size")
    parser.add_argument("--dp", type=int, help="data-parallel size")
    parser.add_argument("--seq-len", type=int, default=4096,
                        help="tokens per sequence (prompt + response), default 4096")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch, default 1")
    parser.add_argument("--num-microbatches", type=int, help="micro-batches per step and DP rank (default: >= pp)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--no-distributed-optimizer", action="store_true",
                        help="replicate the optimizer state on every DP rank")
    parser.add_argument("--no-sequence-parallel", action="store_true")
    parser.add_argument("--critic", action="store_true", help="also train a critic (PPO)")
    parser.add_argument("--no-reference", action="store_true", help="no frozen reference model (no KL term)")
    parser.add_argument("--engine", choices=("sleep", "resident", "none"), default="sleep",
                        help="colocated rollout engine: released while training (sleep, default), kept "
                             "(resident), or none")
    parser.add_argument("--engine-mem-frac", type=float, default=0.5,
                        help="fraction of GPU memory the engine takes for weights + KV cache (vLLM "
                             "gpu_memory_utilization), default 0.5")
    parser.add_argument("--engine-tp", type=int,
                        help="engine tensor parallelism (default: the largest divisor of the heads "
                             "<= min(tp*pp, a node))")
    parser.add_argument("--no-offload-in-rollout", action="store_true",
                        help="keep grads and optimizer state on the GPU while the engine generates")
    parser.add_argument("--kernels", choices=("te", "local"), default="te",
                        help="model backend: te (Transformer Engine spec, default) or local (SDPA + torch RMSNorm)")
    parser.add_argument("--logprob", choices=("fused", "megatron_ce", "reference"), default="fused")
    parser.add_argument("--gpu-memory-gib", type=float, help="GPU memory (default: H100 80GB, 79.65 GiB)")
    parser.add_argument("--overhead-gib", type=float, default=2.5,
                        help="CUDA context, NCCL and workspaces per GPU, default 2.5")
    parser.add_argument("--best", action="store_true", help="print the best layouts (default when no layout is given)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4], help="node counts for --best, default 1 2 4")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--min-headroom-gib", type=float, default=8.0,
                        help="a layout must leave this much free to count for --best, default 8")
    parser.add_argument("--top", type=int, default=3,
                        help="(tp, pp) splits shown per model and node count, each with its best variant, default 3")


def _plan_config(args, tp: int = 1, pp: int = 1, dp: int = 1):
    from megarl.models.plan import H100_80GB_GIB, PlanConfig

    return PlanConfig(
        tp=tp, pp=pp, dp=dp,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        num_microbatches=args.num_microbatches,
        sequence_parallel=not args.no_sequence_parallel,
        recompute=args.recompute,
        distributed_optimizer=not args.no_distributed_optimizer,
        kernels=args.kernels,
        logprob=args.logprob,
        reference=not args.no_reference,
        critic=args.critic,
        engine=args.engine,
        engine_mem_frac=args.engine_mem_frac,
        engine_tp=args.engine_tp,
        offload_in_rollout=not args.no_offload_in_rollout,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory_gib if args.gpu_memory_gib is not None else H100_80GB_GIB,
        runtime_overhead_gib=args.overhead_gib,
    )


def _gib(n: float) -> str:
    from megarl.models.plan import GiB

    return f"{n / GiB:.2f}"


def _describe_model(arch_cfg: dict) -> str:
    from megarl.models.plan import _Arch

    a = _Arch.from_hf(arch_cfg)
    return (f"{a.source}: {a.total_params() / 1e9:.2f}B params, hidden {a.hidden}, {a.layers} layers, "
            f"{a.heads} heads / {a.kv_heads} KV heads, ffn {a.ffn}, vocab {a.vocab}, "
            f"{'tied' if a.tied else 'untied'} embeddings")


def _fits_line(result) -> str:
    from megarl.models.plan import H100_80GB_GIB

    gpu = "80 GB H100" if result.plan.gpu_memory_gib == H100_80GB_GIB else f"{result.plan.gpu_memory_gib:g} GiB GPU"
    verdict = "yes" if result.fits else "no"
    return f"fits on {gpu}: {verdict} (headroom {_gib(result.headroom_bytes)} GiB)"


def print_layout(arch_cfg: dict, result, out=None) -> None:
    from megarl.models.plan import _Arch

    out = out or sys.stdout
    p = result.plan
    heads = _Arch.from_hf(arch_cfg).heads
    dtype = p.param_dtype
    print(_describe_model(arch_cfg), file=out)
    print(f"layout: tp={p.tp} pp={p.pp} dp={p.dp} ({p.gpus} GPUs), seq_len={p.seq_len}, "
          f"micro_batch={p.micro_batch}, recompute={p.recompute}, "
          f"distributed optimizer={'on' if p.distributed_optimizer else 'off'}, "
          f"sequence parallel={'on' if p.sp else 'off'}, kernels={p.kernels}, logprob={p.logprob}", file=out)
    if p.engine == "none":
        print("engine: none", file=out)
    else:
        print(f"engine: colocated, {'released while training' if p.engine == 'sleep' else 'resident while training'}, "
              f"{p.engine_mem_frac:.2f} of the GPU, engine tp={p.effective_engine_tp(heads)}; "
              f"trainer grads + optimizer "
              f"{'offloaded' if p.offload_in_rollout else 'kept on the GPU'} during rollout", file=out)
    print(f"per GPU on pipeline stage {result.stage} of {p.pp} (the most loaded):", file=out)
    labels = {
        "actor weights": f"actor weights ({dtype})",
        "actor grads": f"actor grads ({p.grad_dtype})",
        "actor optimizer": "actor optimizer (Adam" + (" + fp32 master" if dtype != "fp32" else "")
        + (f", 1/{p.dp} shard)" if p.distributed_optimizer else ", replicated)"),
        "actor activations": f"actor activations (recompute {p.recompute})",
        "reference weights": f"reference weights ({dtype})",
        "critic activations": f"critic activations (recompute {p.recompute})",
        "engine weights": "engine weights (bf16)",
        "engine KV cache": f"engine KV cache ({result.kv_cache_tokens:,} tokens)",
    }
    width = max(len(labels.get(k, k)) for k in result.components) + 2
    print(f"  {'component':<{width}}{'GiB':>9}", file=out)
    for name, value in result.components.items():
        print(f"  {labels.get(name, name):<{width}}{_gib(value):>9}", file=out)
    acts = " | ".join(f"{r} {_gib(v)}" for r, v in result.activations.items())
    print(f"  actor activations by recompute (GiB): {acts}", file=out)
    phases = ", ".join(f"{k} {_gib(v)} GiB" for k, v in result.phases.items())
    print(f"peak by phase: {phases}; peak {_gib(result.peak_bytes)} of {_gib(result.gpu_bytes)} GiB", file=out)
    print(_fits_line(result), file=out)


def print_best(arch_cfg: dict, args, out=None) -> None:
    out = out or sys.stdout
    from megarl.models.plan import best_layouts

    print(_describe_model(arch_cfg), file=out)
    header = (f"  {'nodes':>5} {'gpus':>5}  {'tp':>3} {'pp':>3} {'dp':>4}  {'recompute':<9} {'optimizer':<11} "
              f"{'peak GiB':>9} {'headroom':>9}")
    print(header, file=out)
    for nodes in args.nodes:
        gpus = nodes * args.gpus_per_node
        found = best_layouts(arch_cfg, gpus, args.seq_len, args.micro_batch, base=_plan_config(args),
                             min_headroom_gib=args.min_headroom_gib)
        if not found:
            print(f"  {nodes:>5} {gpus:>5}  no layout fits with {args.min_headroom_gib:g} GiB headroom", file=out)
            continue
        # one row per (tp, pp): its best recompute / optimizer variant
        shown: dict[tuple[int, int], tuple] = {}
        for layout, result in found:
            if (layout.tp, layout.pp) not in shown and len(shown) < args.top:
                shown[layout.tp, layout.pp] = (layout, result)
        for layout, result in shown.values():
            opt = "distributed" if layout.distributed_optimizer else "replicated"
            print(f"  {nodes:>5} {gpus:>5}  {layout.tp:>3} {layout.pp:>3} {layout.dp:>4}  {layout.recompute:<9} "
                  f"{opt:<11} {_gib(result.peak_bytes):>9} {_gib(result.headroom_bytes):>9}", file=out)


def _flag_error(message: str) -> str:
    """'tp: 3 must divide ...' -> '--tp: 3 must divide ...'."""
    field, sep, rest = message.partition(":")
    if sep and field in _FLAGS:
        return f"{_FLAGS[field]}:{rest}"
    return message


def main(args) -> int:
    from megarl.models.plan import KNOWN_MODELS, estimate, load_arch_config

    layout_given = any(v is not None for v in (args.tp, args.pp, args.dp))
    try:
        if any(n < 1 for n in args.nodes):
            raise ValueError(f"gpus: node counts must be >= 1, got {args.nodes}")
        if layout_given and args.hf_config is None:
            raise ValueError("--hf-config is needed with --tp/--pp/--dp")
        names = [args.hf_config] if args.hf_config else list(KNOWN_MODELS)
        configs = [load_arch_config(n) for n in names]
        if layout_given:
            plan = _plan_config(args, tp=args.tp or 1, pp=args.pp or 1, dp=args.dp or 1)
            print_layout(configs[0], estimate(configs[0], plan))
        if args.best or not layout_given:
            if layout_given:
                print()
            print(f"best layouts: seq_len {args.seq_len}, micro_batch {args.micro_batch}, {args.gpus_per_node} GPUs "
                  f"per node, at least {args.min_headroom_gib:g} GiB headroom; ranked by fewest model-parallel ways "
                  "(tp*pp), then TP over PP, no recompute over full, distributed optimizer, headroom")
            for i, cfg in enumerate(configs):
                if i:
                    print()
                print_best(cfg, args)
    except ValueError as e:
        print(f"megarl plan: error: {_flag_error(str(e))}", file=sys.stderr)
        return 2
    return 0
