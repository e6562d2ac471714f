"""The in-process rollout engine: generation on the megatron-core model the trainer trains.

Colocated by construction: the engine holds the trainer's own model chunks, so after an
optimizer step it samples from the new weights with no copy (update_weights exists for weights
that come from elsewhere, e.g. another layout, as HF-named buckets).

SPMD: every rank of the model-parallel group calls `generate` with the same prompts and gets
the same completions. Data-parallel replicas are independent engines (their own prompts).

How a batch is generated (measurements in docs/rollout.md, "In-process engine"):
  * prompts are sorted by length and packed into waves of at most `max_batch` rows (a prompt's
    n samples stay together when they fit);
  * a wave's prompts are LEFT-padded to a common length and prefilled once each, every row
    at its own RoPE positions 0..len-1 (padding masked out), so each row computes what the
    trainer computes for it; the KV cache rows are then copied to the n samples of a prompt;
  * decoding runs one token per step for the whole wave through megatron's own modules
    (norms, linear_qkv, linear_proj, MLP, embedding, output layer: the trainer's weights and
    TP collectives), with this module's KV cache and attention (see _layer_forward for why
    not megatron's static inference path); rows that finish stay in the batch until fewer
    than `compact_below` of them are alive, then the batch and its cache are compacted;
  * TP: the output layer's logits stay vocab-parallel and the next token is drawn with
    `sampling.sample_vocab_parallel` (method `tp_sampling`); PP: hidden states go stage to
    stage by point-to-point send/recv (virtual stages in megatron's interleaved order), the
    last stage samples and broadcasts (token, log-prob) over the pipeline group.

Sampling semantics (see megarl.rollout.sampling): log-probs follow SamplingParams.logprobs_mode
("unfiltered": the whole distribution at the temperature, the default; "processed": the
filtered distribution the token was drawn from; the model's own distribution for greedy);
completion (prompt p, sample s) draws its uniforms from its own stream seeded by
(SamplingParams.seed, p, s), so a seeded completion is the same whatever the batching and
parallel layout; seed=None derives the seed from MegatronEngineConfig.seed and a call counter
(reproducible runs, fresh draws per call). Stop strings end a completion as in vLLM:
`token_ids` keep every generated token up to the one completing the stop string, `text` ends
before the stop string (SamplingParams.include_stop_str_in_output=False, the default) or right
after it (True). EOS is kept in `token_ids`; `text` is decoded with skip_special_tokens=True.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from megarl.rollout.engine import Completion, SamplingParams, cut_at_stop
from megarl.rollout.sampling import SAMPLING_METHODS, sample_vocab_parallel


@dataclass(frozen=True)
class MegatronEngineConfig:
    """max_batch: rows (prompts x n) decoded together; max_seq_len: prompt + new tokens per row
    (the KV cache holds max_batch x max_seq_len positions per layer at most, allocated on first
    use at the size a call needs); tp_sampling: "gather_free" or "gather" (see
    sampling.sample_vocab_parallel); seed: base of the per-call seed when SamplingParams.seed
    is None; compact_below: drop finished rows from the batch once the alive fraction falls
    below this (0 never compacts); prefill_tokens: most (padded) tokens per prefill forward
    (bounds activation memory; one longer prompt still goes alone)."""

    max_batch: int = 64
    max_seq_len: int = 2048
    tp_sampling: str = "gather_free"
    seed: int = 0
    compact_below: float = 0.5
    prefill_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq_len", "prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MegatronEngineConfig.{name} must be an int >= 1, got {value!r}")
        if self.tp_sampling not in SAMPLING_METHODS:
            raise ValueError(f"MegatronEngineConfig.tp_sampling must be one of {SAMPLING_METHODS}, "
                             f"got {self.tp_sampling!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"MegatronEngineConfig.seed must be an int, got {self.seed!r}")
        if not 0.0 <= self.compact_below <= 1.0:
            raise ValueError(f"MegatronEngineConfig.compact_below must be in [0, 1], got {self.compact_below!r}")


def _mix_seed(base: int, index: int) -> int:
    """A 63-bit seed for stream `index` under `base` (splitmix64 finaliser): distinct indices
    get unrelated streams, identically on every rank."""
    x = (base * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def _eos_ids(spec, tokenizer, eos_token_ids) -> frozenset[int]:
    if eos_token_ids is not None:
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    elif spec.eos_token_id is not None:
        ids = [spec.eos_token_id] if isinstance(spec.eos_token_id, int) else list(spec.eos_token_id)
    elif tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [tokenizer.eos_token_id]
    else:
        ids = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < spec.vocab_size:
            raise ValueError(f"EOS token id {i!r} is not an id in [0, {spec.vocab_size})")
    return frozenset(ids)


class _KVCache:
    """K and V of every layer on this rank: [rows, kv groups on this TP rank, seq, head_dim],
    batch-major so a decode step reads each row's keys as one contiguous block and batch
    compaction / sample fan-out copy whole rows."""

    def __init__(self, num_layers: int, rows: int, groups: int, seq: int, head_dim: int, dtype, device):
        self.rows, self.seq = rows, seq
        shape = (rows, groups, seq, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def zero(self, row_start: int, row_end: int, length: int) -> None:
        """Rows [row_start, row_end), positions [0, length) := 0."""
        for buf in (*self.k, *self.v):
            buf[row_start:row_end, :, :length] = 0

    def select_rows(self, rows: torch.Tensor, length: int) -> None:
        """Rows [0, len(rows)) := old rows `rows`, positions [0, length)."""
        n = len(rows)
        for buf in (*self.k, *self.v):
            buf[:n, :, :length] = buf[rows, :, :length]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE, as megatron's _apply_rotary_pos_emb_bshd: x*cos + rotate_half(x)*sin."""
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _layer_forward(layer, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                   cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, row0: int = 0,
                   key_start: int = 0) -> torch.Tensor:
    """One megatron TransformerLayer (pre-norm self-attention + MLP) for cache rows
    [row0, row0 + B) at cache positions [start, start + S), attending to the cached keys
    [key_start, start + S), with this module's KV cache instead of megatron's.

    megatron's static-inference path caches keys BEFORE RoPE and re-rotates the whole cache at
    every step (plus a GQA repeat of it): O(sequence) extra work per token that dominated a
    decode step on CPU. Here keys are cached rotated and single-token decoding runs attention
    per KV group ("packed GQA": the group's query heads act as query rows), without copies.
    Shapes: h [S, B, hidden]; k_cache, v_cache [rows, groups, seq, head_dim]; cos/sin
    [S, B, 1, head_dim]; mask None (causal) or boolean [B, 1, S, start + S - key_start],
    True = may attend.
    """
    attn = layer.self_attention
    x = layer.input_layernorm(h)  # an IdentityOp when the norm is fused into linear_qkv (TE spec)
    q, k, v = attn.get_query_key_value_tensors(x, None)  # [S, B, heads, hd], [S, B, groups, hd] x2
    seq, batch, heads, hd = q.shape
    groups = k.shape[2]
    q = _rotate(q, cos, sin)
    k = _rotate(k, cos, sin)
    end, rows = start + seq, slice(row0, row0 + batch)
    k_cache[rows, :, start:end] = k.permute(1, 2, 0, 3)
    v_cache[rows, :, start:end] = v.permute(1, 2, 0, 3)
    keys, values = k_cache[rows, :, key_start:end], v_cache[rows, :, key_start:end]
    scale = getattr(attn.core_attention, "softmax_scale", None) or hd ** -0.5
    if seq == 1:
        qg = q.view(batch, groups, heads // groups, hd)  # head i belongs to group i // (heads / groups)
        ctx = torch.nn.functional.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
        ctx = ctx.reshape(1, batch, heads * hd)
    else:
        if mask is None:
            causal = start == key_start
            am = None if causal else torch.ones(seq, end - key_start, dtype=torch.bool,
                                                device=h.device).tril(start - key_start)
        else:
            causal, am = False, mask
        ctx = torch.nn.functional.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), keys, values, attn_mask=am, is_causal=causal, scale=scale,
            enable_gqa=heads != groups)
        ctx = ctx.permute(2, 0, 1, 3).reshape(seq, batch, heads * hd)
    out, bias = attn.linear_proj(ctx)
    h = h + (out if bias is None else out + bias)
    out, bias = layer.mlp(layer.pre_mlp_layernorm(h))
    return h + (out if bias is None else out + bias)


