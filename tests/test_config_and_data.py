"""Config refusals that name the key; data errors that name the file and the problem; splitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from command_line.main import main as cli_main
from silo_node.app.data import load_silo_records, read_records
from silo_node.ops.split import split_file, split_indices
from silotune.config import (
    ConfigError,
    flatten_run_config,
    load_toml_run_config,
    lr_for_round,
    parse_run_config,
    parse_silo_config,
)
from silotune.errors import DataError, UserError

# -- config ---------------------------------------------------------------------------------------


def test_defaults_and_dashed_dotted_keys_parse() -> None:
    cfg = parse_run_config({"peft.rank": 16, "train.lr-max": 2e-4, "strategy.name": "fedprox"})
    assert cfg.peft.rank == 16 and cfg.train.lr_max == 2e-4 and cfg.strategy.name == "fedprox"
    assert parse_run_config(flatten_run_config(cfg)) == cfg


def test_unknown_key_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"peft\.rnak: unknown key"):
        parse_run_config({"peft.rnak": 4})
    with pytest.raises(ConfigError, match=r"learning-rate: unknown key"):
        parse_run_config({"learning-rate": 4})


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("peft.rank", 0, "peft.rank"),
        ("peft.method", "loha", "peft.method"),
        ("model.dtype", "fp8", "model.dtype"),
        ("strategy.fraction-train", 1.5, "strategy.fraction-train"),
        ("train.batch-size", "four", "train.batch-size"),
        ("num-rounds", -1, "num-rounds"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    assert needle in str(err.value)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="lr-min"):
        parse_run_config({"train.lr-min": 1.0, "train.lr-max": 0.1})
    with pytest.raises(ConfigError, match="flexlora"):
        parse_run_config({"strategy.name": "flexlora", "peft.method": "ia3"})
    assert parse_run_config({"peft.method": "qlora"}).model.quantization == "4bit"


def test_silo_config_requires_data_path_and_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="data-path: missing"):
        parse_silo_config({"name": "a"})
    with pytest.raises(ConfigError, match="lora-rnak: unknown key"):
        parse_silo_config({"data-path": "x.jsonl", "lora-rnak": 4})
    silo = parse_silo_config({"data-path": "x.jsonl", "lora-rank": 4, "partition-id": 0})
    assert silo.lora_rank == 4


def test_toml_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[peft]\nrank = 8\nmethod = "lora"\n[train]\nbogus = 1\n')
    with pytest.raises(ConfigError) as err:
        load_toml_run_config(f)
    assert str(f) in str(err.value) and "train.bogus" in str(err.value)


def test_cosine_annealing_matches_flowertune() -> None:
    cfg = parse_run_config({"train.lr-max": 5e-5, "train.lr-min": 1e-6}).train
    assert lr_for_round(cfg, 0, 10) == pytest.approx(5e-5)
    assert lr_for_round(cfg, 10, 10) == pytest.approx(1e-6)
    assert lr_for_round(cfg, 5, 10) == pytest.approx((5e-5 + 1e-6) / 2)


# -- data -----------------------------------------------------------------------------------------


def _silo(path: Path, **kw: str) -> object:
    return parse_silo_config({"data-path": str(path), **kw})


def test_reads_all_four_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"input": "shares rose", "output": "positive"}, {"input": "shares fell", "output": "negative"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.csv").write_text("input,output\nshares rose,positive\nshares fell,negative\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for ext in ("json", "jsonl", "csv", "parquet"):
        recs = load_silo_records(_silo(tmp_path / f"a.{ext}"), "finance")
        assert [r["output"] for r in recs] == ["positive", "negative"], ext


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("empty.jsonl", b"", "file is empty"),
        ("blank.csv", b"   \n", "empty"),
        ("latin.csv", "input,output\nsoci\xe9t\xe9 up,positive\n".encode("latin-1"), "not valid utf-8"),
        ("broken.json", b'[{"input": "a",', "invalid JSON at line 1"),
        ("broken.jsonl", b'{"input": "a", "output": "b"}\n{oops}\n', "invalid JSON on line 2"),
        ("bad.parquet", b"not parquet at all", "unreadable Parquet"),
        ("data.xlsx", b"PK", "unsupported file type"),
    ],
)
def test_data_errors_name_the_file_and_problem(
    tmp_path: Path, name: str, content: bytes, needle: str
) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_silo_records(_silo(f), "finance")
    assert str(f) in str(err.value) and needle in str(err.value)


def test_missing_file_and_missing_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.jsonl")
    f = tmp_path / "tfns.csv"
    f.write_text("text,label\nshares rose,1\n")
    with pytest.raises(DataError) as err:
        load_silo_records(_silo(f), "finance")
    msg = str(err.value)
    assert str(f) in msg and "missing column(s) ['input', 'output']" in msg and "columns=" in msg
    recs = load_silo_records(
        _silo(f, columns="input=text,output=label", **{"label-map": "1=positive"}), "finance"
    )
    assert recs == [{"instruction": "", "input": "shares rose", "output": "positive"}]


def test_encoding_option_and_unknown_label(tmp_path: Path) -> None:
    f = tmp_path / "latin.csv"
    f.write_bytes("input,output\nsoci\xe9t\xe9 up,7\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"label '7' is not in label-map"):
        load_silo_records(_silo(f, **{"data-encoding": "latin-1", "label-map": "1=positive"}), "finance")
    recs = load_silo_records(_silo(f, **{"data-encoding": "latin-1"}), "finance")
    assert recs[0]["input"] == "société up"


def test_empty_required_field_names_the_row(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"input": "a", "output": "b"}) + "\n" + json.dumps({"input": "", "output": "b"}) + "\n"
    )
    with pytest.raises(DataError, match=r"row 2: field 'input' is empty"):
        load_silo_records(_silo(f), "finance")


def test_templates_mask_free_prompt_ends_without_trailing_space() -> None:
    from silo_node.app.templates import TEMPLATES

    for t in TEMPLATES.values():
        prompt, response = t.render({"instruction": "Do it", "input": "x", "output": "done"})
        assert prompt.endswith("### Response:\n") and response == "done"
    prompt, _ = TEMPLATES["finance"].render({"input": "shares rose", "output": "positive"})
    assert "What is the sentiment of this news?" in prompt


# -- split ----------------------------------------------------------------------------------------


def test_iid_split_is_a_seeded_partition() -> None:
    labels = [i % 3 for i in range(30)]
    parts = split_indices(30, 4, "iid", seed=1)
    assert sorted(i for p in parts for i in p) == list(range(30))
    assert parts == split_indices(30, 4, "iid", seed=1, labels=labels)
    assert parts != split_indices(30, 4, "iid", seed=2)


def test_dirichlet_small_alpha_skews_labels(tmp_path: Path) -> None:
    src = tmp_path / "all.jsonl"
    src.write_text(
        "".join(json.dumps({"input": f"t{i}", "output": ["a", "b", "c"][i % 3]}) + "\n" for i in range(300))
    )
    written = split_file(src, tmp_path / "out", 3, "dirichlet", seed=0, alpha=0.1, label_column="output")
    assert sum(n for _, n, _ in written) == 300
    # With alpha=0.1 at least one silo is dominated by one label (>80 %).
    assert any(max(c.values()) / n > 0.8 for _, n, c in written)
    iid = split_file(src, tmp_path / "iid", 3, "iid", seed=0, label_column="output")
    assert all(max(c.values()) / n < 0.5 for _, n, c in iid)


def test_split_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "all.csv"
    src.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    assert cli_main(["data", "split", str(src), "--silos", "2", "--out", str(tmp_path / "o")]) == 0
    assert len((tmp_path / "o" / "silo-0.jsonl").read_text().splitlines()) == 5
    with pytest.raises(UserError, match="needs --label-column"):
        split_indices(10, 2, "dirichlet", 0)
    with pytest.raises(UserError, match="cannot give 20 silos"):
        split_indices(10, 20, "iid", 0)
    with pytest.raises(DataError, match="no column 'lbl'"):
        split_file(src, tmp_path / "x", 2, "dirichlet", label_column="lbl")
