"""`megarl grade`: JSON lines in, one JSON line out per input line, errors name the line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from megarl.cli import main
from megarl.commands.grade import _parse_line

LINES = [
    {"response": r"so $\boxed{\frac{1}{2}}$", "answer": "0.5"},
    {"response": "The answer is 7.", "answer": "8"},
    {"response": "no answer at all", "answer": "3"},
    {"response": "Final Answer: The final answer is $27$. I hope it is correct.", "answer": 27.0},
    {"response": r"\boxed{" + "{" * 10_000, "answer": "1"},
]
EXPECTED = [
    {"correct": True, "extracted": r"\frac{1}{2}", "reason": "equal"},
    {"correct": False, "extracted": "7", "reason": "not_equal"},
    {"correct": False, "extracted": None, "reason": "no_answer"},
    {"correct": True, "extracted": "27", "reason": "equal"},
    {"correct": False, "extracted": None, "reason": "no_answer"},
]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_grade_file_in_order(tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    _write(f, LINES)
    assert main(["grade", str(f), "--workers", "1", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == EXPECTED
    assert "5 graded, 2 correct" in captured.err


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "in.jsonl line 3: invalid JSON"),
        (json.dumps({"response": "x"}), 'line 3: missing field "answer"'),
        (json.dumps({"response": 5, "answer": "5"}), 'line 3: "response" must be a string'),
        (json.dumps({"response": "x", "answer": True}), 'line 3: "answer" must be a string or a number'),
        (json.dumps(["x", "y"]), "line 3: expected a JSON object"),
        ("", "line 3: empty line"),
    ],
)
def test_line_validation(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _parse_line(bad.encode(), 3, "in.jsonl")


def test_malformed_line_stops_after_grading_the_lines_before(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    _write(f, LINES[:2] + ["{not json"] + LINES[2:])
    assert main(["grade", str(f), "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert f"{f} line 3: invalid JSON" in captured.err
    assert [json.loads(line) for line in captured.out.splitlines()] == EXPECTED[:2]
    assert main(["grade", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_stdin_through_the_command_line():
    lines = "".join(json.dumps(line) + "\n" for line in LINES[:3]).encode()
    proc = subprocess.run(
        [sys.executable, "-m", "megarl.cli", "grade", "-", "--workers", "1"],
        input=lines + b"\xff\xfe\n" + lines, capture_output=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "stdin line 4: not UTF-8" in proc.stderr.decode()
    assert [json.loads(line) for line in proc.stdout.decode().splitlines()] == EXPECTED[:3]
