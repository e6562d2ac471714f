"""Hugging Face `config.json` -> `ArchSpec` -> megatron-core `TransformerConfig`.

Supported (`architectures[0]`):
- Qwen2ForCausalLM (Qwen2, Qwen2.5, Qwen2.5-Math, DeepSeek-R1-Distill-Qwen): QKV bias, GQA,
  tied or untied embeddings.
- LlamaForCausalLM (Llama 3.x with "llama3" rope scaling, SmolLM2).
- Qwen2ForRewardModel (Qwen2.5-Math-RM: outcome head), Qwen2ForProcessRewardModel
  (Qwen2.5-Math-PRM: 2-class step head), {Qwen2,Llama}ForTokenClassification with
  num_labels=1 (our critic's export format: a value per token).

Both config layouts of transformers are read: v5 (`rope_parameters: {rope_theta, rope_type,
...}`) and v4 (`rope_theta` and `rope_scaling` at the top level). Settings that change the math
and that we do not implement (sliding-window layers, yarn/dynamic rope, Llama biases, another
activation) are errors, never silently ignored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

# HF class -> (our architecture family, head kind)
HF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "Qwen2ForRewardModel": ("qwen2", "orm"),
    "Qwen2ForProcessRewardModel": ("qwen2", "prm"),
    "Qwen2ForTokenClassification": ("qwen2", "value"),
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForTokenClassification": ("llama", "value"),
}
_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama"}
HEADS = ("lm", "value", "orm", "prm")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency rescaling, as in HF `rope_parameters` (types "linear" and "llama3")."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Everything about an architecture that shapes the megatron model and the weight mapping.

    `make_vocab_size_divisible_by` is our (megatron-side) choice, not an HF field: the vocab is
    zero-padded to a multiple of it times tp (see `padded_vocab_size`).
    """

    arch: str  # "qwen2" | "llama": selects the mapping table
    hf_architecture: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: RopeScaling | None
    norm_eps: float
    qkv_bias: bool
    max_position_embeddings: int
    hf_head: str = "lm"  # the head of the HF class: "lm" | "value" | "orm" | "prm"
    num_labels: int | None = None
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str | None = None
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        if self.arch not in _MODEL_TYPES:
            raise ValueError(f"ArchSpec.arch must be one of {sorted(_MODEL_TYPES)}, got {self.arch!r}")
        if self.hf_head not in HEADS:
            raise ValueError(f"ArchSpec.hf_head must be one of {HEADS}, got {self.hf_head!r}")
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ArchSpec.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _load_config_dict(hf_config: Any) -> tuple[dict, str]:
    """(config dict, where it came from) from a dict, a config.json path, a model directory or
    a transformers PretrainedConfig."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config), "config dict"
    if hasattr(hf_config, "to_dict") and not isinstance(hf_config, (str, os.PathLike)):
        return hf_config.to_dict(), type(hf_config).__name__
    path = Path(hf_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"HF config: {path} does not exist (expected a config.json or a model directory)")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"HF config: {path} is not valid JSON: {e}") from None


def _get(cfg: dict, key: str, where: str, kind=int, default: Any = ...):
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ValueError(f"HF config {where}: missing required field {key!r}")
        return default
    value = cfg[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"HF config {where}: field {key!r} must be an int, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"HF config {where}: field {key!r} must be a number, got {value!r}")
        value = float(value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"HF config {where}: field {key!r} must be true/false, got {value!r}")
    return value


def _rope(cfg: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from the v5 `rope_parameters` or the v4 top-level fields."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"HF config {where}: rope_parameters must be a mapping, got {params!r}")
    params = dict(params or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"HF config {where}: per-layer-type rope_parameters are not supported")
    legacy = cfg.get("rope_scaling")
    if legacy is not None:
        if not isinstance(legacy, Mapping):
            raise ValueError(f"HF config {where}: rope_scaling must be a mapping or null, got {legacy!r}")
        for k, v in legacy.items():
            params.setdefault(k, v)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"HF config {where}: rope_theta must be a positive number, got {theta!r}")
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"HF config {where}: partial_rotary_factor != 1 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor=_get(params, "factor", where + " rope", float))
    if rope_type == "llama3":
        orig = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        if orig is None:
            # transformers falls back to max_position_embeddings the same way
            orig = cfg.get("max_position_embeddings")
        return float(theta), RopeScaling(
            "llama3",
            factor=_get(params, "factor", where + " rope", float),
            low_freq_factor=_get(params, "low_freq_factor", where + " rope", float),
            high_freq_factor=_get(params, "high_freq_factor", where + " rope", float),
            original_max_position_embeddings=int(orig),
        )
    raise ValueError(
        f"HF config {where}: rope type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def arch_spec(hf_config: Any, **overrides: Any) -> ArchSpec:
    """Read an HF config (dict, config.json path, model directory or PretrainedConfig).

    `overrides` replace ArchSpec fields afterwards (e.g. make_vocab_size_divisible_by=1).
    """
    cfg, where = _load_config_dict(hf_config)
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if archs:
        if not isinstance(archs, list) or not archs:
            raise ValueError(f"HF config {where}: architectures must be a non-empty list, got {archs!r}")
        hf_arch = archs[0]
        if hf_arch not in HF_ARCHITECTURES:
            raise ValueError(
                f"HF config {where}: architecture {hf_arch!r} is not supported "
                f"(supported: {', '.join(HF_ARCHITECTURES)})"
            )
        arch, head = HF_ARCHITECTURES[hf_arch]
        if model_type is not None and model_type != arch:
            raise ValueError(
                f"HF config {where}: model_type {model_type!r} does not match architecture {hf_arch!r}"
            )
    elif model_type in _MODEL_TYPES:
        arch, head = model_type, "lm"
        hf_arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    else:
        raise ValueError(
            f"HF config {where}: no 'architectures' and model_type {model_type!r} is not supported "
            f"(supported model types: {', '.join(_MODEL_TYPES)})"
        )

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"HF config {where}: hidden_act {act!r} is not supported (only silu / SwiGLU)")
    hidden = _get(cfg, "hidden_size", where)
    heads = _get(cfg, "num_attention_heads", where)
    layers = _get(cfg, "num_hidden_layers", where)
    kv_heads = _get(cfg, "num_key_value_heads", where, default=heads)
    head_dim = _get(cfg, "head_dim", where, default=None)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"HF config {where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    if arch == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and no other bias
        if cfg.get("use_sliding_window") and _get(cfg, "max_window_layers", where, default=layers) < layers:
            raise ValueError(
                f"HF config {where}: use_sliding_window=true with max_window_layers < num_hidden_layers "
                "(sliding-window layers) is not supported"
            )
    else:
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ValueError(f"HF config {where}: {key}=true is not supported for Llama")
        qkv_bias = False
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"HF config {where}: layer_types {sorted(set(layer_types))} are not supported")
    rope_theta, rope_scaling = _rope(cfg, where)

    num_labels = None
    if head in ("orm", "prm", "value"):
        num_labels = cfg.get("num_labels")
        if num_labels is None and isinstance(cfg.get("id2label"), Mapping):
            num_labels = len(cfg["id2label"])
        expected = {"orm": 1, "prm": 2, "value": 1}[head]
        if head == "orm" and num_labels is None:
            num_labels = 1  # Qwen2.5-Math-RM's config has no num_labels: its head is Linear(h, 1)
        if head == "prm" and num_labels is None:
            num_labels = 2
        if num_labels != expected:
            raise ValueError(
                f"HF config {where}: {hf_arch} needs num_labels={expected} for our {head} head, got {num_labels}"
            )
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    spec = ArchSpec(
        arch=arch,
        hf_architecture=hf_arch,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=_get(cfg, "intermediate_size", where),
        vocab_size=_get(cfg, "vocab_size", where),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", where, bool, default=False),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=_get(cfg, "rms_norm_eps", where, float, default=1e-6),
        qkv_bias=qkv_bias,
        max_position_embeddings=_get(cfg, "max_position_embeddings", where, default=4096),
        hf_head=head,
        num_labels=num_labels,
        initializer_range=_get(cfg, "initializer_range", where, float, default=0.02),
        attention_dropout=_get(cfg, "attention_dropout", where, float, default=0.0),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos,
        torch_dtype=cfg.get("dtype", cfg.get("torch_dtype")),
    )
    if overrides:
        known = {f.name for f in fields(ArchSpec)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"arch_spec: unknown ArchSpec fields {unknown}")
        import dataclasses

        spec = dataclasses.replace(spec, **overrides)
    return spec


def padded_vocab_size(spec: ArchSpec, tp: int) -> int:
    """Vocab rows of the megatron embedding/output: vocab_size rounded up to a multiple of
    make_vocab_size_divisible_by * tp (megatron-LM's rule). Padded rows are zero and their
    logits are masked (see builder); export strips them."""
    multiple = spec.make_vocab_size_divisible_by * tp
    return int(math.ceil(spec.vocab_size / multiple) * multiple)


def validate_layout(spec: ArchSpec, layout) -> None:
    """ValueError when the layout does not divide the model's shapes."""
    tp, pp, chunks = layout.tp, layout.pp, layout.num_chunks
    checks = [
        ("num_attention_heads", spec.num_attention_heads, tp),
        ("num_key_value_heads", spec.num_kv_heads, tp),
        ("intermediate_size", spec.ffn_hidden_size, tp),
        ("num_hidden_layers", spec.num_layers, pp * chunks),
    ]
    for name, value, by in checks:
        if value % by:
            what = "tp" if by == tp and name != "num_hidden_layers" else "pp*vpp"
            raise ValueError(
                f"{spec.hf_architecture}: {name}={value} is not divisible by {what}={by} "
                f"(layout tp={tp} pp={pp} vpp={layout.vpp})"
            )


def rope_inv_freq(spec: ArchSpec) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim // 2], float32, as transformers computes them.

    megatron's RotaryEmbedding has a `rope_scaling` flag for llama3, but it hard-codes
    low_freq_factor=1, high_freq_factor=4 and original_max_position_embeddings=8192: right for
    the official Llama 3.x values, wrong for any config with others. The builder overwrites
    megatron's inv_freq with this tensor for every model instead.
    """
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    assert scaling.rope_type == "llama3", scaling
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, and the
    # band between interpolated smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)} or a torch.dtype, got {dtype!r}")
    return table[dtype]


def transformer_config(spec: ArchSpec, layout, dtype: Any = torch.float32, **overrides: Any):
    """megatron-core TransformerConfig for `spec` split as `layout` (a ParallelLayout).

    float32 on CPU, bf16 (params and pipeline communication) on GPU is the intent; any dtype
    is accepted. On a machine without CUDA, weights are initialised on the CPU and pipeline
    p2p skips its cuda synchronize. `overrides` are passed to TransformerConfig as is
    (recompute, variable_seq_lengths, ...).
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_layout(spec, layout)
    dtype = _torch_dtype(dtype)
    on_cuda = torch.cuda.is_available()
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=spec.attention_dropout,
        init_method_std=spec.initializer_range,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_cuda,
        batch_p2p_sync=on_cuda,
    )
    kwargs.update(overrides)
    if kwargs.get("variable_seq_lengths") and "moe_token_dispatcher_type" not in overrides:
        # megatron-core 0.16.1 rejects variable_seq_lengths with the default MoE dispatcher
        # ("allgather") even for dense models; the dispatcher is unused without experts.
        kwargs["moe_token_dispatcher_type"] = "alltoall"
    return TransformerConfig(**kwargs)
