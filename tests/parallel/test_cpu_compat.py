"""The CPU compatibility layer (megarl.parallel.cpu_compat) and process groups on CPU.

It patches torch for the whole process, so the checks run in child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_child(args: list[str], timeout: int = 300) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env, cwd=HERE.parent.parent)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"child timed out after {timeout}s:\n{out[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"child failed (exit {proc.returncode}):\n{out[-6000:]}")
    return out


def test_cpu_checks_in_child_process():
    run_child(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(HERE / "cpu_checks.py")])


def test_noop_when_cuda_is_available():
    """With CUDA present the layer must change nothing (here CUDA availability is faked)."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from megarl.parallel.cpu_compat import enable_cpu_compat, is_active\n"
        "assert enable_cpu_compat() == [] and not is_active()\n"
        "try:\n"
        "    torch.zeros(1, device='cuda')\n"
        "except (AssertionError, RuntimeError):\n"
        "    print('cuda still raises')\n"
        "assert torch.zeros(1).type() == 'torch.FloatTensor'\n"
    )
    assert "cuda still raises" in run_child(["-c", code])
