"""End to end: `megarl train` on the demo task at PP=2 over 2 gloo ranks, and a resumed run
that reproduces the uninterrupted one (checkpoint: model, optimizer, RNG, data position)."""

import json
import os
import subprocess
import sys

import pytest

DETERMINISTIC = ("reward/mean", "reward/accuracy", "response/length_mean", "actor/pg_loss",
                 "actor/entropy", "actor/clip_frac", "actor/grad_norm")


# demo_dir: the session fixture in conftest.py


def _train(tmp, run, *overrides):
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_cpu.yaml")
    cmd = [sys.executable, "-m", "megarl.cli", "train", recipe,
           f"model.hf_dir={tmp}/init", f"data.train={tmp}/data/train.jsonl", f"data.test={tmp}/data/test.jsonl",
           "data.test_limit=16", "data.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=4",
           "train.mini_batches=2", "parallel.tp=1", "parallel.pp=2", "train.eval_every=0",
           f"train.run_dir={tmp}/{run}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _metrics(path):
    return {row["step"]: row for row in map(json.loads, open(path))}


def test_train_then_resume_reproduces_uninterrupted_run(demo_dir):
    out = _train(demo_dir, "full", "train.steps=4", "train.save_every=0")
    assert out.strip().splitlines()[-1].startswith("accuracy before=")
    full = _metrics(demo_dir / "full" / "metrics.jsonl")
    assert sorted(full) == [1, 2, 3, 4]
    assert os.listdir(demo_dir / "full" / "tensorboard")
    assert (demo_dir / "full" / "recipe.resolved.yaml").is_file()

    _train(demo_dir, "split", "train.steps=2", "train.save_every=2")
    ckpts = os.listdir(demo_dir / "split" / "checkpoints")
    assert ckpts == ["step_000002"], ckpts
    out = _train(demo_dir, "split", "train.steps=4", "train.save_every=2", "train.keep_last=1")
    assert "resumed from" in out
    assert os.listdir(demo_dir / "split" / "checkpoints") == ["step_000004"]  # keep_last=1
    split = _metrics(demo_dir / "split" / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        for key in DETERMINISTIC:
            assert split[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)

    # rows with all-zero advantages left out of forward/backward: the same update
    assert min(row["actor/updated_frac"] for row in full.values()) < 1.0
    _train(demo_dir, "no_skip", "train.steps=1", "train.save_every=0", "train.skip_zero_advantage=false")
    no_skip = _metrics(demo_dir / "no_skip" / "metrics.jsonl")
    assert no_skip[1]["actor/updated_frac"] == 1.0
    for key in ("actor/grad_norm", "actor/pg_loss"):
        assert no_skip[1][key] == pytest.approx(full[1][key], rel=1e-4, abs=1e-7), key


def test_unknown_recipe_key_is_an_error_naming_it(demo_dir):
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_cpu.yaml")
    out = subprocess.run([sys.executable, "-m", "megarl.cli", "train", recipe, "optim.lrr=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "optim.lrr" in out.stderr and "did you mean 'lr'" in out.stderr


def test_separate_hf_engine_is_synced_and_verified_every_step(demo_dir):
    # PP=2 trainer -> one transformers engine per rank, through the WeightBridge after every update
    out = _train(demo_dir, "hf_engine", "train.steps=3", "train.save_every=0", "rollout.engine=hf",
                 "rollout.bridge.verify_every=1", "data.test_limit=8")
    assert "weights synced to the hf engine" in out
    rows = _metrics(demo_dir / "hf_engine" / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        assert row["sync/checksums_verified"] > 0 and row["time/sync"] > 0
        assert row["sync/probe_max_abs_diff"] <= 1e-3
    assert (demo_dir / "hf_engine" / "eval" / "step_000003" / "results.json").is_file()


def test_engine_sleep_needs_a_separate_engine():
    from megarl.trainers.config import RolloutConfig

    with pytest.raises(ValueError, match="sleep needs a separate engine"):
        RolloutConfig(sleep=True)
