"""Runs megatron_checks.py (builder, heads, loader, KV-cache decoding on one process) in a child
pytest process: init_parallel enables the CPU compatibility layer, which patches torch for the
whole process and must not leak into the rest of the session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_megatron_checks_in_child_process():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
           str(HERE / "megatron_checks.py")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=HERE.parent.parent)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"megatron checks timed out:\n{out[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"megatron checks failed (exit {proc.returncode}):\n{out[-8000:]}")
