"""The README's main job, shrunk: `silotune demo` end to end on the embedded SmolLM2 (real TLS
SuperLink, three SuperNodes, two rounds), then no process of it is left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from silotune.demo import DemoOptions, format_summary, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    opts = DemoOptions(
        workspace=tmp_path / "demo",
        offline=True,
        rounds=2,
        local_steps=1,
        per_silo=8,
        eval_limit=6,
        seq_length=64,
    )
    report = run_demo(opts)
    assert [r["round"] for r in report.rounds] == [1, 2]
    assert all(r["answered"] == 3 for r in report.rounds)
    assert "authored" in report.data_source
    assert 0.0 <= report.accuracy_before <= 1.0 and 0.0 <= report.accuracy_after <= 1.0
    assert set(report.silo_peaks) == {"hospital-a", "bank-b", "clinic-c"}
    assert all(p["peak_rss_bytes"] > 0 for p in report.silo_peaks.values())
    # Every silo sends one adapter up per round: payload = silos x raw adapter size (+ small headers).
    for r in report.rounds:
        assert 3 * report.adapter_raw_bytes <= r["uplink_bytes"] < 3 * report.adapter_raw_bytes * 1.1
    for key in ("setup", "model_load", "rounds", "evaluation", "total"):
        assert report.timings[key] >= 0
    summary = format_summary(report)
    assert "accuracy on held-out data" in summary and report.adapter_dir in summary
    adapter = Path(report.adapter_dir)
    assert (adapter / "adapter_model.safetensors").exists()
    from silotune.modeling import _gguf_cache_dir, resolve_source  # the cache exists by now

    base = AutoModelForCausalLM.from_pretrained(_gguf_cache_dir(resolve_source(opts.model)))
    PeftModel.from_pretrained(base, adapter)
    # Nothing the demo started is still running.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(opts.workspace) not in ps
