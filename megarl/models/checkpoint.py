"""The megarl megatron checkpoint format (MCORE_DIR): per-(tp, pp)-rank safetensors files of
megatron-local tensors, plus a JSON manifest. Written by `tools/convert hf-to-mcore` / `reshard`
(megarl.models.convert, no processes needed) and by a trainer from live shards
(`save_mcore_checkpoint`); read back into model chunks of the same layout
(`load_mcore_checkpoint_into`) or converted to HF / another layout by megarl.models.convert.

Layout of MCORE_DIR (format version 1, see docs/convert.md):

    megarl_checkpoint.json          manifest (below)
    hf/                             the source's non-weight files (tokenizer, generation config,
                                    chat template...); config.json lives in the manifest
    tp00_pp00_000.safetensors       tensors of tp rank 0, pp rank 0, part 0
    tp00_pp00_001.safetensors       (a rank's tensors are split in parts when they exceed the
    ...                              converter's --max-shard-size)

Tensor names inside rank files: "chunk{vp}.{megatron local name}", e.g.
"chunk1.decoder.layers.0.self_attention.linear_qkv.weight" is local layer 0 of virtual stage 1;
names use megatron's local layer spec (transformer-engine norm names are stored under their
local-spec names). Every tensor is this TP rank's shard, vocab rows padded to the manifest's
`padded_vocab_size`. With tied embeddings and pp > 1, the last stage's copy of the embedding
(`output_layer.weight`) is stored too, as megatron keeps it.

Manifest fields: format, version, created_by, hf_config (config.json contents, with the
architecture matching `head`), head, make_vocab_size_divisible_by, padded_vocab_size, tp, pp,
vpp, dtype (the tensors' dtype, or "mixed"), ranks ({"tp00_pp00": {"tp_rank", "pp_rank",
"tensors": {name: {"file", "shape", "dtype"}}}}), files ({file: {"bytes", "sha256"}}).

This module imports torch and safetensors only; torch.distributed is used by the two functions
that run inside a trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from megarl.models.hf_config import HF_ARCHITECTURES, ArchSpec, arch_spec, padded_vocab_size, validate_layout
from megarl.models.mappings import mapping_table, mcore_local_shape, normalize_mcore_name, to_local_name
from megarl.parallel.groups import ParallelLayout

FORMAT = "megarl-mcore-checkpoint"
VERSION = 1
MANIFEST = "megarl_checkpoint.json"
HF_SUBDIR = "hf"
_MANIFEST_KEYS = {
    "format", "version", "created_by", "hf_config", "head", "make_vocab_size_divisible_by",
    "padded_vocab_size", "tp", "pp", "vpp", "dtype", "ranks", "files",
}
# Files of an HF model directory that are weights (never copied into hf/).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}


# ---- names and layout -------------------------------------------------------------------------


def rank_key(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}"


def rank_file_name(tp_rank: int, pp_rank: int, part: int) -> str:
    return f"{rank_key(tp_rank, pp_rank)}_{part:03d}.safetensors"


def chunk_key(vp_stage: int, local_name: str) -> str:
    return f"chunk{vp_stage}.{local_name}"


def stage_tensors(spec: ArchSpec, layout: ParallelLayout, head: str, pp_rank: int) -> list[tuple[str, int, str]]:
    """The megatron tensors pipeline rank `pp_rank` holds, in chunk order:
    [(global name, virtual stage, chunk-local name)]. Every TP rank of the stage holds a shard of
    each. The tied output weight is listed only with pp > 1 (megatron shares the embedding's
    parameter when the first and last stage are one chunk)."""
    validate_layout(spec, layout)
    table = mapping_table(spec, head)
    layer_maps = [m for m in table if "{layer}" in m.mcore]
    pre = [m for m in table if "{layer}" not in m.mcore and m.mcore.startswith("embedding.")]
    post = [m for m in table if "{layer}" not in m.mcore and not m.mcore.startswith("embedding.")
            and not (m.tied and layout.pp == 1)]
    per = spec.num_layers // (layout.pp * layout.num_chunks)
    out = []
    for vp in range(layout.num_chunks):
        if pp_rank == 0 and vp == 0:
            out.extend((m.mcore, vp, m.mcore) for m in pre)
        first = (vp * layout.pp + pp_rank) * per
        for local in range(per):
            for m in layer_maps:
                out.append((m.mcore.format(layer=first + local), vp, m.mcore.format(layer=local)))
        if pp_rank == layout.pp - 1 and vp == layout.num_chunks - 1:
            out.extend((m.mcore, vp, m.mcore) for m in post)
    return out


def expected_rank_tensors(spec: ArchSpec, layout: ParallelLayout, head: str, tp_rank: int,
                          pp_rank: int) -> dict[str, tuple[int, ...]]:
    """{chunk key: local shape} of one (tp, pp) rank's file set, in write order."""
    return {chunk_key(vp, local): mcore_local_shape(spec, name, layout.tp, head)
            for name, vp, local in stage_tensors(spec, layout, head, pp_rank)}


