"""A RolloutEngine on plain transformers: slow, simple, and available everywhere.

    engine = HFEngine("path/to/hf_dir")
    ids = engine.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completions = engine.generate([ids], SamplingParams(n=4, temperature=0.6, seed=0))

Prompts of a call are generated together (left padded, in chunks of max_batch_size), n
samples per prompt via num_return_sequences (prompt-major order, as the protocol requires).

Log-probs and stop strings follow the convention of megarl.rollout.engine (the same as
MegatronEngine and VLLMEngine): SamplingParams.logprobs_mode="unfiltered" (default) reports
log softmax(logits / temperature) over the whole vocabulary, from transformers' raw logits
(output_logits); "processed" reports the log-softmax of the processed scores transformers
samples from (temperature, then top-k, then top-p: output_scores). Greedy decoding reports the
model's own distribution (log-softmax of the raw logits) in both modes.

A stop string ends a sequence at the token that completes its first occurrence; that token
stays in token_ids, later tokens are dropped; the text ends just before the stop string
(include_stop_str_in_output=False, the default) or just after it (True). EOS ends a sequence
and is kept in token_ids; text is decoded without special tokens. extra["stop_reason"] is the
stop string, the EOS id or None.

sleep()/wake(): on an accelerator, sleep moves the weights to host memory and frees the cache;
on CPU there is nothing to free and both are no-ops.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

from megarl.rollout.engine import Completion, SamplingParams, cut_at_stop


class HFEngine:
    """RolloutEngine over transformers' AutoModelForCausalLM.generate."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_size: int = 32,
    ):
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"HFEngine: {path} is not a Hugging Face model directory (no config.json); "
                f"expected the output of save_pretrained (config.json, *.safetensors, tokenizer files)"
            )
        if max_batch_size < 1:
            raise ValueError(f"HFEngine.max_batch_size must be >= 1, got {max_batch_size}")
        self.model_dir = path
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self._asleep = False
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (tensor, copy_checksum words)

    # ------------------------------------------------------------------ RolloutEngine

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""
        if self._asleep:
            raise RuntimeError("HFEngine.generate called while asleep: call wake() first")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty")
        out: list[Completion] = []
        # One seeded generator stream for the whole call, without touching the global RNG.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompts), self.max_batch_size):
                chunk = prompts[start : start + self.max_batch_size]
                out.extend(self._generate_chunk(chunk, sampling, start))
        return out

    def update_weights(self, buckets: Iterable[dict[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into the model (names as in model.state_dict()). Each copy
        also checksums what it wrote (megarl.ops.copy_checksum), for loaded_checksums."""
        from megarl.ops import copy_checksum

        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        state: dict[str, torch.Tensor] | None = None
        self._loaded = {}
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket.items():
                    target = params.get(name)
                    if target is None:
                        # A tied alias (lm_head.weight with tied embeddings) shares storage.
                        state = self.model.state_dict(keep_vars=True) if state is None else state
                        target = state.get(name)
                    if target is None:
                        raise ValueError(f"update_weights: {name!r} is not a weight of {type(self.model).__name__}")
                    if tuple(target.shape) != tuple(tensor.shape):
                        raise ValueError(
                            f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                        )
                    self._loaded[name] = (target, copy_checksum(target, tensor.to(device=target.device)))

    def loaded_checksums(self, names: Sequence[str]) -> dict[str, str | None]:
        """megarl.rollout.bridge checksum strings of what the last update_weights wrote for each
        name, computed from the bytes written (None: that call did not write the name)."""
        from megarl.rollout.bridge import checksum_strings

        found = [n for n in names if n in self._loaded]
        sums = dict(zip(found, checksum_strings([self._loaded[n][0] for n in found],
                                                [self._loaded[n][1] for n in found])))
        return {n: sums.get(n) for n in names}

    def sleep(self) -> None:
        """Offload weights to host memory (no-op on CPU, where there is nothing to free)."""
        if self.device.type != "cpu" and not self._asleep:
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        """Bring the weights back to the device (no-op on CPU)."""
        if self.device.type != "cpu" and self._asleep:
            self.model.to(self.device)
        self._asleep = False

    # ------------------------------------------------------------------ helpers

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (no BOS/EOS added: templates carry their own)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_text(self, texts: Sequence[str], sampling: SamplingParams) -> list[Completion]:
        """generate() from prompt strings."""
        return self.generate([self.encode(t) for t in texts], sampling)

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, offset: int) -> list[Completion]:
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        greedy = sampling.temperature == 0
        processed = sampling.logprobs and not greedy and sampling.logprobs_mode == "processed"
        # Greedy samples are all the same sequence: decode once, copy n times.
        copies = sampling.n if greedy else 1
        # Built from scratch so the model's generation_config.json cannot add processors
        # (repetition penalty, default top_k=50, ...) that the caller did not ask for.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            # top_k=None would let transformers apply its default top_k=50; 0 disables it
            top_k=None if greedy else max(sampling.top_k, 0),
            top_p=sampling.top_p if sampling.top_p < 1 and not greedy else None,
            num_return_sequences=1 if greedy else sampling.n,
            eos_token_id=list(self.eos_token_ids) or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            # processed: the scores transformers samples from; otherwise the raw logits
            output_scores=processed,
            output_logits=sampling.logprobs and not processed,
        )
        criteria = None
        if sampling.stop:
            from transformers import StoppingCriteriaList

            criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, sampling.stop, width)])
        with torch.inference_mode():
            result = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                stopping_criteria=criteria,
            )
        generated = result.sequences[:, width:].cpu()
        steps, scale = None, 1.0
        if sampling.logprobs:
            steps = result.scores if processed else result.logits
            if not greedy and not processed:
                scale = 1.0 / sampling.temperature  # unfiltered: the raw logits at the temperature
        completions = []
        for row in range(generated.shape[0]):
            ids, finish, reason = self._trim(generated[row].tolist(), sampling)
            logprobs = None
            if steps is not None:
                rows_TV = torch.stack([steps[t][row] for t in range(len(ids))]).float() * scale
                logprobs = torch.log_softmax(rows_TV, dim=-1).gather(-1, torch.tensor(ids)[:, None].to(rows_TV.device))
                logprobs = logprobs[:, 0].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if isinstance(reason, str):
                text = cut_at_stop(text, reason, sampling.include_stop_str_in_output)
            for _ in range(copies):
                completions.append(
                    Completion(
                        prompt_index=offset + row // (sampling.n // copies),
                        token_ids=list(ids),
                        text=text,
                        logprobs=list(logprobs) if logprobs is not None else None,
                        finish_reason=finish,
                        extra={"stop_reason": reason},
                    )
                )
        return completions

    def _trim(self, ids: list[int], sampling: SamplingParams) -> tuple[list[int], str, int | str | None]:
        """Cut after EOS or after the token completing the first stop string:
        (ids, finish reason, stop reason: the EOS id, the stop string or None)."""
        end, finish, reason = len(ids), "length", None
        for t, tok in enumerate(ids):
            if tok in self.eos_token_ids:
                end, finish, reason = t + 1, "stop", tok
                break
        if sampling.stop:
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=False)
            # (end of the first occurrence, list position, string): the earliest completed wins
            hits = [(text.find(s) + len(s), i, s) for i, s in enumerate(sampling.stop) if s in text]
            if hits:
                first, _, reason = min(hits)
                # The shortest prefix whose text already contains that stop string.
                lo, hi = 1, end
                while lo < hi:
                    mid = (lo + hi) // 2
                    if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= first:
                        hi = mid
                    else:
                        lo = mid + 1
                end, finish = lo, "stop"
        return ids[:end], finish, reason


class _StopStrings:
    """Stopping criterion: a row is done once its generated text contains a stop string.

    transformers' own stop_strings support precomputes tables over the whole vocabulary for
    every new set of strings (seconds for a 50k vocabulary); decoding the last few tokens of
    each row per step costs microseconds. _trim() then cuts precisely.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.prompt_width = prompt_width
        # Every token decodes to at least one character, so this many tokens cover any string.
        self.window = max(len(s) for s in self.stop) + 2

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window) :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
