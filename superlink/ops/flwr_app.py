"""Where the SiloTune Flower App lives and how a run config is spelled for ``flwr run``.

Both the streaming submission (superlink/ops/submit.py) and the journal's detached resubmission
(superlink/ops/run_journal.py) need these; keeping them here lets the journal stand below the
submission instead of importing it back (the two used to import each other inside functions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from silotune.errors import UserError


def app_dir() -> Path:
    """The Flower App directory (holds pyproject.toml with [tool.flwr.app])."""
    env = os.environ.get("SILOTUNE_APP_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2])  # the checkout: superlink/ops/ -> root
    for c in candidates:
        pyproject = c / "pyproject.toml"
        if pyproject.exists() and "[tool.flwr.app]" in pyproject.read_text():
            return c
    raise UserError(
        "cannot find the SiloTune Flower App (pyproject.toml with [tool.flwr.app]); "
        "run from a source checkout or set SILOTUNE_APP_DIR"
    )


def format_run_config(values: dict[str, Any]) -> str:
    """``{"peft.rank": 8, "model.name": "x"}`` -> Flower's --run-config TOML string."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, int | float):
            parts.append(f"{k}={v!r}")
        else:
            parts.append(f"{k}={json.dumps(str(v))}")
    return " ".join(parts)
