"""Run untrusted, model-written programs (Python, JavaScript, C++) with limits.

Each run gets its own temporary directory, a wall-clock limit (the whole process group is killed),
CPU-time, memory, file-size and process-count limits (``resource.setrlimit``), and no network.

Isolation, best first (picked once per process, recorded in every result as ``isolation``):

``root``    running as root: ``unshare --net --pid --fork --kill-child`` gives the program an empty
            network namespace (not even loopback) and its own PID namespace (when its first process
            dies the kernel kills every descendant), and the program runs as ``nobody``, because
            root is exempt from ``RLIMIT_NPROC`` and a fork bomb is only bounded for a normal user.
``userns``  not root, but unprivileged user namespaces are allowed: the same namespaces, inside a
            user namespace; ``RLIMIT_NPROC`` applies to the calling user.
``none``    neither works (e.g. a locked-down container): limits only, **network NOT isolated** and
            processes that call ``setsid`` may outlive the time limit. ``require_isolation=True``
            (or ``SILOTUNE_SANDBOX_REQUIRE_ISOLATION=1``) turns this into an error instead.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Language = Literal["python", "js", "cpp"]
Isolation = Literal["root", "userns", "none"]
Status = Literal["ok", "failed", "timeout", "compile_error"]

_JAIL = Path(__file__).with_name("_jail.py")
_NOBODY = 65534
_NS_FLAGS = ["--net", "--pid", "--fork", "--kill-child"]
# V8 reserves several GiB of address space up front; node is bounded by RLIMIT_DATA instead.
_NODE_RESERVED_MB = 4096


class SandboxUnavailable(RuntimeError):
    """Isolation was required but this machine offers no network namespace."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 512
    # Tasks (processes + threads) allowed beyond what the sandbox user already runs: node alone
    # uses about a dozen threads, g++ four processes.
    max_tasks: int = 64
    max_file_mb: int = 16
    max_output_chars: int = 8192
    compile_timeout_s: float = 60.0
    compile_memory_mb: int = 1024


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: Isolation

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def isolation_mode() -> Isolation:
    """The strongest isolation this machine allows (see the module docstring)."""
    if os.environ.get("SILOTUNE_SANDBOX_NO_NAMESPACES") == "1":
        return "none"
    unshare = shutil.which("unshare")
    if unshare:
        if os.geteuid() == 0 and _probe([unshare, *_NS_FLAGS, "true"]):
            return "root"
        if _probe([unshare, "--user", "--map-root-user", *_NS_FLAGS, "true"]):
            return "userns"
    return "none"


