"""A small financial-sentiment sample that SiloTune authors itself, for benchmarks of the machinery.

Headlines written by us from templates (companies, events, figures), labelled by construction, free
of any licence question, and trivially learnable: the round-cost and wire benchmarks
(benchmarks/round_overhead.py, wire_bytes.py, silo_vs_standalone.py) use them because what they
measure does not depend on the text. Held-out items come from the same templates as the training
items, so accuracy on them says nothing about real financial text. `silotune demo` trains on real
text instead: the TFNS subset bundled in demo/data (demo/tfns.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COMPANIES = [
    "Acme Robotics",
    "Borealis Energy",
    "Cobalt Bank",
    "Delta Foods",
    "Evergreen Pharma",
    "Falcon Airlines",
    "Granite Insurance",
    "Helix Semiconductors",
    "Ion Telecom",
    "Juniper Retail",
    "Kestrel Motors",
    "Lumen Media",
    "Meridian Logistics",
    "Nimbus Cloud",
    "Orchid Biotech",
    "Pinnacle Steel",
    "Quartz Payments",
    "Redwood Homes",
    "Summit Hotels",
    "Tidal Shipping",
]
EVENTS = {
    "positive": [
        "{c} beats quarterly earnings estimates as revenue jumps {p}%",
        "{c} shares surge {p}% after record profit",
        "{c} raises full-year guidance on strong demand",
        "{c} wins multi-year contract worth ${m} million",
        "Analysts upgrade {c} to buy, citing margin growth",
        "{c} announces ${m} million share buyback and higher dividend",
        "{c} stock rallies {p}% on upbeat sales outlook",
    ],
    "negative": [
        "{c} misses earnings estimates and shares fall {p}%",
        "{c} cuts full-year outlook as demand weakens",
        "{c} shares plunge {p}% after profit warning",
        "Regulators fine {c} ${m} million over compliance failures",
        "{c} announces layoffs of {p}% of its workforce amid losses",
        "Analysts downgrade {c} to sell on falling margins",
        "{c} suspends dividend after quarterly loss widens",
    ],
    "neutral": [
        "{c} to report quarterly results on Thursday",
        "{c} appoints new chief financial officer",
        "{c} schedules annual shareholder meeting for May",
        "{c} completes previously announced office relocation",
        "{c} files routine quarterly report with regulators",
        "{c} shares unchanged ahead of industry conference",
        "{c} names {p} new members to its advisory board",
    ],
}
INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."


def headlines(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` labelled headlines in the FinGPT instruction format (instruction, input, output)."""
    rng = random.Random(seed)
    rows = []
    labels = sorted(EVENTS)
    for i in range(n):
        label = labels[i % len(labels)]
        text = rng.choice(EVENTS[label]).format(
            c=rng.choice(COMPANIES), p=rng.randint(2, 35), m=rng.randint(20, 900)
        )
        rows.append({"instruction": INSTRUCTION, "input": text, "output": label})
    rng.shuffle(rows)
    return rows


def write_demo_data(
    out_dir: Path, n_silos: int = 3, per_silo: int = 60, held_out: int = 60, seed: int = 7
) -> tuple[list[Path], Path]:
    """Write one JSONL file per silo (disjoint) and one held-out evaluation file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = headlines(n_silos * per_silo + held_out, seed)
    paths = []
    for i in range(n_silos):
        p = out_dir / f"silo-{i}.jsonl"
        _write_jsonl(p, rows[i * per_silo : (i + 1) * per_silo])
        paths.append(p)
    eval_path = out_dir / "held-out.jsonl"
    _write_jsonl(eval_path, rows[n_silos * per_silo :])
    return paths, eval_path


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
