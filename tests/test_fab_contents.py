"""The FAB (the app bundle Flower ships to every silo) carries what runs inside Flower and nothing else.

It holds the ground floor (``silotune/``) and the two roles' app halves (``superlink/app/``,
``silo_node/app/``); the operator tooling (``superlink/ops/``, ``silo_node/ops/``), ``certs/``
and everything else stay out (pyproject.toml ``fab-include``; docs/architecture.md). The resident
worker pins exactly these files (silo_node/ops/pinning.py), so its digest of the installed code
must equal the FAB's.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from silo_node.ops.pinning import fab_digest, fab_files, installed_digest, installed_files

REPO = Path(__file__).resolve().parents[1]
APP_TREES = ("silotune", "superlink/app", "silo_node/app")
ROLE_INITS = ("superlink/__init__.py", "silo_node/__init__.py")


@pytest.fixture(scope="module")
def fab() -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(REPO)


def _code_files(fab_bytes: bytes) -> set[str]:
    return {n for n in fab_files(fab_bytes) if n != "pyproject.toml" and not n.startswith(".info/")}


def test_the_fab_holds_the_app_halves_and_the_ground_floor_only(fab: bytes) -> None:
    names = _code_files(fab)
    expected = {
        f.relative_to(REPO).as_posix()
        for tree in APP_TREES
        for f in (REPO / tree).rglob("*.py")
        if "__pycache__" not in f.parts
    } | set(ROLE_INITS)
    assert names == expected, (sorted(names - expected), sorted(expected - names))
    assert "superlink/app/server_app.py" in names and "silo_node/app/client_app.py" in names


def test_no_operator_tooling_travels_in_the_fab(fab: bytes) -> None:
    names = _code_files(fab)
    assert not [n for n in names if "/ops/" in n or n.startswith(("certs/", "monitoring/", "deploy/"))]
    tooling = {
        "cli.py", "run_cli.py", "data_cli.py", "launch.py", "proxy.py", "admission.py", "submit.py",
        "run_journal.py", "supervisor.py", "worker.py", "pinning.py", "clock_check.py", "split.py",
    }  # fmt: skip
    assert not [n for n in names if n.rsplit("/", 1)[-1] in tooling]


def test_the_worker_pins_exactly_the_files_of_the_fab(fab: bytes) -> None:
    assert set(installed_files()) == _code_files(fab)
    assert fab_digest(fab) == installed_digest()


def test_the_fab_alone_imports_the_server_and_client_apps(fab: bytes, tmp_path: Path) -> None:
    """Unpacked on its own, the FAB's ServerApp and ClientApp import without the rest of the checkout."""
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        zf.extractall(tmp_path)
    probe = (
        "import sys\n"
        "import superlink.app.server_app, silo_node.app.client_app\n"
        "mods = {n: getattr(m, '__file__', '') or '' for n, m in sys.modules.items()\n"
        "        if n.split('.')[0] in ('silotune', 'superlink', 'silo_node', 'certs', 'monitoring')}\n"
        f"outside = [n for n, f in mods.items() if not f.startswith({str(tmp_path)!r})]\n"
        "assert not outside, outside\n"
        "assert not [n for n in mods if '.ops' in n], sorted(mods)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
