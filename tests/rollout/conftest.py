"""One 4-rank launch (launch_script.py) for every test of tests/rollout that needs megatron's
parallel state, shared by test_megatron_engine.py and test_bridge.py. Nothing here calls
init_parallel in the pytest process: that would switch megarl's CPU compatibility layer for
megatron-core on for the rest of the session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from childproc import run_child

HERE = Path(__file__).parent
LAUNCH_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def rollout_launch(tmp_path_factory) -> Path:
    """OUT_DIR of the launch: megatron_engine.json and bridge/results.json."""
    out = tmp_path_factory.mktemp("rollout-launch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(HERE / "launch_script.py"), str(out)]
    run_child(cmd, what="launch_script.py", timeout=LAUNCH_TIMEOUT_S, env={"OMP_NUM_THREADS": "1"})
    return out
