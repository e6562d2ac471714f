"""Shared fixture of the trainer tests: the demo task (tiny Qwen2, character tokenizer) prepared
once per session."""

from __future__ import annotations

import pytest

from megarl.pipelines.demo import prepare


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    prepare(tmp, sft_steps=30, seed=0)
    return tmp
