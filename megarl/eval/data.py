"""Benchmark and training-pool loaders: every file in data/ into one record type.

    records = load_benchmark("math500", limit=10)      # list[Record]
    Record(problem, answer, id, source, extra)

The data directory is $MEGARL_DATA, else the repository's data/ (next to the package). Answers
are reference strings for megarl.rewards (numbers as written, LaTeX kept); how each file's answer
is derived is listed in BENCHMARKS and in docs/evaluation.md.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Record:
    """One problem.

    problem: the question text (for chat-style records, the last user message).
    answer: the reference answer as a string.
    id: unique within its source.
    source: the benchmark name (a key of BENCHMARKS).
    extra: everything else worth keeping (read-only), e.g. "messages" for chat-style records.
    """

    problem: str
    answer: str
    id: str
    source: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("problem", "answer", "id", "source"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Record.{name} must be a str, got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def messages(self) -> list[dict] | None:
        """The chat messages of a chat-style record (arith), else None."""
        msgs = self.extra.get("messages")
        return [dict(m) for m in msgs] if msgs is not None else None


def data_dir() -> Path:
    """$MEGARL_DATA, else <repo>/data."""
    env = os.environ.get("MEGARL_DATA")
    if env:
        return Path(env)
    import megarl

    return Path(megarl.__file__).resolve().parents[1] / "data"


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced, or None."""
    best = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if best < 0:
        return None
    start = text.find("{", best)
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i].strip()
    return None


def _number_answer(value: Any) -> str:
    # amc23 stores answers as floats ("27.0"): write integers as integers.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class _Row:
    """Field access with errors that name the file and line."""

    def __init__(self, row: dict, path: Path, line: int):
        self.row, self.path, self.line = row, path, line

    def __getitem__(self, key: str) -> Any:
        if key not in self.row:
            raise ValueError(f"{self.path}:{self.line}: missing field {key!r} (fields: {sorted(self.row)})")
        return self.row[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.row.get(key, default)

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.path}:{self.line}: {message}")


def _math500(r: _Row, i: int, source: str) -> Record:
    return Record(r["problem"], str(r["answer"]), str(r["unique_id"]), source,
                  {"subject": r.get("subject"), "level": r.get("level"), "solution": r.get("solution")})


def _problem_answer(r: _Row, i: int, source: str) -> Record:
    # aime24, aime25, amc23: an id when the file has one, else the row index.
    rid = r.get("id")
    extra = {k: r.get(k) for k in ("url", "solution") if r.get(k) is not None}
    if isinstance(r["answer"], float):
        extra["raw_answer"] = r["answer"]
    return Record(r["problem"], _number_answer(r["answer"]), str(rid if rid is not None else i), source, extra)


def _minerva(r: _Row, i: int, source: str) -> Record:
    answer = last_boxed(r["solution"])
    if not answer:
        raise r.error("no \\boxed{...} answer in 'solution'")
    return Record(r["problem"], answer, str(r.get("idx", i)), source,
                  {"type": r.get("type"), "solution": r["solution"]})


def _olympiad(r: _Row, i: int, source: str) -> Record:
    final = r["final_answer"]
    if isinstance(final, str):  # some copies store the list as its Python repr
        try:
            final = ast.literal_eval(final)
        except (ValueError, SyntaxError) as e:
            raise r.error(f"final_answer is not a list: {final[:80]!r}") from e
    if not isinstance(final, list) or not final or not all(isinstance(a, str) for a in final):
        raise r.error(f"final_answer must be a non-empty list of strings, got {final!r}")
    # "$69$,$84$" -> "69,84": the dollars delimit math, they are not part of the answer.
    answer = ", ".join(a.replace("$", "").strip() for a in final)
    problem = r["question"]
    if r.get("context"):
        problem = f"{r['context']}\n\n{problem}"
    extra = {k: r.get(k) for k in ("is_multiple_answer", "unit", "answer_type", "subfield")}
    return Record(problem, answer, str(r["id"]), source, extra)


def _gsm8k(r: _Row, i: int, source: str) -> Record:
    solution, sep, answer = str(r["answer"]).rpartition("####")
    if not sep or not answer.strip():
        raise r.error("answer has no '#### N' line")
    return Record(r["question"], answer.strip().replace(",", ""), str(i), source, {"solution": solution.strip()})


def _dsr(r: _Row, i: int, source: str) -> Record:
    return Record(r["problem"], str(r["answer"]), str(r["index"]), source)


