"""Monitoring of a REAL federation on loopback: TLS SuperLink with node auth, two admitted silos
training a tiny random Llama, the central and silo exporters, and a real Prometheus scraping them.

Truth is computed independently of the exporter and of Flower's byte counting: the adapter's
parameter count comes from PEFT on the same tiny model, each tensor travels as fp32 (4 bytes per
parameter) serialised with np.save (a fixed header) under its key, as FlowerTune counts it.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.monitoring_stack import empty_panels, exporter, prometheus, query, values
from tests.support.tiny_model import make_tiny_llama
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SILOS = ("hospital-a", "hospital-b")
ROUNDS = 2
RANK, TARGETS = 8, ["q_proj", "v_proj"]  # the run-config defaults (peft.rank, peft.target-modules)
FINANCE_ROWS = [
    {"input": "Shares rose after strong earnings", "output": "positive"},
    {"input": "The company cut its guidance", "output": "negative"},
    {"input": "The board meets on Tuesday", "output": "neutral"},
    {"input": "Profit doubled year on year", "output": "positive"},
    {"input": "Sales fell sharply in the quarter", "output": "negative"},
    {"input": "The CEO spoke at a conference", "output": "neutral"},
]
# Without a GPU these panels have nothing to show (the silos report no GPU figures).
GPU_ONLY_PANELS = frozenset({"GPU memory vs capacity"})


def adapter_truth(model_dir: Path) -> tuple[int, int]:
    """(parameter count, bytes one adapter occupies in count_bytes) from PEFT, json and numpy alone.

    The default wire layout (transport.pack): two uint8 arrays, ``codec.meta`` (JSON: version,
    dtype, block size, every tensor's key and shape) and ``codec.data`` (the float32 values), each
    counted by Flower as its np.save bytes plus its key."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, target_modules=TARGETS))
    state = get_peft_model_state_dict(peft_model)
    params = sum(t.numel() for t in state.values())
    meta = {
        "v": 1,
        "dtype": "fp32",
        "block_size": 0,
        "tensors": [[k, list(t.shape)] for k, t in state.items()],
    }
    arrays = {
        "codec.meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
        "codec.data": np.zeros(4 * params, np.uint8),
    }
    total = 0
    for key, array in arrays.items():
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        total += len(buf.getvalue()) + len(key)
    return params, total


def test_prometheus_sees_a_real_federation(tmp_path: Path) -> None:
    from demo.local_federation import CONNECTION, LocalFederation, SiloSpec
    from monitoring.report import write_report

    model = make_tiny_llama(tmp_path / "tiny-model")
    params, per_adapter_bytes = adapter_truth(model)
    data = tmp_path / "finance.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FINANCE_ROWS))
    # eval-fraction > 0: the silos evaluate the global adapter, so evaluation series exist.
    silos = [SiloSpec(n, data, {"eval-fraction": 0.34}) for n in SILOS]
    logs = tmp_path / "logs"
    logs.mkdir()

    with LocalFederation(tmp_path / "ws", silos) as fed:
        silo_events = {s.name: fed.silo_dir(s) / "events" for s in silos}
        central_args = ("--flwr-connection", CONNECTION, "--flwr-home", str(fed.flwr_home))
        central_args += ("--flwr-poll-seconds", "2")
        with (
            exporter(fed.events_dir, "server", logs / "exp-central.log", central_args) as c_addr,
            exporter(silo_events["hospital-a"], "silo", logs / "exp-a.log") as a_addr,
            exporter(silo_events["hospital-b"], "silo", logs / "exp-b.log") as b_addr,
            prometheus(tmp_path / "prom", c_addr, [a_addr, b_addr]) as prom,
        ):
            run_dir = tmp_path / "run"
            result = fed.submit(
                {
                    "model.name": str(model), "num-rounds": ROUNDS, "run-dir": str(run_dir),
                    "strategy.min-nodes": len(SILOS), "strategy.round-timeout": 300.0,
                    "train.local-steps": 1, "train.batch-size": 2, "train.seq-length": 64,
                    "peft.rank": RANK, "peft.target-modules": ",".join(TARGETS),
                },
                timeout=600,
            )  # fmt: skip
            assert [r["round"] for r in result.rounds] == list(range(1, ROUNDS + 1))
            # Scraped, not read from files: Prometheus must show the completed run.
            done = 'silotune_run_active{job="silotune-central"} == 0'
            wait_until(lambda: query(prom, done), 120, "the run to end in Prometheus", 2)
            wire = 'silotune_flower_traffic_inbound_bytes_total{job="silotune-central"} > 0'
            wait_until(lambda: query(prom, wire), 60, "Flower's traffic accounting", 2)
            time.sleep(3)  # one more scrape of every exporter after the last event

            central = '{job="silotune-central"}'
            expected = per_adapter_bytes * ROUNDS
            assert values(prom, f"silotune_rounds_completed{central}") == {"": ROUNDS}
            assert values(prom, f"silotune_adapter_parameters{central}") == {"": params}
            assert values(prom, f"silotune_silo_rounds_total{central}") == dict.fromkeys(SILOS, ROUNDS)
            up = values(prom, f"silotune_uplink_bytes_total{central}")
            down = values(prom, f"silotune_downlink_bytes_total{central}")
            assert up == dict.fromkeys(SILOS, expected) == down
            total = values(prom, f"sum(silotune_uplink_bytes_total{central})")[""]
            # parameter count x 4 bytes (fp32) x silos x rounds, plus the metadata and np.save framing
            framing = per_adapter_bytes - params * 4
            assert total == (params * 4 + framing) * len(SILOS) * ROUNDS
            assert values(prom, f"silotune_comm_bytes{central}") == {"": 2 * total}
            # Each silo's own exporter agrees with what the server counted.
            assert values(prom, 'silotune_uplink_bytes_total{job="silotune-silo"}') == up
            # Flower's wire bytes include the payload plus protocol overhead.
            wire_in = values(prom, f"silotune_flower_traffic_inbound_bytes_total{central}")[""]
            assert wire_in >= total
            assert values(prom, f"silotune_silos_answered{central}") == {"": len(SILOS)}
            assert query(prom, 'silotune_evaluation_value{metric="eval_loss"}')
            assert not empty_panels(prom, skip=GPU_ONLY_PANELS)

    report = write_report(run_dir, [silo_events[n] / "silo.jsonl" for n in SILOS])
    text = report.read_text()
    # Loss, evaluation, bytes and memory are plotted; accuracy is absent (eval_loss only).
    assert text.count('<svg class="chart"') + text.count('class="empty"') == 8
    for title in ("Training loss", "Other evaluation", "Adapter payload bytes", "Peak memory"):
        assert f'aria-label="{title}' in text, title
