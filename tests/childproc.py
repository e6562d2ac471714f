"""Running a check in a child process, for the tests that must not touch the pytest process
(megatron-core under megarl's CPU compatibility layer patches torch for the whole process;
torchrun launches; vLLM). On pytest's path through `pythonpath = ["tests"]` (pyproject.toml):

    from childproc import run_child
    from childproc import check_record
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_child(cmd: list[str], *, what: str, timeout: float, env: dict[str, str] | None = None,
              merge_stderr: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """Run cmd (from the repository root) in a process group of its own and return its
    CompletedProcess (stderr folded into stdout with merge_stderr).

    On timeout the whole group gets SIGTERM (torchrun then stops its workers, which are not in
    its process group), 60 s later SIGKILL, and the test fails naming `what` with the end of
    the output; with check, a non-zero exit fails it too. Whatever the child left behind in its
    group (a rank that outlived a dead one, multiprocessing helpers) is killed at the end.
    env: variables added to this process's environment.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                out, err = proc.communicate()
            pytest.fail(f"{what} timed out after {timeout:g} s:\n{out[-6000:]}\n{(err or '')[-3000:]}")
    finally:
        _kill_group(proc, signal.SIGKILL)
    if check and proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{out[-8000:]}\n{(err or '')[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_record(records: dict, name: str, script: str) -> dict:
    """The record of one check a child script ran (records["single"][name]); the test fails
    with the child's traceback if the check crashed there, or says which checks did run."""
    result = records["single"].get(name)
    assert result is not None, f"check {name!r} did not run (ranks ran {sorted(records['single'])})"
    if "crashed" in result:
        pytest.fail(f"check {name!r} raised in {script}:\n{result['crashed']}")
    return result
