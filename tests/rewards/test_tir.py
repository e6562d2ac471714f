"""The TIR loop: a scripted generate callback (a test double for the model) with the real sandbox."""

from __future__ import annotations

import pytest

from megarl.rewards.sandbox import SandboxConfig, SandboxResult
from megarl.rewards.tir import (
    MAX_CALLS_NOTE,
    TIRConfig,
    format_execution,
    last_python_block,
    run_tir,
    run_tir_batch,
    truncate_middle,
)

CONFIG = TIRConfig(sandbox=SandboxConfig(timeout_s=10.0, cpu_time_s=1, print_last_expression=True))


class Script:
    """Returns pre-written segments per prompt, in order, and records what it was sent."""

    def __init__(self, segments: dict[str, list[str]]):
        self.segments = {p: list(s) for p, s in segments.items()}
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> list[str]:
        out = []
        for text in texts:
            self.seen.append(text)
            prompt = next(p for p in self.segments if text.startswith(p))
            out.append(self.segments[prompt].pop(0))
        return out


def test_one_execution_then_answer():
    prompt = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"
    script = Script({prompt: ["Compute it.\n```python\nprint(6 * 7)\n```\n```output", " So \\boxed{42}."]})
    trace = run_tir(prompt, lambda t: script([t])[0], CONFIG)
    expected = "Compute it.\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n So \\boxed{42}."
    assert trace.text == expected
    assert trace.finished and trace.num_executions == 1
    assert trace.codes == ["print(6 * 7)\n"]
    # The second call continued from the output block.
    assert script.seen[1] == prompt + "Compute it.\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n"


def test_stops_after_max_executions():
    prompt = "P:"
    step = "Again.\n```python\nx = 1\nx + 1\n```\n"  # stop string already removed by the engine
    script = Script({prompt: [step] * 10})
    trace = run_tir_batch([prompt], script, TIRConfig(max_executions=4, sandbox=CONFIG.sandbox))[0]
    assert trace.num_executions == 4 and not trace.finished
    assert len(script.seen) == 4
    assert trace.text.endswith("```output\n2\n```\n" + MAX_CALLS_NOTE)


def test_output_block_contents():
    prompt = "Q:"
    segments = [
        "```python\n1 / 0\n```",
        "```python\nwhile True:\n    pass\n```",
        "```python\nx = 3\n```",
        "```python\nprint('a' * 1000)\n```",
    ]
    trace = run_tir_batch([prompt], Script({prompt: segments}), CONFIG)[0]
    outputs = trace.text.split("```output\n")[1:]
    shown = [o.split("\n```\n")[0] for o in outputs]
    assert shown == ["ZeroDivisionError: division by zero", "Timeout Error", "Done", "a" * 200 + "..." + "a" * 200]
    assert [r.reason for r in trace.executions] == ["error", "cpu_time", "ok", "ok"]


def test_no_execution_when_boxed_or_no_code():
    prompts = ["A:", "B:"]
    script = Script({"A:": ["Done: \\boxed{3}\n```python\nprint(3)\n```"], "B:": ["Just text."]})
    traces = run_tir_batch(prompts, script, CONFIG)
    assert [t.num_executions for t in traces] == [0, 0]
    assert all(t.finished for t in traces)


def test_cumulative_reruns_successful_blocks():
    prompt = "C:"
    segments = ["```python\na = 5\nprint(a)\n```", "```python\nprint(a * 2)\n```", "\\boxed{10}"]
    last = run_tir_batch([prompt], Script({prompt: list(segments)}), CONFIG)[0]
    assert "NameError: name 'a' is not defined" in last.text
    cumulative = TIRConfig(cumulative=True, sandbox=CONFIG.sandbox)
    trace = run_tir_batch([prompt], Script({prompt: list(segments)}), cumulative)[0]
    assert "```output\n5\n```" in trace.text and "```output\n10\n```" in trace.text
    assert trace.finished


def test_batch_mixes_finished_and_running():
    script = Script({"X:": ["```python\nprint(1)\n```", "\\boxed{1}"], "Y:": ["\\boxed{2}"]})
    traces = run_tir_batch(["X:", "Y:"], script, CONFIG)
    assert [t.num_executions for t in traces] == [1, 0]
    assert script.seen == ["X:", "Y:", "X:```python\nprint(1)\n```\n```output\n1\n```\n"]


def test_helpers():
    assert last_python_block("```python\na\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"
    assert last_python_block("```python\nunclosed") is None
    assert truncate_middle("abcdefghij", 4) == "ab...ij"
    failed = SandboxResult(stdout="", stderr="Traceback...\nValueError: bad\n", exit_code=1, timed_out=False, reason="error")
    assert format_execution(failed) == "ValueError: bad"
    with pytest.raises(ValueError, match="max_executions"):
        TIRConfig(max_executions=0)
    with pytest.raises(ValueError, match="continuations"):
        run_tir_batch(["a"], lambda texts: [], CONFIG)
