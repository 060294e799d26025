"""docs/architecture.md's way of one round stays true: the files it names exist, and it names every
module of ``superlink/app/`` that the ServerApp imports."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def round_section() -> str:
    text = DOC.read_text()
    start = text.index("## The way of one round")
    return text[start : text.index("\n## ", start + 1)]


def named_files(section: str) -> set[str]:
    """Paths in backticks, ``defences/aggregators.py`` style short names resolved under superlink/app/."""
    found = set()
    for ref in re.findall(r"`([\w/]+\.py)`", section):
        top = ref.split("/")[0]
        found.add(ref if "/" in ref and (REPO / top).is_dir() else f"superlink/app/{ref}")
    return found


def test_every_file_the_round_section_names_exists() -> None:
    missing = sorted(f for f in named_files(round_section()) if not (REPO / f).is_file())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_round_section_names_every_module_the_server_app_imports() -> None:
    import grimp

    graph = grimp.build_graph("superlink", cache_dir=None)
    reached = graph.find_upstream_modules("superlink.app.server_app", as_package=False)
    reached = {m for m in reached | {"superlink.app.server_app"} if m.startswith("superlink.app.")}
    files = set()
    for module in reached:
        path = Path(*module.split("."))
        files.add(str(path / "__init__.py") if (REPO / path).is_dir() else f"{path}.py")
    named = named_files(round_section())
    # A package's __init__ is named through its folder (`superlink/app/strategies/` has the registry).
    unnamed = sorted(
        f
        for f in files
        if f not in named
        and not (f.endswith("__init__.py") and f"`{Path(f).parent.name}/" in round_section())
    )
    assert not unnamed, f"on the round's path but not in docs/architecture.md: {unnamed}"
