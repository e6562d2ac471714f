"""Per-GPU memory planner for colocated RL training on megatron-core (`megarl plan`).

    arch = load_arch_config("qwen2.5-math-7b")          # a known name or a config.json path
    result = estimate(arch, PlanConfig(tp=2, pp=1, dp=4, seq_len=4096, micro_batch=1))
    result.fits, result.headroom_bytes, result.components["actor activations"]
    best_layouts(arch, gpus=8, seq_len=4096, micro_batch=1)   # [(Layout, MemoryPlan)], best first

What is counted, per GPU, on the most loaded pipeline stage (docs/plan.md has the formulas, the
assumptions and the check against measured memory):
- actor: weights, main gradients, optimizer state (master weights + Adam moments, sharded over
  DP with the distributed optimizer), activations of one training step;
- reference: weights only (frozen, forward only);
- critic (optional): like the actor, with a value head instead of the vocab projection;
- a colocated rollout engine (vLLM-style): `engine_mem_frac` of the GPU for its weights and KV
  cache, either released while the trainer runs (`engine="sleep"`) or kept (`"resident"`);
- a fixed runtime overhead (CUDA context, NCCL, cuBLAS workspaces).

The peak is the larger of two phases: training (trainer state + activations, plus the engine
when it stays resident) and rollout (engine + trainer weights, plus gradients and optimizer
state unless `offload_in_rollout`). Forward-only passes (old/ref log-probs) keep no activations
for backward, so they stay below the training step and are not a phase of their own.

Pure arithmetic on an HF config dict: no torch, no megatron.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

GiB = 1024**3
# nvidia-smi reports 81559 MiB for an H100 80GB (SXM/PCIe HBM3).
H100_80GB_GIB = 81559 / 1024

CONFIG_DIR = Path(__file__).with_name("configs")
KNOWN_MODELS = ("qwen2.5-math-1.5b", "qwen2.5-math-7b", "qwen2.5-math-72b")

_DTYPE_BYTES = {"bf16": 2, "fp32": 4}


# ----------------------------------------------------------------------------- architecture


def load_arch_config(name_or_path: str | Path) -> dict:
    """The HF config dict of a known model name (see KNOWN_MODELS) or of a config.json path
    (or a model directory holding one). The dict gets a "_source" key naming where it came from,
    used in error messages."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        path = CONFIG_DIR / f"{text}.json"
    else:
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"hf config {text!r} is neither a known model ({', '.join(KNOWN_MODELS)}) "
                f"nor an existing config.json"
            )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"hf config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"hf config {path}: expected a JSON object, got {type(cfg).__name__}")
    cfg["_source"] = text if text in KNOWN_MODELS else str(path)
    _Arch.from_hf(cfg)  # fail early, naming the file
    return cfg


