"""One poisoned silo among five: how far does each defence keep the federated adapter from a clean run?

SmolLM2-135M-Instruct (embedded), LoRA on TFNS (FlowerTune's finance sentiment set, read from
``$SILOTUNE_DATA_DIR`` or /work/shared/data: tfns/sent_train.csv to train, tfns/sent_valid.csv to
evaluate), 5 silos on the CPU, silo 0 the attacker. The federation is the in-process round logic of
evaluation/inprocess.py (payload down, local steps, update up) with the server side of
superlink/app/rounds.py: the same strategies and the same superlink/app/defences/.

Scenarios (the attacker trains honestly, then corrupts what it sends; its update is what it sends
minus what it received, per tensor):
  clean     no attacker: what each configuration costs when every silo is honest;
  scale100  update x100;           signflip  update x(-1);
  noise10x  Gaussian noise at 10x its honest update's norm;
  claim1e9  honest update claiming 10^9 examples (the handshake declared its real count: the real
            round loop rejects the reply, code examples_grew; "fedavg" shows what it did before).
Configurations: fedavg (no defence at all), clip+caps (weight cap 0.5, clipping at 3x the median,
the mean: the default before issue 23), and each robust aggregator with the same caps and clipping
(consensus is the default since); plus a clean 5-silo FedAvg run, the reference of every gap.

Round 1 of every run starts from the same initial adapter, so the five silos' round-1 training is
done once and reused; later rounds train afresh.

    python benchmarks/poisoned_silo.py --quick    # 2 rounds, 2 steps, 5 x 16 rows, 24 eval items
    python benchmarks/poisoned_silo.py            # 2 rounds, 10 steps, 5 x 200 rows, 200 eval items

The full mode is the smallest budget at which the clean adapter has learned the task (3 rounds x 5
steps had not: it scored below the untrained model). TFNS is scored as `silotune eval` and
`silotune compare` score it by default: the generated answer (8 new tokens); ``--protocol loglik``
ranks the three labels by log-likelihood instead (it barely moves at these budgets).

Prints readable tables (accuracy / macro-F1, and the round in which the attacker was first flagged:
its reply rejected, or its anomaly scores beyond ``strategy.anomaly-threshold`` or
``strategy.anomaly-min-cosine``), then a last line with one JSON object:
``worst_gap_to_clean_points`` (the best defence's worst accuracy gap to the clean run over the
scenarios, in points), the best defence's name, ``attacker_flagged_within_rounds``, the constant
answers' scores, and every scenario's figures (with the shares of each label it predicted).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import random
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIOS = ("clean", "scale100", "signflip", "noise10x", "claim1e9")
CONFIGS = ("fedavg", "clip+caps", "trimmed-mean", "median", "multi-krum", "consensus")
ATTACKER = 0
LABELS = "0=negative,1=positive,2=neutral"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_root() -> Path:
    root = Path(os.environ.get("SILOTUNE_DATA_DIR", "/work/shared/data"))
    if not (root / "tfns" / "sent_train.csv").exists():
        raise SystemExit(f"TFNS not found under {root}/tfns (set SILOTUNE_DATA_DIR)")
    return root


def _write_silos(root: Path, out: Path, silos: int, rows: int, seed: int) -> list[Path]:
    """``silos`` disjoint random samples of ``rows`` rows of TFNS train (IID), as CSV files."""
    with open(root / "tfns" / "sent_train.csv", newline="", encoding="utf-8") as fh:
        data = list(csv.DictReader(fh))
    picked = random.Random(seed).sample(data, silos * rows)
    paths = []
    for i in range(silos):
        path = out / f"silo-{i}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows({"text": r["text"], "label": r["label"]} for r in picked[i * rows : (i + 1) * rows])
        paths.append(path)
    return paths


def attack(
    scenario: str,
    sent: dict[str, np.ndarray],
    honest: dict[str, np.ndarray],
    n: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], int]:
    """What the attacker sends instead of ``honest`` (trained from ``sent``), and its claimed count."""
    out: dict[str, np.ndarray] = OrderedDict()
    for k, h in honest.items():
        d = h.astype(np.float64) - sent[k]
        if scenario == "scale100":
            d = 100.0 * d
        elif scenario == "signflip":
            d = -d
        elif scenario == "noise10x":
            norm = float(np.linalg.norm(d))
            d = rng.normal(size=d.shape) * (10.0 * norm / np.sqrt(d.size))
        out[k] = (sent[k] + d).astype(np.float32)
    return out, (10**9 if scenario == "claim1e9" else n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--rows-per-silo", type=int)
    ap.add_argument("--eval-limit", type=int)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument(
        "--protocol",
        choices=("generate", "loglik"),
        default="generate",
        help="how TFNS is scored: generated answer (silotune eval's and compare's default) or log-likelihood",
    )
    args = ap.parse_args(argv)
    quick = {"rounds": 2, "local_steps": 2, "rows_per_silo": 16, "eval_limit": 24}
    full = {"rounds": 2, "local_steps": 10, "rows_per_silo": 200, "eval_limit": 200}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    scenarios = [s for s in args.scenarios.split(",") if s]
    configs = [c for c in args.configs.split(",") if c]

    import torch

    from evaluation.benchmarks import SUITES, DataSource
    from evaluation.compare import select_items
    from evaluation.inprocess import AdapterBank, Silo, _phase_train, silo_seed
    from evaluation.runner import EvalSettings, run_choice
    from silo_node.app.data import load_silo_records
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_records
    from silotune.config import EMBEDDED_MODEL, parse_run_config, parse_silo_config
    from silotune.modeling import load_model
    from superlink.app.defences import Defence
    from superlink.app.strategies import SiloUpdate, get_strategy

    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    root = _data_root()
    run = parse_run_config(
        {
            "model.name": EMBEDDED_MODEL,
            "num-rounds": args.rounds,
            "peft.rank": 8,
            "train.local-steps": args.local_steps,
            "train.batch-size": 4,
            "train.seq-length": 96,
            "train.lr-max": 1e-3,
            "train.lr-min": 1e-4,
            "train.seed": args.seed,
            "train.prompt-style": "eval",
        }
    )
    loaded = load_model(run.model)
    template = get_template("finance")
    silos: list[Silo] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(_write_silos(root, Path(tmp), 5, args.rows_per_silo, args.seed)):
            cfg = parse_silo_config(
                {
                    "data-path": str(path),
                    "name": f"silo-{i}",
                    "columns": "input=text,output=label",
                    "label-map": LABELS,
                }
            )
            records = load_silo_records(cfg, "finance")
            ex = encode_records(
                loaded.tokenizer, template, records, run.train.seq_length, run.model.use_chat_template, "eval"
            )
            silos.append(Silo(cfg.name, ex, run.peft.rank))
    bench = next(b for b in SUITES["finance"] if b.name == "tfns")
    items = select_items(bench, bench.load(DataSource(root=root)), args.eval_limit, "random", args.seed)
    settings = EvalSettings(
        protocol=args.protocol,
        limit=args.eval_limit,
        batch_size=8,
        finance_max_new_tokens=8,  # as benchmarks/transport.py: a label is 1-2 tokens
        log=lambda m: None,
    )
    bank = AdapterBank(loaded.model, loaded.tokenizer, run.peft, args.seed)
    init = bank.initial_state(run.peft.rank)
    round1: dict[int, tuple[dict[str, np.ndarray], float]] = {}  # identical in every run: train once

    def local(i: int, payload: dict[str, np.ndarray], rnd: int) -> dict[str, np.ndarray]:
        if rnd == 1 and i in round1:
            return copy.deepcopy(round1[i][0])
        lr = run.train.lr_min + 0.5 * (run.train.lr_max - run.train.lr_min) * (
            1 + np.cos(np.pi * (rnd - 1) / args.rounds)
        )
        state, loss = _phase_train(
            bank, payload, run.peft.rank, silos[i].examples, run.train, args.local_steps, float(lr),
            silo_seed(args.seed, silos[i].name, rnd),
        )  # fmt: skip
        if rnd == 1:
            round1[i] = (copy.deepcopy(state), loss)
            _log(f"  round 1, silo-{i}: training loss {loss:.4f} (shared by every run)")
        return state

    def federate(config: str, scenario: str | None) -> tuple[dict[str, np.ndarray], int | None]:
        """The run's final adapter, and the first round in which the attacker was flagged.

        Flagged: its reply rejected (claim1e9's examples_grew) or its anomaly score over the
        threshold or its cosine under the minimum (superlink.app.defences.anomaly_scores, what the
        anomaly_score event reports).
        """
        agg = "mean" if config in ("fedavg", "clip+caps") else config
        st = run.strategy.model_copy(update={"aggregator": agg})
        strategy = get_strategy(st, run.peft)
        defence = None if config == "fedavg" else Defence(st, run.peft.alpha)
        rng = np.random.default_rng(args.seed)
        glob: dict[str, np.ndarray] = copy.deepcopy(init)
        flagged: int | None = None
        for rnd in range(1, args.rounds + 1):
            updates, refs = [], []
            for i, silo in enumerate(silos):
                payload = strategy.payload_for(glob, silo.rank, rnd)
                state, n = local(i, payload, rnd), len(silo.examples)
                if scenario not in (None, "clean") and i == ATTACKER:
                    state, n = attack(scenario, payload, state, n, rng)
                    if defence is not None and n > len(silo.examples):
                        flagged = flagged or rnd
                        continue  # superlink/app/reply_checks.py: examples_grew, the reply is rejected
                updates.append(SiloUpdate(i, state, n, silo.rank))
                refs.append(payload)
            if defence is not None:
                scores = defence.apply(updates, refs).by_node()
                score = scores.get(ATTACKER)
                if scenario is not None and score is not None and score.flagged:
                    flagged = flagged or rnd
                honest = [sc for node, sc in scores.items() if node != ATTACKER]
                seen = "rejected" if score is None else (
                    f"norm x{score.norm_ratio:.3g}, distance {score.distance:.3g}, cosine {score.cosine:.3f}"
                )  # fmt: skip
                far, low = max(sc.distance for sc in honest), min(sc.cosine for sc in honest)
                _log(
                    f"    {config} round {rnd}: attacker {seen}; honest silos: max distance {far:.3g}, "
                    f"min cosine {low:.3f}"
                )
            glob = dict(strategy.aggregate(glob, updates))
        return glob, flagged

    constants: dict[str, float] = {}  # what each constant answer scores on the items (evaluate fills it)

    def evaluate(state: dict[str, np.ndarray]) -> dict[str, Any]:
        model = bank.with_state(state, run.peft.rank)
        model.eval()
        res = run_choice(bench, items, model, loaded.tokenizer, settings)
        constants.update(res.extra.get("constant_baselines") or {})
        return {
            "accuracy": 100 * float(res.value),
            "macro_f1": 100 * float(res.extra.get("macro_f1", 0.0)),
            # What the adapter answers: an accuracy near a constant answer's is that answer.
            "predicted": {k: round(100 * v, 1) for k, v in res.extra.get("prediction_shares", {}).items()},
        }

    def shares(r: dict[str, Any]) -> str:
        return "/".join(f"{r['predicted'].get(k, 0.0):.0f}" for k in ("negative", "neutral", "positive"))

    _log(
        f"5 silos x {args.rows_per_silo} rows, {args.rounds} rounds x {args.local_steps} steps, "
        f"{len(items)} eval items"
    )
    clean = evaluate(federate("fedavg", None)[0])
    _log(
        f"clean 5-silo FedAvg: accuracy {clean['accuracy']:.2f}  macro-F1 {clean['macro_f1']:.2f}  "
        f"neg/neu/pos % {shares(clean)}"
    )
    table: dict[str, dict[str, dict[str, float]]] = {}
    for scenario in scenarios:
        table[scenario] = {}
        for config in configs:
            t0 = time.monotonic()
            final, flagged = federate(config, scenario)
            table[scenario][config] = r = evaluate(final)
            if config != "fedavg":  # no defence, no scoring
                r["flagged_round"] = flagged
            _log(
                f"  {scenario:9s} {config:13s} acc {r['accuracy']:6.2f}  F1 {r['macro_f1']:6.2f}  "
                f"neg/neu/pos % {shares(r)}  attacker flagged in round {flagged}  "
                f"({time.monotonic() - t0:.0f} s)"
            )

    print(f"\nPoisoned silo (1 of 5), accuracy / macro-F1 on {len(items)} TFNS items; clean run "
          f"{clean['accuracy']:.2f} / {clean['macro_f1']:.2f}")  # fmt: skip
    print(f"{'scenario':10s}" + "".join(f"{c:>16s}" for c in configs))
    for scenario in scenarios:
        cells = "".join(
            f"{table[scenario][c]['accuracy']:>8.2f}/{table[scenario][c]['macro_f1']:<7.2f}" for c in configs
        )
        print(f"{scenario:10s}{cells}")
    if constants:
        scores = ", ".join(f"{k} {100 * v:.2f}" for k, v in sorted(constants.items()))
        print(f"constant answers score {scores}")
    worst = {
        c: max((clean["accuracy"] - table[s][c]["accuracy"] for s in scenarios), default=0.0) for c in configs
    }
    defended = [c for c in configs if c != "fedavg"]
    best = min(defended or configs, key=lambda c: worst[c])
    print(
        "worst accuracy gap to the clean run (points): " + ", ".join(f"{c} {worst[c]:.2f}" for c in configs)
    )
    # "clean" has no attacker: a flag there is a false positive on silo 0, reported, not counted.
    attacks = [s for s in scenarios if s != "clean"]
    flag_rounds = [table[s][c].get("flagged_round") for s in attacks for c in defended]
    flagged_within = None if not flag_rounds or None in flag_rounds else max(flag_rounds)
    print("round in which the attacker was first flagged (rejected or anomaly score over the threshold;")
    print("clean: silo 0 flagged although honest, a false positive):")
    print(f"{'scenario':10s}" + "".join(f"{c:>14s}" for c in defended))
    for scenario in scenarios:
        cells = (str(table[scenario][c].get("flagged_round")) for c in defended)
        print(f"{scenario:10s}" + "".join(f"{x:>14s}" for x in cells))
    print(f"total {time.monotonic() - t_start:.0f} s")
    summary: dict[str, Any] = {
        "worst_gap_to_clean_points": round(worst[best], 2),
        "best_defence": best,
        # the latest round, over every scenario and defended config, in which the attacker was
        # first flagged; null when it went unflagged in some run
        "attacker_flagged_within_rounds": flagged_within,
        "worst_gap_by_config": {c: round(v, 2) for c, v in worst.items()},
        "clean": clean,
        "constant_baselines": constants,
        "scenarios": table,
        "settings": {
            "quick": args.quick,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "rows_per_silo": args.rows_per_silo,
            "eval_items": len(items),
            "protocol": args.protocol,
            "seed": args.seed,
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