def prefill_groups(lens: Sequence[int], max_tokens: int, overhead_tokens: int = 64) -> list[tuple[int, int]]:
    """Split prompts sorted by ascending length into contiguous groups [start, end), each
    prefilled as one left-padded batch: minimises padded tokens + overhead_tokens per group
    (a forward's fixed cost), groups of more than one prompt stay within max_tokens.
    Padding every prompt to the longest (what transformers' generate does) costs up to
    len(lens) x max(lens) tokens; MATH500-like lengths (60-450) waste more than half of it."""
    n = len(lens)
    assert all(a <= b for a, b in zip(lens, lens[1:])), "lengths must be sorted"
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            size = (j - i) * lens[j - 1]
            if size > max_tokens and j - i > 1:
                break
            cost = best[i] + size + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def _check_layers(chunks) -> list:
    """The layers _layer_forward can run: megatron's GPT layer (self-attention + MLP, pre-norm,
    RoPE, no cross-attention, MoE, QK-norm or output gate). Anything else is refused here
    rather than computed wrong."""
    from megatron.core.transformer.identity_op import IdentityOp

    layers = [layer for c in chunks for layer in c.decoder.layers]
    if not layers:
        raise ValueError("MegatronEngine: the model chunks hold no transformer layers")
    cfg = chunks[0].config
    problems = []
    if chunks[0].position_embedding_type != "rope":
        problems.append(f"position_embedding_type={chunks[0].position_embedding_type!r} (needs rope)")
    if cfg.rotary_interleaved or cfg.multi_latent_attention or cfg.apply_residual_connection_post_layernorm \
            or cfg.fp32_residual_connection or getattr(cfg, "attention_output_gate", False) \
            or getattr(cfg, "num_moe_experts", None):
        problems.append("interleaved rope, MLA, post-layernorm residuals, fp32 residuals, output gates "
                        "and MoE are not supported")
    if getattr(chunks[0].rotary_pos_emb, "rotary_percent", 1.0) not in (1.0, None):
        problems.append("partial rotary embeddings are not supported")
    for layer in layers[:1]:
        attn = layer.self_attention
        for name in ("q_layernorm", "k_layernorm"):
            if getattr(attn, name, None) is not None and not isinstance(getattr(attn, name), IdentityOp):
                problems.append(f"self_attention.{name} is not supported")
        if not isinstance(getattr(layer, "cross_attention", IdentityOp()), IdentityOp):
            problems.append("cross-attention layers are not supported")
    if problems:
        raise ValueError("MegatronEngine cannot run this model: " + "; ".join(problems))
    return layers