# ---- HF config <-> spec -------------------------------------------------------------------------


def hf_class_for(arch: str, head: str) -> str:
    for cls, (a, h) in HF_ARCHITECTURES.items():
        if (a, h) == (arch, head):
            return cls
    raise ValueError(f"no Hugging Face class exports a {arch} model with a {head!r} head "
                     f"(supported: {', '.join(HF_ARCHITECTURES)})")


def hf_config_from_spec(spec: ArchSpec, head: str | None = None) -> dict:
    """A config.json dict that `arch_spec` reads back as `spec` (for checkpoints saved from a
    spec alone, without the original HF directory)."""
    head = head or spec.hf_head
    rope: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if spec.rope_scaling is not None:
        rope.update({k: v for k, v in dataclasses.asdict(spec.rope_scaling).items() if v is not None})
    cfg: dict[str, Any] = {
        "architectures": [hf_class_for(spec.arch, head)],
        "model_type": spec.arch,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": rope,
        "initializer_range": spec.initializer_range,
        "attention_dropout": spec.attention_dropout,
        "pad_token_id": spec.pad_token_id,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_id) if isinstance(spec.eos_token_id, tuple) else spec.eos_token_id,
    }
    if spec.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if spec.torch_dtype is not None:
        cfg["dtype"] = spec.torch_dtype
    if head != "lm":
        cfg["num_labels"] = {"value": 1, "orm": 1, "prm": 2}[head]
    return cfg


def hf_config_with_dtype(hf_config: dict, dtype: str | None) -> dict:
    """`hf_config` saying its weights are `dtype` (transformers reads "dtype", older versions
    "torch_dtype"); None leaves it as is."""
    if dtype is None:
        return dict(hf_config)
    cfg = dict(hf_config, dtype=dtype)
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    return cfg


def hf_config_for_head(hf_config: dict, head: str) -> dict:
    """`hf_config` with `architectures` (and num_labels) naming the HF class of `head`: a critic
    trained from an actor is exported as {Qwen2,Llama}ForTokenClassification."""
    spec = arch_spec(hf_config)
    if spec.hf_head == head:
        return dict(hf_config)
    cfg = dict(hf_config)
    cfg["architectures"] = [hf_class_for(spec.arch, head)]
    for key in ("num_labels", "id2label", "label2id"):
        cfg.pop(key, None)
    if head != "lm":
        cfg["num_labels"] = {"value": 1, "orm": 1, "prm": 2}[head]
    arch_spec(cfg)  # must read back
    return cfg


def same_model(a: ArchSpec, b: ArchSpec) -> list[str]:
    """Fields (other than the dtype note) on which two specs differ."""
    ignore = {"torch_dtype", "hf_architecture", "hf_head", "num_labels"}
    return [f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
            for f in dataclasses.fields(ArchSpec)
            if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)]


def copy_hf_side_files(hf_dir: str | os.PathLike, dest: Path) -> list[str]:
    """Copy the non-weight files at the top of an HF model directory (tokenizer, generation
    config, chat template, ...) except config.json into `dest`; returns their names."""
    copied = []
    for f in sorted(Path(hf_dir).iterdir()):
        if not f.is_file() or f.name == "config.json" or f.name in _WEIGHT_INDEXES:
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / f.name)
        copied.append(f.name)
    return copied


