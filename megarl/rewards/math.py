"""Math answer extraction and equivalence: the verifiable reward.

One grader for training rewards and for evaluation. Rules, examples and the places where the
verdicts intentionally differ from math-verify and from the Qwen2.5-Math evaluation grader are
in docs/grading.md.

    extract_answer(text)   the model's final answer as a string, or None
    is_equiv(pred, ref)    does the predicted answer equal the reference?
    grade(response, answer) -> GradeResult(correct, extracted, reason)

Everything here runs in the calling process with no time limit: model output is hostile input
(power towers, deep nesting, megabyte responses), so the trainer calls these through
`megarl.rewards.grader.GraderPool`, whose workers enforce a wall-clock timeout and a memory cap.
The cheap guards below (answer length, nesting depth, size of the numbers an expression
denotes) make most hostile inputs fail fast instead of burning the timeout.

Comparison order, cheapest first: normalised string equality, plain numbers (exact fractions,
relative tolerance only where a decimal is involved), structure (tuples/intervals element by
element with bracket types respected, unordered sets and comma lists, unions, matrices,
equations), and only then sympy on LaTeX parsed by latex2sympy2_extended (math-verify's parser).
sympy is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import cmath
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

__all__ = ["GradeResult", "extract_answer", "grade", "is_equiv", "normalize_answer"]

# Longest extracted answer that is compared at all. MATH500's longest answer is ~70 characters,
# OlympiadBench's a few hundred; anything longer is model output gone wrong.
MAX_ANSWER_CHARS = 1000
# Deepest bracket nesting handed to the LaTeX parser (its time grows fast with depth; real
# answers stay below 10).
MAX_NESTING = 24
# Largest number (in decimal digits) an answer may denote; 9^{9^{9}} would need 370 million.
MAX_LOG10 = 100_000
# Largest exponent allowed on a symbolic base: expanding (x+1)^{10^6} never finishes.
MAX_SYMBOLIC_EXPONENT = 1_000
# Most elements in a tuple/set/list/matrix, and deepest structural recursion.
MAX_ELEMENTS = 64
MAX_STRUCTURE_DEPTH = 6
# Relative tolerance when a decimal is involved: Qwen2.5-Math's grader uses 1e-4 too.
DECIMAL_REL_TOL = 1e-4
# Exact (symbolic) constants are compared numerically at 30 digits with this tolerance.
EXACT_REL_TOL = 1e-15


@dataclass(frozen=True)
class GradeResult:
    """Verdict for one (response, reference) pair.

    reason is a short machine-readable word: "equal", "not_equal", "no_answer",
    "answer_too_long", "too_complex", "memory_limit", "error: <type>: <message>", and from the
    pool "timeout" and "worker_crash".
    """

    correct: bool
    extracted: str | None
    reason: str


class _TooComplex(Exception):
    """The input is beyond the guards: not equal, without trying."""


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# `\\` (a line break) is one token so that `\\{` opens a group; `\{` and `\}` are literal braces.
_BRACE_TOKEN_RE = re.compile(r"\\\\|\\[{}]|[{}]")
_HASHES_RE = re.compile(r"^[ \t]*####[ \t]*(?P<ans>[^\n]*\S)", re.MULTILINE)
_ANSWER_IS_RE = re.compile(
    r"\bthe\s+(?:final\s+)?answer\s+is\b[ \t]*:?|^[ \t]*(?:\*\*)?(?:final\s+)?answer(?:\*\*)?[ \t]*:(?:\*\*)?",
    re.IGNORECASE | re.MULTILINE,
)
_LAST_NUMBER_RE = re.compile(r"(?<![\d.,])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|\n")
_COMMENTARY_RE = re.compile(
    r"\s+\((?![^()]*,)|\s+(?:because|since|which|as|so|but|when|if|where|not|instead)\b", re.IGNORECASE
)


def _box_contents(text: str) -> tuple[int, str | None] | None:
    """(position, content) of the last \\boxed/\\fbox; content None when its braces never close.

    One pass over the braces from the first box, so a megabyte of unbalanced `\\boxed{{{...`
    costs linear time, not quadratic.
    """
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    last = boxes[-1]
    pos = last.end()
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if pos >= len(text):
        return last.start(), None
    if text[pos] != "{":
        # `\boxed 5`: TeX takes the next token; accept the run of non-space characters.
        m = re.match(r"[^\s$]+", text[pos:])
        return last.start(), (m.group(0) if m else None)
    depth = 0
    for tok in _BRACE_TOKEN_RE.finditer(text, pos):
        t = tok.group()
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                return last.start(), text[pos + 1 : tok.start()]
    return last.start(), None


def _minerva_answer(text: str) -> tuple[int, str] | None:
    """The Minerva form "The final answer is X. I hope it is correct." (its last occurrence).

    Searched backwards from the last "I hope it is correct" instead of with one regex, which
    would try every "final answer is" in a megabyte response against every length.
    """
    lowered = text.lower()
    end = lowered.rfind("i hope it is correct")
    if end < 0:
        return None
    window_start = max(0, end - 400)
    start = lowered.rfind("final answer is", window_start, end)
    if start < 0:
        return None
    ans = text[start + len("final answer is") : end]
    if "\n" in ans.strip():
        return None
    return start, ans.strip().rstrip(".").strip()


def _phrase_after(text: str, start: int) -> str | None:
    """The answer stated after a marker such as "the answer is": math delimiters or a sentence."""
    rest = text[start : start + 2 * MAX_ANSWER_CHARS].lstrip(" \t:*")
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(open_):
            end = rest.find(close, len(open_))
            if end > 0:
                return rest[len(open_) : end]
            return None
    m = _SENTENCE_END_RE.search(rest)
    phrase = rest[: m.start()] if m else rest
    # "The answer is 7 (not 8)", "the answer is 12 because ...": the answer ends where the
    # commentary starts.
    m = _COMMENTARY_RE.search(phrase)
    if m and m.start() > 0:
        phrase = phrase[: m.start()]
    phrase = phrase.strip().rstrip("*").strip()
    return phrase or None


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """The final answer stated in a model response, or None.

    Explicit final-answer markers first; of these the one latest in the text wins:
      * the last `\\boxed{...}` / `\\fbox{...}` (nested braces; an unclosed last box means the
        response was cut off mid-answer: no answer, not an earlier box),
      * the Minerva form "The final answer is X. I hope it is correct.",
      * a GSM8K-style "#### X" line.
    Then the last "the answer is X" / "Answer: X". Then, only if last_number_fallback, the last
    number in the text (thousands separators joined). The fallback is off by default: a reward
    that accepts any number mentioned rewards spraying numbers.

    Examples:
        >>> extract_answer(r"so $\\boxed{\\frac{1}{2}}$.")
        '\\\\frac{1}{2}'
        >>> extract_answer("The answer is 42.")
        '42'
        >>> extract_answer("I think 42") is None
        True
    """
    if not isinstance(text, str):
        raise ValueError(f"response must be a str, got {type(text).__name__}")
    if _CONTROL_RE.search(text):
        text = _CONTROL_RE.sub("", text)

    candidates: list[tuple[int, str | None]] = []
    box = _box_contents(text)
    if box is not None:
        candidates.append(box)
    minerva = _minerva_answer(text)
    if minerva is not None:
        candidates.append(minerva)
    hashes = None
    for hashes in _HASHES_RE.finditer(text):
        pass
    if hashes is not None:
        candidates.append((hashes.start(), hashes.group("ans")))
    if candidates:
        return _clean_extracted(max(candidates, key=lambda c: c[0])[1])

    said = None
    for said in _ANSWER_IS_RE.finditer(text):
        pass
    if said is not None:
        found = _clean_extracted(_phrase_after(text, said.end()))
        if found is not None:
            return found

    if last_number_fallback:
        number = None
        for number in _LAST_NUMBER_RE.finditer(text):
            pass
        if number is not None:
            return number.group(0).replace(",", "").lstrip("+")
    return None


def _clean_extracted(ans: str | None) -> str | None:
    if ans is None:
        return None
    ans = ans.strip()
    # Nested markers: "The final answer is $\boxed{5}$. I hope it is correct."
    if _BOX_RE.search(ans):
        inner = _box_contents(ans)
        if inner is not None and inner[1] is not None:
            ans = inner[1].strip()
    while len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
        ans = ans[1:-1].strip()
    ans = ans.rstrip(".").strip()
    return ans or None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|texttt|mathrm|mathbf|mathit|mathsf|mathtt|mbox|boldsymbol|bm)\s*\{([^{}]*)\}"
)
# `\\\\` (a row break) is matched first so that its second backslash never starts `\\ `.
_SPACING_RE = re.compile(r"(\\\\)|\\[,;:! ]|\\q?quad(?![A-Za-z])|\\displaystyle(?![A-Za-z])|~")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])\.?")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])")
_PERCENT_RE = re.compile(r"\\%|%|\s*\\text\{\s*percent\s*\}|\s+percent\b")
_MATRIX_ENV_RE = re.compile(r"\\(begin|end)\{(?:bmatrix|smallmatrix|matrix|Bmatrix)\}")
_ARRAY_BEGIN_RE = re.compile(r"\\begin\{array\}\s*\{[^{}]*\}")
_ASSIGN_LHS_RE = re.compile(
    r"(?:[A-Za-z]{1,2}|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?'*"
)
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_FIX_RES = (
    (re.compile(r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac\s*([0-9A-Za-z])\s*\{"), r"\\frac{\1}{"),
    (re.compile(r"\\frac\s*(\{[^{}]*\})\s*([0-9A-Za-z])"), r"\\frac\1{\2}"),
    (re.compile(r"\\sqrt\s*([0-9A-Za-z])"), r"\\sqrt{\1}"),
)
_SIMPLE_SUBSCRIPT_RE = re.compile(r"_\{([0-9A-Za-z])\}")
_UNION_U_RE = re.compile(r"([)\]])\s*U\s*([(\[])")

# Unit words stripped after a number. Plural and "square"/"cubic" prefixes are handled below;
# single letters (m, g, s) only when written in \text{...} after a space, never "5m" (= 5*m).
_UNITS = (
    "units?", "unit", "cm", "mm", "km", "m", "meters?", "metres?", "centimeters?", "millimeters?",
    "kilometers?", "inch(?:es)?", "in", "feet", "foot", "ft", "yards?", "yd", "miles?", "mi",
    "mph", "kmh", "km/h", "m/s", "kg", "g", "grams?", "kilograms?", "mg", "pounds?", "lbs?",
    "ounces?", "oz", "tons?", "liters?", "litres?", "ml", "mL", "l", "L", "gallons?", "gal",
    "quarts?", "cups?", "degrees?", "deg", "radians?", "rad", "dollars?", "cents?", "euros?",
    "seconds?", "secs?", "s", "minutes?", "mins?", "hours?", "hrs?", "h", "days?", "weeks?",
    "months?", "years?", "yrs?", "people", "persons?", "students?", "ways?", "times?",
    "points?", "sq", "square", "cubic", "cu", "per",
)
_UNIT_WORD = "(?:" + "|".join(sorted(_UNITS, key=len, reverse=True)) + ")"
_TRAILING_UNITS_RE = re.compile(
    r"(?<=[\d}).])\s+(?:" + _UNIT_WORD + r")(?:\s*(?:\^\s*\{?[23]\}?|\^[23]|²|³))?"
    r"(?:\s+(?:" + _UNIT_WORD + r")(?:\s*(?:\^\s*\{?[23]\}?|\^[23]))?)*\s*$"
)
# Multi-letter units may also follow a number with no space ("5cm", "10dollars").
_GLUED_UNITS_RE = re.compile(
    r"(?<=\d)(?:cm|mm|km|meters?|inches|feet|ft|miles?|mph|kg|grams?|pounds?|lbs?|dollars?|cents?|degrees?|hours?|minutes?|seconds?|units?)(?:\^\{?[23]\}?)?\s*$"
)


_NUMBER_THEN_WORDS_RE = re.compile(r"([-+]?\d[\d,]*(?:\.\d+)?)\s+([A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,3})")
_MATH_WORDS_RE = re.compile(r"\b(?:pi|sqrt|infinity|inf|i|e|and|or|to|over|times|plus|minus|divided|squared|cubed)\b", re.IGNORECASE)


def _unwrap_text(s: str) -> str:
    # Innermost first; bounded because each pass removes one level of \text{...}.
    for _ in range(8):
        new = _TEXT_CMD_RE.sub(r" \1 ", s)
        if new == s:
            break
        s = new
    return s


def normalize_answer(s: str) -> str:
    """Canonical LaTeX-ish string for comparison (both the prediction and the reference).

    Removes $ and math delimiters, \\left/\\right, spacing commands, \\text{} wrappers, trailing
    unit words, degree marks, percent signs, thousands separators; \\dfrac/\\tfrac -> \\frac,
    \\sqrt2 -> \\sqrt{2}, bmatrix/array -> pmatrix, \\leq -> \\le; drops whitespace except
    between two letters. "x = 5" stays an assignment here: is_equiv decides what to do with it.

        >>> normalize_answer(r"\\$1{,}000 \\text{ dollars}")
        '1000'
    """
    if len(s) > MAX_ANSWER_CHARS:
        raise ValueError(f"answer longer than {MAX_ANSWER_CHARS} characters")
    return _normalize(s)


@lru_cache(maxsize=8192)
def _normalize(s: str) -> str:
    s = _CONTROL_RE.sub("", s).strip()
    s = s.replace("\\$", "").replace("$", "")
    for a, b in (("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        s = s.replace(a, b)
    s = _SPACING_RE.sub(lambda m: m.group(1) or " ", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = s.replace("\\lbrack", "[").replace("\\rbrack", "]")
    s = re.sub(r"\\(?:leqslant|leq)(?![A-Za-z])", r"\\le", s)
    s = re.sub(r"\\(?:geqslant|geq)(?![A-Za-z])", r"\\ge", s)
    s = re.sub(r"\\neq(?![A-Za-z])", r"\\ne", s)
    s = re.sub(r"\\(?:varnothing)(?![A-Za-z])|\\\{\s*\\\}", r"\\emptyset", s)
    s = re.sub(r"\binfinity\b|\\infinity\b|\\inf(?![A-Za-z])", r"\\infty", s)
    s = s.replace("\\dots", "\\ldots").replace("\\cdots", "\\ldots")
    s = _MATRIX_ENV_RE.sub(lambda m: f"\\{m.group(1)}{{pmatrix}}", s)
    s = _ARRAY_BEGIN_RE.sub(r"\\begin{pmatrix}", s).replace("\\end{array}", "\\end{pmatrix}")
    s = _DEGREE_RE.sub("", s)
    s = _PERCENT_RE.sub("", s)
    s = _unwrap_text(s)
    s = s.replace("{,}", ",")
    for _ in range(2):
        s = s.strip().rstrip(".").strip()
        new = _TRAILING_UNITS_RE.sub("", s)
        if new.strip():
            s = new
        new = _GLUED_UNITS_RE.sub("", s)
        if new.strip():
            s = new
    m = _NUMBER_THEN_WORDS_RE.fullmatch(s)
    if m and not _MATH_WORDS_RE.search(m.group(2)):
        s = m.group(1)  # "3 apples", "12 red marbles": the noun is not part of the answer
    for pattern, repl in _FRAC_FIX_RES:
        s = pattern.sub(repl, s)
    s = _UNION_U_RE.sub(r"\1\\cup\2", s)
    # Whitespace: one space between two letters ("no solution", "\pi r"), none elsewhere.
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?<![A-Za-z]) | (?![A-Za-z])", "", s)
    s = _SIMPLE_SUBSCRIPT_RE.sub(r"_\1", s)
    s = s.rstrip(".,;").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if s.startswith("+") and len(s) > 1 and s[1].isdigit():
        s = s[1:]
    m = re.fullmatch(r"\(([A-E])\)", s)
    if m:
        s = m.group(1)
    return s


# --------------------------------------------------------------------------------------------
# Structure: top-level splitting that respects brackets, \{ \}, and \begin...\end
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"\\begin\{[A-Za-z*]+\}|\\end\{[A-Za-z*]+\}|\\\\|\\[{}]|\\[A-Za-z]+|\\.|[()\[\]{},=&<>]|[^\\()\[\]{},=&<>]+"
)
_OPEN = {"(", "[", "{", "\\{"}
_CLOSE = {")", "]", "}", "\\}"}


def _tokens(s: str) -> list[str]:
    return _TOKEN_RE.findall(s)


def _nesting(toks: list[str]) -> int | None:
    """Maximum bracket depth, or None when brackets do not balance."""
    depth = best = 0
    for t in toks:
        if t in _OPEN or t.startswith("\\begin{"):
            depth += 1
            best = max(best, depth)
        elif t in _CLOSE or t.startswith("\\end{"):
            depth -= 1
            if depth < 0:
                return None
    return best if depth == 0 else None


def _split_top(s: str, seps: frozenset[str]) -> list[str]:
    """Split at separators outside all brackets; one part when there is none."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for t in _tokens(s):
        if t in _OPEN or t.startswith("\\begin{"):
            depth += 1
        elif t in _CLOSE or t.startswith("\\end{"):
            depth -= 1
        if depth == 0 and t in seps:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(t)
    parts.append("".join(cur))
    return parts


