"""The arithmetic-task verifier: the last integer of a completion equals the answer.

Thousands separators are joined first ("1,234" is 1234), as the reference run in
data/README.md does. Used by the CPU workloads (data/arith and the demo); math benchmarks use
the grader pool (megarl.rewards.grader).
"""

from __future__ import annotations

import re

_INT = re.compile(r"-?\d+")
_SEP = re.compile(r"(?<=\d),(?=\d{3}\b)")


def last_integer(text: str) -> int | None:
    found = _INT.findall(_SEP.sub("", text))
    return int(found[-1]) if found else None


def last_integer_correct(text: str, answer: str | int) -> bool:
    value = last_integer(text)
    try:
        return value is not None and value == int(str(answer).strip())
    except ValueError:
        return False
