"""`silotune compare` on a tiny random model: every row, exact byte counts, the step rule."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from statistics import fmean

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

from command_line.main import main  # noqa: E402
from evaluation.compare import row_slug  # noqa: E402

ROUNDS, STEPS, SILOS, RANK, FLEX_RANKS = 2, 2, 3, 4, (2, 4, 8)
WORDS = {"0": "fell weak guidance", "1": "rose strong earnings", "2": "market shares"}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SILOTUNE_EVAL_DATA", raising=False)


def _finance_data(tmp_path: Path) -> tuple[Path, Path]:
    """A 36-row training file (text, label as TFNS) and an eval dir with tfns/sent_valid.csv."""
    train = tmp_path / "train.jsonl"
    with open(train, "w", encoding="utf-8") as fh:
        for i in range(36):
            label = str(i % 3)
            fh.write(json.dumps({"text": f"the {WORDS[label]} {i}", "label": label}) + "\n")
    eval_dir = tmp_path / "bench"
    (eval_dir / "tfns").mkdir(parents=True)
    with open(eval_dir / "tfns" / "sent_valid.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(6):
            w.writerow([f"shares {WORDS[str(i % 3)]}", i % 3])
    return train, eval_dir


def _lora_params(rank: int) -> int:
    # tiny_model: hidden 32, 4 heads (head_dim 8), 2 KV heads, 2 layers; LoRA on q_proj and v_proj.
    # Each adapted Linear(in, out) carries A (rank x in) and B (out x rank).
    q = rank * 32 + 32 * rank
    v = rank * 32 + 16 * rank
    return 2 * (q + v)


def _compare(tiny_model: Path, tmp_path: Path, *extra: str) -> dict:
    train, eval_dir = _finance_data(tmp_path)
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--data", str(train),
            "--silos", str(SILOS),
            "--columns", "input=text,output=label",
            "--label-map", "0=negative,1=positive,2=neutral",
            "--label-column", "label",
            "--base", str(tiny_model),
            "--rounds", str(ROUNDS),
            "--local-steps", str(STEPS),
            "--batch-size", "2",
            "--seq-length", "64",
            "--rank", str(RANK),
            "--ranks", ",".join(map(str, FLEX_RANKS)),
            "--eval-data-dir", str(eval_dir),
            "--eval-benchmarks", "tfns",
            "--eval-limit", "4",
            "--finance-max-new-tokens", "2",
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    doc["_markdown"] = (out / "compare.md").read_text()
    doc["_out"] = str(out)
    return doc


def test_compare_rows_bytes_and_steps(tiny_model: Path, tmp_path: Path) -> None:
    doc = _compare(tiny_model, tmp_path)
    rows = {r["label"]: r for r in doc["rows"]}
    expected = [
        "base (no training)",
        *(f"isolated silo-{i}" for i in range(SILOS)),
        f"isolated (mean of {SILOS})",
        "federated FedAvg",
        "federated FlexLoRA",
        "centralized (pooled data)",
    ]
    assert [r["label"] for r in doc["rows"]] == expected
    for label in expected:
        assert f"| {label} |" in doc["_markdown"]
        assert rows[label]["items"] == {"tfns": 4}
        assert 0.0 <= rows[label]["scores"]["tfns"] <= 1.0
    per_silo = ROUNDS * STEPS
    assert doc["step_rule"] in doc["_markdown"]
    # Macro-F1 beside accuracy, and the always-majority floor of the very items scored.
    for label in expected:
        assert 0.0 <= rows[label]["macro_f1"]["tfns"] <= 1.0
    floor = doc["majority_baseline"]["tfns"]
    assert floor["accuracy"] == pytest.approx(max(_eval_golds(doc).values()) / 4)
    # Per-label recall, recomputed here from each row's per-item records; the mean row averages.
    for label in expected:
        if label.startswith("isolated (mean"):
            continue
        records = _records(doc, label)
        golds = {r["gold"] for r in records}
        recall = {g: fmean(r["correct"] for r in records if r["gold"] == g) for g in golds}
        assert rows[label]["label_recall"]["tfns"] == pytest.approx(recall)
    mean = rows[f"isolated (mean of {SILOS})"]["label_recall"]["tfns"]
    for g, value in mean.items():
        assert value == pytest.approx(
            sum(rows[f"isolated silo-{i}"]["label_recall"]["tfns"][g] for i in range(SILOS)) / SILOS
        )
    assert "Recall per gold label, TFNS (%):" in doc["_markdown"]
    assert "| Approach | " + " | ".join(sorted(_eval_golds(doc))) + " |" in doc["_markdown"]
    assert f"TFNS {100 * floor['accuracy']:.2f} % accuracy" in doc["_markdown"]
    # Trained in the prompt the evaluation asks with, and the table says so.
    assert doc["prompt_style"] == "eval" and "training prompt eval" in doc["_markdown"]

    # FedAvg: the whole rank-RANK adapter goes down and comes back up, every silo, every round.
    fedavg = rows["federated FedAvg"]
    # Flower's count: the float32 values plus each tensor's header (dtype, shape, key), a couple of
    # hundred bytes per tensor (8 tensors per payload here; ~1 % of a real adapter).
    payloads = SILOS * 2 * ROUNDS
    raw = _lora_params(RANK) * 4 * payloads
    assert raw < fedavg["adapter_bytes"] <= raw + 256 * 8 * payloads
    # fp32 transport, packed: one header per payload instead of one per tensor (the fp32 figure).
    assert raw < fedavg["adapter_bytes"] < fedavg["fp32_bytes"]
    assert fedavg["uplink_bytes"] == fedavg["downlink_bytes"]
    # FlexLoRA: each silo sends and receives factors at its own rank.
    flex = rows["federated FlexLoRA"]
    raw = sum(_lora_params(r) for r in FLEX_RANKS) * 4 * 2 * ROUNDS
    assert raw < flex["adapter_bytes"] <= raw + 256 * 8 * len(FLEX_RANKS) * 2 * ROUNDS
    assert flex["ranks"] == list(FLEX_RANKS)

    for i in range(SILOS):
        iso = rows[f"isolated silo-{i}"]
        assert (iso["adapter_bytes"], iso["raw_data_bytes"]) == (0, 0)
        assert iso["steps_per_silo"] == iso["total_steps"] == per_silo
        assert len(iso["train_losses"]) == ROUNDS
    mean = rows[f"isolated (mean of {SILOS})"]
    assert mean["total_steps"] == SILOS * per_silo
    assert mean["scores"]["tfns"] == pytest.approx(
        sum(rows[f"isolated silo-{i}"]["scores"]["tfns"] for i in range(SILOS)) / SILOS
    )
    for label in ("federated FedAvg", "federated FlexLoRA", "centralized (pooled data)"):
        assert rows[label]["steps_per_silo"] == per_silo
        assert rows[label]["total_steps"] == SILOS * per_silo
    central = rows["centralized (pooled data)"]
    assert central["adapter_bytes"] == 0
    silo_files = sorted((Path(doc["_out"]) / "silos").glob("silo-*.jsonl"))
    assert len(silo_files) == SILOS
    assert central["raw_data_bytes"] == sum(p.stat().st_size for p in silo_files) > 0
    assert fedavg["raw_data_bytes"] == flex["raw_data_bytes"] == 0
    assert rows["base (no training)"]["total_steps"] == 0
    # Every approach's evaluation is kept in silotune eval's own format.
    assert (Path(doc["_out"]) / "evals" / "federated_FedAvg" / "finance-generate.json").is_file()
    # Every trained row keeps its adapter; the base row has none.
    adapters = Path(doc["_out"]) / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == sorted(
        row_slug(label) for label in expected if label != "base (no training)" and "mean" not in label
    )


def _records(doc: dict, label: str) -> list[dict]:
    """The per-item records compare wrote for one row's TFNS evaluation."""
    path = Path(doc["_out"]) / "evals" / row_slug(label) / "finance-generate-items" / "tfns.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval_golds(doc: dict) -> dict[str, int]:
    """Gold label counts of the items compare scored (from the base row's per-item records)."""
    from collections import Counter

    path = Path(doc["_out"]) / "evals" / "base_no_training" / "finance-generate-items" / "tfns.jsonl"
    return Counter(json.loads(line)["gold"] for line in path.read_text().splitlines())