class MegatronEngine:
    """RolloutEngine on megatron-core model chunks (from megarl.models.builder.build_model).

    model_chunks: this rank's chunks, in virtual-stage order (the trainer's objects);
    spec: the ArchSpec; layout/groups: ParallelLayout and ParallelGroups of init_parallel;
    tokenizer: anything with decode(ids, skip_special_tokens=True) (a transformers tokenizer),
    needed for `text` and stop strings (None: texts are empty and stop strings are refused);
    eos_token_ids: ids that end a completion (default: the spec's, else the tokenizer's).
    Keyword settings are MegatronEngineConfig fields (or pass `config=`).
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module], spec, layout, groups, tokenizer=None, *,
                 config: MegatronEngineConfig | None = None, eos_token_ids=None, **settings: Any):
        known = {f.name for f in fields(MegatronEngineConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"MegatronEngine: unknown settings {unknown} (known: {sorted(known)})")
        if config is not None and settings:
            raise ValueError("MegatronEngine: pass either config= or keyword settings, not both")
        self.config = config or MegatronEngineConfig(**settings)
        chunks = list(model_chunks)
        if not chunks:
            raise ValueError("MegatronEngine: no model chunks")
        if len(chunks) != layout.num_chunks:
            raise ValueError(f"MegatronEngine: {len(chunks)} model chunks, layout {layout} has "
                             f"{layout.num_chunks} per pipeline rank")
        head = getattr(chunks[0], "megarl_head", None)
        if head != "lm":
            raise ValueError(f"MegatronEngine needs an LM-head model from build_model(head='lm'), got head={head!r}")
        if groups.layout != layout:
            raise ValueError(f"MegatronEngine: groups were initialised for {groups.layout}, not {layout}")
        self.chunks = chunks
        self.spec = spec
        self.layout = layout
        self.groups = groups
        self.tokenizer = tokenizer
        self.eos = _eos_ids(spec, tokenizer, eos_token_ids)
        cfg = chunks[0].config
        self.hidden_size = cfg.hidden_size
        self.dtype = cfg.pipeline_dtype or cfg.params_dtype
        self.device = next(chunks[0].parameters()).device
        self._layers = _check_layers(chunks)
        self._inv_freq = chunks[0].rotary_pos_emb.inv_freq.detach().to(device=self.device, dtype=torch.float32)
        self._kv: _KVCache | None = None
        self._asleep = False
        self._calls = 0
        self.last_stats: dict[str, float] = {}
        pp = layout.pp
        self._pp_prev = groups.pp_ranks[(groups.pp_rank - 1) % pp]
        self._pp_next = groups.pp_ranks[(groups.pp_rank + 1) % pp]
        self._pp_last = groups.pp_ranks[-1]

    # ---- RolloutEngine --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major; the same on every rank of the model-parallel
        group (all of them must call it with the same arguments)."""
        if self._asleep:
            raise RuntimeError("MegatronEngine.generate called while asleep: call wake() first")
        prompts = self._check_prompts(prompts, sampling)
        seed = sampling.seed if sampling.seed is not None else _mix_seed(self.config.seed, self._calls)
        self._calls += 1
        results: dict[tuple[int, int], Completion] = {}
        stats = {"prefill_s": 0.0, "decode_s": 0.0, "new_tokens": 0, "decode_steps": 0, "waves": 0}
        with self._generation_mode():
            for wave in self._plan_waves(prompts, sampling.n):
                self._run_wave(wave, prompts, sampling, int(seed), results, stats)
        self.last_stats = stats
        return [results[(p, s)] for p in range(len(prompts)) for s in range(sampling.n)]

    def update_weights(self, buckets: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Load a FULL set of HF-named tensors (every weight once, spread over any number of
        buckets, each consumed before the next is read) into this rank's shards through the
        mapping tables of tools/convert. A missing, unknown or misshapen tensor is a ValueError
        naming it. Colocated with the trainer (same chunks) no call is needed."""
        from megarl.models.mappings import load_hf_state_into

        def stream() -> Iterator[tuple[str, Any]]:
            for i, bucket in enumerate(buckets):
                if not isinstance(bucket, Mapping):
                    raise ValueError(f"update_weights: bucket {i} is a {type(bucket).__name__}, expected a "
                                     "mapping of HF tensor names to tensors")
                yield from bucket.items()

        with torch.no_grad():
            load_hf_state_into(self.chunks, self.spec, self.layout, stream())

    def sleep(self) -> None:
        """Free the KV cache (the weights are the trainer's and stay)."""
        self._kv = None
        self._asleep = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Allow generate again; the KV cache is reallocated by the next call at its size."""
        self._asleep = False

    # ---- planning -------------------------------------------------------------------------------

    def _check_prompts(self, prompts, sampling: SamplingParams) -> list[list[int]]:
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer: construct MegatronEngine with one")
        if len(prompts) == 0:
            raise ValueError("generate: no prompts")
        out = []
        for i, p in enumerate(prompts):
            ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if not ids:
                raise ValueError(f"generate: prompt {i} is empty")
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.spec.vocab_size for t in ids):
                bad = next(t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                           or not 0 <= t < self.spec.vocab_size)
                raise ValueError(f"generate: prompt {i} has token {bad!r}, expected ints in [0, {self.spec.vocab_size})")
            if len(ids) + sampling.max_new_tokens > self.config.max_seq_len:
                raise ValueError(f"generate: prompt {i} has {len(ids)} tokens + max_new_tokens "
                                 f"{sampling.max_new_tokens} > max_seq_len {self.config.max_seq_len}")
            out.append(ids)
        return out

    def _plan_waves(self, prompts: list[list[int]], n: int) -> list[list[tuple[int, int, int]]]:
        """Waves of (prompt index, first sample index, number of samples), <= max_batch rows each,
        prompts in length order so a wave pads little."""
        cap = self.config.max_batch
        waves, cur, rows = [], [], 0
        for p in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
            s = 0
            while s < n:
                take = min(n - s, cap - rows)
                cur.append((p, s, take))
                rows += take
                s += take
                if rows == cap:
                    waves.append(cur)
                    cur, rows = [], 0
        if cur:
            waves.append(cur)
        return waves

    # ---- model execution ------------------------------------------------------------------------

    @contextmanager
    def _generation_mode(self):
        """eval mode, sequence parallelism off (one token per step cannot be split over TP
        ranks), inference_mode; everything restored afterwards for the trainer.

        Without CUDA, megarl.parallel.cpu_compat keeps a Python TorchFunctionMode on every torch
        call; generation needs none of its rewrites and makes ~45 torch calls per layer per
        token, so the mode is switched off here (measured: -30% time per token on a 4-layer
        model, where per-call overhead dominates)."""
        from megarl.parallel import cpu_compat

        modes = [c.training for c in self.chunks]
        sp = bool(self.chunks[0].config.sequence_parallel)
        if sp:
            from megatron.core.transformer.utils import set_model_to_sequence_parallel
        no_dispatch = getattr(torch._C, "DisableTorchFunction", None)
        no_dispatch = no_dispatch() if no_dispatch is not None and cpu_compat.is_active() else nullcontext()
        try:
            for c in self.chunks:
                c.eval()
                if sp:
                    set_model_to_sequence_parallel(c, False)
            with torch.inference_mode(), no_dispatch:
                yield
        finally:
            for c, m in zip(self.chunks, modes):
                c.train(m)
                if sp:
                    set_model_to_sequence_parallel(c, True)

    def _cache(self, rows: int, seq: int) -> "_KVCache":
        """The KV cache, grown (never beyond the configured caps) to hold rows x seq."""
        cache = self._kv
        if cache is None or cache.rows < rows or cache.seq < seq:
            old_rows, old_seq = (cache.rows, cache.seq) if cache is not None else (0, 0)
            self._kv = None  # free the old buffers before allocating the new ones
            attn = self._layers[0].self_attention
            cache = _KVCache(len(self._layers), min(max(rows, old_rows), self.config.max_batch),
                             attn.num_query_groups_per_partition, min(max(seq, old_seq), self.config.max_seq_len),
                             attn.hidden_size_per_attention_head, self.dtype, self.device)
            self._kv = cache
        return cache

    def _send(self, x: torch.Tensor) -> None:
        dist.send(x.contiguous(), dst=self._pp_next, group=self.groups.pp_group)

    def _recv(self, shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(x, src=self._pp_prev, group=self.groups.pp_group)
        return x

    def _rope_tables(self, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [S, B, 1, head_dim] at per-row positions, computed like megatron's
        RotaryEmbedding (float32 outer product, cat(freqs, freqs)), so the values equal the
        trainer's bit for bit."""
        freqs = pos_BS.to(torch.float32).unsqueeze(-1) * self._inv_freq  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1).transpose(0, 1).unsqueeze(2)
        return torch.cos(emb).to(self.dtype), torch.sin(emb).to(self.dtype)

    def _forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor, start: int, mask, cache: "_KVCache",
                 row0: int = 0, key_start: int = 0) -> torch.Tensor | None:
        """One forward of tokens at cache positions [start, start + S) of cache rows
        [row0, row0 + B) through this rank's chunks (and the pipeline): vocab-parallel logits
        [B, V_local] of the LAST position on the last stage, None elsewhere."""
        batch, seq = ids_BS.shape
        cos, sin = self._rope_tables(pos_BS)
        layer_idx = 0
        for chunk in self.chunks:
            if chunk.pre_process:
                h = chunk.embedding(input_ids=ids_BS, position_ids=None)
            else:
                h = self._recv((seq, batch, self.hidden_size))
            for layer in chunk.decoder.layers:
                h = _layer_forward(layer, h, cache.k[layer_idx], cache.v[layer_idx], start, cos, sin, mask,
                                   row0, key_start)
                layer_idx += 1
            if not chunk.post_process:
                self._send(h)
                continue
            h = chunk.decoder.final_layernorm(h[-1:])
            weight = chunk.shared_embedding_or_output_weight() if chunk.share_embeddings_and_output_weights else None
            logits, _ = chunk.output_layer(h, weight=weight, runtime_gather_output=False)
            return logits[0]
        return None

    def _sample_and_share(self, logits, u_B: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B], log-probs [B]) drawn on the last stage, broadcast to every stage."""
        if self.groups.is_last_pp_stage:
            tokens, logprobs = sample_vocab_parallel(
                logits, u_B, sampling.temperature, sampling.top_k, sampling.top_p,
                self.groups.tp_group if self.layout.tp > 1 else None, self.config.tp_sampling,
                sampling.logprobs_mode)
        if self.layout.pp == 1:
            return tokens, logprobs
        buf = torch.empty(2, u_B.shape[0], dtype=torch.float64, device=self.device)
        if self.groups.is_last_pp_stage:
            buf[0] = tokens
            buf[1] = logprobs
        dist.broadcast(buf, src=self._pp_last, group=self.groups.pp_group)
        return buf[0].long(), buf[1].float()

    # ---- one wave -------------------------------------------------------------------------------

    def _run_wave(self, wave, prompts, sampling: SamplingParams, seed: int, results: dict, stats: dict) -> None:
        t0 = time.perf_counter()
        dev = self.device
        num_unique = len(wave)
        lens = torch.tensor([len(prompts[p]) for p, _, _ in wave])
        plen = int(lens.max())
        max_new = sampling.max_new_tokens
        ids = torch.zeros(num_unique, plen, dtype=torch.long)
        for i, (p, _, _) in enumerate(wave):
            ids[i, plen - len(prompts[p]):] = torch.tensor(prompts[p], dtype=torch.long)
        # left padding; every row keeps its own positions 0..len-1, as in the trainer
        first = plen - lens  # [U] index of each row's first real token
        cols = torch.arange(plen)
        pad = cols[None, :] < first[:, None]  # [U, P] True = padding
        pos = (cols[None, :] - first[:, None]).clamp_(min=0)
        padded = bool(pad.any())
        counts = torch.tensor([c for _, _, c in wave])
        rows_total = int(counts.sum())
        cache = self._cache(rows_total, plen + max_new)

        # prefill in groups of similar lengths (prompts are sorted), each group left-padded to
        # its own longest prompt and written to the last columns of the wave's cache rows
        logits_parts = []
        for a, b in prefill_groups(lens.tolist(), self.config.prefill_tokens):
            width = int(lens[b - 1])
            first_col = plen - width
            if first_col:
                cache.zero(a, b, first_col)  # never attended, but NaN garbage would leak through SDPA
            pad_g = pad[a:b, first_col:]
            attend = None
            if bool(pad_g.any()):
                # causal, no padding keys; a padding query sees itself (no fully masked row: NaN)
                attend = torch.ones(width, width, dtype=torch.bool).tril_()[None, None] & ~pad_g[:, None, None, :]
                attend |= torch.eye(width, dtype=torch.bool)
                attend = attend.to(dev)
            out = self._forward(ids[a:b, first_col:].to(dev), pos[a:b, first_col:].to(dev), first_col, attend,
                                cache, row0=a, key_start=first_col)
            logits_parts.append(out)
        logits = torch.cat(logits_parts) if logits_parts[0] is not None else None

        # the n samples of a prompt share its prefill: copy its KV cache row n times
        src = torch.repeat_interleave(torch.arange(num_unique), counts)
        if rows_total != num_unique:
            cache.select_rows(src.to(dev), plen)
            if logits is not None:
                logits = logits.index_select(0, src.to(dev))
        key_ok = torch.ones(rows_total, plen + max_new, dtype=torch.bool)  # True = real token
        key_ok[:, :plen] = ~pad.index_select(0, src)
        key_ok = key_ok.to(dev)
        next_pos = lens.index_select(0, src).to(dev)  # position of the first new token per row
        stats["prefill_s"] += time.perf_counter() - t0
        t1 = time.perf_counter()

        # wave row r <-> (prompt, sample); batch position i holds wave row rows[i]
        row_keys = [(p, s + j) for p, s, c in wave for j in range(c)]
        # the uniforms of completion (p, s) come from its own stream: a seeded completion does
        # not depend on batching (max_batch, waves, compaction), on the order of the other
        # prompts' completions or on the parallel layout
        u_rows = torch.stack([
            torch.rand(max_new, generator=torch.Generator().manual_seed(_mix_seed(seed, p * sampling.n + s)))
            for p, s in row_keys]) if sampling.temperature > 0 else torch.zeros(rows_total, max_new)
        rows = torch.arange(rows_total)
        alive = torch.ones(rows_total, dtype=torch.bool)  # per batch position
        out_ids: list[list[int]] = [[] for _ in range(rows_total)]
        out_lp: list[list[float]] = [[] for _ in range(rows_total)]
        finish: list[tuple[str, Any] | None] = [None] * rows_total
        stops = tuple(sampling.stop)
        window = 2 * max((len(s) for s in stops), default=0) + 16
        eos = self.eos
        steps = 0
        for t in range(max_new):
            tokens, logprobs = self._sample_and_share(logits, u_rows[rows, t].to(dev), sampling)
            tok_list = tokens.tolist()
            lp_list = logprobs.tolist() if sampling.logprobs else None
            alive_list = alive.tolist()
            row_list = rows.tolist()
            for i, r in enumerate(row_list):
                if not alive_list[i]:
                    continue
                tok = tok_list[i]
                out_ids[r].append(tok)
                if lp_list is not None:
                    out_lp[r].append(lp_list[i])
                if tok in eos:
                    finish[r] = ("stop", tok)
                elif stops:
                    tail = self.tokenizer.decode(out_ids[r][-window:], skip_special_tokens=True)
                    hit = next((s for s in stops if s in tail), None)
                    if hit is not None:
                        finish[r] = ("stop", hit)
                if finish[r] is None and t + 1 == max_new:
                    finish[r] = ("length", None)
                if finish[r] is not None:
                    alive[i] = False
            steps += 1
            num_alive = int(alive.sum())
            if num_alive == 0:
                break
            length = plen + t  # cache positions filled so far
            if num_alive < self.config.compact_below * len(row_list):
                keep = alive.nonzero().squeeze(-1)
                cache.select_rows(keep.to(dev), length)
                keep = keep.to(dev)
                rows, alive = rows[keep.cpu()], alive[keep.cpu()]
                tokens, key_ok, next_pos = tokens[keep], key_ok[keep], next_pos[keep]
            step_mask = key_ok[:, None, None, : length + 1] if padded else None
            logits = self._forward(tokens.view(-1, 1).to(dev), (next_pos + t).view(-1, 1), length, step_mask, cache)
        stats["decode_s"] += time.perf_counter() - t1
        stats["decode_steps"] += steps
        stats["waves"] += 1

        for r, key in enumerate(row_keys):
            ids_r = out_ids[r]
            reason, what = finish[r]
            text = self.tokenizer.decode(ids_r, skip_special_tokens=True) if self.tokenizer is not None else ""
            if reason == "stop" and isinstance(what, str):
                text = cut_at_stop(text, what, sampling.include_stop_str_in_output)
            stats["new_tokens"] += len(ids_r)
            results[key] = Completion(prompt_index=key[0], token_ids=ids_r, text=text,
                                      logprobs=out_lp[r] if sampling.logprobs else None,
                                      finish_reason=reason, extra={"stop_reason": what})
