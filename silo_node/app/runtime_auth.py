"""Who may speak for the silo on this host: its local Runtime API and its own launch settings.

**The Runtime API secret.** The SuperNode serves its ClientApp tasks on a local Runtime API
(127.0.0.1:9094 by default). Whoever acquires a task there gets its token, and with it the task's
message, the run's context (the silo's node config included), and the right to answer for the silo
and to push back a changed context. `silotune silo start` therefore creates a random secret
(``<state-dir>/superexec.secret``, mode 0600, once; reused on later starts) and hands its PATH to
``flower-supernode --superexec-auth-secret-file`` and to the executor that serves the tasks (the
resident worker, or Flower's ``flower-superexec`` for ``--executor per-message``). Flower then
refuses AcquireTask unless it carries an HMAC made with the secret (flwr/supercore/auth); every
other Runtime call needs the token that only AcquireTask hands out. Flower honours the secret only
with ``--isolation process``, which is how both executors run. The secret's bytes are never
printed, logged or put on a command line.

**Launch settings.** The ClientApp takes the silo's settings (policy file, data path, state dir,
name, rank, ...) from ``SILOTUNE_SILO_SETTINGS``, an environment variable that `silotune silo
start` sets for the processes it starts, never from the task's ``context.node_config``: that one
travels through the Runtime API and is whatever the last task's holder pushed back. When the two
differ, the launch settings win, and the silo's log and audit log say so (``context_ignored``).
Only a process started without launch settings (tests calling the ClientApp in-process, Flower's
simulation) uses the context's node config.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from logging import WARNING
from pathlib import Path
from typing import Any

from silotune.config import SiloConfig, parse_silo_config
from silotune.errors import PolicyRefused, UserError

SECRET_FILE = "superexec.secret"
SETTINGS_ENV = "SILOTUNE_SILO_SETTINGS"
# The Runtime API calls Flower 1.41 guards with the secret (flwr/supercore/superexec/run_superexec.py
# _SUPEREXEC_AUTH_METHODS): only AcquireTask; the rest need the task token it returns.
AUTHENTICATED_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


def ensure_secret(directory: Path) -> Path:
    """``directory/superexec.secret``: created once (random, 0600 from the first byte, complete or
    absent), afterwards checked and reused. Returns its path; never its contents."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / SECRET_FILE
    if os.path.lexists(path):
        check_secret(path)
        return path
    tmp = directory / f".{SECRET_FILE}.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another start made it meanwhile: keep theirs
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    check_secret(path)
    return path


def check_secret(path: Path) -> None:
    """Refuse a secret file that another local user could read or replace."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UserError(f"the Runtime API secret {path} cannot be read ({exc.strerror})") from None
    fix = f"delete it and start the silo again (a new one is made), or `chmod 600 {path}`"
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"the Runtime API secret {path} is not a regular file; {fix}")
    if st.st_uid != os.geteuid():
        raise UserError(f"the Runtime API secret {path} belongs to uid {st.st_uid}, not to this user; {fix}")
    if st.st_mode & 0o077:
        raise UserError(
            f"the Runtime API secret {path} is readable or writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); {fix}"
        )
    if st.st_size == 0:
        raise UserError(f"the Runtime API secret {path} is empty; {fix}")


def load_secret(path: str | Path) -> bytes:
    """The secret's bytes, as Flower reads them (exact raw bytes), after ``check_secret``."""
    check_secret(Path(path))
    return Path(path).read_bytes()


def settings_env(node_config: dict[str, Any]) -> dict[str, str]:
    """The environment entry that carries the silo's validated node config to its ClientApp."""
    return {SETTINGS_ENV: json.dumps(node_config, sort_keys=True)}


def launch_settings() -> dict[str, Any] | None:
    """This process's launch settings; None when it was started without them."""
    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        # Fail closed: falling back to the task's context is what the settings are there to stop.
        raise PolicyRefused(
            f"${SETTINGS_ENV} is not a JSON object; restart the silo with `silotune silo start`"
        )
    return value


_NOTED: set[tuple[str, tuple[str, ...]]] = set()


def silo_settings(context: Any) -> SiloConfig:
    """The silo's settings for this task: its launch settings when it has them, else (no launch
    settings: tests, simulation) the context's node config. A context that disagrees with the
    launch settings is ignored, logged and audited (once per run and set of keys per process)."""
    given = dict(context.node_config)
    launch = launch_settings()
    if launch is None:
        return parse_silo_config(given)
    silo = parse_silo_config(launch, source="this silo's launch settings")
    keys = _differences(silo, given)
    if keys:
        run_id = str(getattr(context, "run_id", ""))
        if (run_id, tuple(keys)) not in _NOTED:
            _NOTED.add((run_id, tuple(keys)))
            _note_ignored(silo, run_id, keys)
    return silo


def _differences(silo: SiloConfig, given: dict[str, Any]) -> list[str]:
    try:
        other = parse_silo_config(given)
    except (UserError, ValueError):
        return sorted({k.replace("_", "-") for k in given} | {"(node config invalid)"})
    mine, theirs = silo.model_dump(), other.model_dump()
    return sorted(k.replace("_", "-") for k in mine if mine[k] != theirs.get(k))


def _note_ignored(silo: SiloConfig, run_id: str, keys: list[str]) -> None:
    from flwr.supercore import log

    log(
        WARNING,
        "SiloTune: run %s: the task's node config differs from this silo's launch settings in %s; "
        "the launch settings are used (someone else on this host may have pushed a context)",
        run_id, ", ".join(keys),
    )  # fmt: skip
    if silo.state_dir:
        from silo_node.app.audit import append_audit

        try:
            append_audit(
                silo.state_dir, "context_ignored", silo=silo.name, run_id=run_id, keys=keys,
                reason="the task's node config differs from the silo's launch settings; "
                "the launch settings were used",
            )  # fmt: skip
        except OSError:
            pass