def _task_count(uid: int) -> int:
    """Tasks (threads included) that ``uid`` runs now: RLIMIT_NPROC counts them all."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                total += len(os.listdir(f"/proc/{entry}/task"))
        except OSError:
            continue
    return total


def _world_executable(path: str) -> bool:
    p = Path(path).resolve()
    if not os.access(p, os.X_OK) or not p.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in p.parents)


@functools.cache
def python_for_sandbox() -> str:
    """An interpreter that ``nobody`` can run (ours may live under a private /root)."""
    candidates = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
    if isolation_mode() != "root":
        return sys.executable
    for c in candidates:
        if c and _world_executable(c):
            return c
    return sys.executable


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for_teardown(uid: int, baseline: int, deadline_s: float = 3.0) -> None:
    """The kernel kills a dead PID namespace's processes asynchronously; wait so the next run's
    RLIMIT_NPROC baseline does not count them."""
    end = time.monotonic() + deadline_s
    while _task_count(uid) > baseline and time.monotonic() < end:
        time.sleep(0.05)


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_command(
    argv: list[str],
    workdir: Path,
    limits: SandboxLimits,
    *,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    address_space_mb: int | None = None,
    require_isolation: bool = False,
) -> tuple[int | None, bool, str, str, float]:
    """Run ``argv`` in ``workdir`` under the sandbox; return (exit code, timed out, out, err, s)."""
    mode = isolation_mode()
    if mode == "none" and (require_isolation or os.environ.get("SILOTUNE_SANDBOX_REQUIRE_ISOLATION") == "1"):
        raise SandboxUnavailable(
            "no network namespace available (need root or unprivileged user namespaces and "
            "`unshare` from util-linux); refusing to run generated code without isolation"
        )
    timeout_s = limits.timeout_s if timeout_s is None else timeout_s
    memory = (memory_mb or limits.memory_mb) * 2**20
    address_space = (address_space_mb or memory_mb or limits.memory_mb) * 2**20
    sandbox_uid = _NOBODY if mode == "root" else os.getuid()
    spec = {
        "limits": {
            "RLIMIT_AS": address_space,
            "RLIMIT_DATA": memory,
            "RLIMIT_CPU": int(timeout_s) + 1,
            "RLIMIT_NPROC": _task_count(sandbox_uid) + limits.max_tasks,
            "RLIMIT_FSIZE": limits.max_file_mb * 2**20,
            "RLIMIT_NOFILE": 256,
            "RLIMIT_CORE": 0,
        },
        "env": {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
        },
    }
    if mode == "root":
        spec["uid"] = spec["gid"] = _NOBODY
    prefix: list[str] = []
    if mode == "root":
        prefix = ["unshare", *_NS_FLAGS]
    elif mode == "userns":
        prefix = ["unshare", "--user", "--map-root-user", *_NS_FLAGS]
    resolved = shutil.which(argv[0], path=spec["env"]["PATH"]) if "/" not in argv[0] else argv[0]
    if resolved is None:
        raise FileNotFoundError(f"{argv[0]!r} not found on PATH; install it to run this language")
    argv = [str(workdir / resolved) if not os.path.isabs(resolved) else resolved, *argv[1:]]
    cmd = [*prefix, sys.executable, "-I", "-S", str(_JAIL), json.dumps(spec), *argv]
    # Output goes to files outside the work dir: RLIMIT_FSIZE then also bounds what a program
    # printing forever can write, where a pipe would have to be drained into memory.
    with tempfile.TemporaryDirectory(prefix="silotune-out-") as outdir:
        out_path, err_path = Path(outdir, "stdout"), Path(outdir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                start_new_session=True,
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also reaps anything left behind after a normal exit.
                _kill_group(proc)
                proc.wait()
        duration = time.monotonic() - start
        if timed_out and mode == "root":
            _wait_for_teardown(sandbox_uid, spec["limits"]["RLIMIT_NPROC"] - limits.max_tasks)
        out = _read_head(out_path, limits.max_output_chars)
        err = _read_head(err_path, limits.max_output_chars)
    if proc.returncode == -signal.SIGXCPU or (proc.returncode == 128 + signal.SIGXCPU):
        timed_out = True
    return (None if timed_out else proc.returncode), timed_out, out, err, duration


def _prepare_workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="silotune-sbx-"))
    if isolation_mode() == "root":
        os.chown(workdir, _NOBODY, _NOBODY)
    return workdir


def _write(workdir: Path, name: str, text: str) -> None:
    path = workdir / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)


def run_program(
    language: Language,
    source: str,
    limits: SandboxLimits | None = None,
    *,
    require_isolation: bool = False,
) -> SandboxResult:
    """Run one complete program; ``status == "ok"`` iff it exits 0 within the limits."""
    limits = limits or SandboxLimits()
    workdir = _prepare_workdir()
    mode = isolation_mode()
    try:
        if language == "python":
            _write(workdir, "prog.py", source)
            argv = [python_for_sandbox(), "-I", "prog.py"]
            address_space = None
        elif language == "js":
            _write(workdir, "prog.js", source)
            argv = ["node", f"--max-old-space-size={limits.memory_mb}", "prog.js"]
            address_space = limits.memory_mb + _NODE_RESERVED_MB
        elif language == "cpp":
            _write(workdir, "prog.cpp", source)
            code, timed_out, out, err, dur = run_command(
                ["g++", "-std=c++17", "prog.cpp", "-o", "prog"],
                workdir,
                limits,
                timeout_s=limits.compile_timeout_s,
                memory_mb=limits.compile_memory_mb,
                require_isolation=require_isolation,
            )
            if code != 0:
                return SandboxResult("compile_error", code, out, err, dur, mode)
            argv = ["./prog"]
            address_space = None
        else:
            raise ValueError(f"unsupported language {language!r}; use python, js or cpp")
        code, timed_out, out, err, dur = run_command(
            argv,
            workdir,
            limits,
            address_space_mb=address_space,
            require_isolation=require_isolation,
        )
        if timed_out:
            status: Status = "timeout"
        else:
            status = "ok" if code == 0 else "failed"
        return SandboxResult(status, code, out, err, dur, mode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