@dataclass(frozen=True)
class _Arch:
    """The few config.json fields the planner needs."""

    source: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    gated: bool

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "_Arch":
        source = str(cfg.get("_source", "hf config"))

        def get_int(key: str, default: int | None = None) -> int:
            value = cfg.get(key, default)
            if value is None:
                raise ValueError(f"hf config {source}: missing required field {key!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"hf config {source}: field {key!r} must be a positive int, got {value!r}")
            return value

        hidden = get_int("hidden_size")
        heads = get_int("num_attention_heads")
        kv_heads = get_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ValueError(
                f"hf config {source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(
                    f"hf config {source}: hidden_size={hidden} is not divisible by "
                    f"num_attention_heads={heads} (and there is no head_dim)"
                )
            head_dim = hidden // heads
        tied = cfg.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ValueError(f"hf config {source}: field 'tie_word_embeddings' must be true/false, got {tied!r}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"hf config {source}: hidden_act {act!r} is not supported")
        # Qwen2 always has q/k/v biases (its config has no field for them); others say so.
        qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False))
        return cls(
            source=source,
            hidden=hidden,
            layers=get_int("num_hidden_layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=get_int("head_dim", head_dim),
            ffn=get_int("intermediate_size"),
            vocab=get_int("vocab_size"),
            tied=tied,
            qkv_bias=qkv_bias,
            # Llama/Qwen MLPs are SwiGLU; GELU/ReLU configs here are plain 2-matrix MLPs.
            gated=act in ("silu", "swish"),
        )

    def padded_vocab(self, tp: int, multiple: int) -> int:
        """megatron pads the vocab to a multiple of make_vocab_size_divisible_by * tp."""
        m = multiple * tp
        return -(-self.vocab // m) * m

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer layer (unsharded)."""
        return self._layer_split_params + 2 * self.hidden

    @property
    def _layer_split_params(self) -> int:
        """The tensor-parallel part of a layer: QKV (+bias), output projection, MLP."""
        h, d = self.hidden, self.head_dim
        qkv = h * (self.heads + 2 * self.kv_heads) * d
        if self.qkv_bias:
            qkv += (self.heads + 2 * self.kv_heads) * d
        proj = self.heads * d * h
        mlp = (3 if self.gated else 2) * h * self.ffn
        return qkv + proj + mlp

    def total_params(self) -> int:
        """Parameters of the HF model (unpadded vocab)."""
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden


# ----------------------------------------------------------------------------- config

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class PlanConfig:
    """One training layout and the assumptions of the estimate (docs/plan.md).

    Sizes: tp * pp * dp GPUs; `micro_batch` sequences of `seq_len` tokens per micro-batch;
    `num_microbatches` per step and DP rank (None: at least pp, the 1F1B steady state).
    Kernels, the two backends of megarl.models.builder: "te" = megatron's Transformer Engine
    spec (fused RMSNorm+linear, TE flash attention; the GPU image), "local" = megatron's local
    spec with our RMSNorm and SDPA attention (no TE: CPU, or a GPU without TE). Both run
    flash-style attention, the unfused SwiGLU and no gradient-accumulation fusion, as the
    builder configures megatron.
    Log-probs over the vocab-parallel logits: "fused" = megarl.ops.logprob_entropy on the logits
    cast to float32, as the trainer calls it (keeps them once, allocates a float32 gradient),
    "megatron_ce" = megatron's vocab-parallel cross entropy (softmax and gradient in place in
    the float32 logits), "reference" = log_softmax + gather in torch (saved log-softmax, its
    dense gradient and the logits gradient).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    seq_len: int = 4096
    micro_batch: int = 1
    num_microbatches: int | None = None
    sequence_parallel: bool = True  # only meaningful with tp > 1
    recompute: Recompute = "none"
    distributed_optimizer: bool = True
    param_dtype: Literal["bf16", "fp32"] = "bf16"
    grad_dtype: Literal["bf16", "fp32"] = "fp32"  # megatron main_grad (grad_reduce_in_fp32)
    kernels: Literal["te", "local"] = "te"
    logprob: Literal["fused", "megatron_ce", "reference"] = "fused"
    reference: bool = True
    critic: bool = False
    engine: Literal["sleep", "resident", "none"] = "sleep"
    engine_mem_frac: float = 0.5
    engine_tp: int | None = None  # None: see effective_engine_tp
    offload_in_rollout: bool = True  # grads + optimizer state live on the host while generating
    gpus_per_node: int = 8
    gpu_memory_gib: float = H100_80GB_GIB
    runtime_overhead_gib: float = 2.5
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "seq_len", "micro_batch", "gpus_per_node", "make_vocab_size_divisible_by"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_microbatches", "engine_tp"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        choices = {
            "recompute": ("none", "selective", "full"),
            "param_dtype": tuple(_DTYPE_BYTES),
            "grad_dtype": tuple(_DTYPE_BYTES),
            "kernels": ("te", "local"),
            "logprob": ("fused", "megatron_ce", "reference"),
            "engine": ("sleep", "resident", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("sequence_parallel", "distributed_optimizer", "reference", "critic", "offload_in_rollout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.engine != "none" and not 0.0 < self.engine_mem_frac < 1.0:
            raise ValueError(f"engine_mem_frac: must be in (0, 1), got {self.engine_mem_frac!r}")
        if not self.gpu_memory_gib > 0:
            raise ValueError(f"gpu_memory_gib: must be > 0, got {self.gpu_memory_gib!r}")
        if not self.runtime_overhead_gib >= 0:
            raise ValueError(f"runtime_overhead_gib: must be >= 0, got {self.runtime_overhead_gib!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PlanConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"PlanConfig: unknown keys {unknown} (known: {sorted(names)})")
        return cls(**data)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect (it needs tp > 1)."""
        return self.sequence_parallel and self.tp > 1

    def effective_engine_tp(self, num_attention_heads: int) -> int:
        """engine_tp, or by default the largest divisor of the heads up to min(tp * pp, a node)."""
        if self.engine_tp is not None:
            return self.engine_tp
        cap = min(self.tp * self.pp, self.gpus_per_node)
        return max(n for n in range(1, cap + 1) if num_attention_heads % n == 0)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value!r}")


def validate(arch: _Arch, plan: PlanConfig) -> None:
    """ValueError, naming the PlanConfig field, when the layout does not divide the model."""
    if arch.heads % plan.tp or arch.kv_heads % plan.tp:
        raise ValueError(
            f"tp: {plan.tp} must divide num_attention_heads={arch.heads} and "
            f"num_key_value_heads={arch.kv_heads} of {arch.source}"
        )
    if arch.ffn % plan.tp:
        raise ValueError(f"tp: {plan.tp} must divide intermediate_size={arch.ffn} of {arch.source}")
    if arch.layers % plan.pp:
        raise ValueError(f"pp: {plan.pp} must divide num_hidden_layers={arch.layers} of {arch.source}")
    if plan.engine != "none" and plan.engine_tp is not None and arch.heads % plan.engine_tp:
        raise ValueError(
            f"engine_tp: {plan.engine_tp} must divide num_attention_heads={arch.heads} of {arch.source}"
        )


# ----------------------------------------------------------------------------- result


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU on the most loaded pipeline stage.

    components: every resident or peak item, in print order (engine items are the engine's
    share of `engine_mem_frac`, present only with a colocated engine).
    activations: the actor's activation peak for each recompute mode, for comparison; the
    one in `components` is `plan.recompute`'s.
    phases: "train" and (with an engine) "rollout" peaks; peak_bytes is their max.
    """

    plan: PlanConfig
    stage: int
    components: dict[str, int]
    activations: dict[str, int]
    phases: dict[str, int]
    peak_bytes: int
    gpu_bytes: int
    kv_cache_tokens: int
    params_total: int
    params_per_gpu: int

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_bytes - self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0 and self.kv_cache_tokens >= 0


@dataclass(frozen=True)
class Layout:
    """One point of the best_layouts search."""

    tp: int
    pp: int
    dp: int
    recompute: Recompute
    distributed_optimizer: bool

    def __str__(self) -> str:
        opt = "dist-opt" if self.distributed_optimizer else "replicated-opt"
        return f"tp{self.tp} pp{self.pp} dp{self.dp} recompute={self.recompute} {opt}"


# ----------------------------------------------------------------------------- arithmetic


def _stage_params(arch: _Arch, plan: PlanConfig, stage: int, head: Literal["lm", "value"]) -> int:
    """Parameters held by one GPU of pipeline stage `stage` (TP-sharded, norms replicated).

    With pp > 1 the last stage keeps its own output matrix even for tied embeddings (megatron
    syncs it with the first stage's embedding through the embedding group).
    """
    tp, pp = plan.tp, plan.pp
    vocab = arch.padded_vocab(tp, plan.make_vocab_size_divisible_by)
    per_layer = arch._layer_split_params // tp + 2 * arch.hidden
    n = arch.layers // pp * per_layer
    if stage == 0:
        n += vocab * arch.hidden // tp
    if stage == pp - 1:
        n += arch.hidden  # final norm
        if head == "value":
            n += arch.hidden + 1  # value head h -> 1, replicated
        elif not (arch.tied and pp == 1):
            n += vocab * arch.hidden // tp
    return n


def _state_bytes(n_params: int, plan: PlanConfig, trainable: bool) -> tuple[int, int, int]:
    """(weights, grads, optimizer) bytes for n_params parameters.

    Optimizer: Adam moments (2 x fp32) plus fp32 master weights when the params are not fp32;
    the distributed optimizer shards them over DP (megatron pads buffers to a DP multiple).
    """
    w = n_params * _DTYPE_BYTES[plan.param_dtype]
    if not trainable:
        return w, 0, 0
    g = n_params * _DTYPE_BYTES[plan.grad_dtype]
    per_param = 8 + (4 if plan.param_dtype != "fp32" else 0)
    shard = -(-n_params // plan.dp) if plan.distributed_optimizer else n_params
    return w, g, shard * per_param


def _norm_pair(arch: _Arch, plan: PlanConfig) -> float:
    """Bytes per token kept by an RMSNorm and the linear it feeds.

    "local" (megarl.models.builder.RMSNorm): the float32 upcast of the input (the input itself
    when it is float32), the normalised output in the model dtype, and 1/rms per token; the
    linear keeps the scaled output. "te" (TELayerNormColumnParallelLinear): input, normalised
    output, 1/rms.
    """
    e = _DTYPE_BYTES[plan.param_dtype]
    h = arch.hidden
    if plan.kernels == "local":
        return 4 * h + 2 * e * h + 4
    return 2 * e * h + 4


def _layer_halves(arch: _Arch, plan: PlanConfig, recompute: str) -> tuple[float, float, float]:
    """What one transformer layer keeps for backward: (attention half, MLP half) in bytes per
    token, and RoPE's cos/sin in bytes per micro-batch.

    Counted storage by storage (docs/plan.md derives each term; "local" was checked tensor by
    tensor with saved-tensor hooks, megatron-core 0.16.1 + megarl.models.builder). No dropout
    (RL turns it off). h-sized tensors are replicated over TP unless sequence parallelism
    splits them. Attention is flash-style (SDPA / TE): nothing [s, s]-sized is kept.
    """
    e = _DTYPE_BYTES[plan.param_dtype]
    t = plan.tp
    rep = t if plan.sp else 1
    d, f = arch.head_dim, arch.ffn
    a, k = arch.heads, arch.kv_heads
    # megatron's unfused RoPE makes new q and k; v stays a view of the fused QKV output and pins
    # it, unless SDPAttention expands k and v to all heads for GQA ("local", a != k).
    if plan.kernels == "local" and a != k:
        qkv = 3 * a * d  # q, expanded k and v
    else:
        qkv = (a + k) * d + (a + 2 * k) * d
    if recompute == "selective":
        # the checkpointed core attention keeps only its inputs q, k, v (not expanded)
        qkv = (a + k) * d + (a + 2 * k) * d
        core = e * (qkv + a * d) / t  # + the recomputed output, kept by the projection
    else:
        core = e * (qkv + a * d) / t + 4 * a / t  # + output (= projection input), fp32 logsumexp
    attn = _norm_pair(arch, plan) / rep + core
    mlp_saved = 5 * f if arch.gated else 2 * f  # fc1 output, silu, x_linear + 0, fc2 input
    mlp = _norm_pair(arch, plan) / rep + e * mlp_saved / t
    rope = 4 * plan.seq_len * d * e  # cos and sin for q and for k, [s, 1, 1, d] each
    return attn, mlp, rope


def _layer_backward_extra(arch: _Arch, plan: PlanConfig, recompute: str, mlp_half: float) -> tuple[float, int]:
    """Memory beyond the saved tensors while one layer runs backward, as (bytes per token,
    fixed bytes): the hidden-state gradients in and out, the largest intermediate gradients,
    and the weight gradient a linear materialises before it is added to main_grad (the builder
    turns gradient_accumulation_fusion off). The MLP runs backward first, so by the attention's
    backward the MLP half is freed."""
    e = _DTYPE_BYTES[plan.param_dtype]
    t = plan.tp
    rep = t if plan.sp else 1
    h, d, f = arch.hidden, arch.head_dim, arch.ffn
    a, k = arch.heads, arch.kv_heads
    mlp_in = 2 * f if arch.gated else f
    mlp = e * (2 * h / rep + 4 * f / t)
    mlp_fixed = e * h * mlp_in // t
    # dq, dk, dv, d(output); expanded k and v for "local" GQA
    grads = 4 * a * d if plan.kernels == "local" else (2 * a + 2 * k) * d
    attn = e * (2 * h / rep + grads / t)
    if recompute == "selective":
        attn += e * (3 * a * d if plan.kernels == "local" else a * d) / t  # the rebuilt core tensors
    attn_fixed = e * h * (a + 2 * k) * d // t
    mlp_total, attn_total = (mlp, mlp_fixed), (attn - mlp_half, attn_fixed)
    return max(mlp_total, attn_total, key=lambda x: x[0] * plan.seq_len * plan.micro_batch + x[1])


def _logits_peak_per_entry(plan: PlanConfig) -> int:
    """Bytes per token per local vocab entry at the loss's backward (see PlanConfig.logprob)."""
    e = _DTYPE_BYTES[plan.param_dtype]
    if plan.logprob == "fused":
        return 8  # the float32 logits it keeps + their float32 gradient
    if plan.logprob == "megatron_ce":
        return 4 + (e if e != 4 else 0)  # float32 buffer (in place) + the bf16 logits/gradient
    return 12  # log_softmax output + its dense gradient + the logits gradient


def _activation_bytes(arch: _Arch, plan: PlanConfig, stage: int, recompute: str, head: str) -> int:
    """Activation peak of one training step on pipeline stage `stage` (per GPU).

    1F1B keeps min(pp - stage, num_microbatches) micro-batches in flight on a stage. The last
    stage peaks either at the loss backward (all layers saved + final norm + logits + the output
    layer's weight gradient) or later in a layer's backward (the logits already freed).
    """
    tokens = plan.seq_len * plan.micro_batch
    e = _DTYPE_BYTES[plan.param_dtype]
    layers = arch.layers // plan.pp
    microbatches = plan.num_microbatches if plan.num_microbatches is not None else plan.pp
    in_flight = min(plan.pp - stage, microbatches)
    rep = plan.tp if plan.sp else 1

    attn_half, mlp_half, rope = _layer_halves(arch, plan, recompute)
    layer_bytes = (attn_half + mlp_half) * tokens + rope
    extra, extra_fixed = _layer_backward_extra(arch, plan, recompute, mlp_half)
    backward_peak = extra * tokens + extra_fixed
    if recompute == "full":
        # each checkpointed layer keeps its input; backward rebuilds one layer at a time
        per_microbatch = layers * e * arch.hidden / rep * tokens
        backward_peak += layer_bytes
    else:
        per_microbatch = layers * layer_bytes
    if stage == 0:
        per_microbatch += 8 * tokens  # int64 token ids kept by the embedding lookup
    loss_peak = 0.0
    if stage == plan.pp - 1:
        loss_peak = _norm_pair(arch, plan) / rep * tokens  # final norm + output layer input
        if head == "lm":
            vocab = arch.padded_vocab(plan.tp, plan.make_vocab_size_divisible_by)
            loss_peak += _logits_peak_per_entry(plan) * tokens * vocab / plan.tp
            loss_peak += e * vocab * arch.hidden / plan.tp  # output layer weight gradient
    return int(math.ceil(in_flight * per_microbatch + max(loss_peak, backward_peak)))


def _kv_bytes_per_token(arch: _Arch, engine_tp: int) -> int:
    """bf16 K and V of every layer for one token, on one engine GPU (KV heads are replicated
    when engine_tp exceeds their number)."""
    kv_heads_per_gpu = -(-arch.kv_heads // engine_tp)
    return 2 * arch.layers * kv_heads_per_gpu * arch.head_dim * 2


def estimate(arch_config: Mapping[str, Any], plan: PlanConfig) -> MemoryPlan:
    """Per-GPU memory of `plan` for the HF config dict `arch_config` (see the module docstring)."""
    arch = _Arch.from_hf(arch_config)
    validate(arch, plan)
    gpu_bytes = int(plan.gpu_memory_gib * GiB)
    overhead = int(plan.runtime_overhead_gib * GiB)

    engine_weights = engine_kv = engine_total = 0
    kv_tokens = 0
    if plan.engine != "none":
        engine_tp = plan.effective_engine_tp(arch.heads)
        engine_total = int(plan.engine_mem_frac * gpu_bytes)
        engine_weights = -(-arch.total_params() * 2 // engine_tp)
        engine_kv = engine_total - engine_weights
        kv_tokens = engine_kv // _kv_bytes_per_token(arch, engine_tp)

    best: MemoryPlan | None = None
    for stage in range(plan.pp):
        n_actor = _stage_params(arch, plan, stage, "lm")
        aw, ag, ao = _state_bytes(n_actor, plan, trainable=True)
        acts = {r: _activation_bytes(arch, plan, stage, r, "lm") for r in ("none", "selective", "full")}
        comp: dict[str, int] = {
            "actor weights": aw,
            "actor grads": ag,
            "actor optimizer": ao,
            "actor activations": acts[plan.recompute],
        }
        if plan.reference:
            comp["reference weights"] = _state_bytes(n_actor, plan, trainable=False)[0]
        if plan.critic:
            n_critic = _stage_params(arch, plan, stage, "value")
            cw, cg, co = _state_bytes(n_critic, plan, trainable=True)
            comp["critic weights"] = cw
            comp["critic grads"] = cg
            comp["critic optimizer"] = co
            comp["critic activations"] = _activation_bytes(arch, plan, stage, plan.recompute, "value")
        if plan.engine != "none":
            comp["engine weights"] = engine_weights
            comp["engine KV cache"] = engine_kv
        comp["runtime overhead"] = overhead

        weights = comp["actor weights"] + comp.get("reference weights", 0) + comp.get("critic weights", 0)
        train_state = comp["actor grads"] + comp["actor optimizer"] + comp.get("critic grads", 0) + comp.get(
            "critic optimizer", 0
        )
        activations = max(comp["actor activations"], comp.get("critic activations", 0))
        phases = {"train": weights + train_state + activations + overhead}
        if plan.engine == "resident":
            phases["train"] += engine_total
        if plan.engine != "none":
            phases["rollout"] = engine_total + weights + overhead
            if not plan.offload_in_rollout:
                phases["rollout"] += train_state
        peak = max(phases.values())
        candidate = MemoryPlan(
            plan=plan,
            stage=stage,
            components=comp,
            activations=acts,
            phases=phases,
            peak_bytes=peak,
            gpu_bytes=gpu_bytes,
            kv_cache_tokens=kv_tokens,
            params_total=arch.total_params(),
            params_per_gpu=n_actor,
        )
        if best is None or candidate.peak_bytes > best.peak_bytes:
            best = candidate
    assert best is not None
    return best


def best_layouts(
    arch_config: Mapping[str, Any],
    gpus: int,
    seq_len: int,
    micro_batch: int,
    *,
    base: PlanConfig | None = None,
    min_headroom_gib: float = 8.0,
    tp_choices: tuple[int, ...] = (1, 2, 4, 8),
) -> list[tuple[Layout, MemoryPlan]]:
    """Layouts of `gpus` GPUs that fit with at least `min_headroom_gib` to spare, best first.

    Searched: tp in tp_choices (dividing the heads and KV heads, at most gpus_per_node: TP stays
    inside a node), pp dividing the layers, dp = gpus / (tp * pp), recompute none/full,
    distributed optimizer on/off. Everything else comes from `base`.

    Cost model, compared in this order (lower is better):
      1. tp * pp: fewer model-parallel ways means less communication per token and more DP;
      2. pp: for the same tp * pp, TP inside a node beats a pipeline (no bubble);
      3. full recompute: about a third more compute than none;
      4. replicated optimizer: the distributed one is free (reduce-scatter + all-gather move
         the same bytes as an all-reduce), so it wins whenever both fit;
      5. more headroom.
    """
    base = base or PlanConfig()
    if gpus < 1:
        raise ValueError(f"gpus: must be >= 1, got {gpus}")
    arch = _Arch.from_hf(arch_config)
    found = []
    for tp in tp_choices:
        if tp > base.gpus_per_node or arch.heads % tp or arch.kv_heads % tp or arch.ffn % tp:
            continue
        for pp in range(1, arch.layers + 1):
            if arch.layers % pp or gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for recompute in ("none", "full"):
                for dist_opt in (True, False):
                    plan = dataclasses.replace(
                        base, tp=tp, pp=pp, dp=dp, seq_len=seq_len, micro_batch=micro_batch,
                        recompute=recompute, distributed_optimizer=dist_opt,
                    )
                    result = estimate(arch_config, plan)
                    if result.fits and result.headroom_bytes >= min_headroom_gib * GiB:
                        found.append((Layout(tp, pp, dp, recompute, dist_opt), result))
    found.sort(key=lambda lr: (
        lr[0].tp * lr[0].pp,
        lr[0].pp,
        lr[0].recompute == "full",
        not lr[0].distributed_optimizer,
        -lr[1].headroom_bytes,
    ))
    return found
