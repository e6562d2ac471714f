"""WeightBridge: megatron-core shards (any TP / PP / virtual PP) -> a rollout engine, verified.

One sync walks the model in a fixed global order (embedding, layer 0 .. L-1, final norm, head)
and moves it bucket by bucket:

  1. on the pipeline stage that owns a bucket, every tensor's TP shards are all-gathered over
     the TP group (replicated tensors are not) and converted to HF names and layouts with
     `megarl.models.mappings.mcore_to_hf` (the tables tools/convert uses: fused QKV and
     gate/up split, vocab padding stripped, tied output skipped);
  2. tensors are cast to the engine's dtype (`BridgeConfig.dtype`) and a checksum of each HF
     tensor is taken (with PP 1 or on the fast path: when the engine first reads it from the
     bucket, so the engine's copy finds it in cache; see _SendBucket);
  3. with PP > 1 the bucket (and its checksums) is packed into one flat buffer and broadcast
     from the owning stage over the pipeline group, so every rank holds the bucket;
  4. every rank hands its bucket to its engine (`update_weights` receives ONE stream of
     buckets per sync, each built only when the engine asks for it, so the bridge holds at
     most one bucket at a time);
  5. the engine's checksum of every tensor is compared with the sent one: by default the one the
     engine computed while writing it (`loaded_checksums`, from `megarl.ops.copy_checksum`: the
     bytes it stored, checksummed block by block as they were written, so verification costs
     no second read of the weights), else (or with `checksum_readback`) its copy read back
     after loading; and every `verify_every` syncs the engine's log-probs on a fixed probe
     batch are compared with the trainer's (`megarl.ops.logprob_entropy` over the trainer's
     own forward).

Fast path: when the engine holds megatron shards in the trainer's layout (a `MegatronEngine`
over its own copy of the model, or any engine implementing `weight_shard_layout()` /
`update_weight_shards()`), each rank copies its own shards: no gather, no conversion, no
broadcast. An engine built on the trainer's very chunks shares the weights: nothing moves,
only the probe runs.

Checksums compare bit patterns, so they need the engine to store exactly what was sent: set
`BridgeConfig.dtype` to the engine's weight dtype (the cast then happens here, once). A
mismatch, a tensor the engine did not load, or a probe beyond `probe_atol` raises
`WeightSyncError` on every rank of the model-parallel group (they agree first, so no rank is
left waiting in a collective), naming the tensors or the probe sequence and its max abs diff.
The ranks also agree before the first bucket (same path, every engine checksummable: else a
ValueError on all), after the stream (an engine that raised on one rank) and in the probe (an
engine that raised there), since a failing rank would skip the collectives that follow.

Optional engine methods the bridge uses when present (otherwise adapters for HFEngine-like
engines with an HF `.model` and for MegatronEngine are used):
  loaded_checksums(names) -> {name: checksum string or None} of what the LAST update_weights
    wrote for each name, computed from the written bytes (`megarl.ops.copy_checksum`, formatted
    by `checksum_string`); None for a name that call did not write;
  weight_checksums(names) -> {name: tensor_checksum(tensor)} of what the engine holds;
  prompt_logprobs(sequences) -> [per sequence, log p(token t | tokens < t) for t >= 1];
  weight_shard_layout() -> (tp_size, tp_rank, pp_size, pp_rank) and
  update_weight_shards(buckets of megatron global names -> this rank's shard), for the fast
  path (the engine must hold the trainer's exact split).
Without prompt_logprobs (or with probe_mode="generate") the probe samples from the engine
(temperature 1, no top-p/top-k, fixed seed) and compares the log-probs the engine reports with
the trainer's on the same tokens.
"""

from __future__ import annotations

import math
import time
from collections import abc
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from megarl.ops.checksum import checksum, copy_checksum
from megarl.rollout.engine import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIGN = 64  # bytes: every tensor in a packed bucket starts at a multiple of this


