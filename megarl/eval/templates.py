"""Prompt templates: how a Record becomes the text a model continues.

    qwen25-math-cot   Qwen2.5-Math evaluation's ChatML text with the CoT system prompt (the
                      1-shot RLVR paper's evaluation prompt); written literally, not through the
                      tokenizer's chat template, exactly as the Qwen harness does.
    qwen25-math-tir   the same with the tool-integrated system prompt; generation stops at
                      "```output" and runs through megarl.rewards.tir.
    one-shot-rlvr     the 1-shot RLVR training prompt: the problem plus
                      ONE_SHOT_RLVR_SUFFIX as the user turn of the model's own chat template.
    chat              the record's own chat messages (arith) or the bare problem as the user turn,
                      through the model's chat template.
    raw               the problem text exactly as written (models without a chat template, such
                      as the CPU demo's character-level model).

Templates that use the model's chat template need a tokenizer with one
(tokenizer.apply_chat_template); the literal ones need no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from megarl.eval.data import Record

COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TIR_SYSTEM = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)
# Appended to every problem in the 1-shot RLVR training data (One-Shot-RLVR, verl preprocessing).
ONE_SHOT_RLVR_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
# The Qwen2.5-Math harness's stop words for these prompts.
QWEN_STOP = ("</s>", "<|im_end|>", "<|endoftext|>")


def with_one_shot_rlvr_suffix(problem: str) -> str:
    """The user turn of a 1-shot RLVR training example."""
    return problem + ONE_SHOT_RLVR_SUFFIX


def _chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptTemplate:
    """name: the CLI name. kind: "literal" (fixed text), "chat" (the model's chat template) or
    "raw" (the problem text itself).
    stop: extra stop strings for generation. tool: the TIR loop drives generation."""

    name: str
    kind: Literal["literal", "chat", "raw"]
    stop: tuple[str, ...] = ()
    tool: bool = False
    description: str = ""

    def messages(self, record: Record) -> list[dict]:
        """The chat turns for a "chat" template."""
        if self.name == "one-shot-rlvr":
            return [{"role": "user", "content": with_one_shot_rlvr_suffix(record.problem)}]
        return record.messages or [{"role": "user", "content": record.problem}]

    def render(self, record: Record, tokenizer: Any = None) -> str:
        """The prompt text for `record`."""
        if self.kind == "raw":
            return record.problem
        if self.kind == "literal":
            # Qwen's construct_prompt strips spaces around the question; so do we.
            system = TIR_SYSTEM if self.tool else COT_SYSTEM
            return _chatml(system, record.problem.strip(" "))
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template {self.name!r} renders through the model's chat template, but the "
                f"tokenizer has none; use qwen25-math-cot or give a model with a chat template"
            )
        return tokenizer.apply_chat_template(self.messages(record), tokenize=False, add_generation_prompt=True)


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("qwen25-math-cot", "literal", QWEN_STOP, description="Qwen2.5-Math CoT (ChatML text)"),
        PromptTemplate("qwen25-math-tir", "literal", QWEN_STOP + ("```output",), tool=True,
                       description="Qwen2.5-Math tool-integrated reasoning (ChatML text)"),
        PromptTemplate("one-shot-rlvr", "chat", description="problem + the 1-shot RLVR suffix, model chat template"),
        PromptTemplate("chat", "chat", description="the record's messages, model chat template"),
        PromptTemplate("raw", "raw", description="the problem text as is"),
    )
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
