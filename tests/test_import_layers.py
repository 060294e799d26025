"""The rooms' import rules (pyproject.toml [tool.importlinter], docs/architecture.md) hold."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from silotune.flwr_connection import interpreter_bin

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = interpreter_bin() / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first-party packages and pyproject.toml, so a test can break a rule without touching the repo."""
    dest = tmp_path_factory.mktemp("tree")
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    for pkg in ("command_line", "demo", "deploy", "evaluation", "superlink", "silo_node", "monitoring",
                "certs", "silotune"):  # fmt: skip
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_every_contract_is_kept() -> None:
    res = lint_imports(REPO)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_an_upward_import_breaks_the_contract_even_inside_a_function(tree_copy: Path) -> None:
    target = tree_copy / "silotune" / "config.py"
    original = target.read_text()
    target.write_text(
        original
        + textwrap.dedent("""

        def _sneaky() -> None:
            from monitoring.exporter import FederationState  # noqa: F401 - upward, on purpose
        """)
    )
    try:
        res = lint_imports(tree_copy)
    finally:
        target.write_text(original)
    assert res.returncode != 0
    assert "silotune.config -> monitoring.exporter" in res.stdout


def test_the_roles_never_import_each_other(tree_copy: Path) -> None:
    target = tree_copy / "silo_node" / "app" / "training.py"
    original = target.read_text()
    target.write_text(original + "\nimport superlink.app.rounds  # noqa: E402,F401\n")
    try:
        res = lint_imports(tree_copy)
    finally:
        target.write_text(original)
    assert res.returncode != 0 and "silo_node.app.training -> superlink.app.rounds" in res.stdout


@pytest.mark.parametrize(
    ("app_module", "ops_module"),
    [
        ("superlink/app/rounds.py", "superlink.ops.admission"),
        ("silo_node/app/client_app.py", "silo_node.ops.launch"),
    ],
)
def test_an_app_half_never_imports_its_operator_tooling(
    tree_copy: Path, app_module: str, ops_module: str
) -> None:
    """What the FAB ships (``*.app``) cannot reach the tooling it leaves out (``*.ops``)."""
    target = tree_copy / app_module
    original = target.read_text()
    target.write_text(original + f"\n\ndef _sneaky() -> None:\n    import {ops_module}  # noqa: F401\n")
    try:
        res = lint_imports(tree_copy)
    finally:
        target.write_text(original)
    source = app_module.removesuffix(".py").replace("/", ".")
    assert res.returncode != 0 and f"{source} -> {ops_module}" in res.stdout


def test_test_helpers_live_in_support_and_benchmarks_import_only_that() -> None:
    """tests/ holds test modules and conftest.py; every helper is in tests/support/, the one part of
    tests/ that benchmarks/ may import."""
    loose = [f.name for f in (REPO / "tests").glob("*.py") if not f.name.startswith("test_")]
    assert sorted(loose) == ["__init__.py", "conftest.py"]
    reached = set()
    for f in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tests":
                reached.add((f.name, node.module))
            elif isinstance(node, ast.Import):
                reached |= {(f.name, a.name) for a in node.names if a.name.split(".")[0] == "tests"}
    assert reached and all(m.startswith("tests.support.") for _, m in reached), sorted(reached)


FIRST_PARTY = ("silotune", "superlink", "silo_node", "monitoring", "certs", "deploy", "evaluation", "demo",
               "command_line")  # fmt: skip


def import_cycles(packages: tuple[str, ...]) -> list[list[str]]:
    """Strongly connected groups of first-party modules (imports inside functions included, as
    grimp reads every import statement): each is a cycle, dodged or not."""
    import grimp

    graph = grimp.build_graph(*packages, cache_dir=None)
    modules = graph.modules
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return groups


def test_no_module_dodges_an_import_cycle() -> None:
    """docs/architecture.md: no two modules import each other, not even through a function-local
    import (the usual way to dodge a cycle that the layers contract cannot see inside one room)."""
    assert import_cycles(FIRST_PARTY) == []


def test_the_cycle_check_sees_an_import_inside_a_function(
    tree_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tree_copy / "silo_node" / "app" / "training.py"
    original = target.read_text()
    target.write_text(
        original + "\n\ndef _dodge() -> None:\n    import silo_node.app.privacy  # noqa: F401\n"
    )
    monkeypatch.syspath_prepend(str(tree_copy))
    for name in [m for m in sys.modules if m.split(".")[0] in FIRST_PARTY]:
        monkeypatch.delitem(sys.modules, name)
    try:
        assert ["silo_node.app.privacy", "silo_node.app.training"] in import_cycles(("silo_node",))
    finally:
        target.write_text(original)
