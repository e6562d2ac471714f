"""The Python sandbox: captured output, limits, and containment of hostile snippets.

Each hostile snippet is run twice where the machine allows it: with every layer (the default),
and with the audit hook turned off, to show that the kernel layers below it hold on their own.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from megarl.rewards.sandbox import (
    SandboxConfig,
    _live_processes_of,
    isolation_report,
    run_python,
    run_python_batch,
)

FAST = SandboxConfig(timeout_s=10.0, cpu_time_s=2, print_last_expression=True)
NO_HOOK = SandboxConfig(timeout_s=10.0, cpu_time_s=2, audit_hook=False)


@pytest.fixture(scope="module")
def layers() -> dict:
    return isolation_report(NO_HOOK)


def test_output_exit_code_and_last_expression(tmp_path):
    code = "import sys\nprint('out')\nprint('err', file=sys.stderr)\nx = 6\nx * 7"
    r = run_python(code, SandboxConfig(print_last_expression=True, work_root=str(tmp_path)))
    assert (r.reason, r.exit_code, r.timed_out) == ("ok", 0, False)
    assert r.stdout == "out\n42\n"
    assert r.stderr == "err\n"
    r = run_python("import sys; sys.exit(3)", FAST)
    assert (r.reason, r.exit_code) == ("error", 3)
    # The working directory is private, writable, and gone afterwards.
    # tmp_path sits under pytest's 0700 directory: absolute paths into the workdir still work.
    code = "import os\nopen('a.txt', 'w').write('hi')\nopen(os.path.join(os.getcwd(), 'b'), 'w').close()\nprint(sorted(os.listdir('.')))"
    r = run_python(code, SandboxConfig(work_root=str(tmp_path)))
    assert r.reason == "ok" and r.stdout == "['a.txt', 'b']\n", r.stderr
    assert list(tmp_path.iterdir()) == []


def test_exception_traceback_shows_only_the_snippet():
    r = run_python("def f():\n    return 1 / 0\nf()", FAST)
    assert r.reason == "error" and r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert "sandbox.py" not in r.stderr and "<snippet>" in r.stderr


def test_numpy_and_sympy_work_inside():
    code = "import sympy, numpy\nx = sympy.Symbol('x')\nprint(sympy.solve(x**2 - 4, x), numpy.eye(2).sum())"
    r = run_python(code, SandboxConfig(timeout_s=30.0))
    assert r.reason == "ok", r.stderr
    assert r.stdout == "[-2, 2] 2.0\n"


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("MEGARL_TEST_SECRET", "hunter2")
    r = run_python("import os; print(os.environ.get('MEGARL_TEST_SECRET'))", FAST)
    assert r.stdout == "None\n"


def test_infinite_loop_hits_cpu_limit():
    r = run_python("while True:\n    pass", SandboxConfig(timeout_s=20.0, cpu_time_s=1))
    assert r.timed_out and r.reason == "cpu_time"
    assert r.duration_s < 15


def test_sleep_hits_wall_clock_limit():
    r = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)", SandboxConfig(timeout_s=1.0))
    assert r.timed_out and r.reason == "timeout"
    assert r.stdout == "started\n"
    assert r.duration_s < 5


@pytest.mark.parametrize("config", [FAST, NO_HOOK], ids=["all_layers", "no_audit_hook"])
def test_10gb_allocation_fails_cleanly(config):
    r = run_python("x = bytearray(10 * 2**30)\nprint('allocated')", config)
    assert r.reason == "memory"
    assert "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_output_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", SandboxConfig(timeout_s=10.0, max_output_bytes=5000))
    assert r.reason == "output_limit" and r.truncated
    assert len(r.stdout) == 5000 and set(r.stdout) == {"x", "\n"}
    assert r.duration_s < 5


def test_fork_bomb_is_blocked_by_the_hook():
    r = run_python("import os\nwhile True:\n    os.fork()", FAST)
    assert r.reason == "blocked"
    assert "os.fork is not allowed" in r.stderr


def test_fork_bomb_is_bounded_without_the_hook(layers):
    if not layers.get("nproc_enforced"):
        pytest.skip(f"RLIMIT_NPROC is not enforceable here: {layers}")
    config = SandboxConfig(timeout_s=2.0, cpu_time_s=1, max_processes=8, audit_hook=False)
    # A bounded probe first: if the limit did not hold, this creates 40 sleepers, not a storm.
    probe = (
        "import os, time\nn = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(1)\n        os._exit(0)\n"
        "    n += 1\nprint(n)"
    )
    r = run_python(probe, config)
    assert r.reason == "ok", r.stderr
    assert int(r.stdout) < 8
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(bomb, config)
    assert r.timed_out
    uid = r.layers.get("uid")
    if isinstance(uid, int):
        assert _live_processes_of(uid) == []  # every forked process was killed with the run


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    return server


@pytest.mark.parametrize("config", [FAST, NO_HOOK], ids=["all_layers", "no_audit_hook"])
def test_network_is_unreachable(config, layers):
    if not config.audit_hook and "netns" not in layers:
        pytest.skip(f"no network namespace here: {layers}")
    server = _listener()
    port = server.getsockname()[1]
    try:
        for address in [("127.0.0.1", port), ("1.1.1.1", 80)]:
            code = f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect({address!r})\nprint('connected')"
            r = run_python(code, config)
            assert r.reason in ("blocked", "error"), (address, r)
            assert "connected" not in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()  # nobody reached the listener
    finally:
        server.close()


@pytest.mark.parametrize("config", [FAST, NO_HOOK], ids=["all_layers", "no_audit_hook"])
def test_write_outside_workdir_is_refused(config, layers):
    if not config.audit_hook and "readonly_mounts" not in layers:
        pytest.skip(f"no mount namespace here: {layers}")
    target = Path("/tmp/outside-xyz")
    if target.exists():
        target.unlink()
    other = Path(f"/tmp/outside-xyz-{uuid.uuid4().hex}")
    code = (
        "import os\n"
        "for path in ['/tmp/outside-xyz', '../outside-xyz', os.path.expanduser('~/../outside')]:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as e:\n        print('refused', type(e).__name__)\n"
        f"os.symlink({str(other)!r}, 'link')\nopen('link', 'w').write('x')\n"
    )
    r = run_python(code, config)
    assert "wrote" not in r.stdout
    assert r.stdout.count("refused") == 3
    assert r.reason in ("blocked", "error")
    assert not target.exists() and not other.exists()


def test_batch_keeps_order():
    results = run_python_batch([f"print({i} * {i})" for i in range(5)], FAST, max_workers=2)
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(5)]


def test_config_is_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="isolation"):
        SandboxConfig(isolation="maybe")
    with pytest.raises(ValueError, match="code must be a str"):
        run_python(b"print(1)")
