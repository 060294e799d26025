"""The sandbox runs correct programs and stops loops, fork bombs and network access."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import pytest

from evaluation.sandbox import SandboxLimits, isolation_mode, run_program

FAST = SandboxLimits(timeout_s=3.0)
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node not installed (nodejs)")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def test_python_program_runs() -> None:
    r = run_program("python", "print(sum(range(10)))", FAST)
    assert r.passed and r.stdout.strip() == "45"


def test_python_failure_is_failed() -> None:
    r = run_program("python", "assert 1 == 2", FAST)
    assert r.status == "failed" and "AssertionError" in r.stderr


@needs_node
def test_javascript_program_runs() -> None:
    ok = run_program(
        "js", "const assert = require('node:assert');\nassert.deepEqual(1+1, 2);\nconsole.log('fine');", FAST
    )
    assert ok.passed and ok.stdout.strip() == "fine"
    assert run_program("js", "require('node:assert').deepEqual(1, 2);", FAST).status == "failed"


@needs_gxx
def test_cpp_program_compiles_and_runs() -> None:
    ok = run_program("cpp", "#include<bits/stdc++.h>\nint main(){ assert(2+2==4); std::cout << 42; }", FAST)
    assert ok.passed and ok.stdout == "42"
    bad = run_program("cpp", "int main( { }", FAST)
    assert bad.status == "compile_error"
    assert run_program("cpp", "#include<cassert>\nint main(){ assert(1==2); }", FAST).status == "failed"


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    r = run_program("python", "while True:\n    pass", FAST)
    assert r.status == "timeout"
    assert time.monotonic() - start < FAST.timeout_s + 5


@needs_node
def test_javascript_infinite_loop_times_out() -> None:
    assert run_program("js", "for(;;){}", FAST).status == "timeout"


def _sandbox_user_tasks() -> int:
    out = subprocess.run(["ps", "-eo", "user="], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip() == "nobody")


def test_fork_bomb_is_contained() -> None:
    before = _sandbox_user_tasks()
    start = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_program("python", bomb, FAST)
    assert r.status in ("timeout", "failed")
    assert time.monotonic() - start < FAST.timeout_s + 8
    if isolation_mode() == "root":
        # The PID namespace died with its first process: nothing of the bomb is left.
        deadline = time.monotonic() + 5
        while _sandbox_user_tasks() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sandbox_user_tasks() <= before
    # The machine is still usable: the next program runs normally.
    assert run_program("python", "print('alive')", FAST).passed


@pytest.mark.netns
@pytest.mark.skipif(
    isolation_mode() == "none",
    reason="no network namespaces here (needs root or "
    "unprivileged user namespaces); generated code would reach the network",
)
def test_network_is_unreachable() -> None:
    # A server on this machine's loopback: reachable from here, not from an empty namespace.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    probe = (
        "import socket\ns = socket.socket()\ns.settimeout(2)\n"
        f"s.connect(('127.0.0.1', {port}))\nprint('connected')\n"
    )
    try:
        r = run_program("python", probe, FAST)
    finally:
        server.close()
    assert r.status == "failed" and "connected" not in r.stdout
    outside = run_program("python", "import socket\nsocket.create_connection(('1.1.1.1', 80), 2)", FAST)
    assert outside.status == "failed"
    assert "unreachable" in outside.stderr.lower() or "errno" in outside.stderr.lower()


def test_memory_limit() -> None:
    r = run_program("python", "x = bytearray(4 * 1024**3)", SandboxLimits(timeout_s=5, memory_mb=256))
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_unbounded_output_is_cut() -> None:
    r = run_program("python", "while True:\n    print('x' * 1000)", SandboxLimits(timeout_s=3))
    assert not r.passed and len(r.stdout) <= SandboxLimits().max_output_chars
