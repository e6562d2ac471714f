"""Evaluation: benchmarks -> prompts -> rollout engine -> the training grader -> metrics -> files.

    config = EvalConfig(benchmarks=("math500", "aime24"), limit=50)
    results, samples = run_eval(engine, engine.tokenizer, config, model="Qwen2.5-Math-1.5B")
    write_results(results, samples, "runs/eval/qwen")   # results.json, results.md, samples.jsonl

Per-benchmark defaults follow the 1-shot RLVR paper's use of the Qwen2.5-Math harness
(qwen25-math-cot, 3072 new tokens; MATH500/Minerva/OlympiadBench greedy pass@1; AIME24/AIME25/
AMC23 mean accuracy over 8 samples at temperature 0.6); EvalConfig fields override them.
Grading goes through megarl.rewards.grader.GraderPool (worker processes with hard limits), the
same grader as training; arith uses the same pool with the last-integer verifier of the arith
training reward.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from megarl.eval.data import Record, load_benchmark, resolve_name
from megarl.eval.metrics import accuracy, avg_at_k, macro_average, maj_at_k, pass_at_k, rm_at_k
from megarl.eval.templates import get_template
from megarl.fileio import atomic_write_text
from megarl.rewards.grader import GraderConfig, GraderPool
from megarl.rewards.math import GradeResult
from megarl.rewards.tir import TIRConfig, run_tir_batch
from megarl.rollout.engine import SamplingParams


@dataclass(frozen=True)
class BenchmarkSettings:
    """How one benchmark is sampled, prompted and graded."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 3072
    template: str = "qwen25-math-cot"
    grader: Literal["math", "last_integer"] = "math"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        get_template(self.template)
        if self.grader not in ("math", "last_integer"):
            raise ValueError(f"grader must be 'math' or 'last_integer', got {self.grader!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_GREEDY = BenchmarkSettings()
_MEAN_OF_8 = BenchmarkSettings(n=8, temperature=0.6)
_ARITH = BenchmarkSettings(max_new_tokens=48, template="chat", grader="last_integer")
_FILE = BenchmarkSettings(template="chat")  # a benchmark given as a JSONL file
DEFAULT_SETTINGS: dict[str, BenchmarkSettings] = {
    "math500": _GREEDY,
    "minerva_math": _GREEDY,
    "olympiadbench": _GREEDY,
    "aime24": _MEAN_OF_8,
    "aime25": _MEAN_OF_8,
    "amc23": _MEAN_OF_8,
    "gsm8k_test": _GREEDY,
    "gsm8k_train": _GREEDY,
    "dsr_sub": _GREEDY,
    "arith_test": _ARITH,
    "arith_train": _ARITH,
}


@dataclass(frozen=True)
class EvalConfig:
    """benchmarks: names or aliases (see megarl.eval.data.BENCHMARKS).
    limit: the first `limit` problems of each benchmark.
    n, temperature, top_p, max_new_tokens, template: override every benchmark's default.
    seed: sampling seed (each engine call gets seed + its index, so runs are reproducible).
    batch_size: prompts per engine call.
    verifier: grade every benchmark with "math" (answer equivalence) or "last_integer" instead
    of its default (the RL trainer passes its correctness reward here).
    Benchmarks may also be JSONL files (path ending in .jsonl; see megarl.eval.data): greedy,
    3072 new tokens, "chat" template and the math verifier unless overridden.
    """

    benchmarks: tuple[str, ...]
    limit: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    template: str | None = None
    seed: int = 0
    batch_size: int = 16
    verifier: Literal["math", "last_integer"] | None = None
    grader: GraderConfig = field(default_factory=GraderConfig)
    tir: TIRConfig = field(default_factory=TIRConfig)

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ValueError("EvalConfig.benchmarks: give at least one benchmark")
        object.__setattr__(self, "benchmarks", tuple(resolve_name(b) for b in self.benchmarks))
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"EvalConfig.benchmarks has duplicates: {self.benchmarks}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"EvalConfig.batch_size must be >= 1, got {self.batch_size}")
        for name in self.benchmarks:
            self.settings_for(name)  # validates the overrides

    def settings_for(self, name: str) -> BenchmarkSettings:
        base = DEFAULT_SETTINGS.get(resolve_name(name), _FILE)
        overrides = {
            k: v
            for k, v in (
                ("n", self.n),
                ("temperature", self.temperature),
                ("top_p", self.top_p),
                ("max_new_tokens", self.max_new_tokens),
                ("template", self.template),
                ("grader", self.verifier),
            )
            if v is not None
        }
        try:
            return dataclasses.replace(base, **overrides)
        except ValueError as e:
            raise ValueError(f"EvalConfig for {name}: {e}") from e


def grade_last_integer(response: str, answer: str, *, last_number_fallback: bool = False) -> GradeResult:
    """GraderPool grade_fn for arith: the arith training reward (last integer equals answer)."""
    from megarl.rewards.last_integer import last_integer, last_integer_correct

    value = last_integer(response)
    if value is None:
        return GradeResult(False, None, "no_answer")
    ok = last_integer_correct(response, answer)
    return GradeResult(ok, str(value), "equal" if ok else "not_equal")


Scorer = Callable[[Sequence[Record], Sequence[Sequence[str]]], Sequence[Sequence[float]]]


def run_eval(
    engine: Any,
    tokenizer: Any,
    config: EvalConfig,
    *,
    model: str = "",
    scorer: Scorer | None = None,
    log: Callable[[str], None] = lambda msg: None,
    process_group: Any = None,
    pools: dict[str, GraderPool] | None = None,
) -> tuple[dict, list[dict]]:
    """Evaluate on every benchmark of `config`; return (results, per-sample records).

    engine: a RolloutEngine. tokenizer: encodes the rendered prompts (and renders chat
    templates). scorer(records, responses) -> scores[p][s]: a reward model's scores; when
    given, RM@n is reported as well.
    process_group: data-parallel evaluation (the RL trainer): every rank of the group calls
    run_eval, generates and grades problems rank, rank + world, ..., and all ranks gather the
    per-problem results and return the same metrics and samples.
    pools: grader pools by verifier kind ("math", "last_integer") kept by the caller across
    calls (the trainer evaluates every N steps); missing ones are added to it, and the caller
    closes them. Without it, run_eval starts its own and closes them before returning.
    """
    results: dict[str, Any] = {
        "model": model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": config.seed,
        "limit": config.limit,
        "benchmarks": {},
    }
    samples: list[dict] = []
    own_pools = pools is None
    pools = {} if pools is None else pools
    try:
        for name in config.benchmarks:
            settings = config.settings_for(name)
            if settings.grader not in pools:
                fn = grade_last_integer if settings.grader == "last_integer" else None
                pools[settings.grader] = GraderPool(config.grader, grade_fn=fn)
            log(f"[eval] {name}: {dataclasses.asdict(settings)}")
            summary, rows = _run_benchmark(engine, tokenizer, name, settings, config, pools[settings.grader], scorer,
                                           log, process_group)
            results["benchmarks"][name] = summary
            samples.extend(rows)
            log(f"[eval] {name}: {summary['primary_metric']} = {summary['score']:.4f} "
                f"({summary['num_problems']} problems, {summary['time_s']:.1f} s)")
    finally:
        if own_pools:
            for pool in pools.values():
                pool.close()
    per = {n: b["metrics"] for n, b in results["benchmarks"].items()}
    results["average"] = {
        "score": sum(b["score"] for b in results["benchmarks"].values()) / len(results["benchmarks"]),
        "metrics": macro_average(per),
        "kind": "macro (unweighted mean over benchmarks)",
    }
    return results, samples


def _run_benchmark(engine, tokenizer, name, settings, config, pool, scorer, log, group=None) -> tuple[dict, list[dict]]:
    start = time.monotonic()
    all_records = load_benchmark(name, limit=config.limit)
    rank, world = 0, 1
    if group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = list(range(rank, len(all_records), world))
    records = [all_records[i] for i in mine]
    template = get_template(settings.template)
    prompts = [template.render(r, tokenizer) for r in records]
    n = settings.n
    sampling = SamplingParams(
        n=1 if template.tool else n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        stop=template.stop,
        logprobs=False,
    )
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # responses[p][s], plus per-sample details
    responses: list[list[str]] = [[] for _ in records]
    details: list[list[dict]] = [[] for _ in records]
    calls = 0
    if template.tool:
        def generate(texts: list[str]) -> list[str]:
            nonlocal calls
            out: list[str] = []
            for i in range(0, len(texts), config.batch_size):
                params = dataclasses.replace(sampling, seed=config.seed + calls * world + rank)
                calls += 1
                out.extend(c.text for c in engine.generate([encode(t) for t in texts[i : i + config.batch_size]], params))
            return out

        flat = [p for p in prompts for _ in range(n)]
        log(f"[eval] {name}: tool-integrated generation for {len(flat)} trajectories")
        traces = run_tir_batch(flat, generate, config.tir)
        for j, trace in enumerate(traces):
            responses[j // n].append(trace.text)
            details[j // n].append({"executions": trace.num_executions, "finished": trace.finished,
                                    "exec_reasons": [r.reason for r in trace.executions]})
    else:
        for i in range(0, len(prompts), config.batch_size):
            params = dataclasses.replace(sampling, seed=config.seed + calls * world + rank)
            calls += 1
            batch = [encode(p) for p in prompts[i : i + config.batch_size]]
            log(f"[eval] {name}: generating {i + len(batch)}/{len(prompts)} prompts x {n}")
            for c in engine.generate(batch, params):
                p = i + c.prompt_index
                responses[p].append(c.text)
                details[p].append({"finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)})
    gen_time = time.monotonic() - start
    for p, r in enumerate(responses):
        assert len(r) == n, f"{name} problem {p}: {len(r)} responses, expected {n}"

    grades = pool.grade_batch([r for rs in responses for r in rs], [rec.answer for rec in records for _ in range(n)])
    scores = [list(map(float, s)) for s in scorer(records, responses)] if scorer is not None else None
    if world > 1:
        # every rank gets every problem's results, in benchmark order
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, (mine, responses, details, grades, scores), group=group)
        by_index: dict[int, tuple] = {}
        for idx, resp, det, grd, sc in parts:
            for k, i in enumerate(idx):
                by_index[i] = (resp[k], det[k], grd[k * n : (k + 1) * n], sc[k] if sc is not None else None)
        order = range(len(all_records))
        records = list(all_records)
        responses = [by_index[i][0] for i in order]
        details = [by_index[i][1] for i in order]
        grades = [g for i in order for g in by_index[i][2]]
        scores = [by_index[i][3] for i in order] if scorer is not None else None

    correct = [[g.correct for g in grades[p * n : (p + 1) * n]] for p in range(len(records))]
    extracted = [[g.extracted for g in grades[p * n : (p + 1) * n]] for p in range(len(records))]

    metrics: dict[str, float] = {}
    if settings.greedy and n == 1:
        primary = "pass@1"
        metrics["pass@1"] = accuracy(correct)
    else:
        primary = f"avg@{n}"
        metrics[primary] = avg_at_k(correct, n)
        for k in _pass_ks(n):
            metrics[f"pass@{k}"] = pass_at_k(correct, k)
        if n > 1:
            equiv = _equivalence(pool, extracted) if settings.grader == "math" else None
            metrics[f"maj@{n}"] = maj_at_k(extracted, correct, n, equiv)
    if scores is not None:
        metrics[f"rm@{n}"] = rm_at_k(scores, correct, n)

    finish = Counter(d.get("finish_reason", "tir") for ds in details for d in ds)
    tokens = [d["num_tokens"] for ds in details for d in ds if "num_tokens" in d]
    summary = {
        "num_problems": len(records),
        "settings": dataclasses.asdict(settings),
        "primary_metric": primary,
        "score": metrics[primary],
        "metrics": metrics,
        "finish_reasons": dict(finish),
        "mean_response_tokens": sum(tokens) / len(tokens) if tokens else None,
        "grade_reasons": dict(Counter(g.reason.split(":")[0] for g in grades)),
        "generation_time_s": gen_time,
        "time_s": time.monotonic() - start,
    }
    rows = []
    for p, rec in enumerate(records):
        for s in range(n):
            g = grades[p * n + s]
            row = {"benchmark": name, "id": rec.id, "sample": s, "answer": rec.answer, "response": responses[p][s],
                   "extracted": g.extracted, "correct": g.correct, "grade_reason": g.reason, **details[p][s]}
            if scores is not None:
                row["score"] = scores[p][s]
            rows.append(row)
    return summary, rows


def _pass_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def _equivalence(pool: GraderPool, extracted: list[list[str | None]]) -> Callable[[str, str], bool]:
    """is_equiv between extracted answers, computed in the grader pool (model output is hostile:
    sympy on it needs the pool's time and memory limits), for all ordered pairs of distinct
    answers within each problem."""
    pairs: list[tuple[str, str]] = []
    for answers in extracted:
        distinct = list(dict.fromkeys(a for a in answers if a is not None))
        pairs.extend((a, b) for a in distinct for b in distinct if a != b)
    pairs = list(dict.fromkeys(pairs))
    verdicts = pool.grade_batch([f"\\boxed{{{a}}}" for a, _ in pairs], [b for _, b in pairs]) if pairs else []
    table = {pair: v.correct for pair, v in zip(pairs, verdicts)}
    return lambda a, b: a == b or table.get((a, b), False)


# ----------------------------------------------------------------------------------------------
# output files


def render_markdown(results: dict) -> str:
    """A Markdown table: one row per benchmark, then the macro average; scores in percent."""
    lines = [
        f"# Evaluation of {results.get('model') or 'model'}",
        "",
        f"seed {results.get('seed')}, limit {results.get('limit')}, created {results.get('created')}",
        "",
        "| benchmark | problems | samples | temperature | template | metric | score (%) | other metrics (%) |",
        "|---|---:|---:|---:|---|---|---:|---|",
    ]
    for name, b in results["benchmarks"].items():
        s = b["settings"]
        others = ", ".join(f"{k} {100 * v:.1f}" for k, v in b["metrics"].items() if k != b["primary_metric"])
        lines.append(
            f"| {name} | {b['num_problems']} | {s['n']} | {s['temperature']:g} | {s['template']} | "
            f"{b['primary_metric']} | {100 * b['score']:.1f} | {others} |"
        )
    avg = results.get("average")
    if avg:
        lines.append(f"| **average (macro)** | | | | | | **{100 * avg['score']:.1f}** | |")
    lines.append("")
    return "\n".join(lines)


def write_results(results: dict, samples: list[dict] | None, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, results.md and (if samples) samples.jsonl in out_dir, each written to a
    temporary file and renamed, so a crash never leaves a half-written file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    if samples is not None:
        paths["samples"] = out / "samples.jsonl"
        atomic_write_text(paths["samples"], "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic_write_text(paths["json"], json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["markdown"], render_markdown(results))
    return paths
