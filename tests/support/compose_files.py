"""Reading the compose bundles' .env.example files and interpolating ${VAR} the way compose does."""

from __future__ import annotations

import re
from pathlib import Path


def env_example(bundle_dir: Path) -> dict[str, str]:
    env = {}
    for line in (bundle_dir / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value
    return env


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (enough for our bundles)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op and op.endswith("?") and not value:
            raise AssertionError(f"required variable {name} unset: {arg}")
        if value is None or (op == ":-" and value == ""):
            return arg or ""
        return value

    return _VAR.sub(sub, text)
