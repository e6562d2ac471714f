"""One 4-rank launch (launch_script.py) for every test of tests/rollout that needs megatron's
parallel state, shared by test_megatron_engine.py and test_bridge.py. Nothing here calls
init_parallel in the pytest process: that would switch megarl's CPU compatibility layer for
megatron-core on for the rest of the session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LAUNCH_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def rollout_launch(tmp_path_factory) -> Path:
    """OUT_DIR of the launch: megatron_engine.json and bridge/results.json."""
    out = tmp_path_factory.mktemp("rollout-launch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(HERE / "launch_script.py"), str(out)]
    proc = subprocess.Popen(cmd, cwd=HERE.parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun then stops its workers (they do not share its process group)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"launch_script.py timed out after {LAUNCH_TIMEOUT_S} s:\n{log[-8000:]}")
    if proc.returncode != 0:
        pytest.fail(f"launch_script.py failed ({proc.returncode}):\n{log[-8000:]}")
    return out
