"""Static checks of monitoring/: promtool on rules, rule unit tests and configs; dashboards and
rules only use series that silotune.metrics defines; dashboards are well-formed Grafana JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from silotune import metrics as m
from tests.support.monitoring_stack import DASHBOARDS, MON, panel_targets

PROM = MON / "prometheus"
DATASOURCE_UID = "silotune-prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (apt-get install --no-install-recommends prometheus)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=PROM)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "rules/silotune-alerts.yml"),
        ("test", "rules", "rules/silotune-alerts.test.yml"),
        ("check", "config", "prometheus.yml"),
        ("check", "config", "prometheus-silo.yml"),
    ],
    ids=["check-rules", "test-rules", "check-config-central", "check-config-silo"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    res = promtool(*args)
    assert res.returncode == 0, res.stdout + res.stderr


def used_series(text: str) -> set[str]:
    return set(re.findall(r"\bsilotune_[a-z_]+\b", text))


def test_rules_and_dashboards_use_defined_series() -> None:
    known = set(m.BY_NAME)
    text = (PROM / "rules" / "silotune-alerts.yml").read_text()
    for path in DASHBOARDS:
        text += path.read_text()
    unknown = used_series(text) - known
    assert not unknown, f"series not defined in silotune/metrics.py: {sorted(unknown)}"


def test_metric_definitions_follow_conventions() -> None:
    for d in m.ALL:
        assert d.name.startswith("silotune_")
        assert d.name.endswith("_total") == (d.kind == "counter"), d.name
        assert "round" not in d.labels  # round is a value, never a label
    assert len(m.BY_NAME) == len(m.ALL)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_is_well_formed(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == DATASOURCE_UID
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    variables = {v["name"] for v in dash["templating"]["list"]}
    for _, expr in panel_targets(dash):
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), f"{path.name}: ${var} undefined"


def test_grafana_provisioning() -> None:
    prov = MON / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert [d["uid"] for d in ds["datasources"]] == [DATASOURCE_UID]
    dp = yaml.safe_load((prov / "dashboards" / "silotune.yml").read_text())
    assert dp["providers"][0]["type"] == "file"
    assert len(DASHBOARDS) == 2


def test_every_series_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "monitoring.md").read_text()
    missing = [d.name for d in m.ALL if f"`{d.name}" not in doc]
    assert not missing, f"add to docs/monitoring.md: {missing}"
