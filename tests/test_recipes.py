"""Shipped run-config recipes: valid, overridable in order, and the one the benchmark measures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from silotune.config import parse_run_config
from silotune.errors import UserError
from silotune.recipes import available, recipe_values
from superlink.ops.run_cli import run_values

REPO = Path(__file__).resolve().parents[1]


def test_finance_recipe_is_a_valid_run_config_with_the_measured_choices() -> None:
    assert "finance" in available()
    cfg = parse_run_config(recipe_values("finance"), source="finance recipe")
    assert cfg.train.prompt_style == "eval" and cfg.train.keep_optimizer_state
    assert cfg.peft.target_modules == "all-linear" and cfg.strategy.weighting == "equal"
    assert cfg.strategy.name == "fedavg" and cfg.train.local_steps == 10
    assert cfg.strategy.aggregator == "mean"  # measured: consensus left the FiQA silo out (BENCHMARKS.md)


def test_unknown_recipe_names_the_known_ones() -> None:
    with pytest.raises(UserError, match="unknown recipe 'medical'.*finance"):
        recipe_values("medical")


def test_config_file_and_set_override_only_what_they_name(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('"peft.rank" = 4\n')
    values = run_values("finance", cfg, ["num-rounds=2"])
    assert values["peft.rank"] == 4 and values["num-rounds"] == 2
    assert values["peft.target-modules"] == "all-linear"  # the recipe's, not the default q_proj,v_proj
    assert run_values(None, None, ["num-rounds=2"]) == {"num-rounds": 2}


def test_the_benchmark_measures_every_key_of_the_recipe() -> None:
    spec = importlib.util.spec_from_file_location(
        "finance_quality", REPO / "benchmarks" / "finance_quality.py"
    )
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # Keys the benchmark sets otherwise: the domain, the strategy and optimizer state by its
    # checks, the transport per row, alpha = compare's default.
    elsewhere = {"domain", "strategy.name", "train.keep-optimizer-state", "transport.dtype", "peft.alpha"}
    assert set(recipe_values("finance")) - elsewhere == set(bench.RECIPE_OPTIONS)
    assert parse_run_config({}).peft.alpha == recipe_values("finance")["peft.alpha"]


def test_every_run_config_key_has_the_apps_default_so_flower_accepts_it_as_an_override() -> None:
    """Flower refuses a --run-config key that the FAB's [tool.flwr.app.config] lacks (flwr's
    fuse_dicts with check_keys): every key of the schema, hence of every recipe, must be there, with
    the schema's default, or `silotune run --recipe finance` would fail at the SuperLink."""
    import tomllib

    from silotune.config import flatten_run_config

    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    schema = flatten_run_config(parse_run_config({}))
    assert sorted(set(schema) - set(app)) == [] and sorted(set(app) - set(schema)) == []
    assert {k: v for k, v in app.items() if schema[k] != v} == {}
    for name in available():
        assert set(recipe_values(name)) <= set(app), name
