"""Benchmark loaders (every file in data/) and prompt templates."""

from __future__ import annotations

import json

import pytest

from megarl.eval.data import BENCHMARKS, Record, data_dir, last_boxed, load_benchmark, resolve_name
from megarl.eval.templates import ONE_SHOT_RLVR_SUFFIX, TEMPLATES, get_template

# Row counts from data/README.md.
COUNTS = {
    "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272, "olympiadbench": 675,
    "gsm8k_test": 1319, "gsm8k_train": 7473, "dsr_sub": 1209, "arith_train": 4000, "arith_test": 200,
}


def test_every_data_file_has_a_loader():
    covered = {spec.file for spec in BENCHMARKS.values()}
    on_disk = {str(p.relative_to(data_dir())) for p in data_dir().rglob("*.jsonl")}
    assert on_disk == covered


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_loader_counts_and_fields(name):
    records = load_benchmark(name)
    assert len(records) == COUNTS[name]
    assert all(isinstance(r, Record) and r.source == name for r in records)
    assert all(r.problem.strip() for r in records)
    # The source data has one row without an answer (dsr_sub index 265); it is kept as is.
    empty = [r.id for r in records if not r.answer.strip()]
    assert empty == (["265"] if name == "dsr_sub" else [])
    assert len({r.id for r in records}) == len(records)


def test_answers_by_hand():
    first = {name: load_benchmark(name, limit=1)[0] for name in COUNTS}
    assert first["math500"].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first["math500"].id == "test/precalculus/807.json"
    assert (first["aime24"].answer, first["aime24"].id) == ("204", "60")
    assert (first["aime25"].answer, first["aime25"].id) == ("70", "0")
    assert first["amc23"].answer == "27" and first["amc23"].extra["raw_answer"] == 27.0
    assert first["minerva_math"].answer == "1.6"  # last \boxed{} of the solution
    assert first["olympiadbench"].answer == "2" and first["olympiadbench"].problem.startswith("Xenia and Sergey")
    assert first["gsm8k_test"].answer == "18" and first["gsm8k_train"].answer == "72"
    assert (first["dsr_sub"].answer, first["dsr_sub"].id) == (r"\frac{3}{7}", "0")
    arith = first["arith_test"]
    assert arith.answer == "59" and arith.problem.startswith("What is 42 + 17?")
    assert arith.messages == [{"role": "user", "content": arith.problem}]
    # dsr_sub index 124 is the 1-shot RLVR example pi1 (answer 12.8).
    assert next(r for r in load_benchmark("dsr_sub") if r.id == "124").answer == "12.8"
    multi = [r.answer for r in load_benchmark("olympiadbench") if r.extra["is_multiple_answer"]]
    assert "69,84" in multi  # "$69$,$84$": the dollars are delimiters


def test_alias_limit_and_errors(tmp_path, monkeypatch):
    assert resolve_name("arith") == "arith_test"
    assert len(load_benchmark("arith", limit=3)) == 3
    with pytest.raises(ValueError, match="unknown benchmark 'math501'"):
        load_benchmark("math501")
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        load_benchmark("aime24", root=tmp_path)
    monkeypatch.setenv("MEGARL_DATA", str(tmp_path))
    (tmp_path / "aime25.jsonl").write_text(json.dumps({"problem": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"aime25.jsonl:1: missing field 'answer'"):
        load_benchmark("aime25")
    (tmp_path / "olympiadbench.jsonl").write_text(
        json.dumps({"id": 7, "question": "q", "final_answer": "['$1$', '$2$']"}) + "\n"
    )
    assert load_benchmark("olympiadbench")[0].answer == "1, 2"  # list stored as its repr
    (tmp_path / "gsm8k_test.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="gsm8k_test.jsonl:1: not valid JSON"):
        load_benchmark("gsm8k_test")


def test_record_is_frozen():
    r = Record("p", "1", "0", "x", {"k": [1]})
    with pytest.raises(AttributeError):
        r.answer = "2"
    with pytest.raises(TypeError):
        r.extra["k"] = 2
    with pytest.raises(ValueError, match="Record.answer"):
        Record("p", 1, "0", "x")


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("none") is None


def test_literal_templates():
    record = load_benchmark("aime24", limit=1)[0]
    cot = get_template("qwen25-math-cot").render(record)
    assert cot == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        f"<|im_start|>user\n{record.problem}<|im_end|>\n<|im_start|>assistant\n"
    )
    tir = get_template("qwen25-math-tir")
    assert tir.tool and "```output" in tir.stop
    assert tir.render(record).startswith(
        "<|im_start|>system\nPlease integrate natural language reasoning with programs to solve the problem above, "
        "and put your final answer within \\boxed{}.<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("cot")
    assert set(TEMPLATES) == {"qwen25-math-cot", "qwen25-math-tir", "one-shot-rlvr", "chat", "raw"}


def test_chat_templates_use_the_model_template():
    from transformers import AutoTokenizer

    from megarl.models.packaged import smollm2_hf_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_hf_dir()))
    arith = load_benchmark("arith_test", limit=1)[0]
    text = get_template("chat").render(arith, tok)
    assert text.endswith(f"<|im_start|>user\n{arith.problem}<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in text  # the model's default system prompt
    # data/README.md's reference run: every arith prompt is 56 tokens with this template.
    lengths = {len(tok(get_template("chat").render(r, tok), add_special_tokens=False)["input_ids"])
               for r in load_benchmark("arith_test", limit=20)}
    assert lengths == {56}
    dsr = load_benchmark("dsr_sub", limit=1)[0]
    rlvr = get_template("one-shot-rlvr").render(dsr, tok)
    assert f"{dsr.problem}{ONE_SHOT_RLVR_SUFFIX}<|im_end|>" in rlvr
    with pytest.raises(ValueError, match="chat template"):
        get_template("chat").render(arith, None)
