"""`megarl eval` end to end on a tiny random model, and the runner's metrics/grading/TIR wiring
with a scripted engine (a test double whose answers, and so the expected metrics, are known)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megarl.cli import main as cli_main
from megarl.eval.runner import EvalConfig, render_markdown, run_eval, write_results
from megarl.rewards.grader import GraderConfig
from megarl.rollout.engine import Completion

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GRADER = GraderConfig(num_workers=1, timeout_s=10.0)


def make_tiny_model(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megarl.models.packaged import smollm2_hf_dir

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_hf_dir() / name, path / name)
    return path


def test_cli_end_to_end(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    rc = cli_main([
        "eval", "--model", str(model), "--benchmarks", "math500,aime24,arith", "--limit", "2",
        "--n", "2", "--max-new-tokens", "4", "--out", str(out), "--grader-workers", "1",
    ])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == ["math500", "aime24", "arith_test"]
    for name, b in results["benchmarks"].items():
        assert b["num_problems"] == 2 and b["settings"]["n"] == 2 and b["settings"]["max_new_tokens"] == 4
        assert 0.0 <= b["score"] <= 1.0 and b["primary_metric"] in b["metrics"]
        assert sum(b["finish_reasons"].values()) == 4
    # Per-benchmark defaults survive where not overridden.
    assert results["benchmarks"]["math500"]["settings"]["temperature"] == 0.0
    assert results["benchmarks"]["aime24"]["settings"]["temperature"] == 0.6
    assert results["benchmarks"]["arith_test"]["settings"]["template"] == "chat"
    assert set(results["benchmarks"]["aime24"]["metrics"]) == {"avg@2", "pass@1", "pass@2", "maj@2"}
    assert results["average"]["kind"].startswith("macro")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 * 2
    assert {s["benchmark"] for s in samples} == {"math500", "aime24", "arith_test"}
    assert all(s["num_tokens"] <= 4 for s in samples)
    table = (out / "results.md").read_text()
    assert "| math500 | 2 | 2 |" in table and "average (macro)" in table
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "results.md" in capsys.readouterr().out


def test_cli_reads_megarl_checkpoints(tmp_path):
    from megarl.models.convert import hf_to_mcore_dir

    model = make_tiny_model(tmp_path / "tiny")
    hf_to_mcore_dir(model, tmp_path / "mcore", tp=2, pp=1, progress=False)
    for source in ("tiny", "mcore"):
        argv = ["eval", "--model", str(tmp_path / source), "--benchmarks", "math500", "--limit", "2",
                "--max-new-tokens", "3", "--out", str(tmp_path / f"out-{source}"), "--grader-workers", "1"]
        assert cli_main(argv) == 0
    hf, mcore = ([json.loads(line)["response"] for line in (tmp_path / f"out-{s}" / "samples.jsonl").read_text().splitlines()]
                 for s in ("tiny", "mcore"))
    assert hf == mcore  # the same greedy tokens from the TP=2 checkpoint as from the HF weights
    assert json.loads((tmp_path / "out-mcore" / "results.json").read_text())["model_format"].startswith("megarl")


def test_cli_rejects_bad_inputs(tmp_path, capsys):
    ckpt = tmp_path / "some_ckpt"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"")
    assert cli_main(["eval", "--model", str(ckpt), "--benchmarks", "math500"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "Hugging Face model directory" in err and "megarl_checkpoint.json" in err
    assert cli_main(["eval", "--model", str(tmp_path / "missing"), "--benchmarks", "math500"]) == 2
    assert "no such directory" in capsys.readouterr().err
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert cli_main(["eval", "--model", str(model), "--benchmarks", "math5000"]) == 2
    assert "unknown benchmark 'math5000'" in capsys.readouterr().err
    assert cli_main(["eval", "--model", str(model), "--benchmarks", "aime24", "--template", "nope"]) == 2
    assert "unknown prompt template" in capsys.readouterr().err


class CharTokenizer:
    """Characters as token ids, so the scripted engine can read the prompts it is sent."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class ScriptedEngine:
    """Answers by what the prompt contains, sample by sample."""

    def __init__(self, script):
        self.script = script  # (prompt text, sample index) -> completion text
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append(sampling)
        out = []
        for p, ids in enumerate(prompts):
            text = "".join(map(chr, ids))
            for s in range(sampling.n):
                reply = self.script(text, s)
                out.append(Completion(p, [ord(c) for c in reply], reply, None, "stop"))
        return out