class WeightSyncError(RuntimeError):
    """A sync did not deliver the trainer's weights. `kind` is "checksum", "missing", "probe"
    or "stream"; `tensors` the failing tensor names; `max_abs_diff` the probe's worst diff."""

    def __init__(self, message: str, kind: str, tensors: Sequence[str] = (), max_abs_diff: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.tensors = list(tensors)
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class BridgeConfig:
    """bucket_mb: bytes of HF tensors per bucket (one tensor larger than this gets a bucket of
    its own); verify_every: run the log-prob probe every N syncs (1 = every sync, 0 = never);
    probe_atol: max |engine - trainer| log-prob allowed on the probe (1e-3 suits float32 on
    both sides; a bf16 engine needs ~0.1); checksum: compare per-tensor checksums after every
    sync; dtype: the engine's weight dtype ("float32", "bfloat16", "float16"; None = the
    trainer's) - tensors are cast before checksumming; fast_path: copy shards directly when
    the engine holds the trainer's layout; checksum_readback: compare checksums read back from
    the engine after loading (one more read of every weight) even when the engine reports the
    ones it computed while writing (loaded_checksums; the fast-path copy does the same); probe_sequences / probe_length / probe_seed: the
    default probe batch (random token ids) when sync() gets none; probe_new_tokens: tokens
    sampled by the generate probe; probe_mode: "auto" (teacher-forced log-probs of the probe
    sequences when the engine can give them, else the generate probe) or "generate" (always
    sample from the engine: checks the log-probs its sampler reports, what RL consumes)."""

    bucket_mb: float = 256.0
    verify_every: int = 1
    probe_atol: float = 1e-3
    checksum: bool = True
    checksum_readback: bool = False
    dtype: str | None = None
    fast_path: bool = True
    probe_sequences: int = 2
    probe_length: int = 16
    probe_seed: int = 1234
    probe_new_tokens: int = 8
    probe_mode: str = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.bucket_mb, (int, float)) and not isinstance(self.bucket_mb, bool)
                and self.bucket_mb > 0 and math.isfinite(self.bucket_mb)):
            raise ValueError(f"bucket_mb must be a positive number, got {self.bucket_mb!r}")
        for name in ("verify_every",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("probe_sequences", "probe_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.probe_length, int) or isinstance(self.probe_length, bool) or self.probe_length < 2:
            raise ValueError(f"probe_length must be an int >= 2, got {self.probe_length!r}")
        if not (isinstance(self.probe_atol, (int, float)) and self.probe_atol > 0):
            raise ValueError(f"probe_atol must be a positive number, got {self.probe_atol!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or null, got {self.dtype!r}")
        if self.probe_mode not in ("auto", "generate"):
            raise ValueError(f"probe_mode must be 'auto' or 'generate', got {self.probe_mode!r}")
        for name in ("checksum", "checksum_readback", "fast_path"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true/false, got {getattr(self, name)!r}")

    @property
    def bucket_bytes(self) -> int:
        return max(int(self.bucket_mb * 2**20), 1)


@dataclass(frozen=True)
class ProbeBatch:
    """Fixed token sequences whose log-probs the engine and the trainer must agree on."""

    sequences: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError("ProbeBatch.sequences is empty")
        for i, s in enumerate(self.sequences):
            if len(s) < 2:
                raise ValueError(f"ProbeBatch.sequences[{i}] has {len(s)} tokens, needs >= 2")
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in s):
                raise ValueError(f"ProbeBatch.sequences[{i}] must hold non-negative int token ids")

    @classmethod
    def random(cls, vocab_size: int, num_sequences: int = 4, length: int = 24, seed: int = 1234) -> "ProbeBatch":
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (num_sequences, length), generator=g)
        # different lengths, so right padding inside the trainer's batch is exercised
        return cls(tuple(tuple(row[: length - (i % 3)].tolist()) for i, row in enumerate(ids)))


@dataclass
class SyncReport:
    """What one sync did. Times in seconds, sizes in bytes (per rank)."""

    version: int
    path: str  # "gather" | "fast" | "shared"
    num_buckets: int = 0
    num_tensors: int = 0
    bytes: int = 0
    max_bucket_bytes: int = 0
    seconds: float = 0.0
    gather_s: float = 0.0
    convert_s: float = 0.0
    broadcast_s: float = 0.0
    load_s: float = 0.0
    checksum_s: float = 0.0
    checksums_verified: int = 0
    probe: str | None = None  # "prompt_logprobs" | "generate" | None (not run)
    probe_max_abs_diff: float | None = None
    probe_s: float = 0.0


# ---- checksums ------------------------------------------------------------------------------------


def checksum_string(dtype: torch.dtype, shape: Sequence[int], words: Sequence[int]) -> str:
    """The short string form of a checksum: dtype, shape and the two words of `megarl.ops.checksum`
    (or `copy_checksum`) of the tensor's bytes, e.g. "float32[4, 8]:<32 hex digits>"."""
    a, b = (int(x) for x in words)
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}:{a & (2**64 - 1):016x}{b & (2**64 - 1):016x}"


def tensor_checksum(t: torch.Tensor) -> str:
    """Checksum of a tensor's dtype, shape and exact bits, as a short string: dtype, shape and
    `megarl.ops.checksum` (the wrapping sum and index-weighted sum of its bytes as int64 words;
    the fused C++/CUDA kernel, one read of the tensor). Engines that implement
    `weight_checksums` must compute it with this function; `loaded_checksums` gives the same
    string from `copy_checksum`'s words (`checksum_strings`)."""
    return checksum_string(t.dtype, t.shape, checksum(t).tolist())


def checksum_strings(tensors: Sequence[torch.Tensor], words: Sequence[torch.Tensor]) -> list[str]:
    """checksum_string of each tensor from its [2] words tensor (as `checksum` or `copy_checksum`
    return them), with one device->host copy for all."""
    if not tensors:
        return []
    return [checksum_string(t.dtype, t.shape, w) for t, w in zip(tensors, torch.stack(list(words)).tolist())]


def _checksums(tensors: Sequence[torch.Tensor]) -> list[str]:
    """tensor_checksum of many tensors with one device->host copy."""
    return checksum_strings(tensors, [checksum(t) for t in tensors])


# ---- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    mcore: str  # global megatron name
    owner: int  # pipeline rank holding it
    kind: str
    hf: tuple[tuple[str, tuple[int, ...]], ...]  # (HF name, shape) produced from it
    shard_shape: tuple[int, ...]  # this TP rank's shard


@dataclass(frozen=True)
class _Bucket:
    owner: int
    entries: tuple[_Entry, ...]
    nbytes: int


