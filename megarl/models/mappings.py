"""HF <-> megatron-core weight mappings, declared as data per architecture, and the pure
functions that apply them. Used by checkpoint conversion (tools/convert) and by the rollout
weight bridge, so both move weights the same way.

A `Mapping` says which megatron tensor (local spec names, global layer ids) is made of which HF
tensor(s), and how tensor parallelism splits it (`kind`):

  replicated  every TP rank holds the whole tensor (norms, head layers)
  column      split along dim 0 (output features)
  row         split along dim 1 (input features)
  vocab       split along dim 0 after zero-padding the vocab to padded_vocab_size(spec, tp)
  qkv         q, k, v fused per query group: for each KV group g, the group's q heads, then its
              k head, then its v head (megatron's GQA layout), split along dim 0 by groups
  gate_up     gate and up each split along dim 0; a rank holds [gate shard; up shard]

Megatron names use the local layer spec (`input_layernorm`, `pre_mlp_layernorm`); the
transformer-engine spec fuses those norms into the next linear (`TE_ALIASES`), and loading
accepts either. Layer ids in names here are GLOBAL; `layer_owner` / `global_layer` translate to
and from (pipeline rank, virtual stage, local index) the way megatron numbers layers.

Tied embeddings: a tied LM has no `lm_head.weight`; `model.embed_tokens.weight` feeds both the
input embedding and, on the last pipeline stage when PP > 1, megatron's duplicate output
weight. Export writes it once. An HF `lm_head.weight` in a tied checkpoint, or in a reward /
critic checkpoint, is ignored (transformers and vLLM ignore it too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from megarl.models.hf_config import ArchSpec, padded_vocab_size

KINDS = ("replicated", "column", "row", "vocab", "qkv", "gate_up")


@dataclass(frozen=True)
class Mapping:
    mcore: str  # megatron name, "{layer}" = global layer id
    hf: tuple[str, ...]  # HF name(s), same placeholder; several = fused in this order
    kind: str
    tied: bool = False  # the tied LM output weight: sourced from the embedding, never exported

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert (len(self.hf) == 3) == (self.kind == "qkv"), self
        assert (len(self.hf) == 2) == (self.kind == "gate_up"), self


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

_DECODER = (
    Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Mapping(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), "replicated"),
    Mapping(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        "qkv",
    ),
    Mapping(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "row"),
    Mapping(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), "replicated"),
    Mapping(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "gate_up"),
    Mapping(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "row"),
    Mapping("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
)
_QKV_BIAS = (
    Mapping(
        _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        "qkv",
    ),
)

# Per architecture: the decoder tables. Qwen2 = Llama + q/k/v biases.
ARCHITECTURES: dict[str, tuple[Mapping, ...]] = {
    "llama": _DECODER,
    "qwen2": _DECODER + _QKV_BIAS,
}

# Per head: the output tables (HF names as in the HF classes listed in hf_config).
HEADS: dict[str, tuple[Mapping, ...]] = {
    "lm": (Mapping("output_layer.weight", ("lm_head.weight",), "vocab"),),
    "value": (
        Mapping("output_layer.weight", ("score.weight",), "replicated"),
        Mapping("output_layer.bias", ("score.bias",), "replicated"),
    ),
    "orm": (
        Mapping("output_layer.hidden.weight", ("score.0.weight",), "replicated"),
        Mapping("output_layer.hidden.bias", ("score.0.bias",), "replicated"),
        Mapping("output_layer.weight", ("score.2.weight",), "replicated"),
        Mapping("output_layer.bias", ("score.2.bias",), "replicated"),
    ),
}
HEADS["prm"] = HEADS["orm"]
_TIED_LM = Mapping("output_layer.weight", ("model.embed_tokens.weight",), "vocab", tied=True)

# local-spec name suffix -> transformer-engine spec name suffix
TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

# HF tensors that are never weights we need
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def mapping_table(spec: ArchSpec, head: str = "lm") -> tuple[Mapping, ...]:
    """All mappings of `spec` with output head `head` (a tied LM gets the tied output entry)."""
    if spec.arch not in ARCHITECTURES:
        raise ValueError(f"no mapping table for architecture {spec.arch!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    table = ARCHITECTURES[spec.arch]
    if head == "lm" and spec.tie_word_embeddings:
        return table + (_TIED_LM,)
    return table + HEADS[head]


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(r"\{layer\}", r"(\d+)") + "$")


_PATTERN_CACHE: dict[str, re.Pattern] = {}


def _match(template: str, name: str) -> int | None | bool:
    """Layer id if `name` matches `template` with a layer, True without one, None if no match."""
    if "{layer}" not in template:
        return True if template == name else None
    pat = _PATTERN_CACHE.get(template)
    if pat is None:
        pat = _PATTERN_CACHE[template] = _pattern(template)
    m = pat.match(name)
    return int(m.group(1)) if m else None


def _fmt(template: str, layer: int | None) -> str:
    return template.format(layer=layer) if layer is not None else template


def find_hf(spec: ArchSpec, hf_name: str, head: str = "lm") -> list[tuple[Mapping, int, int | None]]:
    """Mappings fed by HF tensor `hf_name`: [(mapping, index in mapping.hf, layer id or None)]."""
    found = []
    for m in mapping_table(spec, head):
        for i, template in enumerate(m.hf):
            got = _match(template, hf_name)
            if got is None:
                continue
            layer = None if got is True else got
            found.append((m, i, layer))
    return found


def normalize_mcore_name(name: str) -> str:
    """Local-spec name of a megatron tensor name (transformer-engine norm names are mapped)."""
    for local, te in TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def find_mcore(spec: ArchSpec, mcore_name: str, head: str = "lm") -> tuple[Mapping, int | None]:
    name = normalize_mcore_name(mcore_name)
    for m in mapping_table(spec, head):
        got = _match(m.mcore, name)
        if got is not None:
            return m, (None if got is True else got)
    raise ValueError(f"{spec.hf_architecture} ({head} head): no mapping for megatron tensor {mcore_name!r}")


# ---- shapes -----------------------------------------------------------------------------------


def hf_shape(spec: ArchSpec, hf_name: str, head: str = "lm") -> tuple[int, ...]:
    """Expected shape of an HF tensor of this architecture (ValueError if the name is unknown)."""
    found = find_hf(spec, hf_name, head)
    if not found:
        raise ValueError(f"{spec.hf_architecture}: unexpected HF tensor {hf_name!r}")
    m, i, _ = found[0]
    h = spec.hidden_size
    base = hf_name.rsplit(".", 1)[-1]  # weight | bias
    if m.kind == "vocab":
        return (spec.vocab_size, h)
    if m.kind == "qkv":
        rows = spec.q_size if i == 0 else spec.kv_size
        return (rows, h) if base == "weight" else (rows,)
    if m.kind == "gate_up":
        return (spec.ffn_hidden_size, h)
    if m.mcore.endswith("linear_proj.weight"):
        return (h, spec.q_size)
    if m.mcore.endswith("linear_fc2.weight"):
        return (h, spec.ffn_hidden_size)
    if m.mcore.endswith("layernorm.weight"):
        return (h,)
    if m.mcore.startswith("output_layer.hidden."):
        return (h, h) if base == "weight" else (h,)
    if m.mcore.startswith("output_layer."):
        n = {"value": 1, "orm": 1, "prm": 2}[head]
        return (n, h) if base == "weight" else (n,)
    raise AssertionError(f"no shape rule for {m}")


# ---- HF -> megatron -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where (part of) an HF tensor goes: `tensor` is written to rows `rows` (all rows if None)
    of this TP rank's shard of megatron tensor `mcore_name` (global layer id)."""

    mcore_name: str
    tensor: torch.Tensor
    rows: torch.Tensor | None = None
    complete: bool = True  # False: other HF tensors fill the remaining rows (qkv, gate_up)


