"""Silo data, run configs and events for the real-process federation tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from demo.local_federation import LocalFederation
from silotune.events import read_events

RANKS = {"hospital-a": 2, "hospital-b": 4, "bank-c": 8}


WORDS = {
    "negative": ["fell", "plunged", "missed", "cut"],
    "positive": ["rose", "beat", "soared", "raised"],
    "neutral": ["held", "announced", "scheduled", "filed"],
}


def write_silo_data(path: Path, seed: int, n: int = 24) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            text = f"Company {rng.randint(1, 99)} shares {rng.choice(WORDS[label])} after the report"
            fh.write(json.dumps({"text": text, "label": label}) + "\n")


def run_config(model: Path, run_dir: str, **extra: object) -> dict:
    cfg = {
        "model.name": str(model),
        "num-rounds": 2,
        "strategy.min-nodes": 3,
        "run-dir": run_dir,
        "train.local-steps": 2,
        "train.batch-size": 4,
        "train.seq-length": 64,
        "train.lr-max": 5e-3,
        "strategy.round-timeout": 600.0,
    }
    cfg.update(extra)
    return cfg


def run_events(fed: LocalFederation, run_dir: str) -> list[dict]:
    return list(read_events(fed.runs_root / run_dir / "events.jsonl"))
