"""Build megatron-core GPTModel chunks from an `ArchSpec`.

The default layer spec is megatron's local spec with two of our modules swapped in:
- `SDPAttention`: core attention through torch's scaled_dot_product_attention (causal, GQA,
  megatron's boolean masks, KV-cache decoding) instead of megatron's baddbmm + softmax.
- `RMSNorm`: the HF formula (normalise in float32, cast back, then scale), with the weight
  marked `sequence_parallel` so megatron all-reduces its gradient under sequence parallelism
  (megatron's torch-norm wrapper refuses sequence parallelism).
With transformer-engine importable (GPU) and backend="auto", megatron's TE spec is used instead.

Vocab padding: the embedding and LM output have `padded_vocab_size(spec, tp)` rows; padded rows
are zero and the LM output's padded logits are set to the dtype's lowest value by a forward
hook, so softmax, log-probs, sampling and argmax never see them (a zero logit would otherwise
take probability mass).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megarl.models.hf_config import (
    HEADS,
    ArchSpec,
    _torch_dtype,
    padded_vocab_size,
    rope_inv_freq,
    transformer_config,
    validate_layout,
)


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 like HF's LlamaRMSNorm.

    Shape: x [..., hidden] -> same shape and dtype.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused: Any):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=config.params_dtype))
        self.eps = eps
        # megatron's finalize_model_grads all-reduces grads of params with this flag over TP:
        # under sequence parallelism each TP rank saw only its slice of the sequence.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _sdpa_class():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule

    class SDPAttention(MegatronModule):
        """Core attention for megatron's SelfAttention via F.scaled_dot_product_attention.

        Shapes: query [sq, b, np, hn], key/value [sk, b, ng, hn] (np heads, ng query groups on
        this TP rank) -> context [sq, b, np * hn].
        Masks follow megatron: a boolean `attention_mask` broadcastable to [b, np, sq, sk] with
        True = masked out is used as given; without one, `causal` masks the future (aligned to
        the last key, so it also covers KV-cache decoding with sq < sk) and `no_mask` attends
        to everything.
        """

        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                     attention_dropout: float | None = None, softmax_scale: float | None = None,
                     cp_comm_type: str | None = None, pg_collection=None):
            super().__init__(config=config)
            if config.context_parallel_size != 1:
                raise ValueError("SDPAttention does not support context parallelism")
            if pg_collection is None:
                from megatron.core.process_groups_config import ProcessGroupCollection

                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
            tp = pg_collection.tp.size()
            self.attn_mask_type = attn_mask_type
            self.num_heads = config.num_attention_heads // tp
            self.num_groups = config.num_query_groups // tp
            self.head_dim = config.kv_channels
            self.softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim ** -0.5
            self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if packed_seq_params is not None:
                raise ValueError("SDPAttention does not support packed sequences (thd format)")
            if attention_bias is not None:
                raise ValueError("SDPAttention does not support an attention bias")
            mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
            sq, b, sk = query.size(0), query.size(1), key.size(0)
            q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
            k = key.permute(1, 2, 0, 3)
            v = value.permute(1, 2, 0, 3)
            if self.num_heads != self.num_groups:
                # megatron orders heads group by group: head i uses kv group i // (np / ng)
                rep = self.num_heads // self.num_groups
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            attn_mask, is_causal = None, False
            if attention_mask is not None:
                attn_mask = ~attention_mask.bool()  # SDPA: True = attend
            elif mask_type == AttnMaskType.causal and sq > 1:
                if sq == sk:
                    is_causal = True
                else:
                    attn_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            dropout_p = self.dropout_p if self.training else 0.0
            if dropout_p > 0.0 and not self.config.sequence_parallel:
                from megatron.core import tensor_parallel

                with tensor_parallel.get_cuda_rng_tracker().fork():
                    ctx = nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=self.softmax_scale)
            else:
                ctx = nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=self.softmax_scale)
            # [b, np, sq, hn] -> [sq, b, np * hn]
            return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)

    return SDPAttention


_SDPA = None


def sdpa_attention_class():
    global _SDPA
    if _SDPA is None:
        _SDPA = _sdpa_class()
    return _SDPA


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises more than ImportError without a GPU / libcuda
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """"local" (torch modules, SDPA, our RMSNorm), "te" (megatron's transformer-engine spec),
    or "auto": te when transformer_engine imports, else local."""
    if backend not in ("auto", "local", "te"):
        raise ValueError(f"backend must be 'auto', 'local' or 'te', got {backend!r}")
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    if backend == "te" and not transformer_engine_available():
        raise ValueError("backend='te' needs transformer_engine, which does not import here")
    return backend


def local_layer_spec():
    """megatron's local GPT layer spec with our RMSNorm and SDPA core attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    sub.self_attention.submodules.core_attention = sdpa_attention_class()
    return spec


def decoder_block_spec(config, backend: str, num_local_layers: int, vp_stage: int | None, pp_rank: int):
    """The TransformerBlock spec of one model chunk: its layers and its final norm (megatron's
    default final norm for the local spec is torch's, which refuses sequence parallelism)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(
            config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
        )
    return TransformerBlockSubmodules(layer_specs=[local_layer_spec()] * num_local_layers, layer_norm=RMSNorm)


def _mask_padded_vocab_hook(vocab_size: int, padded: int, tp_rank: int):
    def hook(module, inputs, output):
        logits, bias = output
        local = logits.size(-1)
        start = 0 if local == padded else tp_rank * local
        if start + local <= vocab_size:
            return output
        cols = torch.arange(start, start + local, device=logits.device)
        logits = logits.masked_fill(cols >= vocab_size, torch.finfo(logits.dtype).min)
        return logits, bias

    return hook


def build_model(
    spec: ArchSpec,
    layout,
    *,
    head: str = "lm",
    dtype: Any = torch.float32,
    groups=None,
    vp_stage: int | None = None,
    backend: str = "auto",
    **config_overrides: Any,
) -> list[nn.Module]:
    """GPTModel chunks for this rank: one per virtual-pipeline stage (all of them, or only
    `vp_stage`), in stage order, like megatron's training loop builds them.

    `layout` is a ParallelLayout; `groups` (ParallelGroups from init_parallel) gives the process
    groups; without it megatron's global groups are used (init_parallel must have run).
    `head`: "lm" (actor/reference), "value" (critic), "orm", "prm" (see heads.py). Embeddings
    are tied only for the LM head of a tied architecture: a critic or RM built from a tied
    actor gets its own input embedding (loaded from the same tensor).
    Weights are randomly initialised; load real ones with mappings.load_hf_state_into.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megarl.models.heads import make_head

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    validate_layout(spec, layout)
    if groups is not None:
        if groups.layout != layout:
            raise ValueError(f"groups were initialised for {groups.layout}, not {layout}")
        pg_collection = groups.pg_collection
    else:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    tp_size, pp_size = pg_collection.tp.size(), pg_collection.pp.size()
    if (tp_size, pp_size) != (layout.tp, layout.pp):
        raise ValueError(
            f"process groups have tp={tp_size} pp={pp_size}, layout asks tp={layout.tp} pp={layout.pp}"
        )
    tp_rank, pp_rank = pg_collection.tp.rank(), pg_collection.pp.rank()
    backend = resolve_backend(backend)
    config = transformer_config(spec, layout, _torch_dtype(dtype), **config_overrides)
    num_local_layers = spec.num_layers // (layout.pp * layout.num_chunks)
    padded = padded_vocab_size(spec, layout.tp)
    inv_freq = rope_inv_freq(spec)

    if vp_stage is None:
        stages = list(range(layout.num_chunks))
    else:
        if not 0 <= vp_stage < layout.num_chunks:
            raise ValueError(f"vp_stage {vp_stage} out of range for {layout.num_chunks} chunks")
        stages = [vp_stage]
    chunks = []
    for vp in stages:
        pre = pp_rank == 0 and vp == 0
        post = pp_rank == pp_size - 1 and vp == layout.num_chunks - 1
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(
                config, backend, num_local_layers, vp if layout.vpp else None, pp_rank
            ),
            vocab_size=padded,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_word_embeddings and head == "lm",
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=spec.rope_theta,
            pg_collection=pg_collection,
            vp_stage=vp if layout.vpp else None,
        )
        # megatron's own llama3 scaling hard-codes its parameters (see rope_inv_freq); always use
        # the HF frequencies. RotaryEmbedding moves inv_freq to the compute device on first use.
        model.rotary_pos_emb.inv_freq = inv_freq.clone()
        if pre:
            with torch.no_grad():
                model.embedding.word_embeddings.weight[_local_pad_rows(spec, padded, tp_rank, tp_size)] = 0
        if post:
            if head == "lm":
                if model.output_layer.weight is not None:
                    with torch.no_grad():
                        model.output_layer.weight[_local_pad_rows(spec, padded, tp_rank, tp_size)] = 0
                if padded > spec.vocab_size:
                    model.output_layer.register_forward_hook(
                        _mask_padded_vocab_hook(spec.vocab_size, padded, tp_rank)
                    )
            else:
                model.output_layer = make_head(head, config, tp_group=pg_collection.tp)
        model.megarl_head = head  # read by mappings.load_hf_state_into on every chunk
        chunks.append(model)
    return chunks


def _local_pad_rows(spec: ArchSpec, padded: int, tp_rank: int, tp_size: int) -> slice:
    """Rows of this TP rank's vocab shard that are padding (possibly empty)."""
    local = padded // tp_size
    start = tp_rank * local
    first_pad = max(spec.vocab_size - start, 0)
    return slice(min(first_pad, local), local)