def _outer_brackets(s: str) -> tuple[str, str, str] | None:
    """(open, inside, close) when s is one bracketed group such as (a,b], \\{a\\}, [a]."""
    toks = _tokens(s)
    if len(toks) < 2 or toks[0] not in ("(", "[", "\\{") or toks[-1] not in (")", "]", "\\}"):
        return None
    depth = 0
    for i, t in enumerate(toks):
        if t in _OPEN or t.startswith("\\begin{"):
            depth += 1
        elif t in _CLOSE or t.startswith("\\end{"):
            depth -= 1
        if depth == 0 and i != len(toks) - 1:
            return None
    if depth != 0:
        return None
    return toks[0], "".join(toks[1:-1]), toks[-1]


_COMMA = frozenset({","})
_EQUALS = frozenset({"="})
_CUP = frozenset({"\\cup"})
_ROW = frozenset({"\\\\"})
_CELL = frozenset({"&"})


def _structure(s: str) -> tuple[str, object]:
    """Classify a normalised answer.

    Returns one of
      ("matrix", rows)             \\begin{pmatrix}..\\end{pmatrix}
      ("union", parts)             A \\cup B (unordered)
      ("set", elements)            \\{a, b\\} or a bare list "a, b" (unordered)
      ("seq", (open, elems, close)) (a, b], [a, b]: ordered, brackets must match
      ("equation", (lhs, rhs))     one top-level "=" whose left side is not a plain variable
      ("atom", s)
    """
    m = re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", s, re.DOTALL)
    if m and _outer_env_ok(s):
        rows = [r for r in _split_top(m.group(1), _ROW) if r.strip()]
        return "matrix", [_split_top(r, _CELL) for r in rows]
    union = _split_top(s, _CUP)
    if len(union) > 1:
        return "union", union
    outer = _outer_brackets(s)
    if outer is not None:
        open_, inside, close = outer
        elems = _split_top(inside, _COMMA)
        if open_ == "\\{" and close == "\\}":
            return "set", elems
        if open_ in "([" and close in ")]" and len(elems) > 1:
            return "seq", (open_, elems, close)
        if open_ == "(" and close == ")" and len(elems) == 1:
            return _structure(inside)
    elems = _split_top(s, _COMMA)
    if len(elems) > 1:
        return "set", elems
    sides = _split_top(s, _EQUALS)
    if len(sides) == 2:
        return "equation", (sides[0], sides[1])
    return "atom", s