# ---- files ------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1)
    # shapes on one line: [49152, 576], not one number per line
    text = re.sub(r"\[\s*((?:-?\d+,\s*)*-?\d+)\s*\]", lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", text)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


_UMASK: int | None = None


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give (mkdtemp makes 0700 directories and
    safetensors 0600 files; outputs are meant to be shared like any other file)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o22)
        os.umask(_UMASK)
    return (0o777 if directory else 0o666) & ~_UMASK


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, default_mode())


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool, *inputs: str | os.PathLike) -> Path:
    """ValueError when `out_dir` exists (without overwrite) or overlaps an input directory
    (replacing it would destroy the input)."""
    out = Path(out_dir).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ValueError(f"output directory {out_dir} overlaps the input {src}")
    if out.exists() and not overwrite:
        raise ValueError(f"output directory {out_dir} already exists (pass --overwrite / overwrite=True to replace it)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a directory")
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is removed only after `tmp` is in
    place (a crash leaves either the old or the new directory, plus a hidden leftover)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool, *inputs: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary directory next to `out_dir`, renamed to it when the block succeeds and
    removed when it fails."""
    out = check_output_dir(out_dir, overwrite, *inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """One tensor from a safetensors file. The file is opened (memory-mapped) only for this read,
    so mapped pages never accumulate in the process's resident memory."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype string)} from a file's header, without reading data."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            s = f.get_slice(name)
            out[name] = (tuple(s.get_shape()), s.get_dtype())
    return out


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return _ST_DTYPES.get(dtype, dtype.lower())
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# ---- manifest and reader ------------------------------------------------------------------------