def _plan(spec, layout, head: str, elem_bytes: int, bucket_bytes: int, fast: bool) -> list[_Bucket]:
    """Buckets in the fixed global order; a bucket never spans two pipeline stages."""
    from megarl.models.mappings import hf_shape, layer_owner, mapping_table, mcore_local_shape

    # the tied output weight is no HF tensor, but with PP > 1 megatron keeps a copy of it on
    # the last stage, which a shard-for-shard copy must carry too
    table = [m for m in mapping_table(spec, head) if not m.tied or (fast and layout.pp > 1)]
    pre = [m for m in table if "{layer}" not in m.mcore and m.mcore.startswith("embedding.")]
    per_layer = [m for m in table if "{layer}" in m.mcore]
    post = [m for m in table if "{layer}" not in m.mcore and not m.mcore.startswith("embedding.")]

    def entry(m, layer, owner) -> _Entry:
        name = m.mcore.format(layer=layer) if layer is not None else m.mcore
        hf = tuple((t.format(layer=layer) if layer is not None else t,) for t in m.hf)
        hf = tuple((n[0], hf_shape(spec, n[0], head)) for n in hf)
        return _Entry(name, owner, m.kind, hf, mcore_local_shape(spec, name, layout.tp, head))

    entries = [entry(m, None, 0) for m in pre]
    for layer in range(spec.num_layers):
        owner = layer_owner(spec, layout, layer)[0]
        entries += [entry(m, layer, owner) for m in per_layer]
    entries += [entry(m, None, layout.pp - 1) for m in post]

    buckets: list[_Bucket] = []
    cur: list[_Entry] = []
    cur_bytes = 0
    for e in entries:
        shapes = [e.shard_shape] if fast else [s for _, s in e.hf]
        size = sum(_padded(math.prod(s) * elem_bytes) for s in shapes)
        if cur and (e.owner != cur[0].owner or cur_bytes + size > bucket_bytes):
            buckets.append(_Bucket(cur[0].owner, tuple(cur), cur_bytes))
            cur, cur_bytes = [], 0
        cur.append(e)
        cur_bytes += size
    if cur:
        buckets.append(_Bucket(cur[0].owner, tuple(cur), cur_bytes))
    return buckets


