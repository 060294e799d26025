"""Which app a task asks the silo to run, and whether the silo runs it: code pinning.

Flower executes whatever FAB (app bundle) the SuperLink sends. The resident worker instead runs the
SiloTune code installed at the silo, and only for tasks whose FAB holds exactly that code: the
content digest of the FAB (SHA-256 per file path, the zip read in memory, nothing installed or
imported) must equal the same digest over the installed packages. pyproject.toml and Flower's
``.info/`` manifest are left out: the worker never reads the FAB's pyproject for SiloTune (it runs
its own installed entry point, and the run config arrives in the task's context), and leaving it
out lets a federation change run-config defaults without every silo re-pinning.

Any other app is refused before its code runs, unless the silo operator lists its Flower FAB hash
(``sha256`` of the .fab file, as ``flwr build`` names it; ``silotune silo app-hash DIR`` prints it)
in the policy's ``allowed-apps``. That list is checked BEFORE the task is pulled, on the task's own
FAB hash, so the allowed app can be handed to ``flwr-clientapp`` untouched, as Flower would run it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

# What the FAB carries (pyproject.toml fab-include): every .py of these packages, and the
# __init__.py of the packages above them. The roles' operator tooling (``*.ops``) stays out.
APP_PACKAGES = ("silotune", "superlink.app", "silo_node.app")
APP_NAME = "silotune"  # [project].name; Flower's fab_id is "<publisher>/<name>"
_SKIP = (".info/",)
_SKIP_FILES = ("pyproject.toml",)


def content_digest(files: Mapping[str, bytes]) -> str:
    """SHA-256 over ``path NUL sha256(content)`` lines, paths sorted; pyproject and .info/ left out."""
    total = hashlib.sha256()
    for path in sorted(files):
        if path.startswith(_SKIP) or path in _SKIP_FILES:
            continue
        total.update(path.encode() + b"\0" + hashlib.sha256(files[path]).hexdigest().encode() + b"\n")
    return total.hexdigest()


def fab_files(fab_bytes: bytes) -> dict[str, bytes]:
    """The files of a FAB, read from the zip in memory (nothing is written or imported)."""
    with zipfile.ZipFile(io.BytesIO(fab_bytes)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}


def fab_digest(fab_bytes: bytes) -> str:
    return content_digest(fab_files(fab_bytes))


def _package_files(roots: Iterable[tuple[str, Path]]) -> dict[str, bytes]:
    """``(dotted package, its directory)`` -> its .py files and its parents' ``__init__.py``,
    under the paths the FAB gives them (``superlink/app/rounds.py``, ``superlink/__init__.py``)."""
    out: dict[str, bytes] = {}
    for dotted, root in roots:
        top = root.parents[dotted.count(".")]  # the directory that holds the top-level package
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(top).as_posix()
            if "__pycache__" in rel.split("/"):
                continue
            out[rel] = f.read_bytes()
        for parent in list(root.relative_to(top).parents)[:-1]:
            init = top / parent / "__init__.py"
            out[(parent / "__init__.py").as_posix()] = init.read_bytes()
    return out


def installed_files() -> dict[str, bytes]:
    """The installed SiloTune source files under the paths the FAB gives them."""
    import importlib.util

    roots = []
    for pkg in APP_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        roots.append((pkg, Path(next(iter(spec.submodule_search_locations)))))
    return _package_files(roots)


@lru_cache(maxsize=1)
def installed_digest() -> str:
    """The digest of the code this silo runs; computed once per worker (the code cannot change
    under a running process without a restart, which recomputes it)."""
    return content_digest(installed_files())


def is_own_app(fab_id: str, digest: str) -> bool:
    """A task of the SiloTune app, built from exactly the code installed here."""
    return fab_id.rsplit("/", 1)[-1] == APP_NAME and digest == installed_digest()


def flower_fab_hash(app_dir: Path) -> str:
    """Flower's FAB hash of an app directory: the sha256 of the FAB ``flwr run`` would build."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()