def test_saved_adapter_is_the_one_compare_scored(tiny_model: Path, tmp_path: Path) -> None:
    """`silotune eval --adapter` on a saved row gives the outputs compare recorded for that row."""
    doc = _compare(tiny_model, tmp_path, "--approaches", "fedavg", "--eval-batch-size", "1")
    out = Path(doc["_out"])
    eval_out = tmp_path / "re-eval"
    rc = main(
        [
            "eval", "--suite", "finance", "--base", str(tiny_model),
            "--adapter", str(out / "adapters" / "federated_FedAvg"),
            "--data-dir", str(out.parent / "bench"), "--benchmarks", "tfns",
            "--finance-max-new-tokens", "2", "--batch-size", "1", "--out", str(eval_out),
        ]
    )  # fmt: skip
    assert rc == 0

    def outputs(path: Path) -> dict[str, str]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {r["id"]: r["output"] for r in rows}

    scored = outputs(out / "evals" / "federated_FedAvg" / "finance-generate-items" / "tfns.jsonl")
    again = outputs(eval_out / "finance-generate-items" / "tfns.jsonl")
    assert len(scored) == 4 and len(again) == 6  # compare sampled 4 of the 6 items
    assert {k: again[k] for k in scored} == scored


def test_compare_dirichlet_one_rank_subset(tiny_model: Path, tmp_path: Path) -> None:
    doc = _compare(
        tiny_model,
        tmp_path,
        "--split", "dirichlet",
        "--alpha", "0.5",
        "--ranks", "4",
        "--approaches", "fedavg,flexlora",
    )  # fmt: skip
    rows = {r["label"]: r for r in doc["rows"]}
    assert list(rows) == ["federated FedAvg", "federated FlexLoRA"]
    # One rank for all: FlexLoRA moves exactly what FedAvg moves.
    assert rows["federated FlexLoRA"]["adapter_bytes"] == rows["federated FedAvg"]["adapter_bytes"]
    assert doc["split"] == "dirichlet" and doc["alpha"] == 0.5
    assert sum(s["rows"] for s in doc["silos"]) == 36


