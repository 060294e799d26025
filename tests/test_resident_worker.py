"""The resident silo worker (silo_node/ops/worker.py) in a real loopback federation (issue 13).

Three SuperNodes with --isolation process, each beside its worker, train a tiny random Llama: the
model loads once across rounds, a worker SIGKILLed mid-round comes back and its silo answers the
next round, a foreign Flower app is refused (its code never runs) until the silo policy allows its
FAB hash, and the worker and Flower's per-message path produce the same global adapter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from demo.local_federation import CONNECTION, LocalFederation, SiloSpec
from silotune.events import read_events
from tests.support.federation_runs import RANKS
from tests.support.federation_runs import run_config as _run_config
from tests.support.federation_runs import write_silo_data as _write_silo_data

pytestmark = pytest.mark.slow


def _silos(ws: Path, policy: Path | None = None) -> list[SiloSpec]:
    silos = []
    for i, (name, rank) in enumerate(RANKS.items()):
        data = ws / f"{name}.jsonl"
        _write_silo_data(data, seed=i)
        extra: dict = {"columns": "input=text,output=label", "lora-rank": rank}
        if policy is not None:
            extra["policy-file"] = str(policy)
        silos.append(SiloSpec(name, data, extra))
    return silos


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    # The tiny model is a local directory, which a silo loads only when its policy says so.
    path.write_text(
        "# the silo operator's policy; the test adds allowed-apps later\nallow-local-paths = true\n"
    )
    return path


@pytest.fixture(scope="module")
def resident(tmp_path_factory: pytest.TempPathFactory, policy_file: Path):
    ws = tmp_path_factory.mktemp("resident")
    with LocalFederation(ws / "workspace", _silos(ws, policy_file), executor="resident") as fed:
        yield fed


def _silo_events(fed: LocalFederation, name: str) -> list[dict]:
    return list(read_events(fed.ws / "silos" / name / "events" / "silo.jsonl"))


def _state(fed: LocalFederation, name: str) -> Path:
    return fed.ws / "silos" / name / "state"


def test_round_two_does_not_reload_the_model(resident, tiny_model) -> None:
    result = resident.submit(_run_config(tiny_model, "reuse", **{"num-rounds": 3}), timeout=900)
    assert [r["answered"] for r in result.rounds] == [3, 3, 3]
    for name in RANKS:
        trains = [e for e in _silo_events(resident, name) if e["kind"] == "local_train"]
        assert len(trains) >= 3
        # One worker process served every round: the base model was loaded once.
        assert {e["worker_model_loads"] for e in trains} == {1}, trains
        cores = len(os.sched_getaffinity(0))
        assert {e["threads"] for e in trains} == {max(1, cores // len(RANKS))}


def _wait_busy(state: Path, timeout: float = 120.0) -> int:
    """The worker's pid once it is serving a train task (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = state / "worker.task"
        try:
            if "train" in task.read_text():
                return int((state / "worker.pid").read_text())
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"the worker in {state} never served a train task")


def test_a_killed_worker_drops_one_round_and_is_back_for_the_next(resident, tiny_model) -> None:
    victim = "hospital-b"
    state = _state(resident, victim)
    killed: list[int] = []

    def on_round(info: dict) -> None:
        if info["round"] == 1 and not killed:
            pid = _wait_busy(state)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    cfg = _run_config(
        tiny_model, "kill",
        **{"num-rounds": 3, "strategy.min-nodes": 2, "train.local-steps": 40, "strategy.round-timeout": 90.0},
    )  # fmt: skip
    result = resident.submit(cfg, timeout=900, on_round=on_round)
    assert killed
    assert [r["round"] for r in result.rounds] == [1, 2, 3]
    answered = [r["answered"] for r in result.rounds]
    assert answered[0] == 3 and answered[1] == 2 and answered[2] == 3, result.rounds
    new_pid = int((state / "worker.pid").read_text())
    assert new_pid != killed[0]  # the supervisor started a fresh worker
    run_events = read_events(resident.runs_root / "kill" / "events.jsonl")
    events = [e for e in run_events if e["kind"] == "silo_result"]
    assert victim in {e["silo"] for e in events if e["round"] == 3}
    assert victim not in {e["silo"] for e in events if e["round"] == 2}


