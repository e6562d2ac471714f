"""Tool-integrated reasoning: the Qwen2.5-Math TIR loop on top of the sandbox.

The model writes reasoning and a ```python block, then starts an output block; generation stops
at "```output", the last python block runs in the sandbox, its output is appended in the
format the model was trained on, and generation continues, at most `max_executions` times:

    ...```python
    print(2 + 2)
    ```
    ```output
    4
    ```
    <the model continues>

Protocol details follow Qwen2.5-Math's evaluation harness (math_eval.py, python_executor.py):
a segment is executed when it ends with a closing ``` fence and contains no "boxed"; the
output block shows stdout, else the last line of the error ("ZeroDivisionError: ..."), else
"Done"; a timeout shows "Timeout Error"; the text is cut to 400 characters keeping both ends;
after the last allowed execution the line "Reach max function call limit." is appended and the
trajectory ends. One deliberate difference: by default only the last python block runs, as the
issue asks; `cumulative=True` re-runs the earlier successful blocks first (print lines
dropped), as the Qwen harness does, so later blocks can use earlier variables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from megarl.rewards.sandbox import SandboxConfig, SandboxResult, run_python_batch

OUTPUT_STOP = "```output"
MAX_CALLS_NOTE = "\nReach max function call limit."

_PYTHON_BLOCK_RE = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class TIRConfig:
    """max_executions: code runs per trajectory (Qwen2.5-Math: 4).
    sandbox: limits for each run (the last bare expression is printed, as in the harness).
    max_output_chars: the output block keeps this many characters (half from each end).
    cumulative: re-run earlier successful blocks before the last one (see module docstring).
    max_workers: snippets run in parallel per round (default: CPU count).
    """

    max_executions: int = 4
    sandbox: SandboxConfig = SandboxConfig(timeout_s=10.0, cpu_time_s=5, print_last_expression=True)
    max_output_chars: int = 400
    cumulative: bool = False
    max_workers: int | None = None

    def __post_init__(self) -> None:
        if self.max_executions < 1:
            raise ValueError(f"TIRConfig.max_executions must be >= 1, got {self.max_executions}")
        if self.max_output_chars < 8:
            raise ValueError(f"TIRConfig.max_output_chars must be >= 8, got {self.max_output_chars}")
        if not isinstance(self.sandbox, SandboxConfig):
            raise ValueError(f"TIRConfig.sandbox must be a SandboxConfig, got {type(self.sandbox).__name__}")


@dataclass
class TIRTrace:
    """One trajectory.

    text: everything after the prompt (model segments and output blocks), what gets graded.
    codes / executions: each program run and its sandbox result, in order.
    finished: the model ended on its own (False: it hit max_executions).
    """

    text: str = ""
    codes: list[str] = field(default_factory=list)
    executions: list[SandboxResult] = field(default_factory=list)
    finished: bool = False

    @property
    def num_executions(self) -> int:
        return len(self.executions)


def last_python_block(text: str) -> str | None:
    """The body of the last closed ```python block in `text`, or None."""
    blocks = _PYTHON_BLOCK_RE.findall(text)
    return blocks[-1] if blocks else None


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep the first and last max_chars // 2 characters, joined by "..."."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "..." + text[-half:]


def format_execution(result: SandboxResult, max_chars: int = 400) -> str:
    """What the model sees in the output block for one run."""
    if result.reason in ("timeout", "cpu_time"):
        shown = "Timeout Error"
    elif result.reason in ("ok", "output_limit"):
        shown = result.stdout.strip() or "Done"
    else:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        shown = lines[-1].strip() if lines else f"Error ({result.reason})"
    return truncate_middle(shown, max_chars)


def output_block(shown: str) -> str:
    return f"\n```output\n{shown}\n```\n"


def _strip_stop(segment: str) -> str:
    # Engines that keep the stop string in the text (ours do) leave "```output" at the end.
    segment = segment.rstrip()
    if segment.endswith(OUTPUT_STOP):
        segment = segment[: -len(OUTPUT_STOP)]
    return segment.rstrip()


def _program(trace: TIRTrace, code: str, cumulative: bool) -> str:
    if not cumulative:
        return code
    earlier = [
        "\n".join(line for line in c.splitlines() if not line.strip().startswith("print("))
        for c, r in zip(trace.codes, trace.executions)
        if r.reason == "ok"
    ]
    return "\n".join(earlier + [code])


def run_tir_batch(
    prompts: Sequence[str],
    generate: Callable[[list[str]], list[str]],
    config: TIRConfig = TIRConfig(),
) -> list[TIRTrace]:
    """Drive TIR for many prompts at once.

    generate(texts) -> continuations, one per text, each stopping at "```output" (included or
    not) or at the end of the answer. Every round sends the still-open trajectories together,
    then runs their programs in parallel in the sandbox.
    """
    traces = [TIRTrace() for _ in prompts]
    active = list(range(len(prompts)))
    while active:
        segments = generate([prompts[i] + traces[i].text for i in active])
        if len(segments) != len(active):
            raise ValueError(f"generate returned {len(segments)} continuations for {len(active)} texts")
        to_run: list[tuple[int, str, str]] = []
        for i, segment in zip(active, segments):
            trace = traces[i]
            segment = _strip_stop(segment)
            trace.text += segment
            code = last_python_block(segment) if segment.endswith("```") and "boxed" not in segment else None
            if code is None:
                trace.finished = True
            else:
                to_run.append((i, code, _program(trace, code, config.cumulative)))
        results = run_python_batch([p for _, _, p in to_run], config.sandbox, config.max_workers)
        active = []
        for (i, code, _), result in zip(to_run, results):
            trace = traces[i]
            trace.codes.append(code)
            trace.executions.append(result)
            trace.text += output_block(format_execution(result, config.max_output_chars))
            if trace.num_executions >= config.max_executions:
                trace.text += MAX_CALLS_NOTE
            else:
                active.append(i)
    return traces


def run_tir(prompt: str, generate: Callable[[str], str], config: TIRConfig = TIRConfig()) -> TIRTrace:
    """run_tir_batch for one prompt, with a one-text generate callback."""
    return run_tir_batch([prompt], lambda texts: [generate(t) for t in texts], config)[0]
