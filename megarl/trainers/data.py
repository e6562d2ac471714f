"""Prompt records for RL and the deterministic order in which steps consume them."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """prompt: chat messages (list of {"role", "content"}) or plain text; answer: the reference."""

    prompt: Any
    answer: str
    index: int


def load_prompt_records(source: str) -> list[PromptRecord]:
    """Records from a JSONL file (fields `prompt` (chat messages or text), `problem` or
    `question`, and `answer`: megarl.eval.data.load_jsonl_file) or a benchmark name known to
    megarl.eval.data. `index` is the record's position in the file."""
    from megarl.eval.data import load_benchmark, load_jsonl_file

    path = Path(source)
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise ValueError(f"data file {source} does not exist")
        records = load_jsonl_file(path)
        if not records:
            raise ValueError(f"data file {source} holds no records")
        return [PromptRecord(prompt=r.messages if r.messages is not None else r.problem, answer=r.answer, index=i)
                for i, r in enumerate(records)]
    return [PromptRecord(prompt=r.problem, answer=r.answer, index=i) for i, r in enumerate(load_benchmark(source))]


def render_prompt(tokenizer, prompt: Any, fmt: str) -> list[int]:
    """Token ids of a prompt: chat messages (or text as one user turn) through the model's chat
    template when fmt == "chat", the text itself when fmt == "raw", or any other prompt template
    of megarl.eval.templates (e.g. "one-shot-rlvr": the problem plus the 1-shot RLVR suffix as the
    user turn; "qwen25-math-cot": Qwen2.5-Math's CoT ChatML text), so training prompts are
    rendered exactly as evaluation renders them."""
    if fmt == "chat":
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    elif fmt == "raw":
        if not isinstance(prompt, str):
            raise ValueError("prompt_format 'raw' needs text prompts, got chat messages")
        text = prompt
    else:
        from megarl.eval.data import Record
        from megarl.eval.templates import get_template

        if not isinstance(prompt, str):
            raise ValueError(f"prompt_format {fmt!r} needs text prompts (a `problem`), got chat messages")
        text = get_template(fmt).render(Record(prompt, "", "0", "train"), tokenizer)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptStream:
    """Epochs over the training records in a seeded order; `take(k)` returns the next k.

    The state is just (epoch, position), so a resumed run sees exactly the same prompts.
    """

    def __init__(self, records: list[PromptRecord], *, seed: int, shuffle: bool,
                 indices: tuple[int, ...] | None = None) -> None:
        if indices is not None:
            bad = [i for i in indices if not 0 <= i < len(records)]
            if bad:
                raise ValueError(f"data.train_indices {bad} out of range for {len(records)} records")
            records = [records[i] for i in indices]
        self.records = records
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[PromptRecord]:
        out = []
        order = self._order(self.epoch)
        while len(out) < k:
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
                order = self._order(self.epoch)
            out.append(self.records[order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def resolve_model_dir(name: str) -> str:
    """An HF directory path, or the packaged SmolLM2 (materialised on first use)."""
    if name in ("smollm2-135m-instruct", "smollm2"):
        from megarl.models.packaged import smollm2_hf_dir

        return str(smollm2_hf_dir())
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"model.hf_dir {name!r} is not a Hugging Face model directory (no config.json)")
    return name
