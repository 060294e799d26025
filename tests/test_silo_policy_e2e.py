"""Silo policy, approval, audit log and the no-private-data-leaves promise, through real processes.

One loopback federation (SuperLink + 3 SuperNodes, TLS + node authentication) and a tiny random
Llama. hospital-a requires its operator's approval for every run; bank-c keeps the default,
which refuses base models in local directories (so it refuses the run's model); hospital-b runs
under the local federation's policy (demo/local_federation.py: local model directories allowed).
Every row of every silo holds a canary string. (trust-remote-code is not in the app's run-config
keys, so `flwr run` cannot ask for it; its refusal is tested at the ClientApp in test_silo_policy.py.)
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from demo.local_federation import CONNECTION, LocalFederation, SiloSpec
from silo_node.app.audit import read_audit
from silotune.events import read_events
from tests.support.monitoring_stack import everything, exporter, exposition, prometheus, values, wait_until

pytestmark = pytest.mark.slow

NAMES = ("hospital-a", "hospital-b", "bank-c")
LABELS = {"0": "negative", "1": "positive", "2": "neutral"}
CANARIES = {name: f"CANARY{uuid.uuid4().hex[:12]}{i}" for i, name in enumerate(NAMES)}
BAD_ROW_CANARY = f"CANARYBADROW{uuid.uuid4().hex[:12]}"


def _write_silo_data(path: Path, name: str, seed: int, n: int = 24) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            label = rng.choice(sorted(LABELS))
            text = f"{CANARIES[name]} patient {i} record {rng.randint(1, 99)} {LABELS[label]}"
            fh.write(json.dumps({"text": text, "label": label}) + "\n")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    ws = tmp_path_factory.mktemp("fed")
    policies = {
        "hospital-a": "require-approval = true\napproval-timeout-hours = 1\nallow-local-paths = true\n",
        "bank-c": "# the default policy: no base model in a local directory\n",
    }
    silos = []
    for i, name in enumerate(NAMES):
        data = ws / f"{name}.jsonl"
        _write_silo_data(data, name, seed=i)
        extra: dict[str, Any] = {
            "columns": "input=text,output=label",
            "label-map": ",".join(f"{k}={v}" for k, v in LABELS.items()),
        }
        if name in policies:
            policy = ws / f"{name}-policy.toml"
            policy.write_text(policies[name])
            extra["policy-file"] = str(policy)
        silos.append(SiloSpec(name, data, extra))
    with LocalFederation(ws / "workspace", silos) as fed:
        yield fed


def _state(fed: LocalFederation, name: str) -> Path:
    return fed.ws / "silos" / name / "state"  # silo_node.ops.launch.default_state_dir of its flwr-home


def _run_config(model: Path, run_dir: str, **extra: object) -> dict:
    cfg = {
        "model.name": str(model),
        "num-rounds": 2,
        "strategy.min-nodes": 2,
        "run-dir": run_dir,
        "train.local-steps": 2,
        "train.batch-size": 4,
        "train.seq-length": 64,
        "train.lr-max": 5e-3,
        "strategy.round-timeout": 300.0,
        "strategy.wait-for-nodes": 300.0,
    }
    cfg.update(extra)
    return cfg


def _submit_approving(fed: LocalFederation, cfg: dict, approver: str = "hospital-a") -> tuple[Any, str]:
    """Submit in a thread; when ``approver`` holds the run, approve it with `silotune silo approve`."""
    from command_line.main import main

    state = _state(fed, approver)
    seen = {e.get("run_id") for e in read_audit(state) if e["kind"] == "pending"}
    out: dict[str, Any] = {}

    def submit() -> None:
        try:
            out["result"] = fed.submit(cfg, timeout=900)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    t = threading.Thread(target=submit, daemon=True)
    t.start()
    deadline = time.monotonic() + 600
    run_id = ""
    while not run_id and time.monotonic() < deadline and t.is_alive():
        fresh = [e["run_id"] for e in read_audit(state) if e["kind"] == "pending" and e["run_id"] not in seen]
        if fresh:
            run_id = fresh[0]
            # Held, not failed: the central site is still waiting; approve at the silo.
            assert main(["silo", "approve", run_id, "--state-dir", str(state)]) == 0
        else:
            time.sleep(1.0)
    t.join(timeout=900)
    assert not t.is_alive(), "the run did not finish"
    if "error" in out:
        raise out["error"]
    assert run_id, "hospital-a never held the run for approval"
    return out["result"], run_id


def _events(fed: LocalFederation, run_dir: str) -> list[dict]:
    return list(read_events(fed.runs_root / run_dir / "events.jsonl"))


def test_policy_refusal_approval_and_audit_log(federation: LocalFederation, tiny_model: Path) -> None:
    # A base model outside bank-c's policy: bank-c refuses, the others train.
    result, run_id = _submit_approving(federation, _run_config(tiny_model, "policy"))
    assert [r["round"] for r in result.rounds] == [1, 2]
    events = _events(federation, "policy")
    by_name = {e["node_id"]: e["silo"] for e in events if e["kind"] == "silo_handshake"}
    node_of = {v: k for k, v in by_name.items()}
    assert set(node_of) == {"hospital-a", "hospital-b"}  # names from the admission ledger
    results = [e for e in events if e["kind"] == "silo_result"]
    assert sorted({e["silo"] for e in results}) == ["hospital-a", "hospital-b"]
    assert len(results) == 4

    # The refusal: a code and its fixed text at the central site, the reason only at the silo.
    failed = [e for e in events if e["kind"] == "silo_failed"]
    assert failed and {e["code"] for e in failed} == {"POLICY_REFUSED"}
    assert all("local" not in e["reason"] and str(tiny_model) not in e["reason"] for e in failed)
    refused = [e for e in read_audit(_state(federation, "bank-c")) if e["kind"] == "refused"]
    assert any("allow-local-paths" in e["reason"] and e["run_id"] == run_id for e in refused)

    # Held, not failed: hospital-a's node was pending, never failed.
    pending = [e for e in events if e["kind"] == "silo_pending"]
    assert pending and all(e["code"] == "APPROVAL_PENDING" for e in pending)
    assert node_of["hospital-a"] not in {e["node_id"] for e in failed}

    # hospital-a's audit log: the run, and one entry per adapter that left, matching the central count.
    audit = [e for e in read_audit(_state(federation, "hospital-a")) if e.get("run_id") == run_id]
    kinds = [e["kind"] for e in audit]
    assert kinds[:3] == ["pending", "approved", "run"]
    payloads = {e["round"]: e for e in audit if e["kind"] == "payload" and e["phase"] == "train"}
    central = {e["round"]: e["uplink_bytes"] for e in results if e["silo"] == "hospital-a"}
    assert {r: p["bytes"] for r, p in payloads.items()} == central
    assert all(len(p["sha256"]) == 64 for p in payloads.values())


def test_no_canary_reaches_the_central_site(
    federation: LocalFederation, tiny_model: Path, tmp_path: Path
) -> None:
    from command_line.main import main

    # hospital-b's data gets a row whose label is not in its label map: its error quotes the row.
    with open(federation.silos[1].data_path, "a") as fh:
        fh.write(json.dumps({"text": f"{CANARIES['hospital-b']} leaked", "label": BAD_ROW_CANARY}) + "\n")
    cfg = _run_config(tiny_model, "canary", **{"strategy.min-nodes": 1})
    # The central site's monitoring watches the run as it would in production: the central exporter
    # (with the `flwr ls` traffic poller) and every silo's exporter, scraped by a real Prometheus whose
    # config and storage live in the central workspace (so the file scan below reads its WAL too).
    mon = federation.ws / "central" / "monitoring"
    mon.mkdir(exist_ok=True)
    central_args = ("--flwr-connection", CONNECTION, "--flwr-home", str(federation.flwr_home))
    central_args += ("--flwr-poll-seconds", "10")
    started = time.time()
    answers: dict[str, object] | None = None
    with ExitStack() as stack:
        c_exp = exporter(federation.events_dir, "server", mon / "exporter.log", central_args)
        c_addr = stack.enter_context(c_exp)
        silo_addrs = []
        for s in federation.silos:  # each silo's exporter and its log stay at the silo
            s_exp = exporter(federation.silo_dir(s) / "events", "silo", tmp_path / f"exp-{s.name}.log")
            silo_addrs.append(stack.enter_context(s_exp))
        prom = None
        if shutil.which("prometheus"):  # else skipped at the end, after every other check
            # An uncompressed WAL: a label string Prometheus stored is then plain bytes on disk.
            no_compression = ("--no-storage.tsdb.wal-compression",)
            prom = stack.enter_context(prometheus(mon / "prometheus", c_addr, silo_addrs, no_compression))

        result, _ = _submit_approving(federation, cfg)
        assert [r["round"] for r in result.rounds] == [1, 2]
        events = _events(federation, "canary")
        failed = {e["silo"]: e["code"] for e in events if e["kind"] == "silo_failed"}
        assert failed == {"hospital-b": "DATA_INVALID", "bank-c": "POLICY_REFUSED"}
        assert {e["silo"] for e in events if e["kind"] == "silo_result"} == {"hospital-a"}
        # The detail is at the silo (its log), so the canary check below is not vacuous.
        silo_log = (federation.ws / "logs" / "silo-hospital-b.log").read_text(errors="replace")
        assert BAD_ROW_CANARY in silo_log
        if prom is not None:
            answers = _prometheus_saw_the_run(prom, federation, events, started)
        scraped = {addr: exposition(addr) for addr in [c_addr, *silo_addrs]}

    needles = [*CANARIES.values(), BAD_ROW_CANARY]
    # What the exporters serve (the central one has hospital-b's failure, the silos' their own runs).
    assert 'silo="hospital-b"' in scraped[c_addr] and "silotune_silo_failures_total" in scraped[c_addr]
    leaks = [(addr, n) for addr, text in scraped.items() for n in needles if n in text]
    assert not leaks, f"private strings in a scrape: {leaks}"
    if answers is not None:
        text = json.dumps(answers)
        leaks = [(key, n) for key, a in answers.items() for n in needles if n in json.dumps(a)]
        assert not leaks, f"private strings in Prometheus's answers: {leaks}"
        assert "hospital-a" in text and "silotune_silo_failures_total" in text  # the check saw the run

    assert main(["report", str(federation.runs_root / "canary")]) == 0
    central = [federation.ws / "central"] + sorted((federation.ws / "logs").glob("superlink*"))
    files = [p for root in central for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]
    assert any(p.name == "report.html" for p in files) and any(p.name == "state.db" for p in files)
    assert any("checkpoints" in p.parts for p in files)
    if answers is not None:  # Prometheus's storage is among the files, and holds the run's labels
        stored = b"".join(p.read_bytes() for p in files if "prometheus" in p.parts and "data" in p.parts)
        assert b"hospital-b" in stored and b"silotune_silo_failures_total" in stored
    leaks = [(str(p), n) for p in files for n in needles if n.encode() in p.read_bytes()]
    assert not leaks, f"private strings reached the central site: {leaks}"
    for needle in needles:
        assert needle not in result.log
    if answers is None:
        pytest.skip(
            "prometheus not installed (apt-get install --no-install-recommends prometheus): "
            "everything else passed; Prometheus's answers were not checked"
        )


def _prometheus_saw_the_run(
    prom: str, fed: LocalFederation, events: list[dict], started: float
) -> dict[str, object]:
    """Wait until Prometheus has scraped the whole canary run, check it did (truth: the central
    event log), then return its answer for every series (monitoring_stack.everything)."""
    run_id = next(str(e["run_id"]) for e in events if e["kind"] == "run_start")
    log = list(read_events(fed.events_dir / "server.jsonl"))  # every run of this module's federation

    def count(kind: str, silo: str) -> int:
        return sum(1 for e in log if e["kind"] == kind and e.get("silo") == silo)

    # DATA_INVALID is not a label (the only per-entity label is `silo`): hospital-b failed only in
    # this run, so its failure counter counts exactly the run's DATA_INVALID silo_failed events.
    b_failed = count("silo_failed", "hospital-b")
    assert b_failed == sum(1 for e in events if e["kind"] == "silo_failed" and e["silo"] == "hospital-b") > 0
    central = '{job="silotune-central"}'
    for expr in (
        f'silotune_run_info{{job="silotune-central",run_id="{run_id}"}}',
        f"silotune_run_active{central} == 0",
        f'silotune_silo_failures_total{{job="silotune-central",silo="hospital-b"}} == {b_failed}',
        'count(up{job="silotune-silo"} == 1) == 3',
    ):
        assert wait_until(prom, expr, 120), f"Prometheus never showed {expr}"
    time.sleep(3)  # one more scrape of every exporter after the last event
    assert values(prom, f"silotune_rounds_completed{central}") == {"": 2}
    a_rounds = values(prom, f"silotune_silo_rounds_total{central}")["hospital-a"]
    assert a_rounds == count("silo_result", "hospital-a") > 0
    assert values(prom, f"silotune_silo_failures_total{central}")["bank-c"] == count("silo_failed", "bank-c")
    assert "hospital-a" in values(prom, 'silotune_silo_rounds_total{job="silotune-silo"}')
    answers = everything(prom, started)
    series = answers["series"]
    assert isinstance(series, list)
    assert any(s["__name__"].startswith("silotune_") and s.get("silo") == "hospital-a" for s in series)
    assert {"silo", "run_id", "job", "instance"} <= set(answers["labels"])  # type: ignore[arg-type]
    return answers
