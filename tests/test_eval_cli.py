"""End to end: `silotune eval` on a tiny random model writes the JSON and the markdown table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from command_line.main import main  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared benchmark data absent ({DATA})")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SILOTUNE_EVAL_DATA", raising=False)


def _run(args: list[str]) -> int:
    return main(["eval", *args])


@needs_data
def test_finance_limit_8(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = _run(
        [
            "--suite",
            "finance",
            "--base",
            str(tiny_model),
            "--limit",
            "8",
            "--data-dir",
            str(DATA),
            "--out",
            str(out),
            "--finance-max-new-tokens",
            "4",
        ]
    )
    assert rc == 0
    report = json.loads((out / "finance-generate.json").read_text())
    assert report["suite"] == "finance" and report["protocol"] == "generate"
    assert report["base_model"] == str(tiny_model) and report["adapter"] is None
    assert [b["name"] for b in report["benchmarks"]] == ["fpb", "fiqa", "tfns"]
    for b in report["benchmarks"]:
        assert b["n"] == 8 and b["metric"] == "accuracy" and 0.0 <= b["value"] <= 1.0
    assert report["average"] == pytest.approx(sum(b["value"] for b in report["benchmarks"]) / 3)
    for b in report["benchmarks"]:  # every finance score comes with what the prior alone scores
        assert (
            set(b["prediction_shares"]) == set(b["constant_baselines"]) == {"negative", "neutral", "positive"}
        )
        assert sum(b["prediction_shares"].values()) == pytest.approx(1.0)
        assert max(b["constant_baselines"].values()) == pytest.approx(b["majority_accuracy"])
    means = report["constant_baselines_average"]
    assert means["neutral"] == pytest.approx(
        sum(b["constant_baselines"]["neutral"] for b in report["benchmarks"]) / 3
    )
    assert report["settings"]["quantization"] == "none"
    md = (out / "finance-generate.md").read_text()
    assert "| Base model | Adapter | Protocol | FPB | FiQA | TFNS | Average |" in md
    assert "### Against the label prior (%)" in md and "| Always neutral | Always positive |" in md
    assert f"| {tiny_model} | none | generate |" in md
    items = (out / "finance-generate-items" / "tfns.jsonl").read_text().splitlines()
    assert len(items) == 8 and {"id", "gold", "output", "prediction", "correct"} <= set(json.loads(items[0]))
    assert "FPB" in capsys.readouterr().out


@needs_data
def test_code_limit_2(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = _run(
        [
            "--suite",
            "code",
            "--base",
            str(tiny_model),
            "--limit",
            "2",
            "--data-dir",
            str(DATA),
            "--out",
            str(out),
            "--code-max-new-tokens",
            "16",
            "--code-timeout",
            "5",
        ]
    )
    assert rc == 0
    report = json.loads((out / "code-generate.json").read_text())
    assert [b["name"] for b in report["benchmarks"]] == ["humaneval", "mbpp", "multiple_js", "multiple_cpp"]
    for b in report["benchmarks"]:
        assert b["n"] == 2 and b["metric"] == "pass@1" and "sandbox_isolation" in b
    md = (out / "code-generate.md").read_text()
    assert "| HumanEval | MBPP | MultiPL-E (JS) | MultiPL-E (C++) | Average |" in md
    rec = json.loads((out / "code-generate-items" / "mbpp.jsonl").read_text().splitlines()[0])
    assert rec["status"] in ("ok", "failed", "timeout", "compile_error")


@needs_data
def test_loglik_protocol_is_labelled(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        _run(
            [
                "--suite",
                "medical",
                "--base",
                str(tiny_model),
                "--limit",
                "2",
                "--data-dir",
                str(DATA),
                "--out",
                str(out),
                "--protocol",
                "loglik",
            ]
        )
        == 0
    )
    report = json.loads((out / "medical-loglik.json").read_text())
    assert report["protocol"] == "loglik" and "NOT FlowerTune" in report["protocol_description"]
    assert "| loglik |" in (out / "medical-loglik.md").read_text()


def test_no_data_dir_is_a_clear_error(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["--suite", "finance", "--base", str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "SILOTUNE_EVAL_DATA" in err


def test_data_dir_from_env(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SILOTUNE_EVAL_DATA", str(tmp_path))  # exists, but holds no benchmarks
    assert _run(["--suite", "finance", "--base", str(tiny_model), "--limit", "1"]) == 2
    assert "fpb/derived/fpb_sentences50agree_test_seed42.jsonl" in capsys.readouterr().err


def test_bad_adapter_dir(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        _run(
            [
                "--suite",
                "finance",
                "--base",
                str(tiny_model),
                "--adapter",
                str(tmp_path),
                "--data-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "adapter_config.json" in capsys.readouterr().err


@needs_data
def test_with_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(adapter)
    out = tmp_path / "out"
    assert (
        _run(
            [
                "--suite",
                "finance",
                "--base",
                str(tiny_model),
                "--adapter",
                str(adapter),
                "--benchmarks",
                "tfns",
                "--limit",
                "2",
                "--data-dir",
                str(DATA),
                "--out",
                str(out),
                "--finance-max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "finance-generate.json").read_text())
    assert report["adapter"] == str(adapter) and [b["name"] for b in report["benchmarks"]] == ["tfns"]
    assert f"| {tiny_model} | {adapter} | generate |" in (out / "finance-generate.md").read_text()


@needs_data
def test_flowertune_protocol(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = ["--suite", "finance", "--base", str(tiny_model), "--data-dir", str(DATA), "--out", str(out)]
    assert _run([*base, "--protocol", "flowertune", "--benchmarks", "fiqa", "--limit", "3"]) == 0
    report = json.loads((out / "finance-flowertune.json").read_text())
    assert report["protocol"] == "flowertune" and "exact finance protocol" in report["protocol_description"]
    settings = report["settings"]
    assert settings["batch_size"] == 32 and settings["max_length"] == 512 and settings["seed"] == 2024
    assert settings["quantization"] in ("4bit", "none") and settings["quantization_note"]
    assert "finance_max_new_tokens" not in settings  # not used by this protocol
    (fiqa,) = report["benchmarks"]
    assert fiqa["n"] == 3 and {"prediction_shares", "constant_baselines", "macro_f1"} <= set(fiqa)
    md = (out / "finance-flowertune.md").read_text()
    assert f"| {tiny_model} | none | flowertune |" in md and f"- weights: {settings['quantization']}" in md
    assert "| FiQA | 3 |" in md
    assert "weights" in capsys.readouterr().err  # the loader says what it loaded
    # --quantization none is honoured and recorded.
    assert (
        _run(
            [
                *base,
                "--protocol",
                "flowertune",
                "--benchmarks",
                "tfns",
                "--limit",
                "1",
                "--quantization",
                "none",
            ]
        )
        == 0
    )
    assert json.loads((out / "finance-flowertune.json").read_text())["settings"]["quantization"] == "none"


def test_flowertune_is_finance_only(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--base", str(tiny_model), "--data-dir", str(tmp_path), "--protocol", "flowertune"]
    assert _run(["--suite", "medical", *args]) == 2
    assert "--suite finance" in capsys.readouterr().err
    assert _run(["--suite", "finance", *args, "--dtype", "bf16"]) == 2
    assert "float32" in capsys.readouterr().err
