"""Run untrusted Python snippets (model-written code) in a contained subprocess.

    result = run_python("print(2 + 2)", SandboxConfig(timeout_s=5))
    result.stdout == "4\\n", result.reason == "ok"

Each snippet runs in a fresh `python -I -B` process that starts from this very file (its
`__main__` block is the child side), sets up the containment, then executes the snippet. The
layers, strongest first (docs/sandbox.md says what each one does and does not stop):

1. kernel namespaces (when the kernel lets us create them): a new network namespace (no
   interfaces but a down loopback: every connect fails), a new mount namespace in which every
   mount is re-mounted read-only and the working directory is a fresh size-capped tmpfs;
2. as root: a throwaway unprivileged uid per run (1e9 + child pid), so file permissions,
   RLIMIT_NPROC (the fork-bomb limit, which the kernel does not apply to root) and signal
   permissions hold; no_new_privs;
3. resource limits: CPU seconds, address space, file size, open files, processes, no core;
4. a CPython audit hook that refuses fork/exec/subprocess, sockets, ctypes calls, rlimit
   changes, signals and any write outside the working directory;
5. the parent: a wall-clock deadline, an output cap, then SIGKILL to the whole process group and
   to every process left with the run's uid.

Where a layer is unavailable the others still apply; `SandboxResult.layers` reports what was
active, and `isolation="strict"` turns a missing kernel layer into a setup error.
This module imports only the standard library: it is also the child's bootstrap.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

# Exit statuses the child uses to say why it stopped (anything else is the snippet's own).
EXIT_MEMORY = 120
EXIT_BLOCKED = 121
EXIT_SETUP = 125

# Far above any real account's uid; one per run, derived from the child's pid so concurrent
# sandboxes never share a uid (and so never share a process count).
UID_BASE = 1_000_000_000

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one snippet.

    timeout_s: wall-clock seconds before the whole process group is killed.
    cpu_time_s: RLIMIT_CPU (SIGXCPU at the limit, SIGKILL one second later).
    memory_mb: RLIMIT_AS, the address-space cap (a 10 GB allocation fails with MemoryError).
    max_output_bytes: stdout and stderr are each cut at this many bytes; the run is killed
        as soon as either goes over.
    max_processes: RLIMIT_NPROC for the run's uid (threads count too).
    max_file_bytes: RLIMIT_FSIZE, the largest file the snippet may write.
    max_open_files: RLIMIT_NOFILE.
    workdir_mb: size of the tmpfs working directory (mount namespace only).
    isolation: "auto" uses every kernel layer the machine allows; "strict" fails the run
        (reason "setup_error") when a namespace or the uid drop is unavailable; "none" skips
        namespaces and the uid drop (rlimits, audit hook and parent kill only).
    audit_hook: install the audit hook (turn off only to test the layers below it).
    print_last_expression: print the value of a final bare expression, as a notebook does
        (the Qwen2.5-Math executor's convention for tool-integrated reasoning).
    python: the interpreter to run (default: this one, so numpy/sympy from this venv import).
    work_root: where the temporary working directory is made (default: tempfile's).
    """

    timeout_s: float = 10.0
    cpu_time_s: int = 5
    memory_mb: int = 1024
    max_output_bytes: int = 64 * 1024
    max_processes: int = 16
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 256
    workdir_mb: int = 64
    isolation: Literal["auto", "strict", "none"] = "auto"
    audit_hook: bool = True
    print_last_expression: bool = False
    python: str | None = None
    work_root: str | None = None

    def __post_init__(self) -> None:
        positive = {
            "timeout_s": self.timeout_s,
            "cpu_time_s": self.cpu_time_s,
            "memory_mb": self.memory_mb,
            "max_output_bytes": self.max_output_bytes,
            "max_processes": self.max_processes,
            "max_file_bytes": self.max_file_bytes,
            "max_open_files": self.max_open_files,
            "workdir_mb": self.workdir_mb,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {value!r}")
        if self.max_open_files < 16:
            raise ValueError(f"SandboxConfig.max_open_files must be >= 16 (the interpreter needs some), got {self.max_open_files}")
        if self.isolation not in ("auto", "strict", "none"):
            raise ValueError(f"SandboxConfig.isolation must be 'auto', 'strict' or 'none', got {self.isolation!r}")


@dataclass
class SandboxResult:
    """What a snippet did.

    exit_code: the child's status (negative: killed by that signal, as in subprocess).
    timed_out: the wall-clock or the CPU-time limit ended it.
    reason: "ok", "error" (an exception or a non-zero exit), "timeout", "cpu_time", "memory",
        "blocked" (the audit hook refused something and the snippet did not catch it),
        "output_limit", "killed" (SIGKILL we did not send: the hard CPU limit or the OOM
        killer), "setup_error".
    truncated: stdout or stderr was cut at max_output_bytes.
    layers: the containment that was active (see module docstring).
    """

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    reason: str
    truncated: bool = False
    duration_s: float = 0.0
    layers: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# parent side


def run_python(code: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `code` in a new contained interpreter and return its captured output."""
    import selectors
    import shutil
    import subprocess
    import tempfile
    import time

    if not isinstance(code, str):
        raise ValueError(f"run_python: code must be a str, got {type(code).__name__}")
    workdir = tempfile.mkdtemp(prefix="megarl-sbx-", dir=config.work_root)
    spec = {
        "workdir": os.path.realpath(workdir),
        "cpu_time_s": config.cpu_time_s,
        "memory_mb": config.memory_mb,
        "max_processes": config.max_processes,
        "max_file_bytes": config.max_file_bytes,
        "max_open_files": config.max_open_files,
        "workdir_mb": config.workdir_mb,
        "isolation": config.isolation,
        "audit_hook": config.audit_hook,
        "print_last_expression": config.print_last_expression,
    }
    env = {
        "PATH": _SAFE_PATH,
        "HOME": spec["workdir"],
        "TMPDIR": spec["workdir"],
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # One thread each: BLAS pools would otherwise eat the process budget and the CPU.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    status_r, status_w = os.pipe()
    spec["status_fd"] = status_w
    argv = [config.python or sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(spec)]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
            pass_fds=(status_w,),
        )
    except BaseException:
        os.close(status_r)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        os.close(status_w)

    cap = config.max_output_bytes
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": [], "status": []}
    sizes = {"stdout": 0, "stderr": 0, "status": 0}
    truncated = overflow = timed_out = False
    pending = code.encode("utf-8")
    sel = selectors.DefaultSelector()
    try:
        status_file = os.fdopen(status_r, "rb", buffering=0)
        for name, f in (("stdout", proc.stdout), ("stderr", proc.stderr), ("status", status_file)):
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ, name)
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
        deadline = start + config.timeout_s
        open_readers = 3
        while open_readers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                name = key.data
                if name == "stdin":
                    try:
                        sent = os.write(key.fd, pending[: 1 << 16])
                        pending = pending[sent:]
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, OSError):
                        pending = b""
                    if not pending:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
                    continue
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fileobj)
                    open_readers -= 1
                    continue
                keep = max(0, cap - sizes[name]) if name != "status" else len(data)
                chunks[name].append(data[:keep])
                sizes[name] += len(data)
                if name != "status" and sizes[name] > cap:
                    truncated = overflow = True
            if overflow:
                break
        if not (timed_out or overflow):
            # Output closed; the snippet may still be running (it can close its own stdout).
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        status = _parse_status(b"".join(chunks["status"]))
        _kill_run(proc.pid, status.get("layers", {}))
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr, status_file):
            try:
                f.close()
            except (OSError, ValueError):
                pass
        proc.wait()
        _rmtree(workdir)
    duration = time.monotonic() - start

    stdout = b"".join(chunks["stdout"]).decode("utf-8", errors="replace")
    stderr = b"".join(chunks["stderr"]).decode("utf-8", errors="replace")
    rc = proc.returncode
    if "error" in status:
        reason = "setup_error"
        stderr = f"megarl sandbox setup failed: {status['error']}\n{stderr}"
    elif overflow:
        reason = "output_limit"
    elif timed_out:
        reason = "timeout"
    elif rc == -signal.SIGXCPU:
        reason, timed_out = "cpu_time", True
    elif rc == -signal.SIGKILL:
        # Not ours: the hard RLIMIT_CPU (soft + 1 s, when SIGXCPU was ignored) or the OOM killer.
        reason = "killed"
    elif rc == EXIT_MEMORY:
        reason = "memory"
    elif rc == EXIT_BLOCKED:
        reason = "blocked"
    elif rc == EXIT_SETUP:
        reason = "setup_error"
    elif rc == 0:
        reason = "ok"
    else:
        reason = "error"
    return SandboxResult(
        stdout=stdout,
        stderr=stderr,
        exit_code=rc,
        timed_out=timed_out,
        reason=reason,
        truncated=truncated,
        duration_s=duration,
        layers=status.get("layers", {}),
    )


def run_python_batch(
    codes: Sequence[str], config: SandboxConfig = SandboxConfig(), max_workers: int | None = None
) -> list[SandboxResult]:
    """run_python over many snippets, a few at a time (each is its own process); order kept."""
    from concurrent.futures import ThreadPoolExecutor

    if not codes:
        return []
    workers = max_workers or min(len(codes), os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"run_python_batch: max_workers must be >= 1, got {max_workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run_python(c, config), codes))


def isolation_report(config: SandboxConfig = SandboxConfig()) -> dict:
    """Which containment layers a run gets on this machine (runs one trivial snippet)."""
    result = run_python("pass", config)
    return dict(result.layers, reason=result.reason)


def _parse_status(raw: bytes) -> dict:
    try:
        status = json.loads(raw.decode("utf-8")) if raw else {}
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def _kill_run(pid: int, layers: dict) -> None:
    """SIGKILL the run's process group and, if it had its own uid, every process of that uid."""
    import time

    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    uid = layers.get("uid")
    if not isinstance(uid, int) or uid < UID_BASE:
        return
    # A snippet that escaped the hook could setsid() out of the group; its uid still marks it.
    # Sweep until nothing of that uid is alive (a fork racing the first sweep is caught next).
    for _ in range(200):
        alive = _live_processes_of(uid)
        if not alive:
            return
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _live_processes_of(uid: int) -> list[int]:
    """Pids whose real uid is `uid`, zombies excluded (they are dead, awaiting their reaper)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if b":" in line)
        except OSError:
            continue
        state = fields.get(b"State", b"").split()
        uids = fields.get(b"Uid", b"").split()
        if uids and int(uids[0]) == uid and state[:1] not in ([b"Z"], [b"X"]):
            pids.append(int(entry.name))
    return pids


def _rmtree(path: str) -> None:
    import shutil
    import stat

    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


# ----------------------------------------------------------------------------------------------
# child side (runs as __main__ in the sandboxed interpreter)


class SandboxViolation(PermissionError):
    """Raised by the audit hook for an operation the sandbox refuses."""


class _SetupError(Exception):
    pass


_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME = 32, 1024, 2048
_MS_BIND, _MS_REC, _MS_PRIVATE, _MS_RELATIME = 4096, 16384, 1 << 18, 1 << 21
_MOUNT_OPTION_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": 1 << 24,
}
_PR_SET_NO_NEW_PRIVS = 38


def _child_main() -> None:
    spec = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    layers: dict = {}
    try:
        _contain(spec, layers)
    except Exception as e:  # noqa: BLE001 - any setup failure must reach the parent
        _report_status(spec["status_fd"], {"error": str(e), "layers": layers})
        os._exit(EXIT_SETUP)
    _report_status(spec["status_fd"], {"layers": layers})
    if spec["audit_hook"]:
        _install_audit_hook(os.getcwd())
    sys.argv = [""]
    os._exit(_run_snippet(code, spec["print_last_expression"]))


def _report_status(fd: int, status: dict) -> None:
    os.write(fd, json.dumps(status).encode("utf-8"))
    os.close(fd)


def _contain(spec: dict, layers: dict) -> None:
    """Namespaces, read-only mounts, tmpfs workdir, rlimits, uid drop: in that order."""
    import resource

    workdir = spec["workdir"]
    strict = spec["isolation"] == "strict"
    is_root = os.geteuid() == 0
    libc = None
    namespaces = False
    if spec["isolation"] != "none":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        try:
            _enter_namespaces(libc, is_root)
            namespaces = True
            layers["netns"] = os.readlink("/proc/self/ns/net")
        except OSError as e:
            layers["namespaces"] = f"unavailable: {e}"
            if strict:
                raise _SetupError(f"isolation='strict' but namespaces are unavailable: {e}") from e
    uid = UID_BASE + os.getpid()
    drop_uid = is_root and spec["isolation"] != "none"
    if namespaces:
        if drop_uid:
            # The new uid cannot search 0700 directories such as /root, where the interpreter
            # may live (or pytest's temporary root): show just the paths the run needs.
            layers["exposed"] = _expose_paths(libc, _python_paths() + [workdir])
        failed = _remount_all_readonly(libc)
        layers["readonly_mounts"] = "all" if not failed else f"all but {failed}"
        if failed and strict:
            raise _SetupError(f"could not make these mounts read-only: {failed}")
        owner = f",uid={uid},gid={uid}" if drop_uid else ""
        _mount(libc, "tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={spec['workdir_mb']}m,mode=0700{owner}")
        layers["workdir"] = f"tmpfs {spec['workdir_mb']}m"
    elif drop_uid:
        drop_uid = _readable_by_others(_python_paths())
        if not drop_uid:
            layers["uid"] = "root (the interpreter is not readable by other users and there is no mount namespace)"
            if strict:
                raise _SetupError("isolation='strict' but the uid cannot be dropped")
        else:
            os.chown(workdir, uid, uid)
    os.chdir(workdir)

    limits = {
        resource.RLIMIT_CPU: (spec["cpu_time_s"], spec["cpu_time_s"] + 1),
        resource.RLIMIT_AS: (spec["memory_mb"] << 20,) * 2,
        resource.RLIMIT_FSIZE: (spec["max_file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (spec["max_open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    nproc = spec["max_processes"]
    if not drop_uid and not is_root and not namespaces:
        # Without a uid or user namespace of its own the count includes all our processes.
        nproc += _count_processes(os.getuid())
    limits[resource.RLIMIT_NPROC] = (nproc, nproc)
    for which, value in limits.items():
        resource.setrlimit(which, value)
    if drop_uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        layers["uid"] = uid
    elif is_root and not layers.get("uid"):
        layers["uid"] = "root"
    layers["nproc_enforced"] = not (is_root and not drop_uid)
    if libc is not None:
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if namespaces and not is_root:
            _drop_capabilities(libc)


def _enter_namespaces(libc, is_root: bool) -> None:
    import ctypes

    flags = _CLONE_NEWNS | _CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    if not is_root:
        flags |= _CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")
    if not is_root:
        # Map ourselves to ourselves so files we create (the tmpfs workdir) have an owner.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    import ctypes

    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, per-mount options) for every mount visible to this process."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for spaces, etc.
            out.append((point, fields[5]))
    return out


def _remount_all_readonly(libc) -> list[str]:
    """Make every mount read-only; return the reachable mount points that stayed writable."""
    for point, options in _mountinfo():
        opts = options.split(",")
        if "ro" in opts:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for opt in opts:
            flags |= _MOUNT_OPTION_FLAGS.get(opt, 0)
        try:
            _mount(libc, None, point, None, flags)
        except OSError:
            pass
    # Later entries for the same point are stacked on top: only the topmost one is reachable.
    top = dict(_mountinfo())
    return sorted(p for p, o in top.items() if "ro" not in o.split(",") and os.path.exists(p))


def _python_paths() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.update(p for p in sys.path if p)
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


def _blocked_ancestor(path: str) -> tuple[str, str] | None:
    """The first directory on the way to `path` that others cannot traverse, and its child."""
    import stat

    parts = path.strip("/").split("/")
    current = "/"
    for part in parts:
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current, part
        current = os.path.join(current, part)
    return None


def _readable_by_others(paths: list[str]) -> bool:
    return all(_blocked_ancestor(p) is None for p in paths)


def _expose_paths(libc, paths: list[str]) -> list[str]:
    """Make `paths` reachable for any uid: over each directory on the way that others cannot
    search, mount a tmpfs holding bind mounts of just the entries on those paths."""
    exposed = []
    for _ in range(16):
        blocked: dict[str, set[str]] = {}
        for p in paths:
            hit = _blocked_ancestor(p)
            if hit:
                blocked.setdefault(hit[0], set()).add(hit[1])
        if not blocked:
            return exposed
        for ancestor, children in blocked.items():
            fds = {c: os.open(os.path.join(ancestor, c), os.O_PATH) for c in children}
            _mount(libc, "tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
            for child, fd in fds.items():
                target = os.path.join(ancestor, child)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(target)
                else:
                    open(target, "w").close()
                _mount(libc, f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
                os.close(fd)
                exposed.append(target)
    raise _SetupError(f"could not make these paths reachable: {paths}")


def _count_processes(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _drop_capabilities(libc) -> None:
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    sys_capset = 126  # x86_64 and aarch64 differ; only the x86_64 number is used here
    import platform

    if platform.machine() == "aarch64":
        sys_capset = 91
    if libc.syscall(sys_capset, ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _install_audit_hook(workdir: str) -> None:
    """Refuse process creation, sockets, foreign calls and writes outside `workdir`.

    Everything the hook uses is bound here, so a snippet that monkeypatches os or os.path does
    not change what the hook sees; the hook itself is reachable only through gc, which it blocks.
    """
    root = os.path.realpath(workdir)
    prefix = root.rstrip("/") + "/"
    blocked = frozenset(
        {
            "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
            "os.startfile", "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
            "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
            "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
            "socket.getnameinfo", "socket.sethostname",
            "resource.setrlimit", "resource.prlimit",
            "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
            "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents",
            "sys.setprofile", "sys.settrace", "sys.remote_exec",
        }
    )
    # event -> (indices of path arguments, indices of dir_fd arguments)
    path_events = {
        "os.chmod": ((0,), (2,)),
        "os.chown": ((0,), (3,)),
        "os.link": ((0, 1), (2, 3)),
        "os.mkdir": ((0,), (2,)),
        "os.remove": ((0,), (1,)),
        "os.rename": ((0, 1), (2, 3)),
        "os.rmdir": ((0,), (1,)),
        "os.symlink": ((1,), (2,)),
        "os.truncate": ((0,), ()),
        "os.utime": ((0,), (3,)),
        "os.setxattr": ((0,), ()),
        "os.removexattr": ((0,), ()),
        "os.chflags": ((0,), ()),
        "os.lchflags": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    o_path_dir = os.O_PATH | os.O_DIRECTORY
    fspath, os_open, close, readlink, getcwd = os.fspath, os.open, os.close, os.readlink, os.getcwd
    stat_, s_islnk = os.stat, __import__("stat").S_ISLNK
    violation = SandboxViolation
    is_str, is_bytes = str, bytes

    def resolve(path, depth=0):
        """The kernel's view of `path`: the parent is opened (relative paths from the cwd,
        so no ancestor needs to be searchable) and named by /proc/self/fd; a final symlink
        is followed."""
        path = fspath(path)
        if isinstance(path, is_bytes):
            path = path.decode("utf-8", "surrogateescape")
        if path.strip("/") == "":
            return "/" if path else getcwd()
        head, sep, base = path.rstrip("/").rpartition("/")
        head = head if head else ("/" if sep else ".")
        fd = os_open(head, o_path_dir)
        try:
            parent = readlink(f"/proc/self/fd/{fd}")
            if base in ("", "."):
                return parent
            if base == "..":
                return parent.rpartition("/")[0] or "/"
            try:
                st = stat_(base, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and s_islnk(st.st_mode):
                if depth >= 16:
                    raise OSError("too many levels of symbolic links")
                target = readlink(base, dir_fd=fd)
                return resolve(target if target.startswith("/") else parent + "/" + target, depth + 1)
        finally:
            close(fd)
        return parent.rstrip("/") + "/" + base

    def inside(path) -> bool:
        try:
            p = resolve(path)
        except (OSError, TypeError, ValueError):
            return False
        return p == root or p.startswith(prefix) or p == "/dev/null"

    def hook(event, args):
        if event in blocked:
            raise violation(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writing = (isinstance(mode, is_str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing and not inside(path):
                raise violation(f"sandbox: writing {path!r} outside the working directory is not allowed")
        elif event == "ctypes.dlopen":
            if args and args[0] is not None:
                raise violation("sandbox: ctypes.dlopen is not allowed")
        elif event == "os.chdir":
            if not inside(args[0]):
                raise violation(f"sandbox: chdir to {args[0]!r} outside the working directory is not allowed")
        elif event in path_events:
            path_idx, dir_fd_idx = path_events[event]
            for i in dir_fd_idx:
                if i < len(args) and args[i] is not None:
                    raise violation(f"sandbox: {event} with dir_fd is not allowed")
            for i in path_idx:
                arg = args[i]
                if isinstance(arg, int):
                    # An fd: truncate needs one opened for writing (checked at open); the
                    # others would change files opened read-only outside the directory.
                    if event != "os.truncate":
                        raise violation(f"sandbox: {event} on a file descriptor is not allowed")
                elif not inside(arg):
                    raise violation(f"sandbox: {event} on {arg!r} outside the working directory is not allowed")

    sys.addaudithook(hook)


def _run_snippet(code: str, print_last_expression: bool) -> int:
    import ast
    import linecache
    import traceback

    filename = "<snippet>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    status = 0
    try:
        tree = ast.parse(code, filename)
        last = None
        if print_last_expression and tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, filename, "eval"), namespace)
            if value is not None:
                print(value)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:  # noqa: BLE001 - report whatever the snippet raised
        try:
            # Only the snippet's frames: the bootstrap and the audit hook are not its business.
            report = traceback.TracebackException(type(e), e, e.__traceback__)
            report.stack = traceback.StackSummary.from_list(
                [f for f in report.stack if f.filename != __file__]
            )
            sys.stderr.write("".join(report.format()))
        except MemoryError:
            sys.stderr.write(f"{type(e).__name__}\n")
        if isinstance(e, MemoryError):
            status = EXIT_MEMORY
        elif isinstance(e, SandboxViolation):
            status = EXIT_BLOCKED
        else:
            status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return status


if __name__ == "__main__":
    _child_main()