def _padded(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


# ---- engine adapters --------------------------------------------------------------------------------


def _plain_torch():
    """Without CUDA, megarl.parallel.cpu_compat keeps a Python TorchFunctionMode on every torch
    call (it rewrites megatron's device="cuda"). Moving weights needs none of its rewrites and
    makes a dozen torch calls per tensor, so the mode is off while a sync streams."""
    import contextlib

    from megarl.parallel import cpu_compat

    disable = getattr(torch._C, "DisableTorchFunction", None)
    if disable is None or not cpu_compat.is_active():
        return contextlib.nullcontext()
    return disable()


def _unwrap(chunk):
    """The GPTModel inside megatron's wrappers (DDP and Float16Module keep it in `.module`)."""
    while not hasattr(chunk, "megarl_head") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _hf_module(engine) -> torch.nn.Module | None:
    model = getattr(engine, "model", None)
    if isinstance(model, torch.nn.Module) and hasattr(model, "get_parameter"):
        return model
    return None


def _megatron_chunks(engine) -> list | None:
    chunks = getattr(engine, "chunks", None)
    if isinstance(chunks, (list, tuple)) and chunks:
        chunks = [_unwrap(c) for c in chunks]
        if getattr(chunks[0], "megarl_head", None) is not None:
            return chunks
    return None


def _module_tensor(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        pass
    try:
        return model.get_buffer(name)
    except AttributeError:
        return None


def _padded_batch(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, S] right-padded with 0 (causal models: padding never influences earlier positions)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids


def _hf_prompt_logprobs(model: torch.nn.Module, sequences) -> list[torch.Tensor]:
    ids = _padded_batch(sequences)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
    return [lp[i, : len(s) - 1] for i, s in enumerate(sequences)]


# ---- the bridge --------------------------------------------------------------------------------------


class WeightBridge:
    """Moves the trainer's weights into a rollout engine and proves they arrived.

    model_chunks: this rank's chunks from megarl.models.builder.build_model (virtual-stage
    order); spec: their ArchSpec; layout: the ParallelLayout; groups: ParallelGroups from
    init_parallel (None for a one-process TP1 PP1 model).
    Every rank of the model-parallel group calls sync() (SPMD); a rank without an engine
    passes engine=None and only sends.
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module], spec, layout, groups=None,
                 config: BridgeConfig | None = None):
        from megarl.models.mappings import find_mcore, normalize_mcore_name, to_global_name

        self.config = config or BridgeConfig()
        chunks = [_unwrap(c) for c in model_chunks]
        if not chunks:
            raise ValueError("WeightBridge: no model chunks")
        head = getattr(chunks[0], "megarl_head", None)
        if head is None:
            raise ValueError("WeightBridge: model chunks must come from megarl.models.builder.build_model")
        if len(chunks) != layout.num_chunks:
            raise ValueError(f"WeightBridge: {len(chunks)} model chunks, layout {layout} has {layout.num_chunks}")
        if groups is None:
            if layout.tp != 1 or layout.pp != 1:
                raise ValueError(f"WeightBridge: layout {layout} needs the ParallelGroups of init_parallel")
        elif groups.layout != layout:
            raise ValueError(f"WeightBridge: groups were initialised for {groups.layout}, not {layout}")
        self.chunks, self.spec, self.layout, self.groups, self.head = chunks, spec, layout, groups, head
        self.tp_rank = groups.tp_rank if groups else 0
        self.pp_rank = groups.pp_rank if groups else 0

        # this rank's parameters by global megatron name
        self._params: dict[str, torch.Tensor] = {}
        for c in chunks:
            vp = c.vp_stage if c.vp_stage is not None else 0
            for local, p in c.named_parameters():
                name = to_global_name(spec, layout, self.pp_rank, vp, normalize_mcore_name(local))
                find_mcore(spec, name, head)  # ValueError for a parameter no table maps
                self._params[name] = p
        first = next(iter(self._params.values()))
        self.device = first.device
        self.train_dtype = first.dtype
        self.send_dtype = _DTYPES[self.config.dtype] if self.config.dtype else self.train_dtype
        self._plans: dict[bool, list[_Bucket]] = {}
        for b in self._plan(fast=False):
            for e in b.entries:
                if e.owner == self.pp_rank and e.mcore not in self._params:
                    raise ValueError(f"WeightBridge: this rank (pp {self.pp_rank}) has no parameter {e.mcore}")

        self.trainer_version = 0
        self.engine_version: int | None = None
        self.num_syncs = 0
        self._transit_hooks: list[Callable[[dict[str, torch.Tensor]], None]] = []
        self._default_probe: ProbeBatch | None = None

    # ---- versions (NeMo-RL's WeightSynchronizer: sync_weights / is_stale) ------------------------

    def mark_trainer_step(self) -> None:
        """The trainer's weights changed (call after each optimizer step, or use track_optimizer)."""
        self.trainer_version += 1

    def track_optimizer(self, optimizer) -> Callable[[], None]:
        """Count optimizer steps automatically (a torch optimizer, or megatron's wrapper with
        `.optimizer`); returns a function that stops tracking."""
        opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else getattr(optimizer, "optimizer", None)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"track_optimizer: {type(optimizer).__name__} is not (and does not wrap) a torch optimizer")
        handle = opt.register_step_post_hook(lambda *_: self.mark_trainer_step())
        return handle.remove

    def is_stale(self, engine=None) -> bool:
        """True when the engine has not received the trainer's current weights. An engine that
        reports `weights_version` (e.g. None after its weights were discarded by sleep) is
        judged by that; otherwise by the version the bridge last delivered."""
        version = self.engine_version
        if engine is not None and hasattr(engine, "weights_version"):
            version = engine.weights_version
        return version is None or version != self.trainer_version

    def add_transit_hook(self, fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[], None]:
        """fn(bucket) is called on every bucket just before the engine gets it (after the
        sending checksums): for instrumentation and for tests that corrupt a bucket in transit.
        Bucket tensors may be views of the trainer's parameters: a hook replaces entries, it
        never writes into them. Returns a function that removes the hook."""
        self._transit_hooks.append(fn)
        return lambda: self._transit_hooks.remove(fn)

    def default_probe(self) -> ProbeBatch:
        if self._default_probe is None:
            c = self.config
            self._default_probe = ProbeBatch.random(self.spec.vocab_size, c.probe_sequences, c.probe_length, c.probe_seed)
        return self._default_probe

    # ---- sync --------------------------------------------------------------------------------------

    def sync(self, engine, probe: ProbeBatch | Sequence[Sequence[int]] | None = None) -> SyncReport:
        """Send the trainer's current weights to `engine` and verify them (see module docstring).
        Raises WeightSyncError (on every rank of the model-parallel group) if a check fails."""
        t0 = time.perf_counter()
        path = self._path(engine)
        setup: list[tuple[str, str]] = []
        if self.config.checksum and engine is not None and path == "gather":
            try:
                self._check_readable(engine)
            except ValueError as e:
                setup.append(("config", str(e)))
        # Every rank of the model-parallel group must take the same path and be able to finish
        # it, or the collectives below pair up wrongly and hang: agree before the first one.
        self._raise_agreed(setup, [], exc_type=ValueError, path=path)
        self.num_syncs += 1
        report = SyncReport(version=self.trainer_version, path=path)
        errors: list[tuple[str, str]] = []  # (kind, message)
        bad: list[str] = []
        if report.path != "shared":
            fast = report.path == "fast"
            with _plain_torch():
                expected, written = self._send(engine, fast, report, errors)
                # a rank whose engine failed skips the read-back, which can be collective (a
                # MegatronEngine in another layout): every rank raises here instead
                self._raise_agreed(errors, bad)
                if self.config.checksum and engine is not None:
                    t1 = time.perf_counter()
                    if fast and written is not None and not self.config.checksum_readback:
                        got = written  # computed by the copy itself (copy_checksum)
                    elif fast:
                        got = self._engine_shard_checksums(engine, list(expected))
                    else:
                        got = self._engine_checksums(engine, list(expected))
                    report.checksum_s += time.perf_counter() - t1
                    self._compare(expected, got, report, errors, bad)
        self._raise_agreed(errors, bad)
        if self.config.verify_every and (self.num_syncs - 1) % self.config.verify_every == 0:
            t1 = time.perf_counter()
            report.probe, report.probe_max_abs_diff = self.verify(engine, probe)
            report.probe_s = time.perf_counter() - t1
        # only a sync that passed its checks delivers a version
        self.engine_version = self.trainer_version
        if engine is not None and hasattr(engine, "weights_version"):
            try:
                engine.weights_version = self.trainer_version
            except AttributeError:
                pass
        report.seconds = time.perf_counter() - t0
        return report

    def _path(self, engine) -> str:
        if engine is None:
            # senders must follow the ranks that have engines: with the gather path they always
            # can, so engine-less ranks and fast-path engines are not mixed
            return "gather"
        chunks = _megatron_chunks(engine)
        if chunks is not None and [id(p) for c in chunks for p in c.parameters()] == \
                [id(p) for c in self.chunks for p in c.parameters()]:
            return "shared"
        if not self.config.fast_path:
            return "gather"
        layout_fn = getattr(engine, "weight_shard_layout", None)
        if layout_fn is not None and hasattr(engine, "update_weight_shards"):
            mine = (self.layout.tp, self.tp_rank, self.layout.pp, self.pp_rank)
            return "fast" if tuple(layout_fn()) == mine else "gather"
        if chunks is not None and getattr(engine, "layout", None) == self.layout and \
                getattr(engine, "spec", None) == self.spec:
            return "fast"
        return "gather"

    def _plan(self, fast: bool) -> list[_Bucket]:
        if fast not in self._plans:
            self._plans[fast] = _plan(self.spec, self.layout, self.head, self.send_dtype.itemsize,
                                      self.config.bucket_bytes, fast)
        return self._plans[fast]

    def _shards(self, e: _Entry, report: SyncReport) -> list[torch.Tensor]:
        p = self._params[e.mcore].detach()
        if self.layout.tp == 1 or e.kind == "replicated":
            return [p]
        t = time.perf_counter()
        parts = [torch.empty_like(p) for _ in range(self.layout.tp)]
        dist.all_gather(parts, p.contiguous(), group=self.groups.tp_group)
        report.gather_s += time.perf_counter() - t
        return parts

    def _hf_tensors(self, bucket: _Bucket, report: SyncReport) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in the send dtype) of a bucket this rank's stage owns."""
        from megarl.models.mappings import mcore_to_hf

        for e in bucket.entries:
            shards = self._shards(e, report)
            t = time.perf_counter()
            # views=True: at TP1 the HF tensors are views of the trainer's parameters (no copy)
            out = [(n, x.to(self.send_dtype))
                   for n, x in mcore_to_hf(self.spec, e.mcore, shards, self.head, views=True)]
            del shards
            report.convert_s += time.perf_counter() - t
            assert [n for n, _ in out] == [n for n, _ in e.hf], (out, e.hf)
            yield from out
            del out

    def _pack_layout(self, items: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[list[int], int]:
        offsets, off = [], 0
        for _, shape in items:
            offsets.append(off)
            off += _padded(math.prod(shape) * self.send_dtype.itemsize)
        return offsets, off

    def _bucket_stream(self, buckets: list[_Bucket], fast: bool, report: SyncReport,
                       expected: dict[str, str]) -> Iterator[dict[str, torch.Tensor]]:
        """Build, move and yield one bucket at a time (see the module docstring, steps 1-4)."""
        pp = self.layout.pp
        use_checksum = self.config.checksum  # not `checksum`: that name is the op
        for bucket in buckets:
            mine = bucket.owner == self.pp_rank
            if fast:
                items = [(e.mcore, e.shard_shape) for e in bucket.entries]
            else:
                items = [h for e in bucket.entries for h in e.hf]
            tensors: dict[str, torch.Tensor] = {}
            lazy: _SendBucket | None = None
            if pp == 1 or fast:
                if not mine:
                    continue  # fast path: the engine is pipelined like the trainer, shards stay put
                if fast:
                    for e in bucket.entries:
                        tensors[e.mcore] = self._params[e.mcore].detach().to(self.send_dtype)
                else:
                    tensors = dict(self._hf_tensors(bucket, report))
                sums = None
                # the sending checksums are taken as the engine reads each tensor (below)
                lazy = _SendBucket(tensors, report) if use_checksum else None
            else:
                offsets, total = self._pack_layout(items)
                n = len(items)
                buf = torch.empty(total + 16 * n, dtype=torch.uint8, device=self.device)
                views = {
                    name: buf[off : off + math.prod(shape) * self.send_dtype.itemsize]
                    .view(self.send_dtype).view(shape)
                    for (name, shape), off in zip(items, offsets)
                }
                sums_t = buf[total:].view(torch.int64).view(n, 2)
                if mine:
                    if fast:
                        source = ((e.mcore, self._params[e.mcore].detach()) for e in bucket.entries)
                    else:
                        source = self._hf_tensors(bucket, report)
                    if use_checksum:  # packed and checksummed in one pass (copy_checksum)
                        words = {}
                        for name, tensor in source:
                            t = time.perf_counter()
                            words[name] = copy_checksum(views[name], tensor)
                            report.checksum_s += time.perf_counter() - t
                        sums_t.copy_(torch.stack([words[name] for name in views]))
                    else:
                        for name, tensor in source:
                            views[name].copy_(tensor)
                t = time.perf_counter()
                dist.broadcast(buf, src=self.groups.pp_ranks[bucket.owner], group=self.groups.pp_group)
                report.broadcast_s += time.perf_counter() - t
                tensors = views
                sums = None
                if use_checksum:
                    sums = [
                        f"{str(self.send_dtype).removeprefix('torch.')}{list(shape)}:"
                        f"{a & (2**64 - 1):016x}{b & (2**64 - 1):016x}"
                        for (_, shape), (a, b) in zip(items, sums_t.tolist())
                    ]
                del buf
            if sums is not None:
                expected.update(zip(tensors, sums))
            for hook in self._transit_hooks:
                hook(tensors)  # (a lazy bucket keeps the tensors from before the hooks to checksum)
            report.num_buckets += 1
            report.num_tensors += len(tensors)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            report.bytes += nbytes
            report.max_bucket_bytes = max(report.max_bucket_bytes, nbytes)
            t = time.perf_counter()
            if lazy is not None:
                c0 = report.checksum_s
                yield lazy
                expected.update(lazy.finish())
                report.load_s += time.perf_counter() - t - (report.checksum_s - c0)
            else:
                yield tensors
                report.load_s += time.perf_counter() - t
            # The engine asked for the next bucket, so it is done with this one: empty the dict
            # it may still reference, so at most one bucket is alive at a time.
            tensors.clear()
            del tensors
            views = sums_t = lazy = None

    def _send(self, engine, fast: bool, report: SyncReport,
              errors: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str] | None]:
        """Stream every bucket to the engine; a failing or lazy engine is recorded in `errors`
        after the stream has been drained, so the other ranks' collectives still complete.
        Returns the sent checksums and, when this bridge wrote the engine's shards itself (the
        fast path without update_weight_shards), the checksums of what it wrote."""
        expected: dict[str, str] = {}
        written: dict[str, str] | None = None
        stream = self._bucket_stream(self._plan(fast=fast), fast, report, expected)
        name = type(engine).__name__
        try:
            if engine is None:
                pass
            elif not fast:
                engine.update_weights(_Guard(stream))
            elif hasattr(engine, "update_weight_shards"):
                engine.update_weight_shards(_Guard(stream))
            else:
                params = self._engine_shard_params(engine)
                written = {}
                with torch.no_grad():
                    for bucket in stream:
                        names = list(bucket)
                        if self.config.checksum and not self.config.checksum_readback:
                            t = time.perf_counter()
                            words = [copy_checksum(params[n], bucket[n]) for n in names]
                            written.update(zip(names, checksum_strings([params[n] for n in names], words)))
                            report.checksum_s += time.perf_counter() - t
                        else:
                            for n in names:
                                params[n].copy_(bucket[n])
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            errors.append(("engine", f"{name} failed while loading bucket {report.num_buckets}: "
                                     f"{type(e).__name__}: {e}"))
        taken = report.num_buckets
        leftover = sum(1 for _ in stream)
        if leftover and engine is not None and not errors:
            errors.append(("stream", f"{name} stopped reading after {taken} of "
                                     f"{taken + leftover} buckets"))
        return expected, written

    # ---- reading the engine back ---------------------------------------------------------------

    @staticmethod
    def _check_readable(engine) -> None:
        # before any collective: a configuration error must not leave other ranks waiting
        if not (hasattr(engine, "weight_checksums") or hasattr(engine, "loaded_checksums")
                or _hf_module(engine) is not None
                or _megatron_chunks(engine) is not None):
            raise ValueError(
                f"{type(engine).__name__} cannot be checksummed: it has no weight_checksums(names), no HF "
                "`.model` and no megatron `.chunks`; implement weight_checksums or set BridgeConfig.checksum=false"
            )

    def _engine_checksums(self, engine, names: list[str]) -> dict[str, str | None]:
        loaded = getattr(engine, "loaded_checksums", None)
        if loaded is not None and not self.config.checksum_readback:
            return dict(loaded(names))
        fn = getattr(engine, "weight_checksums", None)
        if fn is not None:
            return dict(fn(names))
        model = _hf_module(engine)
        if model is not None:
            out = {}
            for name in names:
                t = _module_tensor(model, name)
                out[name] = tensor_checksum(t) if t is not None else None
            return out
        chunks = _megatron_chunks(engine)
        if chunks is not None:
            # an engine holding megatron shards in another layout: rebuild its HF tensors
            # exactly as this bridge does for the trainer
            other = WeightBridge(chunks, engine.spec, engine.layout, getattr(engine, "groups", None),
                                 BridgeConfig(bucket_mb=self.config.bucket_mb, dtype=self.config.dtype))
            got = other.hf_checksums()
            return {n: got.get(n) for n in names}
        raise ValueError(
            f"{type(engine).__name__} cannot be checksummed: it has no weight_checksums(names), no HF "
            "`.model` and no megatron `.chunks`; implement weight_checksums or set BridgeConfig.checksum=false"
        )

    def _engine_shard_params(self, engine) -> dict[str, torch.Tensor]:
        from megarl.models.mappings import normalize_mcore_name, to_global_name

        out = {}
        groups = getattr(engine, "groups", None)
        pp_rank = groups.pp_rank if groups is not None else 0
        for c in _megatron_chunks(engine):
            vp = c.vp_stage if c.vp_stage is not None else 0
            for local, p in c.named_parameters():
                out[to_global_name(self.spec, self.layout, pp_rank, vp, normalize_mcore_name(local))] = p
        return out

    def _engine_shard_checksums(self, engine, names: list[str]) -> dict[str, str | None]:
        fn = getattr(engine, "weight_checksums", None)
        if fn is not None and hasattr(engine, "update_weight_shards"):
            return dict(fn(names))
        params = self._engine_shard_params(engine)
        present = [n for n in names if n in params]
        sums = dict(zip(present, _checksums([params[n].detach() for n in present])))
        return {n: sums.get(n) for n in names}

    def hf_checksums(self) -> dict[str, str]:
        """tensor_checksum of every HF tensor of this bridge's model (cast to the send dtype), on
        every rank. Collective over the model-parallel group: every rank must call it."""
        expected: dict[str, str] = {}
        report = SyncReport(version=self.trainer_version, path="gather")
        for _ in self._bucket_stream(self._plan(fast=False), False, report, expected):
            pass
        return expected

    @staticmethod
    def _compare(expected: dict[str, str], got: Mapping[str, str | None], report: SyncReport,
                 errors: list[tuple[str, str]], bad: list[str]) -> None:
        missing = [n for n in expected if got.get(n) is None]
        wrong = [n for n in expected if got.get(n) is not None and got[n] != expected[n]]
        report.checksums_verified = len(expected) - len(missing) - len(wrong)
        if missing:
            errors.append(("missing", f"engine does not hold {len(missing)} tensor(s): {', '.join(missing[:5])}"))
            bad.extend(missing)
        for n in wrong[:5]:
            hint = ""
            if got[n].split("[")[0] != expected[n].split("[")[0]:
                hint = " (the engine stores another dtype: set BridgeConfig.dtype to it)"
            errors.append(("checksum", f"checksum mismatch for {n}: sent {expected[n]}, engine holds {got[n]}{hint}"))
        if len(wrong) > 5:
            errors.append(("checksum", f"... and {len(wrong) - 5} more tensors with a checksum mismatch"))
        bad.extend(wrong)

    def _raise_agreed(self, errors: list[tuple[str, str]], bad: list[str], max_abs_diff: float | None = None,
                      exc_type: type = WeightSyncError, path: str | None = None) -> None:
        """Raise the same error (a WeightSyncError, or exc_type) on every rank of the
        model-parallel group if any rank found a problem. With `path`, also if the ranks did
        not all choose that sync path."""
        where = f"rank {dist.get_rank()} (tp {self.tp_rank}, pp {self.pp_rank})" if dist.is_initialized() else "rank 0"
        mine = [(kind, f"{where}: {msg}") for kind, msg in errors]
        everyone = mine
        diffs = [max_abs_diff] if max_abs_diff is not None else []
        codes = {"gather": 1, "fast": 2, "shared": 3}
        if self.groups is not None and self.groups.world_size > 1:
            for group, size in ((self.groups.tp_group, self.layout.tp), (self.groups.pp_group, self.layout.pp)):
                if size == 1:
                    continue
                code = codes[path] if path is not None else 0
                flag = torch.tensor([1 if everyone else 0, code, -code], dtype=torch.int32, device=self._comm_device())
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
                if int(flag[1]) != -int(flag[2]) and not everyone:
                    everyone = [("config", f"{where}: the ranks chose different sync paths (this one: {path}): give "
                                           "every rank of a model-parallel group the same kind of engine (None "
                                           "only with the gather path), or set BridgeConfig.fast_path=false")]
                if int(flag[0]) == 0 and int(flag[1]) == -int(flag[2]):
                    continue
                gathered: list[Any] = [None] * size
                dist.all_gather_object(gathered, (everyone, bad, diffs), group=group)
                everyone = [x for g in gathered for x in g[0]]
                bad = list(dict.fromkeys(x for g in gathered for x in g[1]))
                diffs = [x for g in gathered for x in g[2]]
        if not everyone:
            return
        kind = everyone[0][0]
        message = "weight sync failed:\n  " + "\n  ".join(m for _, m in everyone[:20])
        if exc_type is not WeightSyncError:
            raise exc_type(message)
        raise WeightSyncError(message, kind=kind, tensors=bad, max_abs_diff=max(diffs) if diffs else None)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ---- probe ---------------------------------------------------------------------------------------

    def verify(self, engine, probe: ProbeBatch | Sequence[Sequence[int]] | None = None) -> tuple[str | None, float | None]:
        """Compare the engine's log-probs on the probe with the trainer's (collective: every rank
        of the model-parallel group calls it). Returns (probe kind, max abs diff on this rank)
        or raises WeightSyncError naming the worst probe sequence."""
        if probe is None:
            probe = self.default_probe()
        elif not isinstance(probe, ProbeBatch):
            probe = ProbeBatch(tuple(tuple(int(t) for t in s) for s in probe))
        for i, s in enumerate(probe.sequences):
            if max(s) >= self.spec.vocab_size:
                raise ValueError(f"probe sequence {i} has token id {max(s)} >= vocab_size {self.spec.vocab_size}")
        try:
            kind, engine_lp, sequences = self._engine_probe(engine, probe)
            failure = []
        except Exception as e:  # noqa: BLE001 - agreed on below, so no rank is left in a collective
            kind, engine_lp, sequences = None, None, [list(s) for s in probe.sequences]
            failure = [("engine", f"{type(engine).__name__} failed in the probe: {type(e).__name__}: {e}")]
        # the generate fallback makes different sequences on different ranks only if the engine
        # is inconsistent; the trainer forward below needs the same batch on every rank
        sequences = self._agree_sequences(sequences)
        trainer_lp = self.trainer_logprobs(sequences)
        errors, worst = failure, None
        if engine_lp is not None:
            worst, worst_at, failed = 0.0, None, 0
            for i, (e, t, s) in enumerate(zip(engine_lp, trainer_lp, sequences)):
                start = 0 if kind == "prompt_logprobs" else len(s) - 1 - len(e)
                t = t[start:]
                if e.shape != t.shape:
                    errors.append(("probe", f"probe sequence {i}: engine gave {tuple(e.shape)} log-probs, "
                                            f"trainer {tuple(t.shape)}"))
                    continue
                diff = (e.float() - t.float()).abs().nan_to_num(float("inf"))
                d = float(diff.max()) if diff.numel() else 0.0
                if d > self.config.probe_atol:
                    failed += 1
                if worst_at is None or d > worst:
                    worst, worst_at = d, (i, start + int(diff.argmax()) + 1 if diff.numel() else 0)
            if failed:
                i, pos = worst_at
                errors.append(("probe", f"{failed} of {len(sequences)} probe sequences ({kind}) exceed the "
                                        f"tolerance {self.config.probe_atol:g}; worst: sequence {i}, token "
                                        f"position {pos}, |engine - trainer| log-prob = {worst:.3g}"))
        self._raise_agreed(errors, [], worst)
        return (kind if engine_lp is not None else None), worst

    def _engine_probe(self, engine, probe: ProbeBatch):
        """(kind, per-sequence engine log-probs or None, the sequences the trainer must score)."""
        seqs = [list(s) for s in probe.sequences]
        if engine is None:
            return None, None, seqs
        if self.config.probe_mode == "generate":
            return self._generate_probe(engine, seqs)
        fn = getattr(engine, "prompt_logprobs", None)
        if fn is not None:
            return "prompt_logprobs", [torch.as_tensor(x, dtype=torch.float32).cpu() for x in fn(seqs)], seqs
        model = _hf_module(engine)
        if model is not None:
            return "prompt_logprobs", _hf_prompt_logprobs(model, seqs), seqs
        chunks = _megatron_chunks(engine)
        if chunks is not None and getattr(engine, "layout", None) == self.layout:
            return "prompt_logprobs", _forward_logprobs(chunks, self.layout, self.groups, seqs), seqs
        return self._generate_probe(engine, seqs)

    def _generate_probe(self, engine, seqs: list[list[int]]):
        prompts = [s[: max(1, len(s) // 2)] for s in seqs]
        sampling = SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=self.config.probe_new_tokens, seed=self.config.probe_seed,
                                  logprobs=True)
        done = engine.generate(prompts, sampling)
        if any(c.logprobs is None for c in done):
            raise ValueError(f"{type(engine).__name__}.generate returned no log-probs: the probe needs them")
        return ("generate", [torch.tensor(c.logprobs, dtype=torch.float32) for c in done],
                [p + list(c.token_ids) for p, c in zip(prompts, done)])

    def _agree_sequences(self, seqs: list[list[int]]) -> list[list[int]]:
        if self.groups is None or self.groups.world_size == 1:
            return seqs
        # every rank of the pipeline must run the same forward: take the last stage's batch,
        # which on its TP group is the same on every rank
        box = [seqs]
        dist.broadcast_object_list(box, src=self.groups.pp_ranks[-1], group=self.groups.pp_group)
        return box[0]

    def trainer_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """log p(token t | tokens < t), t >= 1, of each sequence under the trainer's model,
        float32 on CPU, on every rank (collective over the pipeline and TP groups)."""
        return _forward_logprobs(self.chunks, self.layout, self.groups, [list(s) for s in sequences])


class _SendBucket(abc.Mapping):
    """The bucket an engine receives on a path without a broadcast (PP 1, or the fast path):
    each tensor's sending checksum is taken when the engine first reads it, so the engine's copy
    that follows finds the tensor in cache (one read from memory on each side instead of two on
    the sending side; ~10% of a SmolLM2 sync on the CPU). The checksum is of the tensor as built,
    before any transit hook replaced it; finish() checksums what the engine never read."""

    def __init__(self, tensors: dict[str, torch.Tensor], report: SyncReport):
        self._tensors = tensors  # what the engine sees (transit hooks may replace entries)
        self._sent = dict(tensors)  # what was built, before the hooks
        self._words: dict[str, torch.Tensor] = {}
        self._report = report

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._tensors[name]
        if name not in self._words:
            t = time.perf_counter()
            self._words[name] = checksum(self._sent[name])
            self._report.checksum_s += time.perf_counter() - t
        return value

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def finish(self) -> dict[str, str]:
        """Checksum strings of every tensor built (one device->host copy)."""
        t = time.perf_counter()
        names = list(self._sent)
        words = [self._words[n] if n in self._words else checksum(self._sent[n]) for n in names]
        out = dict(zip(names, checksum_strings([self._sent[n] for n in names], words)))
        self._report.checksum_s += time.perf_counter() - t
        self._sent.clear()
        self._words.clear()
        return out


class _Guard:
    """An iterable over a generator that cannot be closed by the consumer: a consumer that stops
    early (break, exception) must not kill the stream, whose collectives the other ranks are in."""

    def __init__(self, gen: Iterator):
        self._gen = gen

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)


def _forward_logprobs(chunks, layout, groups, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Forward-only pipeline schedule over the model chunks; per-sequence log-probs on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarl.ops import logprob_entropy

    ids = _padded_batch(sequences)
    batch, seq = ids.shape
    pp = layout.pp
    mbs = 1
    num_mb = batch
    if layout.vpp:
        num_mb = max(pp, -(-batch // pp) * pp)  # interleaving wants a multiple of pp microbatches
    rows = torch.cat([ids, ids[:1].expand(num_mb * mbs - batch, seq)]) if num_mb * mbs > batch else ids
    device = next(chunks[0].parameters()).device
    tp_group = groups.tp_group if groups is not None and layout.tp > 1 else None

    def step(data_iter, model):
        x = next(data_iter).to(device)
        pos = torch.arange(seq, device=device).unsqueeze(0).expand_as(x)
        out = model(x, pos, None)

        def collect(logits_BSV, non_loss_data=False):
            v_local = logits_BSV.shape[-1]
            lp, _ = logprob_entropy(logits_BSV[:, :-1].reshape(-1, v_local).contiguous(),
                                    x[:, 1:].reshape(-1), 1.0, tp_group)
            return lp.view(x.shape[0], seq - 1).float()

        return out, collect

    batches = list(rows.view(num_mb, mbs, seq))
    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        kwargs = {}
        if groups is not None:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            kwargs = dict(pg_collection=groups.pg_collection,
                          p2p_communicator=P2PCommunicator(pp_group=groups.pp_group, config=chunks[0].config))
        with torch.no_grad():
            outs = get_forward_backward_func(pp_size=pp, vp_size=layout.vpp)(
                forward_step_func=step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=num_mb, seq_length=seq, micro_batch_size=mbs,
                forward_only=True, collect_non_loss_data=True, **kwargs)
    finally:
        for c, t in zip(chunks, was_training):
            c.train(t)
    last = groups is None or groups.is_last_pp_stage
    if last:
        lp = torch.cat([o.cpu() for o in outs])[:batch].contiguous()
    else:
        lp = torch.empty(batch, seq - 1, dtype=torch.float32)
    if groups is not None and pp > 1:
        buf = lp.to(device) if device.type == "cuda" else lp
        dist.broadcast(buf, src=groups.pp_ranks[-1], group=groups.pp_group)
        lp = buf.cpu()
    return [lp[i, : len(s) - 1] for i, s in enumerate(sequences)]
