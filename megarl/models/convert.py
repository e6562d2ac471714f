"""Checkpoint conversion: HF <-> megarl megatron checkpoints (MCORE_DIR, see checkpoint.py) at
any TP/PP/VPP, megatron -> megatron resharding, and logits verification.

Conversion is a pure tensor transformation through the mapping tables of
megarl.models.mappings: no torch.distributed, no megatron processes. It streams: one megatron
tensor at a time is built from its HF tensors (the fused q/k/v and gate/up groups are read
together), its TP shards go to per-rank buffers, and the buffers are written as part files
whenever they reach `max_shard_size`; reading back, one tensor's TP shards are read, converted
and buffered the same way. Peak memory is about one tensor group plus one part
(`max_shard_size`), never the model. Files are read per tensor (memory-mapped only for that
read), so mapped pages do not pile up in the resident set either.

Outputs go to a temporary directory next to the destination and are renamed at the end; an
existing destination is refused unless `overwrite=True` (then replaced only once the new one
is complete).

    hf_to_mcore_dir(hf_dir, out_dir, tp=2, pp=2)          # HF -> MCORE_DIR
    mcore_to_hf_dir(mcore_dir, out_dir)                   # MCORE_DIR -> HF (from_pretrained loads it)
    reshard_mcore_dir(mcore_dir, out_dir, tp=1, pp=1)     # MCORE_DIR -> MCORE_DIR, another layout
    iter_mcore_hf_tensors(mcore_dir)                      # (HF name, tensor), one at a time
    verify_mcore_dir(hf_dir, mcore_dir)                   # logits parity vs transformers

`verify_mcore_dir` is the one function that builds a megatron model (one process, TP1 PP1) and
needs the whole model in memory twice (megatron and transformers, float32).
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from megarl.models.checkpoint import (
    HF_SUBDIR,
    MANIFEST,
    McoreCheckpoint,
    atomic_output_dir,
    build_manifest,
    chunk_key,
    copy_hf_side_files,
    dtype_name,
    hf_config_with_dtype,
    read_tensor,
    safetensors_header,
    same_model,
    save_safetensors,
    stage_tensors,
    write_json,
    write_rank_file,
)
from megarl.models.hf_config import ArchSpec, _torch_dtype, arch_spec, validate_layout
from megarl.models.mappings import (
    _IGNORED_HF,
    find_hf,
    find_mcore,
    hf_names,
    hf_tensor_problem,
    hf_to_mcore,
    mapping_table,
    mcore_local_shape,
    mcore_to_hf,
)
from megarl.parallel.groups import ParallelLayout

DEFAULT_MAX_SHARD_SIZE = "2GB"


# ---- small helpers ----------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """Bytes from 123, "500MB", "2GB" (decimal, as Hugging Face) or "1GiB" (binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size must be bytes or a size like '500MB', '2GB', '1GiB'; got {size!r}")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _dtype(dtype: Any) -> torch.dtype | None:
    return None if dtype is None else _torch_dtype(dtype)


def _fmt(template: str, layer: int | None) -> str:
    return template.format(layer=layer) if layer is not None else template


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True)


@dataclass
class ConversionReport:
    out_dir: Path
    tensors: int
    files: list[str]
    bytes: int
    seconds: float
    peak_rss_mb: float  # process peak so far (includes the interpreter and imports)
    start_rss_mb: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"wrote {self.tensors} tensors in {len(self.files)} files ({self.bytes / 2**20:.1f} MiB) to "
                f"{self.out_dir} in {self.seconds:.1f} s; peak RSS {self.peak_rss_mb:.0f} MiB "
                f"(RSS at start {self.start_rss_mb:.0f} MiB)")


# ---- sources: HF tensors by name ----------------------------------------------------------------


