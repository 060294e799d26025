"""A silo's private data: reading JSON/JSONL/CSV/Parquet (or a hub dataset), mapping, checking.

Everything is checked before any training starts, and every problem names the file: a silo operator
must be able to fix their data without reading our code.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from silo_node.app.templates import get_template
from silotune.config import SiloConfig
from silotune.errors import DataError

SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _read_text(path: Path, encoding: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-save the file as UTF-8, or set data-encoding in the silo's node config "
            "(e.g. data-encoding=latin-1)"
        ) from None
    except LookupError:
        raise DataError(f"{path}: unknown data-encoding {encoding!r}") from None
    return text.lstrip("\ufeff")  # tolerate a UTF-8 byte-order mark (common in CSV exports)


def read_records(path: Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read all rows of a local data file as dicts. Raises DataError naming the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: file not found (check data-path in the silo's node config)")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; data-path must name one file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(sorted(SUFFIXES))}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DataError(f"{path}: unreadable Parquet file ({exc})") from None
    else:
        text = _read_text(path, encoding)
        if not text.strip():
            raise DataError(f"{path}: file is empty (only whitespace)")
        rows = _parse_text(path, kind, text)
    if not rows:
        raise DataError(f"{path}: file holds no rows")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad + 1} is not an object with named fields")
    return rows


def _parse_text(path: Path, kind: str, text: str) -> list[dict[str, Any]]:
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        if isinstance(data, dict):
            # {"train": [...]} or {"data": [...]} layouts are common exports.
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: JSON must be a list of objects (or one list inside an object)")
        return data
    if kind == "jsonl":
        rows = []
        # Only "\n" ends a JSONL record: str.splitlines() would also split inside a string at
        # U+2028 / U+2029 / U+0085, which JSON allows unescaped (real tweets contain them).
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: invalid JSON on line {n}: {exc.msg}") from None
        return rows
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may hold newlines
        rows = [dict(r) for r in reader]
    except csv.Error as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None
    if reader.fieldnames is None:
        raise DataError(f"{path}: CSV has no header row")
    return rows


def load_hub_dataset(dataset_id: str, split: str = "train") -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(dataset_id, split=split)]
    except Exception as exc:
        raise DataError(
            f"{dataset_id}: not a local file, and the Hugging Face hub could not provide "
            f"it ({type(exc).__name__}: {exc}); pass a local file as data-path"
        ) from None


def _is_local(data_path: str) -> bool:
    p = Path(data_path).expanduser()
    return p.exists() or p.suffix.lower() in SUFFIXES or data_path.startswith(("/", ".", "~"))


def map_records(
    rows: list[dict[str, Any]], silo: SiloConfig, domain: str, source: str
) -> list[dict[str, str]]:
    """Rename columns, map labels, and check the template's required fields on every row."""
    template = get_template(domain)
    mapping = silo.column_mapping()  # template field -> file column
    labels = silo.label_mapping()
    available = set(rows[0].keys())
    for field, column in mapping.items():
        if field not in ("instruction", "input", "output"):
            raise DataError(
                f"{source}: columns maps unknown field {field!r}; fields are instruction, input, output"
            )
        if column not in available:
            raise DataError(
                f"{source}: column {column!r} (mapped to {field}) not found; the file has {sorted(available)}"
            )
    missing = [f for f in template.required if mapping.get(f, f) not in available]
    if missing:
        hint = ",".join(f"{f}=<column>" for f in missing)
        raise DataError(
            f"{source}: missing column(s) {missing} needed by the {domain} template; "
            f"the file has {sorted(available)}. Rename them or set columns='{hint}' "
            "in the silo's node config"
        )
    out = []
    for i, row in enumerate(rows):
        rec = {f: row.get(mapping.get(f, f)) for f in ("instruction", "input", "output")}
        if labels and rec["output"] is not None:
            key = str(rec["output"]).strip()
            if key not in labels:
                raise DataError(f"{source}: row {i + 1}: label {key!r} is not in label-map {sorted(labels)}")
            rec["output"] = labels[key]
        for f in template.required:
            value = rec.get(f)
            if value is None or not str(value).strip():
                raise DataError(f"{source}: row {i + 1}: field {mapping.get(f, f)!r} is empty")
        out.append({k: "" if v is None else str(v) for k, v in rec.items()})
    return out


def load_silo_records(silo: SiloConfig, run_domain: str) -> list[dict[str, str]]:
    """Read, map and check a silo's private records (instruction, input, output strings)."""
    domain = silo.domain or run_domain
    if _is_local(silo.data_path):
        rows = read_records(Path(silo.data_path), silo.data_encoding)
    else:
        rows = load_hub_dataset(silo.data_path)
    records = map_records(rows, silo, domain, silo.data_path)
    if silo.max_examples:
        records = records[: silo.max_examples]
    return records


def split_train_eval(
    records: list[dict[str, str]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A deterministic held-out slice for federated evaluation (never trained on)."""
    import random

    if eval_fraction <= 0 or len(records) < 2:
        return records, []
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(records) * eval_fraction)))
    held = set(idx[:n_eval])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def check_silo_data(silo: SiloConfig, run_domain: str = "finance") -> int:
    """Validate a silo's data before it joins a federation; return the number of records."""
    return len(load_silo_records(silo, run_domain))
