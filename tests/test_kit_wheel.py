"""An installed SiloTune makes the same kits as the source checkout: `silotune kit` reads its compose
bundles, monitoring files and templates as package resources (deploy/kit/sources.py), so the wheel
must carry them (pyproject.toml ``[tool.setuptools.package-data]``).

The wheel is built from a copy of the checkout (a build writes build/ and *.egg-info beside its
sources) and installed, without dependencies, into a fresh virtual environment. That environment
finds the dependencies through a .pth file naming this interpreter's site-packages folders as
plain paths (``--system-site-packages`` would name the base interpreter's, not this environment's),
so no .pth file of theirs runs: an editable install's finder, which maps the packages back to the
checkout, stays out, and nothing puts the checkout on sys.path.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from command_line.main import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "federation.example.toml"
SILOS = ["bank-a", "bank-b", "insurer-c"]
# What a source tree of the repository holds that is no source (gitignored run outputs, caches).
_NOT_SOURCE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.egg-info", "runs", "workspace", "flwr-home", "silotune-demo", "kits"
)


def _env() -> dict[str, str]:
    """No PYTHONPATH (it would put the checkout back on sys.path), no virtual environment active."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
    return res


def _copy_sources(dst: Path) -> None:
    """pyproject.toml, the readme and the packages setuptools is told to find."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dst.mkdir()
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy2(REPO / name, dst / name)
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pattern.rstrip("*")
        if (REPO / top / "__init__.py").is_file():
            shutil.copytree(REPO / top, dst / top, ignore=_NOT_SOURCE)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel, and a fresh virtual environment with it installed: {"wheel", "venv", "python"}."""
    work = tmp_path_factory.mktemp("kit-wheel")
    src, dist, venv = work / "src", work / "dist", work / "venv"
    _copy_sources(src)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(src)], cwd=work)  # fmt: skip
    (wheel,) = dist.glob("silotune-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    # Install before the dependencies become visible: pip would otherwise see this environment's
    # (editable) silotune and leave the wheel uninstalled.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], cwd=work)  # fmt: skip
    purelib = _run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   cwd=work).stdout.strip()  # fmt: skip
    deps = [p for p in site.getsitepackages() if Path(p).resolve() != REPO]
    (Path(purelib) / "_silotune_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return {"wheel": wheel, "venv": venv, "python": python}


def test_the_wheel_carries_the_kit_sources(installed: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    bundles = [p for p in (REPO / "deploy" / "compose").rglob("*") if p.is_file()]
    monitoring = [
        p
        for p in (REPO / "monitoring").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    templates = list((REPO / "deploy" / "kit" / "templates").glob("*.tmpl"))
    assert bundles and monitoring and templates
    wanted = {p.relative_to(REPO).as_posix() for p in (*bundles, *monitoring, *templates)}
    assert not wanted - names, sorted(wanted - names)


def test_installed_kit_matches_the_checkout(installed: dict[str, Path], tmp_path: Path) -> None:
    import deploy.kit
    from certs.pki import create_ca

    venv = installed["venv"].resolve()
    # The installed package, not the checkout: its own files, its own resources.
    probe = (
        "import json, sys, deploy.kit as k; print(json.dumps({'file': k.__file__, 'path': sys.path, "
        "'bundles': str(k.DEFAULT_BUNDLES), 'monitoring': str(k.DEFAULT_MONITORING)}))"
    )
    seen = json.loads(_run([str(installed["python"]), "-c", probe], cwd=tmp_path).stdout)
    for what in ("file", "bundles", "monitoring"):
        assert Path(seen[what]).resolve().is_relative_to(venv), (what, seen[what])
    assert not [p for p in seen["path"] if p and Path(p).resolve() in (REPO, REPO / "deploy")], seen["path"]
    assert Path(deploy.kit.__file__).resolve().is_relative_to(REPO), "the tests must run from the checkout"

    create_ca(tmp_path / "pki")
    fed = tmp_path / "federation.toml"
    shutil.copy(EXAMPLE, fed)
    res = _run([str(installed["venv"] / "bin" / "silotune"), "kit", "--federation", str(fed), "--out",
                str(tmp_path / "installed")], cwd=tmp_path)  # fmt: skip
    assert "created" in res.stdout
    assert main(["kit", "--federation", str(fed), "--out", str(tmp_path / "checkout")]) == 0

    got, want = _files(tmp_path / "installed"), _files(tmp_path / "checkout")
    assert sorted(got) == sorted(want)
    assert [rel for rel in want if got[rel] != want[rel]] == []
    # The bundles were there to copy: compose files, the silos' pinned policy, monitoring files.
    for rel in (
        "central/docker-compose.yml",
        "central/prometheus.yml",
        "central/grafana-datasources.yml",
        "central/monitoring/prometheus/rules/silotune-alerts.yml",
        "central/monitoring/grafana/dashboards/federation-overview.json",
        *(f"{s}/{f}" for s in SILOS for f in ("docker-compose.yml", "policy.toml", ".env", "README.md")),
    ):
        assert rel in got, rel
    assert b'\nfederation-ca-sha256 = "' in got["bank-a/policy.toml"]
