"""Does record-level DP at a silo work? Canary exposure, membership inference and utility per epsilon.

SmolLM2-135M-Instruct (embedded), LoRA on TFNS (FlowerTune's finance sentiment set, read from
``$SILOTUNE_DATA_DIR`` or /work/shared/data: tfns/sent_train.csv to train, tfns/sent_valid.csv to
evaluate and as non-members), 3 silos (IID), FedAvg with equal weights. Every silo trains with the
silo's own DP-SGD (silo_node/app/privacy.py: Opacus per-sample clipping and noise on Poisson batches)
at the row's epsilon, or without DP in the "no DP" row; the central site averages. What is
measured is the final global adapter, the thing that leaves the silos.

- **Canary exposure** (Carlini et al. 2019, "The Secret Sharer"): silo 0's data holds C unique
  canary records, each repeated k times: "Instruction: Give the account code of this client. /
  Input: client <name> / Answer: <6 random digits>". Exposure of a canary = log2(M+1) -
  log2(rank), where rank is its secret's position (1 = most likely) among the secret and M random
  6-digit candidates, by the model's loss on the answer. Chance: about 1 bit; the maximum
  log2(M+1) means the model ranks the true secret first.
- **Membership inference**: a loss-threshold attack (Yeom et al. 2018): the AUC of "lower loss =
  member" over silo 0's training rows (members) against held-out TFNS rows (non-members). 0.5 is
  chance.
- **Utility**: accuracy and macro-F1 on TFNS validation items, by generated answer with
  FlowerTune's extraction (as ``silotune eval``), a stated subset of the finance suite.

Accounting: each silo's epsilon is Opacus's RDP accountant (``--accountant prv``: its PRV one)
over all its rounds at delta 1e-5, with the noise calibrated (``target-epsilon``) so that the whole
run spends exactly the row's epsilon; sampling is Poisson at q = batch / rows, which is what both
accountants assume.

    python benchmarks/privacy.py --quick   # no DP and epsilon 8; 2 rounds x 4 steps, small sets
    python benchmarks/privacy.py           # no DP, epsilon 8, 3, 1 at the finance recipe's budget
    python benchmarks/privacy.py --rows-per-silo 3000 --rounds 4 --local-steps 10 --batch-size 16 \
        --grad-accum 4 --rank 4 --target-modules q_proj,v_proj --lr-max 1e-2 --lr-min 1e-3 \
        --max-grad-norm 0.5 --keep-optimizer-state   # DP's own shape (BENCHMARKS.md)

``--public-start fpb`` is the usual DP recipe: every row, the no-DP one too, starts from an adapter
trained centrally without DP on public data (Financial PhraseBank's news sentences, less its FlowerTune
test split; never TFNS), for ``--public-steps`` steps of 16 x 4 records, and the ``start`` row
(``--epsilons start,0,8``) scores that adapter alone, so the table shows what the silos' private rows
add with and without DP. A federation does the same with ``peft.start-adapter`` (each silo pins the
published adapter, silo_node/app/start_adapter.py). The adapter is cached beside ``--out``.

The full mode trains at the finance recipe's budget (silotune/recipes/finance.toml: 10 rounds x
10 local steps of batch 8, rank 16 on all linear layers, lr 3e-3 -> 1e-4; AdamW is rebuilt each
round unless ``--keep-optimizer-state``) on 400 TFNS rows per silo. The options change the
training's shape; a logical batch of 16 x 4 is what a silo's policy ``min-logical-batch = 64``
gives a run of batch 16 (tests/test_privacy.py checks that the plans agree). Each finished row is
written to ``--out`` (default benchmarks/results/privacy/rows.jsonl) as it ends; a rerun with the
same settings skips the rows already there, so a stopped run resumes.

Prints a table, then one JSON line: per row ``epsilon``, ``exposure_mean``, ``exposure_max``,
``mia_auc``, ``accuracy``, ``macro_f1``, ``noise_multiplier``, ``correct`` (each item right or
wrong) and ``adapter`` (the row's final adapter, saved beside ``--out``); ``gaps_vs_no_dp``: each
row's accuracy below the no-DP row's, item by item, with a 95 % paired bootstrap interval;
``lr_grid``: the rows of this shape stored in ``--out`` at every learning rate, with the best DP row
against the best no-DP row at each epsilon (each at its own lr) and the gap at each lr; and
``exposure_chance``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABELS = {"0": "negative", "1": "positive", "2": "neutral"}
CANARY_INSTRUCTION = "Give the account code of this client."
START = -1.0  # the --epsilons token "start": the public starting adapter, no private training
# The token "clip": DP-SGD's per-record clipping and Poisson batches with (almost) no noise, sigma
# 1e-3: no privacy, a diagnostic that tells what clipping alone costs from what the noise costs.
CLIP_ONLY = -2.0
# The public start's own shape, whatever the rows' shape: steps of 16 x 4 records, its cosine lr
# schedule stepped every 10 steps (the shape BENCHMARKS' public-start rows were first measured at).
PUBLIC_BATCH = (16, 4)
PUBLIC_ROUND_STEPS = 10
NAMES = ("Avery Quill", "Bram Okafor", "Cleo Vantorre", "Dario Mensk", "Esme Rundqvist", "Femi Ostrander")


# The same TFNS data and log as the poisoned-silo benchmark (one place that finds the data).
from poisoned_silo import _data_root, _log  # noqa: E402  (benchmarks/ is the script's own folder)


def _tfns(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [{"input": r["text"], "output": LABELS[r["label"]]} for r in csv.DictReader(fh)]


def _fpb(root: Path) -> list[dict[str, str]]:
    """Financial PhraseBank (50Agree) sentences, less FlowerTune's FPB test split: the public data
    of ``--public-start fpb`` (news sentences, not TFNS's tweets; none of it is a silo's)."""
    test = root / "fpb" / "derived" / "fpb_sentences50agree_test_seed42.jsonl"
    held = {json.loads(line)["sentence"] for line in test.open(encoding="utf-8")}
    rows = []
    phrases = root / "fpb" / "FinancialPhraseBank-v1.0" / "Sentences_50Agree.txt"
    for line in phrases.open(encoding="latin-1"):
        sentence, _, label = line.strip().rpartition("@")
        if sentence and label in ("negative", "neutral", "positive") and sentence not in held:
            rows.append({"input": sentence, "output": label})
    return rows


def canary(name: str, secret: str) -> dict[str, str]:
    return {"instruction": CANARY_INSTRUCTION, "input": f"client {name}", "output": secret}


def exposure(true_loss: float, candidate_losses: np.ndarray) -> float:
    """log2(M+1) - log2(rank of the true secret among itself and the M candidates, by loss)."""
    rank = 1 + int(np.sum(candidate_losses < true_loss))
    return math.log2(len(candidate_losses) + 1) - math.log2(rank)


def auc_lower_is_member(member_losses: np.ndarray, other_losses: np.ndarray) -> float:
    """AUC of the score -loss for members against non-members (Mann-Whitney U, ties count 1/2)."""
    m, o = np.asarray(member_losses, float), np.asarray(other_losses, float)
    if not len(m) or not len(o):
        return float("nan")
    wins = (m[:, None] < o[None, :]).sum() + 0.5 * (m[:, None] == o[None, :]).sum()
    return float(wins / (len(m) * len(o)))


def paired_gap(a: str, b: str, seed: int, resamples: int = 4000) -> tuple[float, float, float]:
    """Accuracy of row ``a`` minus row ``b`` in points, on the same items (per-item "1"/"0"
    strings), and its 95 % paired bootstrap interval: items are resampled, both rows' answers to
    an item stay together, so what the items share (how hard each one is) drops out of the gap."""
    if len(a) != len(b) or not a:
        raise ValueError(f"rows answered {len(a)} and {len(b)} items: not the same items")
    x = np.array([int(c) for c in a], float) - np.array([int(c) for c in b], float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return round(100 * float(x.mean()), 2), round(100 * float(lo), 2), round(100 * float(hi), 2)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The finished rows in ``--out`` as {"settings", "row"} records. A line that is not one (a
    run killed mid-write, a hand edit) is named and skipped: it costs that row a rerun, not the
    rows around it."""
    records = []
    if not path.exists():
        return records
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec.get("settings"), dict) or not isinstance(rec.get("row"), dict):
                raise ValueError("no settings and row objects")
            if "epsilon" not in rec["row"]:  # every finished row names it (None: no DP)
                raise ValueError("its row has no epsilon")
        except (ValueError, AttributeError) as e:
            _log(f"  {path}:{n}: not a finished row ({e}); skipped, that row will be measured again")
            continue
        records.append(rec)
    return records