def _qkv_rows(spec: ArchSpec, part: int, tp_rank: int, tp_size: int) -> tuple[torch.Tensor, slice]:
    """(rows in the local fused qkv shard, slice of the HF q/k/v rows) for part 0=q, 1=k, 2=v."""
    d = spec.head_dim
    groups_local = spec.num_kv_heads // tp_size
    q_per_group = spec.num_attention_heads // spec.num_kv_heads
    block = (q_per_group + 2) * d  # one group's rows in the fused tensor
    offset, width = [(0, q_per_group * d), (q_per_group * d, d), ((q_per_group + 1) * d, d)][part]
    rows = torch.cat([torch.arange(g * block + offset, g * block + offset + width) for g in range(groups_local)])
    hf_rows_per_rank = groups_local * width
    return rows, slice(tp_rank * hf_rows_per_rank, (tp_rank + 1) * hf_rows_per_rank)


def hf_to_mcore(
    spec: ArchSpec, hf_name: str, tensor: torch.Tensor, tp_rank: int, tp_size: int, head: str = "lm"
) -> list[Placement]:
    """The pieces of HF tensor `hf_name` that TP rank `tp_rank` of `tp_size` holds.

    Usually one placement; the tied embedding gives two (input embedding and output weight).
    Shape-checks `tensor` against the architecture (ValueError naming the tensor).
    """
    found = find_hf(spec, hf_name, head)
    if not found:
        raise ValueError(f"{spec.hf_architecture} ({head} head): unexpected HF tensor {hf_name!r}")
    expected = hf_shape(spec, hf_name, head)
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"{spec.hf_architecture}: HF tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected}"
        )
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    out = []
    for m, part, layer in found:
        name = _fmt(m.mcore, layer)
        if m.kind == "replicated":
            out.append(Placement(name, tensor))
        elif m.kind == "column":
            out.append(Placement(name, tensor.chunk(tp_size, dim=0)[tp_rank]))
        elif m.kind == "row":
            out.append(Placement(name, tensor.chunk(tp_size, dim=1)[tp_rank]))
        elif m.kind == "vocab":
            padded = padded_vocab_size(spec, tp_size)
            local = padded // tp_size
            start = tp_rank * local
            shard = torch.zeros((local,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
            real = max(min(spec.vocab_size - start, local), 0)
            shard[:real] = tensor[start : start + real]
            out.append(Placement(name, shard))
        elif m.kind == "qkv":
            rows, hf_rows = _qkv_rows(spec, part, tp_rank, tp_size)
            out.append(Placement(name, tensor[hf_rows], rows, complete=False))
        elif m.kind == "gate_up":
            f_local = spec.ffn_hidden_size // tp_size
            rows = torch.arange(part * f_local, (part + 1) * f_local)
            out.append(Placement(name, tensor.chunk(tp_size, dim=0)[tp_rank], rows, complete=False))
    return out


def mcore_local_shape(spec: ArchSpec, mcore_name: str, tp_size: int, head: str = "lm") -> tuple[int, ...]:
    """Shape of one TP rank's shard of a megatron tensor."""
    m, layer = find_mcore(spec, mcore_name, head)
    shapes = [hf_shape(spec, _fmt(t, layer), head) for t in m.hf]
    if m.kind == "replicated":
        return shapes[0]
    if m.kind == "vocab":
        return (padded_vocab_size(spec, tp_size) // tp_size,) + shapes[0][1:]
    if m.kind == "row":
        return (shapes[0][0], shapes[0][1] // tp_size)
    rows = sum(s[0] for s in shapes) // tp_size
    return (rows,) + shapes[0][1:]


# ---- megatron -> HF -----------------------------------------------------------------------------


def mcore_to_hf(
    spec: ArchSpec, mcore_name: str, shards: list[torch.Tensor], head: str = "lm", *, views: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """HF tensors made from the TP shards (in TP-rank order) of megatron tensor `mcore_name`
    (global layer id). Vocab padding is stripped; the tied output weight gives [].

    views=True lets outputs made from a single shard be views of it instead of copies (the
    rollout weight bridge, which only reads them; such views may share storage, e.g. gate and
    up of one fc1 shard, which safetensors refuses to save side by side)."""

    def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return parts[0] if views and len(parts) == 1 else torch.cat(parts, dim=dim)

    m, layer = find_mcore(spec, mcore_name, head)
    if m.tied:
        return []
    tp_size = len(shards)
    if tp_size < 1:
        raise ValueError(f"mcore_to_hf({mcore_name!r}): no shards")
    expected = mcore_local_shape(spec, mcore_name, tp_size, head)
    for r, s in enumerate(shards):
        if tuple(s.shape) != expected:
            raise ValueError(
                f"mcore_to_hf({mcore_name!r}): shard {r} of {tp_size} has shape {tuple(s.shape)}, expected {expected}"
            )
    names = [_fmt(t, layer) for t in m.hf]
    if m.kind == "replicated":
        return [(names[0], shards[0])]
    if m.kind == "column":
        return [(names[0], cat(shards, dim=0))]
    if m.kind == "row":
        return [(names[0], cat(shards, dim=1))]
    if m.kind == "vocab":
        return [(names[0], cat(shards, dim=0)[: spec.vocab_size])]
    if m.kind == "gate_up":
        f_local = spec.ffn_hidden_size // tp_size
        gate = cat([s[:f_local] for s in shards], dim=0)
        up = cat([s[f_local:] for s in shards], dim=0)
        return [(names[0], gate), (names[1], up)]
    assert m.kind == "qkv"
    # each shard is groups_local blocks of [q rows of the group's heads, k rows, v rows]: slice
    # the blocks (a strided copy, or a view with one group), as _qkv_rows lists them
    d = spec.head_dim
    groups_local = spec.num_kv_heads // tp_size
    q_rows = spec.num_attention_heads // spec.num_kv_heads * d
    bounds = [(0, q_rows), (q_rows, q_rows + d), (q_rows + d, q_rows + 2 * d)]
    parts: list[list[torch.Tensor]] = [[], [], []]
    for s in shards:
        blocks = s.view(groups_local, q_rows + 2 * d, *s.shape[1:])
        for part, (lo, hi) in enumerate(bounds):
            parts[part].append(blocks[:, lo:hi].reshape(groups_local * (hi - lo), *s.shape[1:]))
    return [(names[p], cat(parts[p], dim=0)) for p in range(3)]


def hf_names(spec: ArchSpec, head: str = "lm") -> list[str]:
    """Every HF tensor name of the architecture with this head (what an export writes)."""
    out = []
    for m in mapping_table(spec, head):
        if m.tied:
            continue
        layers = range(spec.num_layers) if "{layer}" in m.mcore else [None]
        for layer in layers:
            out.extend(_fmt(t, layer) for t in m.hf)
    return out


def mcore_names(spec: ArchSpec, head: str = "lm") -> list[str]:
    """Every megatron tensor name (global layer ids, local spec), including the tied output."""
    out = []
    for m in mapping_table(spec, head):
        layers = range(spec.num_layers) if "{layer}" in m.mcore else [None]
        out.extend(_fmt(m.mcore, layer) for layer in layers)
    return out


# ---- layer numbering ------------------------------------------------------------------------------


def layers_per_chunk(spec: ArchSpec, layout) -> int:
    n = layout.pp * layout.num_chunks
    if spec.num_layers % n:
        raise ValueError(f"num_hidden_layers={spec.num_layers} is not divisible by pp*vpp={n}")
    return spec.num_layers // n


def layer_owner(spec: ArchSpec, layout, layer: int) -> tuple[int, int, int]:
    """Global layer id -> (pipeline rank, virtual stage, local index in that chunk).

    megatron interleaves chunks: virtual stage v of pipeline rank p holds global chunk
    v * pp + p (transformer_layer.get_transformer_layer_offset with even splits).
    """
    if not 0 <= layer < spec.num_layers:
        raise ValueError(f"layer {layer} out of range (num_hidden_layers={spec.num_layers})")
    per = layers_per_chunk(spec, layout)
    chunk, local = divmod(layer, per)
    vp, pp_rank = divmod(chunk, layout.pp)
    return pp_rank, vp, local


def global_layer(spec: ArchSpec, layout, pp_rank: int, vp_stage: int, local: int) -> int:
    """(pipeline rank, virtual stage, local index) -> global layer id."""
    per = layers_per_chunk(spec, layout)
    if not (0 <= pp_rank < layout.pp and 0 <= vp_stage < layout.num_chunks and 0 <= local < per):
        raise ValueError(f"no layer at pp_rank={pp_rank} vp_stage={vp_stage} local={local} for {layout}")
    return (vp_stage * layout.pp + pp_rank) * per + local


def to_local_name(spec: ArchSpec, layout, mcore_name: str) -> tuple[int | None, int | None, str]:
    """Global megatron name -> (pp rank, virtual stage, chunk-local name). Non-layer tensors
    give (None, None, name): the embedding lives on the first chunk, the final norm and output
    on the last."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", mcore_name)
    if not m:
        return None, None, mcore_name
    pp_rank, vp, local = layer_owner(spec, layout, int(m.group(1)))
    return pp_rank, vp, f"decoder.layers.{local}.{m.group(2)}"


def to_global_name(spec: ArchSpec, layout, pp_rank: int, vp_stage: int, local_name: str) -> str:
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", local_name)
    if not m:
        return local_name
    return f"decoder.layers.{global_layer(spec, layout, pp_rank, vp_stage, int(m.group(1)))}.{m.group(2)}"


# ---- loading ------------------------------------------------------------------------------------


class LazyTensor:
    """A tensor in a safetensors file, read only when `load()` is called."""

    def __init__(self, handle, name: str):
        self._handle, self.name = handle, name
        self.shape = tuple(handle.get_slice(name).get_shape())

    def load(self) -> torch.Tensor:
        return self._handle.get_tensor(self.name)


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, LazyTensor]]:
    """(name, LazyTensor) for every tensor of an HF checkpoint directory or .safetensors file,
    one file open at a time (sharded checkpoints via model.safetensors.index.json)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / f for f in files]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors files")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{path} does not exist")
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                yield name, LazyTensor(handle, name)


def export_hf_tensors(model_chunks: list, spec: ArchSpec, layout) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of this rank's chunks, one megatron parameter at a time.

    Collective over the tensor-parallel group (every TP rank must iterate to the end): each
    parameter's shards are all-gathered (chunk.pg_collection.tp) and converted by
    `mcore_to_hf`, so every TP rank gets the same full tensors. Names carry global layer ids;
    each pipeline stage yields its own layers (the embedding on the first stage, the final norm
    and head on the last); the tied output weight is skipped and vocab padding stripped.
    """
    for chunk in (_unwrap(c) for c in model_chunks):
        head = chunk.megarl_head
        tp_rank, tp_size, pp_rank, vp = _chunk_info(chunk)
        for local, p in chunk.named_parameters():
            data = p.detach()
            if tp_size > 1:
                shards = [torch.empty_like(data) for _ in range(tp_size)]
                torch.distributed.all_gather(shards, data.contiguous(), group=chunk.pg_collection.tp)
            else:
                shards = [data]
            name = to_global_name(spec, layout, pp_rank, vp, normalize_mcore_name(local))
            yield from mcore_to_hf(spec, name, shards, head)


def _unwrap(chunk):
    """The GPTModel inside megatron's wrappers (DDP, Float16Module keep it in `.module`)."""
    while not hasattr(chunk, "megarl_head") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _chunk_info(chunk) -> tuple[int, int, int, int]:
    pgs = chunk.pg_collection
    vp = chunk.vp_stage if chunk.vp_stage is not None else 0
    return pgs.tp.rank(), pgs.tp.size(), pgs.pp.rank(), vp


def hf_tensor_problem(spec: ArchSpec, hf_name: str, shape: Sequence[int], head: str = "lm") -> str | None:
    """What is wrong with an HF tensor of this name and shape for the architecture, or None:
    a name no table maps ("unexpected tensor ..."), a layer beyond num_hidden_layers, or a shape
    other than hf_shape. (Ignored names and head tensors are the callers' business.)"""
    found = find_hf(spec, hf_name, head)
    if not found:
        return f"unexpected tensor {hf_name!r}"
    layer = found[0][2]
    if layer is not None and layer >= spec.num_layers:
        return f"unexpected tensor {hf_name!r}: layer {layer} >= num_hidden_layers {spec.num_layers}"
    expected = hf_shape(spec, hf_name, head)
    if tuple(shape) != expected:
        return f"tensor {hf_name!r} has shape {tuple(shape)}, expected {expected}"
    return None


def load_hf_state_into(
    model_chunks: list,
    spec: ArchSpec,
    layout,
    hf_tensors: Iterable[tuple[str, Any]],
    *,
    head_from_checkpoint: bool = True,
) -> dict[str, int]:
    """Copy HF tensors into this rank's model chunks (from builder.build_model, possibly
    wrapped by megatron's DDP / Float16Module).

    `hf_tensors` yields (name, tensor) where tensor is a torch.Tensor or a LazyTensor (from
    `iter_safetensors`; read only if this rank holds part of it). Every name is checked on every
    rank: an unknown name, a layer id out of range or a wrong shape is an error; afterwards any
    parameter of this rank's chunks left unset is an error. Errors are collected and raised
    together as one ValueError naming the tensors.

    head_from_checkpoint=False initialises a critic / reward model from an actor checkpoint
    (or any model from a checkpoint with another head): the checkpoint's head tensors
    (lm_head, score.*) are ignored and this model's head keeps its fresh initialisation.
    Returns counts: {"tensors": HF tensors seen, "loaded": tensors this rank copied from,
    "skipped": tensors for other ranks or ignored}.
    """
    if not model_chunks:
        raise ValueError("load_hf_state_into: no model chunks")
    model_chunks = [_unwrap(c) for c in model_chunks]
    head = getattr(model_chunks[0], "megarl_head", None)
    if head is None:
        raise ValueError("load_hf_state_into: model chunks must come from megarl.models.builder.build_model")

    chunk_of: dict[tuple[int, int], int] = {}
    params: dict[tuple[int, str], torch.nn.Parameter] = {}
    tp_rank = tp_size = None
    for idx, c in enumerate(model_chunks):
        tp_rank, tp_size, pp_rank, vp = _chunk_info(c)
        chunk_of[(pp_rank, vp)] = idx
        for name, p in c.named_parameters():
            params[(idx, normalize_mcore_name(name))] = p
    first = next((i for i, c in enumerate(model_chunks) if c.pre_process), None)
    last = next((i for i, c in enumerate(model_chunks) if c.post_process), None)

    def owner(mcore_name: str) -> tuple[int, str] | None:
        pp_rank, vp, local = to_local_name(spec, layout, mcore_name)
        if pp_rank is not None:
            idx = chunk_of.get((pp_rank, vp))
        else:
            idx = first if mcore_name.startswith("embedding.") else last
        key = (idx, local)
        # not in params: another rank's, or (PP=1, tied) megatron reuses the embedding weight
        return key if idx is not None and key in params else None

    any_head_tensor = {t for table in HEADS.values() for m in table for t in m.hf}
    own_head_tensor = {t for m in HEADS[head] for t in m.hf}
    errors: list[str] = []
    counts = {"tensors": 0, "loaded": 0, "skipped": 0}
    filled: dict[tuple[int, str], int] = {}  # rows written so far
    for hf_name, tensor in hf_tensors:
        counts["tensors"] += 1
        ignored = bool(_IGNORED_HF.search(hf_name))
        if hf_name == "lm_head.weight" and (head != "lm" or spec.tie_word_embeddings):
            ignored = True  # documented above: transformers and vLLM ignore it too
        if hf_name in any_head_tensor and not head_from_checkpoint:
            ignored = True
        if ignored:
            counts["skipped"] += 1
            continue
        if hf_name in any_head_tensor and hf_name not in own_head_tensor:
            errors.append(f"head tensor {hf_name!r} does not belong to a {head!r} model "
                          "(use head_from_checkpoint=False to start a new head)")
            continue
        problem = hf_tensor_problem(spec, hf_name, tensor.shape, head)
        if problem is not None:
            errors.append(problem)
            continue
        found = find_hf(spec, hf_name, head)
        if not any(owner(_fmt(m.mcore, lay)) for m, _, lay in found):
            counts["skipped"] += 1
            continue
        full = tensor.load() if isinstance(tensor, LazyTensor) else tensor
        counts["loaded"] += 1
        for pl in hf_to_mcore(spec, hf_name, full, tp_rank, tp_size, head):
            key = owner(pl.mcore_name)
            if key is None:
                continue
            param = params[key]
            with torch.no_grad():
                if pl.rows is None:
                    assert tuple(param.shape) == tuple(pl.tensor.shape), (key, param.shape, pl.tensor.shape)
                    param.copy_(pl.tensor.to(device=param.device, dtype=param.dtype))
                    filled[key] = param.shape[0]
                else:
                    param[pl.rows.to(param.device)] = pl.tensor.to(device=param.device, dtype=param.dtype)
                    filled[key] = filled.get(key, 0) + len(pl.rows)

    for key, p in params.items():
        idx, local = key
        if local.startswith("output_layer.") and head != "lm" and not head_from_checkpoint:
            continue
        if filled.get(key, 0) != p.shape[0]:
            _, _, pp_rank, vp = _chunk_info(model_chunks[idx])
            name = to_global_name(spec, layout, pp_rank, vp, local)
            m, lay = find_mcore(spec, name, head)
            sources = ", ".join(_fmt(t, lay) for t in m.hf)
            errors.append(f"missing HF tensor(s) {sources} for {name} (pp rank {pp_rank}, vp stage {vp})")
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"loading {spec.hf_architecture} weights into a {head!r} model failed:\n  {shown}{more}")
    return counts
