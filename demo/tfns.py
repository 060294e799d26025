"""The demo's real text: a small, seeded subset of Twitter Financial News Sentiment (TFNS), bundled.

TFNS (``zeroshot/twitter-financial-news-sentiment`` on the Hugging Face hub, MIT licence; see
demo/data/LICENSE-TFNS.md) is one of the three sets of FlowerTune's finance evaluation, and its
validation split is the one FlowerTune scores. The demo ships two files derived from it:

- ``demo/data/tfns_demo_train.csv``: 1,500 rows of TFNS's *train* split, 500 per label (class
  balanced). TFNS is 65 % neutral; with a few hundred training examples a stratified sample mostly
  teaches the prior ("answer neutral"), which raises accuracy and leaves macro-F1 where it was. Equal
  classes make the adapter learn what bearish and bullish tweets look like, which is the gain
  macro-F1 measures.
- ``demo/data/tfns_demo_heldout.csv``: 300 rows of TFNS's *validation* split (FlowerTune's
  evaluation split), stratified: the labels keep the split's shares (65.7 % neutral), so accuracy
  on them reads like accuracy on the real split, and "always neutral" scores about 65.7 %.

Both keep TFNS's own columns (``text``, ``label``: 0 bearish/negative, 1 bullish/positive, 2
neutral) plus ``source_row``, the row's 0-based index in the original CSV. Regenerate them (seeded,
byte-identical) from a local copy of TFNS's two CSV files::

    python -m demo.tfns DIR      # DIR holds sent_train.csv and sent_valid.csv

The demo itself reads only the bundled files (``demo/data``), never DIR.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from collections import defaultdict
from pathlib import Path

from silo_node.app.templates import instruction_answer_prompt

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE, HELDOUT_FILE = "tfns_demo_train.csv", "tfns_demo_heldout.csv"
SOURCE = "TFNS (zeroshot/twitter-financial-news-sentiment, MIT licence)"
LABELS = {0: "negative", 1: "positive", 2: "neutral"}  # TFNS: 0 bearish, 1 bullish, 2 neutral
# FlowerTune's TFNS prompt (evaluation/benchmarks/finance.py): "tweet", not FinGPT's "news".
INSTRUCTION = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
SEED = 20260421
TRAIN_PER_LABEL = 500
HELDOUT_ROWS = 300
FIELDS = ("source_row", "text", "label")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        if set(row) != {"text", "label"} or row["label"] not in {"0", "1", "2"}:
            raise ValueError(f"{path}: row {i + 2} is not TFNS (text,label with label 0/1/2)")
        row["source_row"] = str(i)
    return rows


def _by_label(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[row["label"]].append(row)
    return dict(sorted(groups.items()))


def balanced(rows: list[dict[str, str]], per_label: int, seed: int) -> list[dict[str, str]]:
    """``per_label`` rows of every label, drawn with ``seed``, shuffled together."""
    rng = random.Random(seed)
    out = [r for group in _by_label(rows).values() for r in rng.sample(group, per_label)]
    rng.shuffle(out)
    return out


def stratified(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows whose label shares follow ``rows``' (largest remainder), drawn with ``seed``."""
    rng = random.Random(seed)
    groups = _by_label(rows)
    exact = {k: n * len(g) / len(rows) for k, g in groups.items()}
    quota = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - quota[k], reverse=True)[: n - sum(quota.values())]:
        quota[k] += 1
    out = [r for k, g in groups.items() for r in rng.sample(g, quota[k])]
    rng.shuffle(out)
    return out


def to_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def derive(source_dir: Path, out_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    """Write the two bundled files from TFNS's sent_train.csv and sent_valid.csv in ``source_dir``."""
    train = balanced(_read(Path(source_dir) / "sent_train.csv"), TRAIN_PER_LABEL, SEED)
    held = stratified(_read(Path(source_dir) / "sent_valid.csv"), HELDOUT_ROWS, SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / TRAIN_FILE, out_dir / HELDOUT_FILE
    for path, rows in zip(paths, (train, held), strict=True):
        path.write_text(to_csv(rows), encoding="utf-8")
    return paths


def load(name: str, data_dir: Path = DATA_DIR) -> list[dict[str, str]]:
    """A bundled file as instruction/input/output records (the finance template's fields)."""
    path = Path(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo's bundled TFNS subset is missing (broken install?)")
    with open(path, encoding="utf-8", newline="") as fh:
        return [
            {"instruction": INSTRUCTION, "input": r["text"], "output": LABELS[int(r["label"])]}
            for r in csv.DictReader(fh)
        ]


def prompt(record: dict[str, str]) -> str:
    """FlowerTune's evaluation prompt for one record (what train.prompt-style = "eval" trains on)."""
    return instruction_answer_prompt(record["instruction"], record["input"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.tfns", description=__doc__.split("\n\n")[0])
    parser.add_argument("source_dir", type=Path, help="folder with TFNS's sent_train.csv and sent_valid.csv")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"where to write (default {DATA_DIR})")
    args = parser.parse_args(argv)
    for path in derive(args.source_dir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