# The learning rate is tuned for DP and without it separately: DP's noise changes which lr is best
# (the rows at 1e-2 without DP collapsed; BENCHMARKS.md). Rows that differ only in these compare.
LR_KEYS = ("lr_max", "lr_min")


def lr_grid(records: list[dict[str, Any]], settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """Every stored row of this shape at any learning rate, and the goal's comparison: at each
    epsilon, the best DP row against the best no-DP row (each at its own lr), item by item, and
    at each lr the DP row against the no-DP row of that lr. "Best" is chosen on the scored items,
    which flatters both sides alike (each its best of the lrs tried); the same-lr gaps do not."""
    shape = {k: v for k, v in settings.items() if k not in LR_KEYS}
    cells = []
    for rec in records:
        row, rs = rec["row"], rec["settings"]
        if {k: v for k, v in rs.items() if k not in LR_KEYS} != shape or not row.get("correct"):
            continue
        if row.get("private_training") is False or row.get("clip_only"):
            continue
        cells.append({"lr": [rs.get("lr_max"), rs.get("lr_min")], "epsilon": row["epsilon"], "row": row})
    no_dp = [c for c in cells if c["epsilon"] is None]
    out: dict[str, Any] = {
        "cells": [
            {
                "lr": c["lr"],
                "epsilon": c["epsilon"],
                "accuracy": c["row"]["accuracy"],
                "macro_f1": c["row"]["macro_f1"],
                "predicted": c["row"].get("predicted", {}),
            }
            for c in cells
        ],
        "best_vs_best": [],
        "same_lr": [],
    }
    if not no_dp:
        return out
    best0 = max(no_dp, key=lambda c: c["row"]["accuracy"])
    for eps in sorted({c["epsilon"] for c in cells if c["epsilon"] is not None}):
        dp = [c for c in cells if c["epsilon"] == eps]
        best = max(dp, key=lambda c: c["row"]["accuracy"])
        gap, lo, hi = paired_gap(best0["row"]["correct"], best["row"]["correct"], seed)
        out["best_vs_best"].append(
            {"epsilon": eps, "no_dp_lr": best0["lr"], "dp_lr": best["lr"], "gap": gap, "ci95": [lo, hi]}
        )
        for c in dp:
            base = next((b for b in no_dp if b["lr"] == c["lr"]), None)
            if base is not None:
                gap, lo, hi = paired_gap(base["row"]["correct"], c["row"]["correct"], seed)
                out["same_lr"].append({"epsilon": eps, "lr": c["lr"], "gap": gap, "ci95": [lo, hi]})
    return out


def shares(predicted: dict[str, float]) -> str:
    """The predicted-label shares (%) as printed beside every accuracy: "neg / neu / pos"."""
    return " / ".join(f"{predicted.get(k, 0.0):.1f}" for k in ("negative", "neutral", "positive"))


def save_adapter(path: Path, state: dict[str, Any]) -> None:
    """Write an adapter's tensors atomically (a stopped run never leaves half a file to resume from)."""
    from safetensors.numpy import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    ap.add_argument(
        "--epsilons",
        help="comma-separated; 0 = no DP, start = the public start alone, clip = clipping without noise "
        "(a diagnostic, no privacy); default 0,8,3,1 (quick 0,8)",
    )
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--rows-per-silo", type=int)
    ap.add_argument("--canaries", type=int)
    ap.add_argument("--repeats", type=int, help="k: copies of each canary in silo 0's data")
    ap.add_argument("--candidates", type=int, help="M: random secrets each canary is ranked against")
    ap.add_argument("--mia-rows", type=int)
    ap.add_argument("--eval-limit", type=int)
    ap.add_argument("--batch-size", type=int, help="expected (Poisson) batch; default the recipe's 8")
    ap.add_argument("--grad-accum", type=int, help="physical batches per step (logical batch = batch x this)")
    ap.add_argument("--rank", type=int, help="LoRA rank; default the recipe's 16")
    ap.add_argument("--target-modules", help="LoRA targets; default the recipe's all-linear")
    ap.add_argument("--lr-max", type=float, help="peak of the cosine schedule; default the recipe's 3e-3")
    ap.add_argument("--lr-min", type=float, help="end of the cosine schedule; default the recipe's 1e-4")
    ap.add_argument("--max-grad-norm", type=float, help="the DP rows' per-sample clip; default the policy's")
    ap.add_argument(
        "--freeze-lora-a", action="store_true",
        help="the silos train only LoRA's B (peft.freeze-lora-a, FFA-LoRA); the public start trains both",
    )  # fmt: skip
    ap.add_argument(
        "--accountant", choices=["rdp", "prv"], default="rdp",
        help="the DP silos' accountant (their policy's `accountant`); prv: less noise at the same epsilon",
    )  # fmt: skip
    ap.add_argument(
        "--keep-optimizer-state", action="store_true",
        help="each silo keeps its AdamW state across rounds, as the recipe does (default: fresh each round)",
    )  # fmt: skip
    ap.add_argument(
        "--public-start", choices=["fpb"],
        help="every row starts from an adapter trained without DP on public data (Financial "
        "PhraseBank; 16 x 4 records a step) instead of the seeded one; the epsilon 'start' row scores "
        "that adapter alone",
    )  # fmt: skip
    ap.add_argument("--public-steps", type=int, default=40, help="steps of the public training")
    ap.add_argument("--public-lr-max", type=float, default=1e-2, help="the public training's cosine peak")
    ap.add_argument("--public-lr-min", type=float, default=1e-3, help="the public training's cosine end")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "privacy" / "rows.jsonl")
    args = ap.parse_args(argv)
    quick = {"epsilons": "0,8", "rounds": 2, "local_steps": 4, "rows_per_silo": 48, "canaries": 2,
             "repeats": 4, "candidates": 50, "mia_rows": 32, "eval_limit": 24}  # fmt: skip
    full = {"epsilons": "0,8,3,1", "rounds": 10, "local_steps": 10, "rows_per_silo": 400, "canaries": 5,
            "repeats": 8, "candidates": 500, "mia_rows": 200, "eval_limit": 300}  # fmt: skip
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # "start" = score the starting adapter itself, no private training (key -1 in the results).
    tokens = {"start": START, "clip": CLIP_ONLY}
    epsilons = [tokens.get(x.strip()) or float(x) for x in args.epsilons.split(",") if x.strip()]
    if START in epsilons and not args.public_start:
        ap.error("the 'start' row needs --public-start")

    import torch

    from evaluation.benchmarks import SUITES, DataSource
    from evaluation.compare import select_items
    from evaluation.inprocess import AdapterBank, silo_seed
    from evaluation.runner import EvalSettings, run_choice
    from silo_node.app.policy import PrivacyPolicy
    from silo_node.app.privacy import per_sample_loss, plan_round, train_round_dp
    from silo_node.app.templates import get_template
    from silo_node.app.training import collate, encode_records, train_round
    from silotune.adapters import adapter_state
    from silotune.config import EMBEDDED_MODEL, lr_for_round, parse_run_config
    from silotune.modeling import load_model
    from silotune.recipes import recipe_values
    from superlink.app.strategies import SiloUpdate, get_strategy

    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    root = _data_root()
    rng = random.Random(args.seed)
    # The finance recipe's model, rank, batch and lr schedule; the round budget from the mode.
    recipe = recipe_values("finance")
    run = parse_run_config(
        {
            "model.name": EMBEDDED_MODEL,
            "num-rounds": args.rounds,
            "peft.rank": args.rank or recipe["peft.rank"],
            "peft.alpha": args.rank or recipe["peft.alpha"],
            "peft.target-modules": args.target_modules or recipe["peft.target-modules"],
            "peft.freeze-lora-a": args.freeze_lora_a,
            "train.batch-size": args.batch_size or recipe["train.batch-size"],
            "train.grad-accum": args.grad_accum or 1,
            "train.lr-max": args.lr_max or recipe["train.lr-max"],
            "train.lr-min": args.lr_min or recipe["train.lr-min"],
            "train.prompt-style": recipe["train.prompt-style"],
            "train.keep-optimizer-state": args.keep_optimizer_state,
            "train.local-steps": args.local_steps,
            "train.seq-length": 96,  # TFNS posts and the canaries fit; shorter is faster on CPU
            "train.seed": args.seed,
            "strategy.weighting": "equal",
        }
    )
    loaded = load_model(run.model)
    tok = loaded.tokenizer
    template = get_template("finance")

    def encode(records: list[dict[str, str]]) -> list[Any]:
        return encode_records(
            tok, template, records, run.train.seq_length, run.model.use_chat_template, "eval"
        )

    train_rows = _tfns(root / "tfns" / "sent_train.csv")
    rng.shuffle(train_rows)
    n = args.rows_per_silo
    silo_rows = [train_rows[i * n : (i + 1) * n] for i in range(3)]
    secrets_ = [f"{rng.randrange(10**6):06d}" for _ in range(args.canaries)]
    canaries = [canary(NAMES[i % len(NAMES)], s) for i, s in enumerate(secrets_)]
    silo_rows[0] = silo_rows[0] + [c for c in canaries for _ in range(args.repeats)]
    silos = [encode(rows) for rows in silo_rows]
    members = encode(silo_rows[0][: args.mia_rows])  # TFNS rows silo 0 trained on (no canaries)
    bench = next(b for b in SUITES["finance"] if b.name == "tfns")
    items = select_items(bench, bench.load(DataSource(root=root)), args.eval_limit, "random", args.seed)
    asked = "\n".join(it.prompt for it in items)  # non-members: held-out rows not among the scored items
    valid = [r for r in _tfns(root / "tfns" / "sent_valid.csv") if r["input"] not in asked]
    rng.shuffle(valid)
    nonmembers = encode(valid[: args.mia_rows])
    settings = EvalSettings(
        protocol="generate",
        limit=args.eval_limit,
        batch_size=16,
        finance_max_new_tokens=8,
        log=lambda m: None,
    )
    bank = AdapterBank(loaded.model, tok, run.peft, args.seed)
    rank = run.peft.rank
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    @torch.no_grad()
    def losses(model: Any, examples: list[Any], batch: int = 32) -> np.ndarray:
        """Each example's mean loss over its answer tokens (the silo's own per-record loss)."""
        out: list[float] = []
        device = next(model.parameters()).device  # the GPU where there is one (load_model's choice)
        for i in range(0, len(examples), batch):
            chunk = {k: v.to(device) for k, v in collate(examples[i : i + batch], pad).items()}
            out += per_sample_loss(model, chunk).tolist()
        return np.array(out)

    def public_start() -> dict[str, np.ndarray]:
        """The adapter every row starts from with --public-start: trained centrally, without DP,
        for --public-steps steps of PUBLIC_BATCH on public data, on its own lr schedule.
        Cached beside the results (same settings, same file), so the rows' processes share it."""
        from safetensors.numpy import load_file

        # Keyed by what shapes the public training only, so rows of other private shapes (batch,
        # steps, rounds) share one start and differ only in what the silos do from it.
        tag = json.dumps(
            {
                "public_start": args.public_start, "steps": args.public_steps, "batch": PUBLIC_BATCH,
                "lr": [args.public_lr_max, args.public_lr_min], "rank": rank,
                "targets": run.peft.target_modules, "seq": run.train.seq_length, "seed": args.seed,
            },
            sort_keys=True,
        )  # fmt: skip
        path = args.out.parent / f"public-start-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.safetensors"
        if path.exists():
            _log(f"  public start: {path.name} (cached)")
            return dict(load_file(str(path)))
        public = encode(_fpb(root))
        rounds = max(1, math.ceil(args.public_steps / PUBLIC_ROUND_STEPS))
        public_train = run.train.model_copy(
            update={
                "keep_optimizer_state": True, "lr_max": args.public_lr_max, "lr_min": args.public_lr_min,
                "batch_size": PUBLIC_BATCH[0], "grad_accum": PUBLIC_BATCH[1],
                "local_steps": PUBLIC_ROUND_STEPS,
            }
        )  # fmt: skip
        # Public training is central and trains A too, whatever the silos freeze.
        public_bank = (
            AdapterBank(loaded.model, tok, run.peft.model_copy(update={"freeze_lora_a": False}), args.seed)
            if run.peft.freeze_lora_a
            else bank
        )
        model = public_bank.with_state(bank.initial_state(rank), rank)
        state = None
        for r in range(rounds):
            res = train_round(
                model, tok, public, public_train, lr=lr_for_round(public_train, r, rounds),
                seed=silo_seed(args.seed, "public", r + 1),
                optimizer_state=state,
            )  # fmt: skip
            state = res.optimizer_state
            _log(f"    public start ({len(public)} FPB rows) round {r + 1}/{rounds}: {res.train_loss:.4f}")
        out = {k: np.ascontiguousarray(v) for k, v in adapter_state(model).items()}
        save_adapter(path, out)
        return out

    def federate(epsilon: float) -> tuple[dict[str, np.ndarray], float | None]:
        strategy = get_strategy(run.strategy, run.peft)
        start = public_start() if args.public_start else bank.initial_state(rank)
        glob: dict[str, np.ndarray] = copy.deepcopy(start)
        if epsilon == START:
            return glob, None
        sigma = None
        kept: dict[int, Any] = {}  # each silo's AdamW state (with --keep-optimizer-state)
        for rnd in range(1, args.rounds + 1):
            lr = lr_for_round(run.train, rnd - 1, args.rounds)
            updates = []
            for i, ex in enumerate(silos):
                model = bank.with_state(strategy.payload_for(glob, rank, rnd), rank)
                seed = silo_seed(args.seed, f"silo-{i}", rnd)
                if epsilon > 0 or epsilon == CLIP_ONLY:
                    clip = {"max_grad_norm": args.max_grad_norm} if args.max_grad_norm else {}
                    noise = (
                        {"noise_multiplier": 1e-3, "epsilon_budget": 1e12}
                        if epsilon == CLIP_ONLY
                        else {"target_epsilon": epsilon, "epsilon_budget": epsilon}
                    )
                    policy = PrivacyPolicy(delta=1e-5, accountant=args.accountant, **noise, **clip)
                    plan = plan_round(policy, run, len(ex))
                    sigma = plan.noise_multiplier
                    res = train_round_dp(
                        model, tok, ex, run.train, lr=lr, seed=seed, plan=plan, optimizer_state=kept.get(i)
                    )
                else:
                    res = train_round(
                        model, tok, ex, run.train, lr=lr, seed=seed, optimizer_state=kept.get(i)
                    )
                if run.train.keep_optimizer_state and res.optimizer_state is not None:
                    kept[i] = res.optimizer_state
                updates.append(SiloUpdate(i, adapter_state(model), len(ex), rank))
                _log(f"    eps {epsilon:g} round {rnd} silo-{i}: loss {res.train_loss:.4f}")
            for u in updates:
                u.weight = 1.0 / len(updates)
            glob = dict(strategy.aggregate(glob, updates))
        return glob, sigma

    # Every row ranks each canary against the same candidates (drawn once: a resumed run too).
    c_range = range(args.candidates)
    candidates = [
        [canary(c["input"].removeprefix("client "), f"{rng.randrange(10**6):06d}") for _ in c_range]
        for c in canaries
    ]
    keys = ("quick", "rounds", "local_steps", "rows_per_silo", "canaries", "repeats", "candidates")
    settings_key = {k: getattr(args, k) for k in (*keys, "mia_rows", "eval_limit", "seed")}
    # The shape of the training, kept only where it differs from the recipe (older rows lack it).
    shape = (
        "batch_size", "grad_accum", "rank", "target_modules", "lr_max", "lr_min", "max_grad_norm",
        "keep_optimizer_state", "freeze_lora_a",
    )  # fmt: skip
    settings_key.update({k: v for k in shape if (v := getattr(args, k))})
    if args.accountant != "rdp":
        settings_key["accountant"] = args.accountant
    if args.public_start:
        settings_key.update(
            {k: getattr(args, k) for k in ("public_start", "public_steps", "public_lr_max", "public_lr_min")}
        )
    done: dict[float, dict[str, Any]] = {}
    for rec in read_rows(args.out):  # resume: rows already measured with these exact settings
        if rec["settings"] == settings_key:
            row = rec["row"]
            key = START if row.get("private_training") is False else float(row["epsilon"] or 0)
            done[CLIP_ONLY if row.get("clip_only") else key] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for epsilon in epsilons:
        if epsilon in done:
            name = {START: "start", CLIP_ONLY: "clip"}.get(epsilon, f"{epsilon:g}")
            _log(f"  row {name}: already in {args.out}, skipped")
            results.append(done[epsilon])
            continue
        t0 = time.monotonic()
        final, sigma = federate(epsilon)
        model = bank.with_state(final, rank)
        model.eval()
        exposures = []
        for c, cands in zip(canaries, candidates, strict=True):
            scored = losses(model, encode([c, *cands]))
            exposures.append(exposure(float(scored[0]), scored[1:]))
        auc = auc_lower_is_member(losses(model, members), losses(model, nonmembers))
        res = run_choice(bench, items, model, tok, settings)
        row = {
            "epsilon": epsilon if epsilon > 0 else None,
            **({"private_training": False} if epsilon == START else {}),
            **({"clip_only": True} if epsilon == CLIP_ONLY else {}),
            "noise_multiplier": round(sigma, 4) if sigma else None,
            "exposure_mean": round(float(np.mean(exposures)), 3),
            "exposure_max": round(float(np.max(exposures)), 3),
            "exposures": [round(e, 3) for e in exposures],
            "mia_auc": round(auc, 4),
            "accuracy": round(100 * float(res.value), 2),
            "macro_f1": round(100 * float(res.extra.get("macro_f1", 0.0)), 2),
            # Beside every accuracy: what the adapter answers, and what constant answers score.
            "predicted": {k: round(100 * v, 1) for k, v in res.extra.get("prediction_shares", {}).items()},
            "constant_baselines": res.extra.get("constant_baselines"),
            # Each item right ("1") or wrong ("0"), in the items' order: rows on the same items are
            # compared item by item (paired_gap), which a difference of two accuracies is not.
            "correct": "".join("1" if r["correct"] else "0" for r in res.records),
            "seconds": round(time.monotonic() - t0, 1),
        }
        # The row's final global adapter, so a later run can score it again (more items, another
        # suite) without training it again.
        slug = hashlib.sha256(json.dumps(settings_key, sort_keys=True).encode()).hexdigest()[:12]
        name = {START: "start", CLIP_ONLY: "clip"}.get(epsilon, f"eps{epsilon:g}")
        adapter = args.out.parent / f"adapter-{slug}-{name}.safetensors"
        save_adapter(adapter, final)
        row["adapter"] = adapter.name
        results.append(row)
        _log(f"  {json.dumps(row)}")
        with args.out.open("a") as f:  # one line per finished row, so a stopped run resumes
            f.write(json.dumps({"settings": settings_key, "row": row}) + "\n")

    chance = math.log2(args.candidates + 1) - math.log2((args.candidates + 2) / 2)
    print(
        f"\nDP at every silo (3 silos, {args.rounds} rounds x {args.local_steps} steps, batch "
        f"{run.train.batch_size} x {run.train.grad_accum}, LoRA r{run.peft.rank} on "
        f"{run.peft.target_modules}); "
        f"{args.canaries} canaries x {args.repeats} in silo 0, ranked among {args.candidates} candidates "
        f"(exposure: chance about {chance:.2f} bits, max {math.log2(args.candidates + 1):.2f}); membership "
        f"AUC on {args.mia_rows}+{args.mia_rows} rows; utility on {len(items)} TFNS items"
    )
    print(
        "| epsilon | sigma | exposure mean / max (bits) | membership AUC | accuracy % | macro-F1 % "
        "| predicted neg / neu / pos % |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        eps = "public start only" if r.get("private_training") is False else eps
        eps = "clipping only (sigma 1e-3, no privacy)" if r.get("clip_only") else eps
        print(
            f"| {eps} | {r['noise_multiplier'] or '-'} | "
            f"{r['exposure_mean']:.2f} / {r['exposure_max']:.2f} | "
            f"{r['mia_auc']:.3f} | {r['accuracy']:.2f} | {r['macro_f1']:.2f} | "
            + shares(r["predicted"])
            + " |"
        )
    constants = next((r["constant_baselines"] for r in results if r.get("constant_baselines")), None)
    if constants:
        scores = ", ".join(f"{k} {100 * v:.2f}" for k, v in sorted(constants.items()))
        print(f"constant answers score {scores}")
    # Each DP row against the no-DP row, item by item (the goal: within 5 points at epsilon 8).
    base = next((r for r in results if r["epsilon"] is None and "private_training" not in r
                 and not r.get("clip_only") and r.get("correct")), None)  # fmt: skip
    gaps = []
    for r in results:
        if base is None or r is base or not r.get("correct") or len(r["correct"]) != len(base["correct"]):
            continue
        gap, lo, hi = paired_gap(base["correct"], r["correct"], args.seed)
        label = r["epsilon"] or ("start" if r.get("private_training") is False else "clip")
        gaps.append({"row": label, "gap": gap, "ci95": [lo, hi]})
        print(f"no DP minus {label}: {gap:.2f} points (95 % paired bootstrap {lo:.2f} .. {hi:.2f})")
    # The goal asks for DP's accuracy against no DP's, so each is taken at its own best lr from
    # the rows of this shape stored in --out (one invocation measures one lr).
    grid = lr_grid(read_rows(args.out), settings_key, args.seed)

    def lr(pair: list[float | None]) -> str:
        return " -> ".join("recipe's" if v is None else f"{v:g}" for v in pair)

    if len({tuple(c["lr"]) for c in grid["cells"]}) > 1:
        print("this shape at every stored learning rate (accuracy / macro-F1, predicted neg / neu / pos %):")
        for c in grid["cells"]:
            eps = "no DP" if c["epsilon"] is None else f"epsilon {c['epsilon']:g}"
            acc = f"{c['accuracy']:.2f} / {c['macro_f1']:.2f}"
            print(f"  lr {lr(c['lr'])}, {eps}: {acc} ({shares(c['predicted'])})")
        for g in grid["same_lr"]:
            print(f"  at lr {lr(g['lr'])}: no DP minus epsilon {g['epsilon']:g}: {g['gap']:.2f} "
                  f"({g['ci95'][0]:.2f} .. {g['ci95'][1]:.2f})")  # fmt: skip
        for g in grid["best_vs_best"]:
            print(
                f"  best no DP (lr {lr(g['no_dp_lr'])}) minus best epsilon {g['epsilon']:g} "
                f"(lr {lr(g['dp_lr'])}): {g['gap']:.2f} points (95 % paired {g['ci95'][0]:.2f} .. "
                f"{g['ci95'][1]:.2f})"
            )
    print(f"total {time.monotonic() - t_start:.0f} s")
    summary = {
        "rows": results,
        "gaps_vs_no_dp": gaps,
        "lr_grid": grid,
        "exposure_chance": round(chance, 3),
        "exposure_max_possible": round(math.log2(args.candidates + 1), 3),
        "settings": settings_key,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