def is_mcore_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` looks like MCORE_DIR (has the manifest); McoreCheckpoint validates it."""
    return (Path(path) / MANIFEST).is_file()


def _need(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {what}")


class McoreCheckpoint:
    """A validated MCORE_DIR: manifest, spec, layout, and per-tensor reads.

    Construction checks the manifest (format, version, fields), that every rank holds exactly
    the tensors the layout implies with the right shapes, and that every file exists with the
    recorded size. With verify_checksums, each file's sha256 is checked the first time it is
    read.
    """

    def __init__(self, path: str | os.PathLike, *, verify_checksums: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise ValueError(f"{self.path}: not a megarl megatron checkpoint (no {MANIFEST})")
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath}: invalid JSON: {e}") from None
        _need(isinstance(m, dict) and m.get("format") == FORMAT, mpath, f"format must be {FORMAT!r}")
        _need(isinstance(m.get("version"), int), mpath, "version must be an int")
        _need(m["version"] <= VERSION, mpath,
              f"format version {m['version']} is newer than this megarl reads ({VERSION})")
        unknown = sorted(set(m) - _MANIFEST_KEYS)
        _need(not unknown, mpath, f"unknown manifest fields {unknown}")
        missing = sorted(_MANIFEST_KEYS - set(m))
        _need(not missing, mpath, f"missing manifest fields {missing}")
        self.manifest = m
        self.head: str = m["head"]
        try:
            self.spec = arch_spec(m["hf_config"], make_vocab_size_divisible_by=m["make_vocab_size_divisible_by"])
            self.layout = ParallelLayout(tp=m["tp"], pp=m["pp"], vpp=m["vpp"])
            validate_layout(self.spec, self.layout)
        except ValueError as e:
            raise ValueError(f"{mpath}: {e}") from None
        _need(self.spec.hf_head == self.head, mpath,
              f"head {self.head!r} does not match hf_config architecture {self.spec.hf_architecture}")
        padded = padded_vocab_size(self.spec, self.layout.tp)
        _need(m["padded_vocab_size"] == padded, mpath,
              f"padded_vocab_size {m['padded_vocab_size']} != {padded} implied by the config and tp")
        self._verify = verify_checksums
        self._verified: set[str] = set()
        self._check_contents()

    def _check_contents(self) -> None:
        m, errors = self.manifest, []
        ranks, files = m["ranks"], m["files"]
        for pp_rank in range(self.layout.pp):
            for tp_rank in range(self.layout.tp):
                key = rank_key(tp_rank, pp_rank)
                if key not in ranks:
                    errors.append(f"rank {key} is missing")
                    continue
                expected = expected_rank_tensors(self.spec, self.layout, self.head, tp_rank, pp_rank)
                got = ranks[key]["tensors"]
                for name in expected.keys() - got.keys():
                    errors.append(f"{key}: missing tensor {name!r}")
                for name in got.keys() - expected.keys():
                    errors.append(f"{key}: unexpected tensor {name!r}")
                for name in expected.keys() & got.keys():
                    if tuple(got[name]["shape"]) != expected[name]:
                        errors.append(f"{key}: tensor {name!r} has shape {tuple(got[name]['shape'])}, "
                                      f"expected {expected[name]}")
                    if got[name]["file"] not in files:
                        errors.append(f"{key}: tensor {name!r} is in {got[name]['file']}, which is not listed")
        extra = sorted(set(ranks) - {rank_key(t, p) for t in range(self.layout.tp) for p in range(self.layout.pp)})
        errors.extend(f"unexpected rank {k} for tp={self.layout.tp} pp={self.layout.pp}" for k in extra)
        for name, info in files.items():
            f = self.path / name
            if not f.is_file():
                errors.append(f"file {name} is missing")
            elif f.stat().st_size != info["bytes"]:
                errors.append(f"file {name} has {f.stat().st_size} bytes, the manifest says {info['bytes']}")
        if errors:
            shown = "\n  ".join(errors[:20])
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise ValueError(f"{self.path}: inconsistent checkpoint:\n  {shown}{more}")

    @property
    def hf_config(self) -> dict:
        return self.manifest["hf_config"]

    def num_tensors(self) -> int:
        return sum(len(r["tensors"]) for r in self.manifest["ranks"].values())

    def verify_file(self, name: str) -> None:
        if name in self._verified:
            return
        want = self.manifest["files"][name]["sha256"]
        got = sha256_file(self.path / name)
        if got != want:
            raise ValueError(f"{self.path / name}: sha256 {got} does not match the manifest ({want}): "
                             "the file was modified or is corrupt")
        self._verified.add(name)

    def verify_all(self) -> None:
        for name in self.manifest["files"]:
            self.verify_file(name)

    def read_local(self, tp_rank: int, pp_rank: int, key: str) -> torch.Tensor:
        """Tensor `key` ("chunk{vp}.{local name}") of rank (tp_rank, pp_rank)."""
        info = self.manifest["ranks"][rank_key(tp_rank, pp_rank)]["tensors"].get(key)
        if info is None:
            raise ValueError(f"{self.path}: rank {rank_key(tp_rank, pp_rank)} has no tensor {key!r}")
        if self._verify:
            self.verify_file(info["file"])
        t = read_tensor(self.path / info["file"], key)
        if tuple(t.shape) != tuple(info["shape"]) or dtype_name(t.dtype) != info["dtype"]:
            raise ValueError(f"{self.path / info['file']}: tensor {key!r} is {tuple(t.shape)} {dtype_name(t.dtype)}, "
                             f"the manifest says {tuple(info['shape'])} {info['dtype']}")
        return t

    def locate(self, mcore_name: str) -> tuple[int, int, str]:
        """Global megatron name -> (pp rank, virtual stage, chunk-local name) in this layout."""
        return locate(self.spec, self.layout, mcore_name)

    def read_shards(self, mcore_name: str) -> list[torch.Tensor]:
        """The TP shards (in TP-rank order) of global megatron tensor `mcore_name`."""
        pp_rank, vp, local = self.locate(mcore_name)
        return [self.read_local(t, pp_rank, chunk_key(vp, local)) for t in range(self.layout.tp)]


def locate(spec: ArchSpec, layout: ParallelLayout, mcore_name: str) -> tuple[int, int, str]:
    """Global megatron name -> (pp rank, virtual stage, chunk-local name)."""
    pp_rank, vp, local = to_local_name(spec, layout, mcore_name)
    if pp_rank is not None:
        return pp_rank, vp, local
    if mcore_name.startswith("embedding."):
        return 0, 0, mcore_name
    return layout.pp - 1, layout.num_chunks - 1, mcore_name


def build_manifest(*, spec: ArchSpec, hf_config: dict, head: str, layout: ParallelLayout, created_by: str,
                   ranks: dict, files: dict) -> dict:
    dtypes = {t["dtype"] for r in ranks.values() for t in r["tensors"].values()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_by": created_by,
        "hf_config": hf_config,
        "head": head,
        "make_vocab_size_divisible_by": spec.make_vocab_size_divisible_by,
        "padded_vocab_size": padded_vocab_size(spec, layout.tp),
        "tp": layout.tp,
        "pp": layout.pp,
        "vpp": layout.vpp,
        "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "ranks": {k: ranks[k] for k in sorted(ranks)},
        "files": {k: files[k] for k in sorted(files)},
    }


def write_rank_file(out_dir: Path, tp_rank: int, pp_rank: int, part: int, tensors: dict[str, torch.Tensor],
                    ranks: dict, files: dict) -> None:
    """Write one part file of rank (tp_rank, pp_rank) and record it in `ranks` / `files`."""
    name = rank_file_name(tp_rank, pp_rank, part)
    path = out_dir / name
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path)
    files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    entry = ranks.setdefault(rank_key(tp_rank, pp_rank), {"tp_rank": tp_rank, "pp_rank": pp_rank, "tensors": {}})
    for k, v in tensors.items():
        entry["tensors"][k] = {"file": name, "shape": list(v.shape), "dtype": dtype_name(v.dtype)}


# ---- inside a trainer: load and save live shards ----------------------------------------------


def _unwrap(chunk):
    # megatron's DDP and Float16Module keep the GPTModel in `.module`
    while not hasattr(chunk, "megarl_head") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _chunk_params(chunk) -> dict[str, torch.nn.Parameter]:
    vp = chunk.vp_stage if chunk.vp_stage is not None else 0
    return {chunk_key(vp, normalize_mcore_name(n)): p for n, p in chunk.named_parameters()}


def load_mcore_checkpoint_into(model_chunks: list, mcore_dir: str | os.PathLike, groups, *,
                               spec: ArchSpec | None = None, verify_checksums: bool = True) -> int:
    """Copy this rank's shards from MCORE_DIR into its model chunks (from build_model, possibly
    wrapped in megatron's DDP / Float16Module). The checkpoint's tp/pp/vpp must equal
    `groups.layout` (use `tools/convert reshard` for another layout); values are cast to the
    parameters' dtype and device. With `spec`, the checkpoint's architecture must match it.
    Errors (layout, head, spec, missing/unexpected tensors, shapes, checksums) are ValueErrors.
    Returns the number of tensors loaded.
    """
    ckpt = McoreCheckpoint(mcore_dir, verify_checksums=verify_checksums)
    layout = groups.layout
    if (ckpt.layout.tp, ckpt.layout.pp, ckpt.layout.vpp) != (layout.tp, layout.pp, layout.vpp):
        raise ValueError(
            f"{mcore_dir}: saved with tp={ckpt.layout.tp} pp={ckpt.layout.pp} vpp={ckpt.layout.vpp}, the model "
            f"has tp={layout.tp} pp={layout.pp} vpp={layout.vpp} (reshard it: tools/convert reshard)")
    chunks = [_unwrap(c) for c in model_chunks]
    if not chunks or any(not hasattr(c, "megarl_head") for c in chunks):
        raise ValueError("load_mcore_checkpoint_into: model chunks must come from megarl.models.builder.build_model")
    head = chunks[0].megarl_head
    if head != ckpt.head:
        raise ValueError(f"{mcore_dir}: checkpoint has a {ckpt.head!r} head, the model a {head!r} head")
    if spec is not None:
        diff = same_model(spec, ckpt.spec)
        if diff:
            raise ValueError(f"{mcore_dir}: checkpoint architecture differs from the model's: {'; '.join(diff)}")
    params: dict[str, torch.nn.Parameter] = {}
    for c in chunks:
        params.update(_chunk_params(c))
    stored = ckpt.manifest["ranks"][rank_key(groups.tp_rank, groups.pp_rank)]["tensors"]
    errors = [f"model parameter {k!r} is not in the checkpoint" for k in params.keys() - stored.keys()]
    held = {chunk_key(c.vp_stage or 0, "") for c in chunks}
    errors += [f"checkpoint tensor {k!r} has no model parameter" for k in stored.keys() - params.keys()
               if any(k.startswith(h) for h in held)]
    errors += [f"{k!r}: checkpoint shape {tuple(stored[k]['shape'])}, model {tuple(p.shape)}"
               for k, p in params.items() if k in stored and tuple(stored[k]["shape"]) != tuple(p.shape)]
    if errors:
        raise ValueError(f"{mcore_dir} -> rank tp{groups.tp_rank} pp{groups.pp_rank}:\n  " + "\n  ".join(errors))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ckpt.read_local(groups.tp_rank, groups.pp_rank, k).to(device=p.device, dtype=p.dtype))
    return len(params)


def save_mcore_checkpoint(model_chunks: list, spec: ArchSpec, layout: ParallelLayout, groups,
                          out_dir: str | os.PathLike, *, hf_dir: str | os.PathLike | None = None,
                          overwrite: bool = False, created_by: str = "save_mcore_checkpoint") -> Path:
    """Write this model's live shards as MCORE_DIR. Collective over the default process group:
    every rank calls it; the data-parallel rank 0 of each (tp, pp) position writes its own file,
    rank 0 writes the manifest; all of it goes to `<out_dir>.tmp`, renamed when complete.
    `out_dir` must be on a filesystem all ranks see.

    `hf_dir`: the HF directory the model came from: its config.json (re-labelled for the
    model's head, e.g. a critic becomes ...ForTokenClassification) and tokenizer files go into
    the checkpoint; without it the config is made from `spec` and no tokenizer is stored.
    Tensors are saved in the parameters' dtype (bf16 training: bf16 weights, not fp32 master).
    """
    import torch.distributed as dist

    if groups.layout != layout:
        raise ValueError(f"groups were initialised for {groups.layout}, not {layout}")
    out = Path(out_dir)
    rank = dist.get_rank()
    problem = None
    try:
        check_output_dir(out, overwrite, *([hf_dir] if hf_dir else []))
    except ValueError as e:
        problem = str(e)
    chunks = [_unwrap(c) for c in model_chunks]
    head = getattr(chunks[0], "megarl_head", None) if chunks else None
    if problem is None and head is None:
        problem = "model chunks must come from megarl.models.builder.build_model"
    tensors: dict[str, torch.Tensor] = {}
    writer = groups.dp_rank == 0
    if problem is None and writer:
        for c in chunks:
            tensors.update({k: p.detach() for k, p in _chunk_params(c).items()})
        expected = {k: s for k, s in expected_rank_tensors(spec, layout, head, groups.tp_rank, groups.pp_rank).items()
                    if any(k.startswith(chunk_key(c.vp_stage or 0, "")) for c in chunks)}
        bad = sorted(set(expected) ^ set(tensors)) + sorted(
            k for k in expected.keys() & tensors.keys() if tuple(tensors[k].shape) != expected[k])
        if bad:
            problem = f"rank tp{groups.tp_rank} pp{groups.pp_rank}: parameters do not match the layout: {bad[:10]}"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if any(problems):
        raise ValueError(f"save_mcore_checkpoint({out}): " + "; ".join(sorted({p for p in problems if p})))

    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    ranks: dict = {}
    files: dict = {}
    if writer:
        cpu = {k: v.to("cpu") for k, v in tensors.items()}
        write_rank_file(tmp, groups.tp_rank, groups.pp_rank, 0, cpu, ranks, files)
        del cpu
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ranks, files))
    failure = None
    if rank == 0:
        try:
            all_ranks, all_files = {}, {}
            for r, f in gathered:
                for key, entry in r.items():
                    all_ranks.setdefault(key, {"tp_rank": entry["tp_rank"], "pp_rank": entry["pp_rank"],
                                               "tensors": {}})
                    all_ranks[key]["tensors"].update(entry["tensors"])
                all_files.update(f)
            if hf_dir is not None:
                hf_config = hf_config_for_head(json.loads((Path(hf_dir) / "config.json").read_text()), head)
                copy_hf_side_files(hf_dir, tmp / HF_SUBDIR)
            else:
                hf_config = hf_config_from_spec(spec, head)
            manifest = build_manifest(spec=spec, hf_config=hf_config, head=head, layout=layout,
                                      created_by=created_by, ranks=all_ranks, files=all_files)
            write_json(tmp / MANIFEST, manifest)
            McoreCheckpoint(tmp, verify_checksums=False)  # what we wrote must read back
            replace_dir(tmp, out)
        except Exception as e:  # reported to every rank below, so none waits forever
            failure = f"{type(e).__name__}: {e}"
            shutil.rmtree(tmp, ignore_errors=True)
    status = [None]
    if rank == 0:
        status = [failure]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise ValueError(f"save_mcore_checkpoint({out}) failed on rank 0: {status[0]}")
    return out