def _arith(r: _Row, i: int, source: str) -> Record:
    messages = r["prompt"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise r.error("prompt must be a non-empty list of chat messages")
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise r.error("prompt has no user message")
    extra = {"messages": tuple(MappingProxyType(dict(m)) for m in messages),
             "a": r.get("a"), "b": r.get("b"), "op": r.get("op")}
    return Record(str(user[-1]["content"]), str(r["answer"]), str(i), source, extra)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's file is and how its rows become Records."""

    file: str
    parse: Callable[[_Row, int, str], Record]
    description: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("math500.jsonl", _math500, "MATH500; answer field"),
    "aime24": BenchmarkSpec("aime24.jsonl", _problem_answer, "AIME 2024; answer field"),
    "aime25": BenchmarkSpec("aime25.jsonl", _problem_answer, "AIME 2025; answer field, id = row index"),
    "amc23": BenchmarkSpec("amc23.jsonl", _problem_answer, "AMC 2023; float answers written as integers"),
    "minerva_math": BenchmarkSpec("minerva_math.jsonl", _minerva, "Minerva math; last \\boxed{} of the solution"),
    "olympiadbench": BenchmarkSpec("olympiadbench.jsonl", _olympiad, "OlympiadBench; final_answer list joined"),
    "gsm8k_test": BenchmarkSpec("gsm8k_test.jsonl", _gsm8k, "GSM8K test; the '#### N' number"),
    "gsm8k_train": BenchmarkSpec("gsm8k_train.jsonl", _gsm8k, "GSM8K train; the '#### N' number"),
    "dsr_sub": BenchmarkSpec("dsr_sub.jsonl", _dsr, "DSR-sub (1-shot RLVR pool); id = index"),
    "arith_train": BenchmarkSpec("arith/train.jsonl", _arith, "arith train; chat messages"),
    "arith_test": BenchmarkSpec("arith/test.jsonl", _arith, "arith test; chat messages"),
}
ALIASES = {"arith": "arith_test", "minerva": "minerva_math", "gsm8k": "gsm8k_test"}


def is_file_benchmark(name: str) -> bool:
    """A benchmark given as a JSONL file path rather than a name."""
    return name.endswith(".jsonl")


def resolve_name(name: str) -> str:
    """The canonical benchmark name (aliases resolved), or a JSONL path as given; ValueError for
    unknown names."""
    if is_file_benchmark(name):
        return name
    canonical = ALIASES.get(name, name)
    if canonical not in BENCHMARKS:
        known = sorted(BENCHMARKS) + sorted(ALIASES)
        raise ValueError(f"unknown benchmark {name!r}; expected one of {known} or a path to a .jsonl file")
    return canonical


def _jsonl_file(r: _Row, i: int, source: str) -> Record:
    """A JSONL file of your own: `prompt` (chat messages, or text) or `problem` / `question`,
    and `answer`; id = `id` or `index` if present, else the row index."""
    prompt = r.get("prompt", r.get("problem", r.get("question")))
    if prompt is None:
        raise r.error("needs a `prompt`, `problem` or `question` field")
    rid = r.get("id", r.get("index", i))
    if isinstance(prompt, list):
        chat = _arith(r, i, source)  # chat messages, validated as arith's
        return Record(chat.problem, chat.answer, str(rid), source, {"messages": chat.extra["messages"]})
    if not isinstance(prompt, str):
        raise r.error(f"prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    return Record(prompt, _number_answer(r["answer"]), str(rid), source)


def load_benchmark(name: str, *, limit: int | None = None, root: str | os.PathLike | None = None) -> list[Record]:
    """Records of one benchmark in file order (the first `limit` if given)."""
    canonical = resolve_name(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if is_file_benchmark(canonical):
        path = (Path(root) if root is not None else Path.cwd()) / canonical
        if not path.is_file():
            raise FileNotFoundError(f"benchmark file {path} not found")
        records = load_jsonl_file(path, limit=limit, source=canonical)
    else:
        spec = BENCHMARKS[canonical]
        base = Path(root) if root is not None else data_dir()
        path = base / spec.file
        if not path.is_file():
            raise FileNotFoundError(
                f"benchmark {canonical!r}: {path} not found (data directory {base}; set MEGARL_DATA "
                f"to the folder that holds {spec.file})"
            )
        records = _read(path, spec.parse, canonical, limit)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids")
    return records


def load_jsonl_file(path: str | os.PathLike, *, limit: int | None = None, source: str | None = None) -> list[Record]:
    """Records of a JSONL file of your own (any name; see `_jsonl_file` for the fields), in file
    order; the RL trainer reads its training data through this too."""
    return _read(Path(path), _jsonl_file, source or str(path), limit)


def _read(path: Path, parse: Callable[[_Row, int, str], Record], source: str, limit: int | None) -> list[Record]:
    records: list[Record] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            records.append(parse(_Row(row, path, line_no), len(records), source))
            if limit is not None and len(records) >= limit:
                break
    return records