def _outer_env_ok(s: str) -> bool:
    # "\begin{pmatrix}1\end{pmatrix}+\begin{pmatrix}2\end{pmatrix}" is not one matrix.
    toks = _tokens(s)
    depth = 0
    for i, t in enumerate(toks):
        if t in _OPEN or t.startswith("\\begin{"):
            depth += 1
        elif t in _CLOSE or t.startswith("\\end{"):
            depth -= 1
        if depth == 0 and i != len(toks) - 1:
            return False
    return depth == 0


def _split_assignment(s: str) -> tuple[str, str] | None:
    """("x", "5") for "x=5", "x\\in[1,2)", or a chain "x=2+3=5" (last value); None otherwise."""
    toks = _tokens(s)
    if "=" not in toks and "\\in" not in toks:
        return None
    parts = _split_top(s, frozenset({"=", "\\in"}))
    if len(parts) < 2 or not _ASSIGN_LHS_RE.fullmatch(parts[0]):
        return None
    if parts[0].startswith("\\") and parts[0] in ("\\frac", "\\sqrt", "\\infty", "\\pi"):
        return None
    return parts[0], parts[-1]


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"[-+]?\d+")
# Exponents of at most three digits: Fraction("1e999999999") would build a billion-digit integer.
_DEC_RE = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d{1,3})?|[-+]?\d+[eE][-+]?\d{1,3}")
_SLASH_RE = re.compile(r"([-+]?\d+)/(\d+)")
_FRAC_RE = re.compile(r"([-+]?)\\frac\{([-+]?\d+(?:\.\d+)?)\}\{([-+]?\d+(?:\.\d+)?)\}")