def _ignored(spec: ArchSpec, head: str, name: str) -> bool:
    # the loader's rules (mappings.load_hf_state_into): transformers and vLLM ignore these too
    if _IGNORED_HF.search(name):
        return True
    return name == "lm_head.weight" and (head != "lm" or spec.tie_word_embeddings)


class HFSource:
    """The tensors of an HF model directory (model.safetensors, or shards listed in
    model.safetensors.index.json), indexed from the file headers; tensors are read on demand."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.path = Path(hf_dir)
        if not self.path.is_dir():
            raise ValueError(f"--hf {hf_dir}: no such directory")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise ValueError(f"{index} lists files that do not exist: {missing}")
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {other}: convert them to safetensors first)" if other else ""
            raise ValueError(f"{self.path}: no .safetensors weights{hint}")
        self.entries: dict[str, tuple[str, tuple[int, ...], str]] = {}
        for f in files:
            for name, (shape, dtype) in safetensors_header(self.path / f).items():
                if name in self.entries:
                    raise ValueError(f"{self.path}: tensor {name!r} is in both {self.entries[name][0]} and {f}")
                self.entries[name] = (f, shape, dtype)

    def check(self, spec: ArchSpec, head: str) -> None:
        """ValueError listing every unexpected, missing or mis-shaped tensor."""
        errors = []
        for name, (f, shape, _) in self.entries.items():
            if _ignored(spec, head, name):
                continue
            problem = hf_tensor_problem(spec, name, shape, head)
            if problem is not None:
                errors.append(f"{problem} (in {f})")
        errors += [f"missing tensor {n!r}" for n in hf_names(spec, head) if n not in self.entries]
        if errors:
            shown = "\n  ".join(errors[:20])
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise ValueError(f"{self.path}: the weights do not match {spec.hf_architecture} "
                             f"({spec.num_layers} layers, {head} head):\n  {shown}{more}")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: read_tensor(self.path / self.entries[n][0], n) for n in names}


class McoreSource:
    """HF tensors computed from a megatron checkpoint's TP shards (through `mcore_to_hf`)."""

    def __init__(self, ckpt: McoreCheckpoint):
        self.ckpt = ckpt

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        spec, head = self.ckpt.spec, self.ckpt.head
        wanted: dict[str, list[str]] = {}
        for n in names:
            # the tied output is fed by the embedding's HF name: read the embedding itself
            found = [(m, layer) for m, _, layer in find_hf(spec, n, head) if not m.tied]
            assert found, n
            m, layer = found[0]
            wanted.setdefault(_fmt(m.mcore, layer), []).append(n)
        out = {}
        for mcore_name, hf in wanted.items():
            tensors = dict(mcore_to_hf(spec, mcore_name, self.ckpt.read_shards(mcore_name), head, views=True))
            out.update({n: tensors[n] for n in hf})
        return out


# ---- writing megatron shards --------------------------------------------------------------------