def test_runner_metrics_grading_and_majority():
    # aime24 problems 0 and 1 (answers 204 and 25), 4 samples each.
    replies = {
        "204": [r"\boxed{7}", r"\boxed{204}", r"\boxed{\frac{408}{2}}", r"\boxed{5}"],
        "other": [r"\boxed{1}"] * 4,
    }

    def script(prompt, s):
        return replies["204" if "Aya" in prompt else "other"][s]

    engine = ScriptedEngine(script)
    config = EvalConfig(benchmarks=("aime24",), limit=2, n=4, grader=GRADER, seed=5)
    results, samples = run_eval(engine, CharTokenizer(), config, model="scripted")
    m = results["benchmarks"]["aime24"]["metrics"]
    assert m["avg@4"] == pytest.approx(0.25)  # (2/4 + 0/4) / 2
    assert m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6) / 2)  # 1 - C(2,2)/C(4,2) for problem 0
    assert m["pass@4"] == pytest.approx(0.5)
    # 204 and 408/2 form one group only through the grader's equivalence: majority is right.
    assert m["maj@4"] == pytest.approx(0.5)
    assert [s["correct"] for s in samples[:4]] == [False, True, True, False]
    assert engine.calls[0].temperature == 0.6 and engine.calls[0].seed == 5
    assert engine.calls[0].max_new_tokens == 3072
    assert results["average"]["score"] == pytest.approx(0.25)
    # RM@k from given scores: the scorer prefers sample 2 of problem 0 (correct) and 0 of problem 1.
    scorer = lambda records, responses: [[0.1, 0.2, 0.9, 0.0], [1.0, 0.0, 0.0, 0.0]]  # noqa: E731
    results, _ = run_eval(ScriptedEngine(script), CharTokenizer(), config, scorer=scorer)
    assert results["benchmarks"]["aime24"]["metrics"]["rm@4"] == pytest.approx(0.5)


def test_runner_tir_executes_code():
    # gsm8k_test problem 0 (answer 18), solved with one program run.
    def script(prompt, s):
        if "```output\n18\n```" in prompt:
            return "So she makes \\boxed{18} dollars."
        return "Let me compute.\n```python\nprint((16 - 3 - 4) * 2)\n```\n```output"

    engine = ScriptedEngine(script)
    config = EvalConfig(benchmarks=("gsm8k_test",), limit=1, template="qwen25-math-tir", grader=GRADER)
    results, samples = run_eval(engine, CharTokenizer(), config)
    assert results["benchmarks"]["gsm8k_test"]["metrics"] == {"pass@1": 1.0}
    assert samples[0]["executions"] == 1 and samples[0]["finished"]
    assert samples[0]["response"].endswith("```output\n18\n```\nSo she makes \\boxed{18} dollars.")
    assert "```output" in engine.calls[0].stop


def test_write_results_is_atomic_and_readable(tmp_path):
    results = {
        "model": "m", "seed": 0, "limit": None, "created": "now",
        "benchmarks": {"math500": {"num_problems": 1, "settings": {"n": 1, "temperature": 0.0, "template": "t"},
                                   "primary_metric": "pass@1", "score": 0.5, "metrics": {"pass@1": 0.5}}},
        "average": {"score": 0.5},
    }
    paths = write_results(results, [{"a": 1}], tmp_path)
    assert json.loads(paths["json"].read_text()) == results
    assert paths["samples"].read_text() == '{"a": 1}\n'
    assert "| math500 | 1 | 1 | 0 | t | pass@1 | 50.0 |" in render_markdown(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "samples.jsonl"]


def _arith_script(prompt, s):
    # right on even left operands, off by one otherwise
    a, b = (int(x) for x in prompt.split("+"))
    return f"= {a + b + (a % 2)}"


def _sharded_eval(rank, world, port, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        config = EvalConfig(benchmarks=(str(path),), template="raw", verifier="last_integer", grader=GRADER,
                            batch_size=2, max_new_tokens=8)
        results, samples = run_eval(ScriptedEngine(_arith_script), CharTokenizer(), config,
                                    process_group=dist.group.WORLD)
        torch.save((results["benchmarks"][str(path)]["metrics"], samples), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_runner_jsonl_file_raw_template_and_data_parallel(tmp_path):
    import torch.multiprocessing as mp

    from megarl.parallel.groups import free_port

    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a + 1}", "answer": 2 * a + 1}) + "\n" for a in range(7)))
    config = EvalConfig(benchmarks=(str(path),), template="raw", verifier="last_integer", grader=GRADER,
                        batch_size=2, max_new_tokens=8)
    engine = ScriptedEngine(_arith_script)
    results, samples = run_eval(engine, CharTokenizer(), config)
    assert results["benchmarks"][str(path)]["metrics"] == {"pass@1": pytest.approx(4 / 7)}  # a = 0, 2, 4, 6
    assert engine.calls[0].temperature == 0.0 and engine.calls[0].max_new_tokens == 8
    assert [s["correct"] for s in samples] == [a % 2 == 0 for a in range(7)]
    # two data-parallel ranks: each generates half the problems; both return the unsharded results
    mp.spawn(_sharded_eval, args=(2, free_port(), path, str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        metrics, sharded = torch.load(tmp_path / f"out.{rank}")
        assert metrics == results["benchmarks"][str(path)]["metrics"]
        assert sharded == samples


def test_eval_config_rejects_unknown_benchmark_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'.*jsonl"):
        EvalConfig(benchmarks=("math5000",))
    from megarl.eval.data import load_benchmark

    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