@dataclass(frozen=True)
class _Num:
    value: Fraction
    decimal: bool  # written with a decimal point: compared with a relative tolerance


def _as_number(s: str) -> _Num | None:
    """Plain numbers only: 12, -3.5, .5, 1e-3, 3/4, \\frac{3}{4}, -\\frac{3}{4}."""
    if len(s) > 400:
        return None
    if _INT_RE.fullmatch(s):
        return _Num(Fraction(int(s)), False)
    if _DEC_RE.fullmatch(s):
        return _Num(Fraction(s), True)
    m = _SLASH_RE.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return _Num(Fraction(int(m.group(1)), int(m.group(2))), False)
    m = _FRAC_RE.fullmatch(s)
    if m:
        num, den = Fraction(m.group(2)), Fraction(m.group(3))
        if den != 0:
            value = num / den * (-1 if m.group(1) == "-" else 1)
            return _Num(value, "." in m.group(2) or "." in m.group(3))
    return None


def _numbers_equal(pred: _Num, ref: _Num) -> bool:
    if pred.value == ref.value:
        return True
    # An integer reference asks for that integer: 100.004 is not 100.
    if ref.value.denominator == 1 and not ref.decimal:
        return False
    if not (pred.decimal or ref.decimal):
        return False
    return abs(pred.value - ref.value) <= DECIMAL_REL_TOL * max(abs(pred.value), abs(ref.value))