def _local_shard(spec: ArchSpec, head: str, mcore_name: str, hf_group: list[str],
                 src: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank `tp_rank`'s shard of megatron tensor `mcore_name`, assembled from its HF tensors."""
    pieces = [p for n in hf_group for p in hf_to_mcore(spec, n, src[n], tp_rank, tp_size, head)
              if p.mcore_name == mcore_name]
    shape = mcore_local_shape(spec, mcore_name, tp_size, head)
    if len(pieces) == 1 and pieces[0].rows is None:
        assert tuple(pieces[0].tensor.shape) == shape, (mcore_name, pieces[0].tensor.shape, shape)
        return pieces[0].tensor.contiguous()
    dtypes = {p.tensor.dtype for p in pieces}
    if len(dtypes) != 1:
        raise ValueError(f"{mcore_name}: its HF tensors {hf_group} have different dtypes "
                         f"{sorted(map(str, dtypes))} (pass a dtype to convert them)")
    out = torch.empty(shape, dtype=dtypes.pop())
    rows = 0
    for p in pieces:
        out[p.rows] = p.tensor
        rows += len(p.rows)
    assert rows == shape[0], (mcore_name, rows, shape)
    return out


def _write_mcore(source, spec: ArchSpec, head: str, layout: ParallelLayout, out: Path, *,
                 dtype: torch.dtype | None, max_shard_bytes: int, progress: bool, desc: str) -> tuple[dict, dict]:
    """Write every (tp, pp) rank's part files into `out`; returns the manifest's ranks and files."""
    ranks: dict = {}
    files: dict = {}
    stages = [stage_tensors(spec, layout, head, p) for p in range(layout.pp)]
    bar = _progress(sum(map(len, stages)), desc, progress)
    for pp_rank, tensors in enumerate(stages):
        buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(layout.tp)]
        parts = [0] * layout.tp
        held = 0

        def flush() -> None:
            nonlocal held
            for t in range(layout.tp):
                if buffers[t]:
                    write_rank_file(out, t, pp_rank, parts[t], buffers[t], ranks, files)
                    parts[t] += 1
                    buffers[t] = {}
            held = 0

        for mcore_name, vp, local in tensors:
            m, layer = find_mcore(spec, mcore_name, head)
            hf_group = [_fmt(t, layer) for t in m.hf]
            src = source.read(hf_group)
            if dtype is not None:
                src = {k: v.to(dtype) for k, v in src.items()}
            shards = [_local_shard(spec, head, mcore_name, hf_group, src, t, layout.tp) for t in range(layout.tp)]
            del src
            size = sum(map(_nbytes, shards))
            if held and held + size > max_shard_bytes:
                flush()
            for t, s in enumerate(shards):
                buffers[t][chunk_key(vp, local)] = s
            held += size
            del shards
            bar.update()
        flush()
    bar.close()
    return ranks, files


def _layout(tp: int, pp: int, vpp: int | None) -> ParallelLayout:
    if vpp in (None, 0, 1):
        vpp = None
    return ParallelLayout(tp=tp, pp=pp, vpp=vpp)


def _finish(out: Path, started: float, start_rss: float, warnings: list[str] | None = None) -> ConversionReport:
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        tensors = sum(len(r["tensors"]) for r in manifest["ranks"].values())
    else:
        tensors = sum(len(safetensors_header(out / f)) for f in files)
    return ConversionReport(out_dir=out, tensors=tensors, files=files,
                            bytes=sum((out / f).stat().st_size for f in files),
                            seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(),
                            start_rss_mb=start_rss, warnings=warnings or [])