def test_fedavg_with_one_silo_is_isolated_training(tiny_model: Path) -> None:
    """The approaches differ only in what happens between phases: with one silo, FedAvg's
    aggregation is the identity, so federated and isolated training give the same adapter."""
    import numpy as np

    from evaluation.inprocess import AdapterBank, Silo, train_federated, train_isolated
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_records
    from silotune.config import parse_run_config
    from silotune.modeling import load_model

    run = parse_run_config(
        {"model.name": str(tiny_model), "peft.rank": 4, "train.local-steps": 2, "train.batch-size": 2}
    )
    loaded = load_model(run.model)
    records = [
        {"instruction": "", "input": f"shares {WORDS[str(i % 3)]}", "output": "neutral"} for i in range(6)
    ]
    examples = encode_records(loaded.tokenizer, get_template("finance"), records, 64, True)
    bank = AdapterBank(loaded.model, loaded.tokenizer, run.peft, run.train.seed)
    silo = Silo("silo-0", examples, 4)
    iso = train_isolated(bank, silo, run.train, 2, log=lambda _m: None)
    fed = train_federated(bank, [silo], run, 2, log=lambda _m: None)
    assert list(iso.state) == list(fed.state)
    for k in iso.state:
        np.testing.assert_array_equal(iso.state[k], fed.state[k])
    assert any(np.abs(v).sum() > 0 for k, v in iso.state.items() if "lora_B" in k)  # it trained
    raw = _lora_params(4) * 4 * 2 * 2
    assert raw < fed.adapter_bytes <= raw + 256 * 8 * 4 and fed.adapter_bytes < fed.fp32_bytes


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ranks", "4,8"], "one positive rank per silo"),
        (["--split", "dirichlet"], "needs --label-column"),
        (["--approaches", "fedavg,magic"], "unknown ['magic']"),
    ],
)
def test_compare_refuses_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    train, eval_dir = _finance_data(tmp_path)
    args = ["compare", "--data", str(train), "--silos", "3", "--eval-data-dir", str(eval_dir)]
    if "--split" in extra:
        rc = main([*args, *extra])
    else:
        rc = main([*args, "--label-column", "label", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_select_items_first_or_seeded_random() -> None:
    from evaluation.benchmarks import get_benchmark
    from evaluation.compare import select_items

    bench = get_benchmark("tfns")
    items = list(range(50))
    assert select_items(bench, items, 5, "first", 0) == [0, 1, 2, 3, 4]
    a = select_items(bench, items, 5, "random", 1)
    assert a == select_items(bench, items, 5, "random", 1) == sorted(a)
    assert len(set(a)) == 5 and a != [0, 1, 2, 3, 4]
    assert select_items(bench, items, 80, "random", 1) == items
    assert select_items(bench, items, None, "random", 1) == items


def test_server_strategy_rows_fedprox_fedadam(tiny_model: Path, tmp_path: Path) -> None:
    """Extra rows: FedProx with mu 0 trains exactly FedAvg's adapter; mu > 0 and FedAdam differ."""
    from silotune.adapters import load_adapter_dir

    doc = _compare(
        tiny_model,
        tmp_path,
        "--approaches",
        "fedavg,fedprox,fedadam",
        "--proximal-mu",
        "0",
        "--server-lr",
        "0.01",
    )
    labels = [r["label"] for r in doc["rows"]]
    assert labels == ["federated FedAvg", "federated FedProx (mu 0)", "federated FedAdam (lr 0.01)"]
    rows = {r["approach"]: r for r in doc["rows"]}
    for approach in ("fedprox", "fedadam"):  # same payloads as FedAvg: the whole adapter, each way
        assert rows[approach]["adapter_bytes"] == rows["fedavg"]["adapter_bytes"]
    adapters = Path(doc["_out"]) / "adapters"
    fedavg, _ = load_adapter_dir(adapters / "federated_FedAvg")
    prox0, _ = load_adapter_dir(adapters / "federated_FedProx_mu_0")
    adam, _ = load_adapter_dir(adapters / "federated_FedAdam_lr_0.01")
    assert all((fedavg[k] == prox0[k]).all() for k in fedavg)
    assert any(not np.allclose(fedavg[k], adam[k]) for k in fedavg)

    (tmp_path / "mu").mkdir()
    doc = _compare(tiny_model, tmp_path / "mu", "--approaches", "fedprox", "--proximal-mu", "1.0")
    prox1, _ = load_adapter_dir(Path(doc["_out"]) / "adapters" / "federated_FedProx_mu_1")
    assert any(not np.allclose(fedavg[k], prox1[k]) for k in fedavg)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_in_process_federation_trains_in_every_transport_format(tiny_model: Path, dtype: str) -> None:
    """Two rounds through the codec (downlink quantized, uplink as an update with error feedback):
    the adapter trains, and the wire carries less than fp32 would."""
    import numpy as np

    from evaluation.inprocess import AdapterBank, Silo, train_federated
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_records
    from silotune.config import parse_run_config
    from silotune.modeling import load_model

    run = parse_run_config(
        {"model.name": str(tiny_model), "peft.rank": 4, "train.local-steps": 2, "train.batch-size": 2,
         "transport.dtype": dtype, "strategy.min-nodes": 2}
    )  # fmt: skip
    loaded = load_model(run.model)
    bank = AdapterBank(loaded.model, loaded.tokenizer, run.peft, run.train.seed)
    silos = []
    for s in range(2):
        records = [
            {"instruction": "", "input": f"shares {WORDS[str((i + s) % 3)]}", "output": "neutral"}
            for i in range(6)
        ]
        examples = encode_records(loaded.tokenizer, get_template("finance"), records, 64, True)
        silos.append(Silo(f"silo-{s}", examples, 4))
    out = train_federated(bank, silos, run, 2, log=lambda _m: None)
    assert any(np.abs(v).sum() > 0 for k, v in out.state.items() if "lora_B" in k)  # it trained
    assert all(np.isfinite(v).all() for v in out.state.values())
    assert out.uplink_bytes + out.downlink_bytes < out.fp32_bytes


def test_eval_precision_bf16_autocasts_and_fp32_does_not() -> None:
    import torch

    from evaluation.compare import eval_precision

    x = torch.ones(4, 4)
    with eval_precision("bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with eval_precision("fp32"):
        assert (x @ x).dtype == torch.float32
