"""Runs megatron_checks.py (builder, heads, loader, KV-cache decoding on one process) in a child
pytest process: init_parallel enables the CPU compatibility layer, which patches torch for the
whole process and must not leak into the rest of the session."""

from __future__ import annotations

import sys
from pathlib import Path

from childproc import run_child


HERE = Path(__file__).parent


def test_megatron_checks_in_child_process():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
           str(HERE / "megatron_checks.py")]
    run_child(cmd, what="megatron checks", timeout=600)