# --------------------------------------------------------------------------------------------
# sympy
# --------------------------------------------------------------------------------------------

_COMPLEX_HINT_RE = re.compile(r"(?<![A-Za-z\\])i(?![A-Za-z])|\\mathbb\{C\}|\\imath")


@lru_cache(maxsize=4096)
def _parse_latex(s: str):
    """sympy object for a normalised LaTeX string, or None when it does not parse."""
    from latex2sympy2_extended import latex2sympy
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig

    try:
        return latex2sympy(
            s,
            is_real=not _COMPLEX_HINT_RE.search(s),
            normalization_config=None,
            conversion_config=ConversionConfig(
                interpret_as_mixed_fractions=True,
                interpret_simple_eq_as_assignment=False,
                interpret_contains_as_eq=True,
                lowercase_symbols=False,
            ),
        )
    except RecursionError:
        raise _TooComplex("nesting") from None
    except Exception:
        return None


def _log10_size(e, depth: int = 0) -> float:
    """Rough upper bound of |log10|value|| of a sympy expression, without evaluating it.

    Raises _TooComplex on what would take unbounded time to evaluate or simplify: numbers with
    more than MAX_LOG10 digits, symbolic powers with exponents above MAX_SYMBOLIC_EXPONENT.
    """
    import sympy

    if depth > 200:
        raise _TooComplex("depth")
    if isinstance(e, sympy.Integer):
        return math.log10(abs(int(e))) if e != 0 else 0.0
    if isinstance(e, sympy.Rational):
        return max(math.log10(abs(e.p)), math.log10(e.q)) if e.p else 0.0
    if isinstance(e, sympy.Float):
        return abs(math.log10(abs(float(e)))) if e != 0 else 0.0
    if isinstance(e, sympy.Symbol) or not getattr(e, "args", ()):
        return 1.0
    if isinstance(e, sympy.Pow):
        base, exp = e.args
        exp_size = _log10_size(exp, depth + 1)
        if exp_size > 12:
            if base in (0, 1, -1):
                return 0.0
            raise _TooComplex("exponent")
        exp_mag = 10.0**exp_size
        if base.free_symbols:
            if exp_mag > MAX_SYMBOLIC_EXPONENT and exp.is_number:
                raise _TooComplex("symbolic exponent")
            return _log10_size(base, depth + 1) * exp_mag
        size = exp_mag * _log10_size(base, depth + 1)
        if size > MAX_LOG10:
            raise _TooComplex("number too large")
        return size
    if isinstance(e, sympy.factorial):
        n = _log10_size(e.args[0], depth + 1)
        size = (10.0**n) * n
        if size > MAX_LOG10:
            raise _TooComplex("factorial")
        return size
    if isinstance(e, sympy.Mul):
        total = sum(_log10_size(a, depth + 1) for a in e.args)
    else:
        sizes = [_log10_size(a, depth + 1) for a in e.args]
        total = max(sizes) + math.log10(len(sizes)) if sizes else 0.0
        if isinstance(e, sympy.exp):
            total = 10.0 ** min(total, 300.0)
        elif isinstance(e, (sympy.binomial, sympy.FallingFactorial, sympy.RisingFactorial)):
            total = 10.0 ** min(total, 300.0)
    if total > MAX_LOG10:
        raise _TooComplex("number too large")
    return total


