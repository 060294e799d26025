"""Partition one dataset into N silo files: IID, Dirichlet non-IID over a label column, or by column.

Used to build federations from a single public dataset (benchmarks, the demo). Dirichlet(alpha)
splitting follows the common FL practice (Hsu et al. 2019): for every label, the share each silo
receives is drawn from Dir(alpha); small alpha = very skewed silos, large alpha = close to IID.
Splitting by column gives every distinct value of a column its own silo: the natural cross-silo
federation, where each institution holds one kind of text (``silotune data finance`` writes a
``source`` column: analyst sentences, social posts, forum posts and headlines).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from silo_node.app.data import read_records
from silotune.atomic_files import atomic_write_text
from silotune.errors import DataError, UserError


def split_indices(
    n: int,
    n_silos: int,
    method: str,
    seed: int,
    labels: list[Any] | None = None,
    alpha: float = 0.5,
    min_per_silo: int = 1,
) -> list[list[int]]:
    """Indices of ``n`` rows per silo; ``labels`` (one per row) is required for 'dirichlet'.

    Every silo gets at least ``min_per_silo`` rows.
    """
    if n_silos < 1:
        raise UserError("--silos must be at least 1")
    if labels is not None and len(labels) != n:
        raise ValueError("one label per row")
    rng = np.random.default_rng(seed)
    if method == "iid":
        raise_if_small(n, n_silos, min_per_silo)
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, n_silos)]
    if method == "column":
        if labels is None:
            raise UserError("--method column needs --label-column (each of its values becomes a silo)")
        values = sorted(set(labels), key=str)
        if n_silos != len(values):
            raise UserError(
                f"--method column: the column holds {len(values)} values ({', '.join(map(str, values))}), "
                f"so it makes {len(values)} silos, not {n_silos}"
            )
        return [[i for i, lab in enumerate(labels) if lab == v] for v in values]
    if method != "dirichlet":
        raise UserError(f"--method {method!r}: use 'iid', 'dirichlet' or 'column'")
    if labels is None:
        raise UserError("--method dirichlet needs --label-column")
    if alpha <= 0:
        raise UserError("--alpha must be positive")
    raise_if_small(n, n_silos, min_per_silo)
    by_label: dict[Any, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    # Redraw until every silo has enough rows (bounded: a silo left empty is useless).
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_silos)]
        for lab in sorted(by_label, key=str):
            idx = rng.permutation(by_label[lab])
            shares = rng.dirichlet([alpha] * n_silos)
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_silo:
            return [sorted(p) for p in parts]
    raise UserError(
        f"could not give every silo {min_per_silo} rows with alpha={alpha}; raise --alpha or use fewer silos"
    )


def raise_if_small(n: int, n_silos: int, min_per_silo: int) -> None:
    if n < n_silos * min_per_silo:
        raise UserError(f"{n} rows cannot give {n_silos} silos {min_per_silo} row(s) each")


def split_file(
    path: Path,
    out_dir: Path,
    n_silos: int,
    method: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    label_column: str | None = None,
    encoding: str = "utf-8",
    prefix: str = "silo",
) -> list[tuple[Path, int, dict[str, int]]]:
    """Write ``out_dir/<prefix>-<i>.jsonl`` per silo; return (path, rows, label counts) each.

    ``method="column"``: one silo per value of ``label_column``, named ``<prefix>-<value>.jsonl``,
    and ``n_silos`` 0 means "as many as the column has values".
    """
    rows = read_records(path, encoding)
    labels = None
    if label_column:
        if label_column not in rows[0]:
            raise DataError(f"{path}: no column {label_column!r}; the file has {sorted(rows[0])}")
        labels = [str(r.get(label_column)) for r in rows]
    if method == "column" and n_silos == 0 and labels is not None:
        n_silos = len(set(labels))
    parts = split_indices(len(rows), n_silos, method, seed, labels, alpha)
    names = [str(i) for i in range(len(parts))]
    if method == "column" and labels is not None:
        names = [re.sub(r"[^A-Za-z0-9._-]+", "_", labels[idx[0]]) for idx in parts]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, idx in zip(names, parts, strict=True):
        target = out_dir / f"{prefix}-{name}.jsonl"
        text = "".join(json.dumps(rows[j], ensure_ascii=False, default=str) + "\n" for j in idx)
        atomic_write_text(target, text)
        counts = dict(Counter(labels[j] for j in idx)) if labels else {}
        written.append((target, len(idx), counts))
    return written
