"""SuperLink connections for the `flwr` CLI, kept in a silotune-managed FLWR_HOME.

The `flwr` CLI (`flwr run`, `flwr supernode register`, ...) reads its connections from
``$FLWR_HOME/config.toml``. SiloTune writes its own FLWR_HOME under a workspace instead of touching
the operator's ``~/.flwr``, and runs `flwr` with that environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w  # a dependency of flwr itself; flwr writes config.toml with it as well

from silotune.atomic_files import atomic_write_text
from silotune.errors import UserError

CONFIG_FILE = "config.toml"
DEFAULT_CONNECTION = "silotune"
# SiloTune's per-site state (FLWR_HOME, admission ledger, SuperLink database, event logs) lives
# under a workspace directory: --workspace, else $SILOTUNE_WORKSPACE, else ./.silotune.
DEFAULT_WORKSPACE = Path(".silotune")
WORKSPACE_ENV = "SILOTUNE_WORKSPACE"


@dataclass(frozen=True)
class Connection:
    name: str
    address: str
    root_certificates: Path | None
    insecure: bool


def resolve_workspace(workspace: str | Path | None = None) -> Path:
    chosen = workspace or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
    return Path(chosen).expanduser().resolve()


def resolve_flwr_home(flwr_home: str | Path | None = None, workspace: str | Path | None = None) -> Path:
    """Explicit FLWR_HOME, else ``<workspace>/flwr-home`` (never ~/.flwr unless asked for)."""
    if flwr_home:
        return Path(flwr_home).expanduser().resolve()
    return resolve_workspace(workspace) / "flwr-home"


def _load(flwr_home: Path) -> dict:
    path = flwr_home / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    root_certificates: Path | None,
    insecure: bool = False,
    make_default: bool = True,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``flwr_home/config.toml``; return the file path."""
    if insecure and root_certificates is not None:
        raise UserError("a connection is either insecure or has a CA certificate, not both")
    if not insecure and root_certificates is None:
        raise UserError(
            "give the federation CA certificate (--ca ca.crt); plaintext needs an explicit --insecure"
        )
    conn: dict[str, object] = {"address": address}
    if root_certificates is not None:
        ca = Path(root_certificates).expanduser().resolve()
        if not ca.is_file():
            raise UserError(f"CA certificate {ca} not found")
        conn["root-certificates"] = str(ca)  # absolute: flwr resolves relative paths differently
    else:
        conn["insecure"] = True
    flwr_home = Path(flwr_home)
    data = _load(flwr_home)
    superlink = data.setdefault("superlink", {})
    superlink[name] = conn
    if make_default or "default" not in superlink:
        superlink["default"] = name
    path = flwr_home / CONFIG_FILE
    atomic_write_text(path, tomli_w.dumps(data))  # the operator's other connections live here too
    return path


def read_connection(flwr_home: Path, name: str | None = None) -> Connection:
    """Read one connection (the default one when ``name`` is None)."""
    superlink = _load(Path(flwr_home)).get("superlink", {})
    name = name or superlink.get("default")
    conn = superlink.get(name) if name else None
    if not isinstance(conn, dict) or "address" not in conn:
        raise UserError(
            f"no SuperLink connection {name!r} in {Path(flwr_home) / CONFIG_FILE}; "
            "pass --superlink HOST:PORT and --ca CA.crt"
        )
    root = conn.get("root-certificates")
    return Connection(name, conn["address"], Path(root) if root else None, bool(conn.get("insecure")))


def interpreter_bin() -> Path:
    """The folder of the running interpreter: where pip put flower-superlink, flwr-serverapp, ...

    Not resolved: a virtual environment's ``bin/python`` is a symlink to the base interpreter, and
    the scripts live beside the link, not beside its target.
    """
    return Path(sys.executable).parent


def path_with_interpreter_bin(path: str) -> str:
    """``PATH`` with :func:`interpreter_bin` first, so every Flower program we start (and the
    ``flwr-serverapp`` / ``flwr-clientapp`` that Flower itself starts by name) is the one installed
    beside this SiloTune, also when the environment was never activated (systemd, cron, a
    container entrypoint calling ``/opt/venv/bin/silotune``)."""
    first = str(interpreter_bin())
    rest = [p for p in path.split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *rest])


def flower_env(
    flwr_home: Path | None = None,
    events_dir: Path | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for any Flower process we start (SuperLink, SuperNode, `flwr`): no telemetry,
    no update check (air-gapped sites), our FLWR_HOME and SILOTUNE_EVENTS_DIR when given."""
    from silotune.events import EVENTS_DIR_ENV

    env = dict(os.environ if base is None else base)
    env["PATH"] = path_with_interpreter_bin(env.get("PATH", ""))
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    if events_dir is not None:
        env[EVENTS_DIR_ENV] = str(Path(events_dir).resolve())
    return env


def run_flwr(
    args: list[str],
    flwr_home: Path,
    timeout: float = 60.0,
    cwd: Path | None = None,
    netns: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` with our FLWR_HOME (inside ``netns`` if set), bounded by ``timeout``."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    try:
        return subprocess.run(
            [*prefix, "flwr", *args],
            env=flower_env(flwr_home),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise UserError("the `flwr` command is not installed (pip install 'flwr==1.41.*')") from None
    except subprocess.TimeoutExpired:
        raise UserError(
            f"`flwr {' '.join(args[:2])}` did not answer within {timeout:.0f}s; "
            "is the SuperLink up and reachable?"
        ) from None