def _numeric(e):
    """30-digit complex value of a symbol-free expression, or None."""
    import sympy

    try:
        v = sympy.N(e, 30)
    except Exception:
        return None
    if v.has(sympy.nan, sympy.zoo, sympy.oo, -sympy.oo) or not v.is_number:
        return None
    try:
        value = complex(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if cmath.isfinite(value) else None


def _has_float(e) -> bool:
    import sympy

    return bool(e.atoms(sympy.Float))


def _values_close(a: complex, b: complex, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def _sympy_equal(pred, ref) -> bool:
    import sympy
    from sympy.core.relational import Relational

    if pred == ref:
        return True
    if isinstance(pred, Relational) or isinstance(ref, Relational):
        return _relations_equal(pred, ref)
    if not (isinstance(pred, sympy.Expr) and isinstance(ref, sympy.Expr)):
        return False
    if pred.has(sympy.oo, -sympy.oo, sympy.zoo) or ref.has(sympy.oo, -sympy.oo, sympy.zoo):
        return False
    if not pred.free_symbols and not ref.free_symbols:
        a, b = _numeric(pred), _numeric(ref)
        if a is None or b is None:
            return False
        if _has_float(pred) or _has_float(ref):
            if ref.is_Integer:
                return _values_close(a, b, EXACT_REL_TOL)
            return _values_close(a, b, DECIMAL_REL_TOL)
        return _values_close(a, b, EXACT_REL_TOL)
    return _expressions_identical(pred, ref)


def _sample_values(a, b, wanted: int = 4, tries: int = 8) -> list[tuple[complex, complex]]:
    """Values of a and b at random rational points of mixed sign where both are defined."""
    import sympy

    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    rng = random.Random(0)
    pairs = []
    for k in range(tries):
        # The first point is all positive and the second all negative, so that branch-cut
        # differences (sqrt(x^2) vs x, log(x^2) vs 2 log x) show up.
        signs = [1 if k == 0 else -1 if k == 1 else rng.choice((-1, 1)) for _ in symbols]
        point = {s: sympy.Rational(sign * rng.randint(11, 97), rng.randint(7, 31)) for s, sign in zip(symbols, signs)}
        try:
            va, vb = _numeric(a.subs(point)), _numeric(b.subs(point))
        except Exception:
            continue
        if va is not None and vb is not None:
            pairs.append((va, vb))
            if len(pairs) >= wanted:
                break
    return pairs


def _expressions_identical(a, b) -> bool:
    """Symbolic identity a == b.

    Decided numerically when both sides are defined at 4 random points of mixed sign (relative
    agreement 1e-9 at 30 digits; 1e-4 when a decimal was written): a false "equal" needs two
    different expressions to agree at four random points, while sympy.simplify can run for
    minutes on a correct answer such as sin(x)^200 cos(x)^200 = sin(2x)^200 / 2^200. Only
    where the sides are undefined at most points (poles, unknown functions) does simplify decide.
    """
    import sympy

    tol = DECIMAL_REL_TOL if (_has_float(a) or _has_float(b)) else 1e-9
    values = _sample_values(a, b)
    if any(not _values_close(va, vb, tol) for va, vb in values):
        return False
    if len(values) >= 4:
        return True
    try:
        diff = sympy.simplify(a - b)
    except Exception:
        return False
    if diff == 0:
        return True
    try:
        return bool(diff.equals(0))
    except Exception:
        return False


def _proportional(a, b) -> bool:
    """a == c * b for a constant c != 0, decided like _expressions_identical."""
    values = _sample_values(a, b)
    if len(values) >= 4 and all(vb != 0 for _, vb in values):
        ratios = [va / vb for va, vb in values]
        return ratios[0] != 0 and all(_values_close(r, ratios[0], 1e-9) for r in ratios)
    import sympy

    try:
        ratio = sympy.simplify(a / b)
    except Exception:
        return False
    return bool(ratio.is_number and ratio != 0)


def _relations_equal(pred, ref) -> bool:
    """Same relation up to moving terms across, scaling by a constant, or flipping sides."""
    from sympy.core.relational import Relational

    if not (isinstance(pred, Relational) and isinstance(ref, Relational)):
        return False
    flips = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "==": "==", "!=": "!="}
    dp = pred.lhs - pred.rhs
    dr = ref.lhs - ref.rhs
    if flips.get(pred.rel_op) == ref.rel_op and pred.rel_op != ref.rel_op:
        dp = -dp
    elif pred.rel_op != ref.rel_op:
        return False
    if _expressions_identical(dp, dr):
        return True
    if pred.rel_op in ("==", "!="):
        return _proportional(dp, dr)
    # Inequalities survive only positive scaling.
    return _proportional(dp, dr) and _positive_ratio(dp, dr)


def _positive_ratio(a, b) -> bool:
    values = _sample_values(a, b)
    return bool(values) and all(vb != 0 and (va / vb).real > 0 for va, vb in values)


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------

_TEXTY_RE = re.compile(r"[A-Za-z][A-Za-z ]+")
_BASE_RE = re.compile(r"([0-9A-Za-z]+)_\{?(\d+)\}?")


def _atoms_equal(pred: str, ref: str) -> bool:
    if pred == ref:
        return True
    if _TEXTY_RE.fullmatch(pred) and _TEXTY_RE.fullmatch(ref) and pred.casefold() == ref.casefold():
        return True
    base = _BASE_RE.fullmatch(ref)
    if base and (pred == base.group(1) or _BASE_RE.fullmatch(pred) == base):
        # "2516_8": the digits carry the answer; a missing base subscript is no different answer.
        return True
    np_, nr = _as_number(pred), _as_number(ref)
    if np_ is not None and nr is not None:
        return _numbers_equal(np_, nr)
    for s in (pred, ref):
        depth = _nesting(_tokens(s))
        if depth is None:
            return False
        if depth > MAX_NESTING or s.count("^") > 2 * MAX_NESTING:
            raise _TooComplex("nesting")
    b = _parse_latex(ref)
    if b is None:
        return False
    a = _parse_latex(pred)
    if a is None:
        return False
    _log10_size(a)
    _log10_size(b)
    return _sympy_equal(a, b)


def _equiv(pred: str, ref: str, depth: int) -> bool:
    if depth > MAX_STRUCTURE_DEPTH:
        raise _TooComplex("structure depth")
    if pred == ref:
        return True
    if not pred or not ref:
        return False
    pa, ra = _split_assignment(pred), _split_assignment(ref)
    if (pa is None) != (ra is None):
        # "y = 2x + 3" against "2x - y + 3 = 0": an assignment is also an equation.
        other = ref if pa is not None else pred
        if _structure(other)[0] == "equation":
            return _atoms_equal(pred, ref)
    if pa is not None and ra is not None:
        # x = 1 is not y = 1; an equal left side compares the right sides.
        if pa[0] != ra[0]:
            return False
        pred, ref = pa[1], ra[1]
    elif pa is not None:
        pred = pa[1]
    elif ra is not None:
        ref = ra[1]
    if pred == ref:
        return True

    kind_p, sp = _structure(pred)
    kind_r, sr = _structure(ref)
    if kind_p != kind_r:
        # A one-element set is its element: "\{3\}" answers "find all solutions" with "3".
        if kind_p == "set" and kind_r == "atom" and len(sp) == 1:
            return _equiv(sp[0], ref, depth + 1)
        if kind_r == "set" and kind_p == "atom" and len(sr) == 1:
            return _equiv(pred, sr[0], depth + 1)
        # "x > 3" and "(3, \infty)" describe the same set of reals.
        kinds = {kind_p, kind_r}
        if "atom" in kinds and kinds & {"seq", "union"}:
            return _relation_matches_intervals(pred, ref, kind_p, sp, kind_r, sr)
        return False
    if kind_p == "atom":
        return _atoms_equal(pred, ref)
    if kind_p == "seq":
        (po, pe, pc), (ro, re_, rc) = sp, sr
        if po != ro or pc != rc or len(pe) != len(re_):
            return False
        if len(pe) > MAX_ELEMENTS:
            raise _TooComplex("elements")
        return all(_equiv(p, r, depth + 1) for p, r in zip(pe, re_))
    if kind_p in ("set", "union"):
        return _unordered_equal(sp, sr, depth)
    if kind_p == "matrix":
        if len(sp) != len(sr) or any(len(a) != len(b) for a, b in zip(sp, sr)):
            return False
        if sum(len(r) for r in sp) > MAX_ELEMENTS:
            raise _TooComplex("elements")
        return all(_equiv(p, r, depth + 1) for prow, rrow in zip(sp, sr) for p, r in zip(prow, rrow))
    if kind_p == "equation":
        return _atoms_equal(pred, ref)
    raise AssertionError(kind_p)


def _interval_set(kind: str, parts):
    """sympy set of an interval "(a, b]" or a union of intervals, or None."""
    import sympy

    pieces = [_structure(p) for p in parts] if kind == "union" else [(kind, parts)]
    sets = []
    for k, v in pieces:
        if k != "seq" or len(v[1]) != 2:
            return None
        open_, (lo, hi), close = v
        a, b = _parse_latex(lo), _parse_latex(hi)
        if a is None or b is None or not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
            return None
        _log10_size(a)
        _log10_size(b)
        sets.append(sympy.Interval(a, b, left_open=open_ == "(", right_open=close == ")"))
    return sympy.Union(*sets)


def _relation_matches_intervals(pred: str, ref: str, kind_p: str, sp, kind_r: str, sr) -> bool:
    """An inequality in one variable (or a chain a < x < b) against intervals."""
    import sympy
    from sympy.core.relational import Relational

    atom, (kind, parts) = (pred, (kind_r, sr)) if kind_p == "atom" else (ref, (kind_p, sp))
    intervals = _interval_set(kind, parts)
    rel = _parse_latex(atom)
    if intervals is None or rel is None:
        return False
    relations = rel.args if isinstance(rel, sympy.And) else (rel,)
    if not relations or not all(isinstance(r, Relational) and r.rel_op != "==" for r in relations):
        return False
    if len(rel.free_symbols) != 1:
        return False
    _log10_size(rel)
    try:
        as_set = rel.as_set()
        return bool(as_set == intervals or as_set.symmetric_difference(intervals).is_empty)
    except Exception:
        return False


def _unordered_equal(pred: list[str], ref: list[str], depth: int) -> bool:
    if len(pred) != len(ref):
        return False
    if len(pred) > MAX_ELEMENTS:
        raise _TooComplex("elements")
    unmatched = list(ref)
    for p in pred:
        for i, r in enumerate(unmatched):
            if _equiv(p, r, depth + 1):
                del unmatched[i]
                break
        else:
            return False
    return True


_HAS_PERCENT_RE = re.compile(r"%|\\text\{\s*percent\s*\}|\bpercent\b")


def _compare(pred: str, ref: str) -> bool:
    """is_equiv that lets _TooComplex through, so grade() can report it."""
    if len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
        raise _TooComplex("length")
    npred, nref = _normalize(pred), _normalize(ref)
    for n in (npred, nref):
        # Checked once here: the structural recursion below rescans its input at every level.
        depth = _nesting(_tokens(n))
        if depth is not None and depth > MAX_NESTING:
            raise _TooComplex("nesting")
    if _equiv(npred, nref, 0):
        return True
    # Percent signs are dropped ("50\%" = "50", as MATH references often omit them); when
    # exactly one side wrote one, the fraction it stands for counts too ("50\%" = "0.5").
    pct_pred, pct_ref = bool(_HAS_PERCENT_RE.search(pred)), bool(_HAS_PERCENT_RE.search(ref))
    if pct_pred != pct_ref:
        a, b = _as_number(npred), _as_number(nref)
        if a is not None and b is not None:
            if pct_pred:
                a = _Num(a.value / 100, a.decimal)
            else:
                b = _Num(b.value / 100, b.decimal)
            return _numbers_equal(a, b)
    return False


def is_equiv(pred: str, ref: str) -> bool:
    """Whether the predicted answer string equals the reference answer string.

    Not symmetric where the reference decides the form: an integer reference must be matched
    exactly (100.004 != 100), and "x = 5" matches "5" only when the other side is not a
    different assignment. Inputs beyond the guards (numbers with more than 100,000 digits,
    nesting deeper than 24) are not equal.

        >>> is_equiv(r"\\dfrac{1}{2}", "0.5"), is_equiv("(1,2]", "(1,2)"), is_equiv(r"\\{2,1\\}", r"\\{1,2\\}")
        (True, False, True)
    """
    if not isinstance(pred, str) or not isinstance(ref, str):
        raise ValueError(f"pred and ref must be str, got {type(pred).__name__} and {type(ref).__name__}")
    try:
        return _compare(pred, ref)
    except (_TooComplex, RecursionError):
        return False


def grade(response: str, answer: str, *, last_number_fallback: bool = False) -> GradeResult:
    """Extract the final answer from a response and compare it with the reference, in-process.

    No isolation: use GraderPool for model output in training and evaluation. Never raises on
    hostile content; a bug or an unexpected exception comes back as reason "error: ...".
    """
    if not isinstance(response, str) or not isinstance(answer, str):
        raise ValueError(
            f"response and answer must be str, got {type(response).__name__} and {type(answer).__name__}"
        )
    extracted = None
    try:
        if not answer.strip():
            return GradeResult(False, None, "error: empty reference")
        extracted = extract_answer(response, last_number_fallback=last_number_fallback)
        if extracted is None:
            return GradeResult(False, None, "no_answer")
        if len(extracted) > MAX_ANSWER_CHARS:
            return GradeResult(False, extracted[:100] + "...", "answer_too_long")
        ok = _compare(extracted, answer)
        return GradeResult(ok, extracted, "equal" if ok else "not_equal")
    except (_TooComplex, RecursionError):
        return GradeResult(False, extracted, "too_complex")
    except MemoryError:
        return GradeResult(False, extracted, "memory_limit")
    except Exception as e:  # noqa: BLE001 - the reward must never raise on model output
        return GradeResult(False, extracted, f"error: {type(e).__name__}: {str(e)[:200]}")


# Typical answer shapes. The ANTLR parser builds its prediction tables lazily, per construct;
# parsing these once in the grader's zygote makes every forked worker start warm.
_WARMUP_ANSWERS = (
    r"\frac{x^2-1}{x-1}", r"\frac{\sqrt{3}}{2}", r"-\frac{1}{2}", r"2\sqrt{3}", r"\sqrt[3]{2}", r"3\pi",
    r"\frac{\pi}{2}", r"x^{2}-2x+1", r"(x-1)(x+2)", r"\sin(x)", r"\cos^2x", r"\tan\theta", r"\log_2 8",
    r"\ln(x)", r"e^{x}", r"6+9i", r"|x|", r"5!", r"\binom{5}{2}", r"a_1", r"y=2x+3", r"x\le3", r"x>2",
    r"-\infty", r"ab", r"Devon", r"1.5\times10^{3}", r"2\cdot3", r"\frac{a}{b}+c", r"\frac{1+\sqrt{5}}{2}",
    r"4\sqrt{2}-1", r"\frac{9}{4}\pi", r"2^{10}", r"\pi r^2",
    # Shapes of hostile output: a cold parser needs seconds for each the first time.
    r"e^{e^{e^{10}}}", r"2^{2^{2^{2^{2}}}}", r"9^{9^{9}}", r"(10^{10})!", r"(x+1)^{100}",
    r"\frac{1}{\frac{1}{\frac{1}{2}}}", r"\sqrt{\sqrt{\sqrt{2}}}", r"\sum_{n=1}^{10} \sin(n)",
    r"\binom{10^{9}}{5}", r"1e99",
)


def warmup() -> None:
    """Import sympy and warm the LaTeX parser (grader start-up, so the first items are not slow)."""
    for s in _WARMUP_ANSWERS:
        _parse_latex(s)
    is_equiv(r"\frac{x^2-1}{x-1}", "x+1")
    is_equiv(r"\sqrt{2}", "1.41421")
