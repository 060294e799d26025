"""Named run-config recipes, shipped as package data (``silotune run --recipe NAME``).

A recipe is a TOML file of run-config keys, measured before it ships: ``finance.toml`` is the
recipe ``benchmarks/finance_quality.py`` trains with (BENCHMARKS.md has its scores).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from silotune.errors import UserError


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def recipe_values(name: str) -> dict[str, Any]:
    """The flat run-config keys of recipe ``name`` (validated as a run config on use)."""
    if name not in available():
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(available())}")
    text = resources.files(__name__).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return dict(tomllib.loads(text))