FOREIGN_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreignapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "foreignapp.apps:server"
clientapp = "foreignapp.apps:client"

[tool.flwr.app.config]
out = ""
marker-dir = ""
"""

FOREIGN_APPS = """
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    marker = Path(str(context.run_config["marker-dir"])) / f"ran-{context.node_id}"
    marker.write_text("the foreign app's code ran at this silo")
    return Message(RecordDict({"m": MetricRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(120):
        nodes = list(grid.get_node_ids())
        if len(nodes) >= 3:
            break
        time.sleep(0.5)
    msgs = [
        Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
        for n in nodes
    ]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [{"error": r.has_error(), "code": r.error.code if r.has_error() else None} for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
"""


def _foreign_app(root: Path) -> Path:
    app = root / "foreignapp"
    (app / "foreignapp").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(textwrap.dedent(FOREIGN_PYPROJECT))
    (app / "foreignapp" / "__init__.py").write_text("")
    (app / "foreignapp" / "apps.py").write_text(FOREIGN_APPS)
    return app


def _flwr_run(fed: LocalFederation, app: Path, out: Path, markers: Path) -> list[dict]:
    from silotune.flwr_connection import flower_env

    cfg = f'out="{out}" marker-dir="{markers}"'
    proc = subprocess.run(
        ["flwr", "run", str(app), CONNECTION, "--run-config", cfg, "--stream"],
        env=flower_env(fed.flwr_home), capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert out.exists(), f"the foreign ServerApp wrote nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_a_foreign_app_is_refused_until_the_policy_allows_its_hash(resident, policy_file, tmp_path) -> None:
    from silo_node.ops.pinning import flower_fab_hash
    from silotune.silo_failures import SiloFailure

    app = _foreign_app(tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    replies = _flwr_run(resident, app, tmp_path / "out1.json", markers)
    assert len(replies) == 3
    assert all(r["error"] and r["code"] == SiloFailure.APP_NOT_ALLOWED for r in replies), replies
    assert not list(markers.iterdir()), "a refused app's code ran at a silo"
    audit = (_state(resident, "bank-c") / "audit.jsonl").read_text()
    assert "app not allowed" in audit

    policy_file.write_text(f'allow-local-paths = true\nallowed-apps = ["{flower_fab_hash(app)}"]\n')
    try:
        replies = _flwr_run(resident, app, tmp_path / "out2.json", markers)
    finally:
        policy_file.write_text(
            "# back to the defaults, the tiny model's directory allowed\nallow-local-paths = true\n"
        )
    assert len(replies) == 3 and not any(r["error"] for r in replies), replies
    assert len(list(markers.iterdir())) == 3


def test_worker_and_per_message_paths_give_the_same_adapter(resident, tiny_model, tmp_path_factory) -> None:
    import numpy as np

    from superlink.app.checkpoints import CheckpointStore

    values = _run_config(tiny_model, "same", **{"strategy.name": "fedavg"})
    resident.submit(values, timeout=900)
    ws = tmp_path_factory.mktemp("per-message")
    with LocalFederation(ws / "workspace", _silos(ws), executor="per-message") as fed:
        fed.submit(values, timeout=900)
        per_message = CheckpointStore(fed.runs_root / "same").latest()
    worker = CheckpointStore(resident.runs_root / "same").latest()
    assert worker is not None and per_message is not None and worker.round == per_message.round == 2
    assert sorted(worker.adapter) == sorted(per_message.adapter)
    worst = max(float(np.max(np.abs(worker.adapter[k] - per_message.adapter[k]))) for k in worker.adapter)
    assert worst <= 1e-5, f"the worker and the per-message path differ by up to {worst:g}"
