"""The CPU compatibility layer (megarl.parallel.cpu_compat) and process groups on CPU.

It patches torch for the whole process, so the checks run in child processes."""

from __future__ import annotations

import sys
from pathlib import Path

from childproc import run_child


HERE = Path(__file__).parent


def run_python(args: list[str], timeout: int = 300) -> str:
    return run_child([sys.executable, *args], what="child", timeout=timeout, env={"PYTHONWARNINGS": "ignore"}).stdout


def test_cpu_checks_in_child_process():
    run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(HERE / "cpu_checks.py")])


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
    assert "cuda still raises" in run_python(["-c", code])