def hf_to_mcore_dir(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                    vpp: int | None = None, dtype: Any = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                    make_vocab_size_divisible_by: int = 128, overwrite: bool = False,
                    progress: bool = True) -> ConversionReport:
    """Convert an HF model directory to MCORE_DIR split as tp x pp (x vpp virtual stages).

    Refuses (ValueError) an unknown architecture, weights that do not match the config (missing,
    unexpected or mis-shaped tensors), a layout that does not divide the shapes, and an existing
    `out_dir` unless `overwrite`. dtype=None keeps each tensor's dtype.
    """
    started, start_rss = time.perf_counter(), current_rss_mb()
    hf_dir = Path(hf_dir)
    source = HFSource(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text()) if (hf_dir / "config.json").is_file() else None
    if hf_config is None:
        raise ValueError(f"{hf_dir}: no config.json")
    spec = arch_spec(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    head = spec.hf_head
    layout = _layout(tp, pp, vpp)
    validate_layout(spec, layout)
    source.check(spec, head)
    dt = _dtype(dtype)
    hf_config = hf_config_with_dtype(hf_config, None if dt is None else dtype_name(dt))
    max_bytes = parse_size(max_shard_size)
    with atomic_output_dir(out_dir, overwrite, hf_dir) as tmp:
        ranks, files = _write_mcore(source, spec, head, layout, tmp, dtype=dt, max_shard_bytes=max_bytes,
                                    progress=progress, desc="hf-to-mcore")
        copy_hf_side_files(hf_dir, tmp / HF_SUBDIR)
        write_json(tmp / MANIFEST, build_manifest(spec=spec, hf_config=hf_config, head=head, layout=layout,
                                                  created_by="megarl convert hf-to-mcore", ranks=ranks,
                                                  files=files))
        McoreCheckpoint(tmp, verify_checksums=False)  # what we wrote must read back
    return _finish(Path(out_dir), started, start_rss)


def reshard_mcore_dir(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                      vpp: int | None = None, dtype: Any = None,
                      max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                      progress: bool = True, verify_checksums: bool = True) -> ConversionReport:
    """MCORE_DIR -> MCORE_DIR with another tp/pp/vpp (through the HF layout, tensor by tensor:
    exact, since it only slices and concatenates)."""
    started, start_rss = time.perf_counter(), current_rss_mb()
    ckpt = McoreCheckpoint(mcore_dir, verify_checksums=verify_checksums)
    spec, head = ckpt.spec, ckpt.head
    layout = _layout(tp, pp, vpp)
    validate_layout(spec, layout)
    dt = _dtype(dtype)
    hf_config = hf_config_with_dtype(ckpt.hf_config, None if dt is None else dtype_name(dt))
    with atomic_output_dir(out_dir, overwrite, mcore_dir) as tmp:
        ranks, files = _write_mcore(McoreSource(ckpt), spec, head, layout, tmp, dtype=dt,
                                    max_shard_bytes=parse_size(max_shard_size), progress=progress, desc="reshard")
        if (ckpt.path / HF_SUBDIR).is_dir():
            copy_hf_side_files(ckpt.path / HF_SUBDIR, tmp / HF_SUBDIR)
        write_json(tmp / MANIFEST, build_manifest(spec=spec, hf_config=hf_config, head=head, layout=layout,
                                                  created_by="megarl convert reshard", ranks=ranks, files=files))
        McoreCheckpoint(tmp, verify_checksums=False)
    return _finish(Path(out_dir), started, start_rss)


# ---- writing HF ---------------------------------------------------------------------------------


def global_order(spec: ArchSpec, head: str) -> list[str]:
    """Megatron tensor names in HF order (embedding, layer 0..N-1, final norm, head); the tied
    output weight is left out."""
    table = [m for m in mapping_table(spec, head) if not m.tied]
    pre = [m.mcore for m in table if "{layer}" not in m.mcore and m.mcore.startswith("embedding.")]
    layers = [m.mcore.format(layer=i) for i in range(spec.num_layers) for m in table if "{layer}" in m.mcore]
    post = [m.mcore for m in table if "{layer}" not in m.mcore and not m.mcore.startswith("embedding.")]
    return pre + layers + post


def iter_mcore_hf_tensors(mcore: str | os.PathLike | McoreCheckpoint, *,
                          verify_checksums: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a megatron checkpoint, one megatron tensor's worth at a time, in HF
    order: feed it to `mappings.load_hf_state_into` to load the checkpoint into a model of any
    layout, or to a rollout engine."""
    ckpt = mcore if isinstance(mcore, McoreCheckpoint) else McoreCheckpoint(mcore, verify_checksums=verify_checksums)
    for name in global_order(ckpt.spec, ckpt.head):
        yield from _unshared(mcore_to_hf(ckpt.spec, name, ckpt.read_shards(name), ckpt.head, views=True))


def _unshared(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """mcore_to_hf(views=True) outputs made safe to save side by side: contiguous, and no two
    sharing storage (at TP1, gate and up are views of one fc1 shard). Views are what make TP1
    exports copy-free."""
    seen: set[int] = set()
    out = []
    for name, t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out.append((name, t))
    return out


def _tied_copy_warning(ckpt: McoreCheckpoint) -> str | None:
    """The last stage's copy of a tied embedding should equal the embedding (megatron keeps them
    in sync); export writes the embedding only, so say so if they differ."""
    spec = ckpt.spec
    if not (ckpt.head == "lm" and spec.tie_word_embeddings and ckpt.layout.pp > 1):
        return None
    emb = ckpt.read_shards("embedding.word_embeddings.weight")
    out = ckpt.read_shards("output_layer.weight")
    if all(torch.equal(a, b) for a, b in zip(emb, out)):
        return None
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(emb, out))
    return (f"{ckpt.path}: the last stage's output_layer.weight differs from the tied embedding "
            f"(max abs diff {diff:.3g}); the export uses the embedding")


def mcore_to_hf_dir(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: Any = None,
                    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                    progress: bool = True, verify_checksums: bool = True) -> ConversionReport:
    """MCORE_DIR (any tp/pp/vpp) -> an HF model directory that transformers' `from_pretrained`
    loads: safetensors (one `model.safetensors`, or `model-0000i-of-0000N.safetensors` parts of
    at most `max_shard_size` plus `model.safetensors.index.json`), config.json, and the
    tokenizer / generation files the checkpoint carries. dtype=None keeps the stored dtypes.
    """
    started, start_rss = time.perf_counter(), current_rss_mb()
    ckpt = McoreCheckpoint(mcore_dir, verify_checksums=verify_checksums)
    spec, head = ckpt.spec, ckpt.head
    dt = _dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    warnings = [w for w in [_tied_copy_warning(ckpt)] if w]
    order = global_order(spec, head)
    with atomic_output_dir(out_dir, overwrite, mcore_dir) as tmp:
        parts: list[tuple[str, list[str]]] = []
        buffer: dict[str, torch.Tensor] = {}
        held = 0
        total_size = 0

        def flush() -> None:
            nonlocal held, buffer
            name = f"part-{len(parts):05d}.safetensors"
            save_safetensors(buffer, tmp / name)
            parts.append((name, list(buffer)))
            buffer, held = {}, 0

        bar = _progress(len(order), "mcore-to-hf", progress)
        for mcore_name in order:
            for hf_name, t in _unshared(mcore_to_hf(spec, mcore_name, ckpt.read_shards(mcore_name), head,
                                                    views=True)):
                t = t if dt is None else t.to(dt)
                size = _nbytes(t)
                if held and held + size > max_bytes:
                    flush()
                buffer[hf_name] = t
                held += size
                total_size += size
            bar.update()
        if buffer:
            flush()
        bar.close()
        if len(parts) == 1:
            os.replace(tmp / parts[0][0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (name, names) in enumerate(parts):
                final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                weight_map.update({n: final for n in names})
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": total_size}, "weight_map": weight_map})
        if (ckpt.path / HF_SUBDIR).is_dir():
            copy_hf_side_files(ckpt.path / HF_SUBDIR, tmp)
        stored = ckpt.manifest["dtype"]
        out_dtype = dtype_name(dt) if dt is not None else (stored if stored != "mixed" else None)
        write_json(tmp / "config.json", hf_config_with_dtype(ckpt.hf_config, out_dtype))
    return _finish(Path(out_dir), started, start_rss, warnings)


# ---- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    max_abs_ref: float
    tol: float  # relative: passes when max_abs_diff <= tol * max_abs_ref
    head: str
    layout: str
    shape: tuple[int, ...]

    @property
    def ratio(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-30)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tol * self.max_abs_ref

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: max abs diff {self.max_abs_diff:.4g}, max abs {'logits' if self.head == 'lm' else 'output'} "
                f"{self.max_abs_ref:.4g}, ratio {self.ratio:.3g} (tolerance {self.tol:g} x max abs); "
                f"checkpoint {self.layout}, {self.head} head, probe {list(self.shape)}")


def _hf_reference(hf_dir: Path, head: str, ids: torch.Tensor) -> torch.Tensor:
    """transformers' output on `ids` (float32, eager attention): logits [B, S, V], values
    [B, S, 1], or reward-head outputs [B, S, n] (the RM/PRM classes are remote code: their body
    is transformers' base model and their score MLP is applied here)."""
    import transformers

    kw = dict(dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        if head == "lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), **kw).eval()
            return model(ids).logits.float()
        if head == "value":
            model = transformers.AutoModelForTokenClassification.from_pretrained(str(hf_dir), **kw).eval()
            return model(ids).logits.float()
        model = transformers.AutoModel.from_pretrained(str(hf_dir), **kw).eval()
        h = model(ids).last_hidden_state.float()
        s = HFSource(hf_dir).read(["score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"])
        s = {k: v.float() for k, v in s.items()}
        h = torch.relu(h @ s["score.0.weight"].T + s["score.0.bias"])
        return h @ s["score.2.weight"].T + s["score.2.bias"]


def verify_mcore_dir(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, *, tol: float = 1e-4,
                     batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> VerifyResult:
    """Logits parity of MCORE_DIR against the HF model in `hf_dir` on a fixed probe batch.

    Builds the megatron model at TP1 PP1 in this process (a single-process world; a checkpoint
    saved at another layout is re-assembled through the mapping tables, so the whole model must
    fit in memory, twice with transformers' copy), float32, local layer spec, and compares its
    outputs with transformers' (float32, eager attention) on `batch_size` x `seq_len` token ids
    drawn with `seed`. Checksums are verified. ValueError if the two are different models.
    """
    from megarl.models.builder import build_model
    from megarl.models.checkpoint import load_mcore_checkpoint_into
    from megarl.models.mappings import load_hf_state_into
    from megarl.parallel.groups import destroy_parallel, init_parallel, single_process_world

    hf_dir = Path(hf_dir)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"probe batch must be at least 1 x 1, got {batch_size} x {seq_len}")
    ckpt = McoreCheckpoint(mcore_dir, verify_checksums=True)
    spec, head = ckpt.spec, ckpt.head
    hf_spec = arch_spec(hf_dir, make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    diff = same_model(hf_spec, spec)
    if diff or hf_spec.hf_head != head:
        what = "; ".join(diff) or f"head {hf_spec.hf_head!r} != {head!r}"
        raise ValueError(f"{hf_dir} and {mcore_dir} are different models: {what}")
    ckpt.verify_all()
    ids = torch.randint(0, spec.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    ref = _hf_reference(hf_dir, head, ids)

    one = ParallelLayout()
    with single_process_world():
        groups = init_parallel(one, seed=seed)
        try:
            chunks = build_model(spec, one, head=head, dtype=torch.float32, groups=groups, backend="local",
                                 perform_initialization=False)
            if (ckpt.layout.tp, ckpt.layout.pp, ckpt.layout.vpp) == (1, 1, None):
                load_mcore_checkpoint_into(chunks, ckpt.path, groups, spec=spec, verify_checksums=False)
            else:
                load_hf_state_into(chunks, spec, one, iter_mcore_hf_tensors(ckpt))
            (model,) = chunks
            model.eval()
            device = next(model.parameters()).device
            pos = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
            with torch.no_grad():
                out = model(ids.to(device), pos.to(device), None).float().cpu()
        finally:
            destroy_parallel()
    if head == "lm":
        out = out[..., : spec.vocab_size]
    if out.shape != ref.shape:
        raise ValueError(f"megatron output shape {tuple(out.shape)} != transformers' {tuple(ref.shape)}")
    layout = f"tp{ckpt.layout.tp} pp{ckpt.layout.pp}" + (f" vpp{ckpt.layout.vpp}" if ckpt.layout.vpp else "")
    return VerifyResult(max_abs_diff=(out - ref).abs().max().item(), max_abs_ref=ref.abs().max().item(),
                        tol=tol, head=head, layout=layout, shape=tuple(ids.shape))
