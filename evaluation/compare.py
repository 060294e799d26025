"""``silotune compare``: isolated vs federated (FedAvg, FlexLoRA) vs centralized, same compute.

One data file is split into N silo files (``silo_node.ops.split``, as ``silotune data split`` does), the
base model is loaded once, every approach is trained in-process (``evaluation/inprocess.py``) and
its adapter is scored with the evaluation suite (``evaluation.runner.evaluate_suite``) on held-out
benchmark data. One table (markdown + JSON) reports accuracy and the bytes each approach moved.

Step rule (printed with every table): every approach gets the compute of the N silos for the same
number of optimizer steps, at the same batch size:

- isolated:    each silo trains R x S steps on its own data (N adapters, each evaluated);
- federated:   R rounds x S local steps at each silo (FedAvg at one rank; FlexLoRA at each silo's);
- centralized: R phases x (N x S) steps on the pooled data (one site with the N silos' compute).

So each approach performs N x R x S optimizer steps in total (R x S per silo's worth of compute)
and sees N x R x S x B training examples; all use R phases with the cosine LR of ``lr_for_round``
and a fresh AdamW per phase, exactly like federated rounds (``--keep-optimizer-state``: each silo,
and the central site, carries its AdamW state from phase to phase instead, in every approach).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from silotune.atomic_files import atomic_write_json, atomic_write_text
from silotune.errors import UserError

SCHEMA = "silotune.compare/v1"
# The comparison by default; FedProx / FedAvgM / FedAdam rows on request (--approaches).
APPROACHES = ("base", "isolated", "fedavg", "flexlora", "fedprox", "fedavgm", "fedadam", "centralized")
DEFAULT_APPROACHES = ("base", "isolated", "fedavg", "flexlora", "centralized")
FEDERATED_LABELS = {
    "fedavg": "FedAvg",
    "flexlora": "FlexLoRA",
    "fedprox": "FedProx",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
}
DATA_ENV = "SILOTUNE_EVAL_DATA"


def register_arguments(c: argparse.ArgumentParser) -> None:
    """The ``silotune compare`` options (evaluation/cli.py creates the subparser)."""
    g = c.add_argument_group("data and split")
    g.add_argument("--data", type=Path, required=True, help="one training data file to split into silos")
    g.add_argument("--domain", choices=("general", "finance", "medical", "code"), default="finance")
    g.add_argument("--silos", type=int, default=3, help="number of silos N (default 3)")
    g.add_argument(
        "--split",
        choices=("iid", "dirichlet", "column"),
        default="iid",
        help="iid; dirichlet (label-skewed); column: one silo per value of --label-column (e.g. source, "
        "as silotune data finance writes it; --silos is then the number of values)",
    )
    g.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (non-IID)")
    g.add_argument("--label-column", help="column of --data that --split dirichlet / column reads")
    g.add_argument("--columns", default="", help="column mapping, e.g. input=text,output=label")
    g.add_argument("--label-map", default="", help="label words, e.g. 0=negative,1=positive,2=neutral")
    g.add_argument("--split-seed", type=int, default=0)
    t = c.add_argument_group("training (same meaning as the run config's keys)")
    t.add_argument("--base", default="embedded:smollm2-135m-instruct", help="base model (model.name)")
    t.add_argument("--rounds", type=int, default=4, help="R: rounds (phases for isolated/centralized)")
    t.add_argument("--local-steps", type=int, default=5, help="S: optimizer steps per silo per round")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--seq-length", type=int, default=128)
    t.add_argument("--lr-max", type=float, default=1e-3)
    t.add_argument("--lr-min", type=float, default=1e-5)
    t.add_argument("--rank", type=int, default=8, help="LoRA rank of isolated, FedAvg and centralized")
    t.add_argument("--ranks", default="4,8,16", help="FlexLoRA ranks: one per silo, or one for all")
    t.add_argument("--target-modules", default="q_proj,v_proj")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument(
        "--prompt-style",
        choices=("eval", "alpaca"),
        default="eval",
        help="training prompt (train.prompt-style): eval (default) trains in the prompt the evaluation "
        "asks with, so the table measures what was learned; alpaca is FlowerTune's training prompt "
        "inside the chat template",
    )
    t.add_argument(
        "--keep-optimizer-state",
        action="store_true",
        help="each silo carries its AdamW state across rounds (train.keep-optimizer-state; "
        "off by default: a fresh AdamW every round, as in FlowerTune)",
    )
    t.add_argument(
        "--approaches",
        default=",".join(DEFAULT_APPROACHES),
        help=f"comma-separated, from {','.join(APPROACHES)} (default: {','.join(DEFAULT_APPROACHES)}; "
        "base = the untrained model)",
    )
    t.add_argument(
        "--weighting",
        choices=("examples", "equal"),
        default="examples",
        help="silo weights in every federated row (strategy.weighting): examples (FedAvg) or equal; "
        "with equal, the centralized row also draws every silo's data equally often",
    )
    t.add_argument(
        "--aggregator",
        choices=("mean", "trimmed-mean", "median", "multi-krum", "consensus"),
        default="consensus",
        help="robust selection in every federated row (strategy.aggregator; the run default)",
    )
    t.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx mu (fedprox rows)")
    t.add_argument(
        "--server-lr",
        type=float,
        default=1.0,
        help="server step of fedavgm / fedadam rows (FedAdam wants a small one, e.g. 1e-3)",
    )
    t.add_argument("--server-momentum", type=float, default=0.9, help="FedAvgM momentum")
    t.add_argument(
        "--transport-dtype",
        choices=("fp32", "bf16", "int8", "int4"),
        default="fp32",
        help="how federated rows move adapters (transport.dtype; silotune/wire_codec.py)",
    )
    t.add_argument("--transport-block-size", type=int, default=0, help="int8/int4 block (0 = default)")
    t.add_argument(
        "--no-error-feedback",
        action="store_true",
        help="quantized transport without the silos' residual (transport.error-feedback=false)",
    )
    e = c.add_argument_group("evaluation (as silotune eval)")
    e.add_argument("--eval-data-dir", type=Path, help=f"benchmark files; default ${DATA_ENV}")
    e.add_argument("--eval-limit", type=int, default=100, help="N items of each benchmark (0: all)")
    e.add_argument(
        "--eval-sample",
        choices=("random", "first"),
        default="random",
        help="which N items: a seeded random sample (default; representative of the labels) "
        "or the first N (as silotune eval --limit)",
    )
    e.add_argument("--eval-seed", type=int, default=0, help="seed of --eval-sample random")
    e.add_argument("--eval-benchmarks", help="subset of the domain's suite, e.g. tfns")
    e.add_argument("--protocol", choices=("generate", "loglik"), default="generate")
    e.add_argument("--eval-batch-size", type=int, default=8)
    e.add_argument(
        "--eval-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="evaluation compute: fp32, or bf16 autocast (about 2x faster on CPUs with AVX512-BF16; "
        "training stays fp32; the row's JSON and table say which)",
    )
    e.add_argument("--finance-max-new-tokens", type=int, default=32)
    c.add_argument("--out", type=Path, default=Path("compare-results"))


@dataclass
class Row:
    approach: str  # base | isolated | fedavg | flexlora | centralized
    label: str
    silo: str | None
    ranks: list[int]
    steps_per_silo: int
    total_steps: int
    uplink_bytes: int = 0  # in the run's transport.dtype
    downlink_bytes: int = 0
    fp32_bytes: int = 0  # the same adapter traffic as float32
    raw_data_bytes: int = 0  # raw training data moved off the silos (centralized only)
    scores: dict[str, float] = field(default_factory=dict)  # benchmark name -> value (0-1)
    macro_f1: dict[str, float] = field(default_factory=dict)  # closed-answer benchmarks only
    recall: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark -> label -> recall
    items: dict[str, int] = field(default_factory=dict)
    average: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def adapter_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes

    @property
    def mean_macro_f1(self) -> float | None:
        return sum(self.macro_f1.values()) / len(self.macro_f1) if self.macro_f1 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "approach": self.approach,
            "label": self.label,
            "silo": self.silo,
            "ranks": self.ranks,
            "steps_per_silo": self.steps_per_silo,
            "total_steps": self.total_steps,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "adapter_bytes": self.adapter_bytes,
            "fp32_bytes": self.fp32_bytes,
            "raw_data_bytes": self.raw_data_bytes,
            "scores": self.scores,
            "macro_f1": self.macro_f1,
            "label_recall": self.recall,
            "items": self.items,
            "average": self.average,
            "train_seconds": round(self.train_seconds, 1),
            "eval_seconds": round(self.eval_seconds, 1),
            "train_losses": self.losses,
        }


def _parse_ranks(text: str, n: int) -> list[int]:
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ranks {text!r}: expected integers like 4,8,16") from None
    if len(ranks) == 1:
        ranks = ranks * n
    if len(ranks) != n or min(ranks) < 1:
        raise UserError(f"--ranks {text!r}: give one positive rank per silo ({n}) or one for all")
    return ranks


def _approaches(text: str) -> list[str]:
    chosen = [a.strip() for a in text.split(",") if a.strip()]
    unknown = sorted(set(chosen) - set(APPROACHES))
    if unknown or not chosen:
        raise UserError(f"--approaches: unknown {unknown}; choose from {','.join(APPROACHES)}")
    return [a for a in APPROACHES if a in chosen]


def step_rule(n: int, rounds: int, steps: int, batch: int, keep_optimizer_state: bool = False) -> str:
    adamw = (
        "AdamW state kept from phase to phase by each silo (train.keep-optimizer-state)"
        if keep_optimizer_state
        else "fresh AdamW per phase"
    )
    return (
        f"Same compute: every approach performs N x R x S = {n} x {rounds} x {steps} = "
        f"{n * rounds * steps} optimizer steps at batch {batch} ({rounds * steps} per silo's compute). "
        f"Isolated: each silo R x S = {rounds * steps} steps on its own data. Federated: R = {rounds} "
        f"rounds x S = {steps} local steps at each silo. Centralized: R = {rounds} phases x N x S = "
        f"{n * steps} steps on the pooled data. All: cosine LR per round/phase, {adamw}."
    )


def _mb(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f} MB)" if n else "0"


def to_markdown(meta: dict[str, Any], rows: list[Row], titles: dict[str, str]) -> str:
    names = list(titles)
    lines = [
        f"## silotune compare: {meta['domain']} on `{meta['data']}` ({meta['split_desc']})",
        "",
        f"- base model: `{meta['base']}` (weights `{meta['base_identity']}`); LoRA rank {meta['rank']} "
        f"(FlexLoRA ranks {','.join(map(str, meta['flexlora_ranks']))}), targets {meta['target_modules']}",
        f"- silos: {meta['silos_desc']}",
        f"- training: R={meta['rounds']} rounds, S={meta['local_steps']} local steps, batch "
        f"{meta['batch_size']}, seq {meta['seq_length']}, lr {meta['lr_max']} -> {meta['lr_min']} (cosine "
        f"over rounds), response-only loss, seed {meta['seed']}, training prompt {meta['prompt_style']}",
        f"- {meta['step_rule']}",
        f"- evaluation: {meta['protocol']} protocol ({meta.get('eval_dtype', 'fp32')} compute), "
        + ", ".join(f"{titles[b]} n={meta['eval_items'].get(b, '?')}" for b in names)
        + f" (--eval-limit {meta['eval_limit']}, {meta['eval_sample']} sample"
        + (f", seed {meta['eval_seed']})" if meta["eval_sample"] == "random" else ")"),
        f"- bytes: adapter tensors ({meta.get('transport_dtype', 'fp32')} transport) down + up over all "
        "rounds and silos, as the federation sends them; raw data: the silos' training files moved "
        "to a central site (centralized only)",
    ]
    floor = meta.get("majority_baseline") or {}
    if floor:
        lines.append(
            "- floor: always answering the most frequent label scores "
            + ", ".join(
                f"{titles[b]} {100 * v['accuracy']:.2f} % accuracy, {100 * v['macro_f1']:.2f} % macro-F1"
                for b, v in floor.items()
                if b in titles
            )
            + " on these items (macro-F1: the unweighted mean of per-label F1)"
        )
    lines += [
        "",
        "| Approach | LoRA rank | Steps per silo | Steps total | "
        + " | ".join(f"{titles[b]} (%)" for b in names)
        + " | Average (%) | Macro-F1 (%) | Adapter bytes (up + down) | Raw data bytes to center | Train s |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|",
    ]
    for r in rows:
        f1 = r.mean_macro_f1
        lines.append(
            f"| {r.label} | {','.join(map(str, r.ranks)) or '-'} | {r.steps_per_silo} | {r.total_steps} | "
            + " | ".join(f"{100 * r.scores[b]:.2f}" if b in r.scores else "-" for b in names)
            + f" | {100 * r.average:.2f} | {'-' if f1 is None else f'{100 * f1:.2f}'} | "
            f"{_mb(r.adapter_bytes)} | {_mb(r.raw_data_bytes)} | {r.train_seconds:.0f} |"
        )
    lines.append("")
    lines += _recall_tables(rows, titles)
    return "\n".join(lines)


def _recall_tables(rows: list[Row], titles: dict[str, str]) -> list[str]:
    """Per-label recall, one table per closed-answer benchmark: which labels each approach finds.

    Accuracy and macro-F1 say how much was learned; this says what. On label-skewed silos an
    isolated silo finds only the labels it holds, and that is what federation should change.
    """
    lines: list[str] = []
    for b in titles:
        scored = [r for r in rows if b in r.recall]
        if not scored:
            continue
        labels = list(scored[0].recall[b])
        lines += [
            f"Recall per gold label, {titles[b]} (%):",
            "",
            "| Approach | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        lines += [
            f"| {r.label} | " + " | ".join(f"{100 * r.recall[b][x]:.1f}" for x in labels) + " |"
            for r in scored
        ]
        lines.append("")
    return lines


def _mean_row(rows: list[Row]) -> Row:
    n = len(rows)
    names = list(rows[0].scores)
    mean = Row(
        "isolated",
        f"isolated (mean of {n})",
        None,
        rows[0].ranks,
        rows[0].steps_per_silo,
        sum(r.total_steps for r in rows),
        scores={b: sum(r.scores[b] for r in rows) / n for b in names},
        macro_f1={b: sum(r.macro_f1[b] for r in rows) / n for b in rows[0].macro_f1},
        recall={
            b: {label: sum(r.recall[b][label] for r in rows) / n for label in labels}
            for b, labels in rows[0].recall.items()
        },
        items=rows[0].items,
        average=sum(r.average for r in rows) / n,
        train_seconds=sum(r.train_seconds for r in rows),
        eval_seconds=sum(r.eval_seconds for r in rows),
    )
    return mean


def _benchmarks(args: argparse.Namespace) -> list[Any]:
    from evaluation.benchmarks import SUITES

    benches = list(SUITES[args.domain])
    if args.eval_benchmarks:
        wanted = [b.strip() for b in args.eval_benchmarks.split(",") if b.strip()]
        unknown = sorted(set(wanted) - {b.name for b in benches})
        if unknown:
            raise UserError(
                f"--eval-benchmarks: {unknown} not in the {args.domain} suite "
                f"({', '.join(b.name for b in benches)})"
            )
        benches = [b for b in benches if b.name in wanted]
    if args.protocol == "loglik" and any(b.kind == "code" for b in benches):
        raise UserError("--protocol loglik scores multiple-choice answers; code is always generated")
    return benches


def select_items(bench: Any, items: list[Any], limit: int | None, sample: str, seed: int) -> list[Any]:
    """``limit`` items: the benchmark's own ``--limit`` rule (first), or a seeded random sample.

    The first N rows of a benchmark are often not representative (TFNS validation's first 100
    are 63 % positive, the whole split 66 % neutral), which skews small comparisons.
    """
    if limit is None or limit >= len(items):
        return items
    if sample == "first":
        return bench.take(items, limit)
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]


def _source(args: argparse.Namespace) -> Any:
    from evaluation.benchmarks import DataSource

    root = args.eval_data_dir or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    if root is None:
        raise UserError(f"no evaluation data: pass --eval-data-dir DIR or set {DATA_ENV}=DIR")
    if not root.is_dir():
        raise UserError(f"--eval-data-dir {root}: not a directory")
    return DataSource(root=root)


def _strategy_note(approach: str, args: argparse.Namespace) -> str:
    """The server-side setting that distinguishes a row, in its label (tables stay self-describing)."""
    if approach == "fedprox":
        return f" (mu {args.proximal_mu:g})"
    if approach == "fedavgm":
        return f" (lr {args.server_lr:g}, momentum {args.server_momentum:g})"
    if approach == "fedadam":
        return f" (lr {args.server_lr:g})"
    return ""


def eval_precision(dtype: str) -> Any:
    """The context scoring runs in: nothing for fp32, bf16 autocast on the model's device type."""
    import contextlib

    import torch

    if dtype == "fp32":
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)


def row_slug(label: str) -> str:
    """Row folder under evals/ and adapters/: "federated FedProx (mu 0.01)" -> federated_FedProx_mu_0.01"""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")


def save_row_adapter(directory: Path, state: dict[str, Any], peft_config: dict[str, Any]) -> None:
    """Keep a row's adapter as a PEFT directory (``silotune eval --adapter`` takes it), atomically."""
    from silotune.adapters import save_adapter_dir

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter_dir(tmp, state, peft_config)
    shutil.rmtree(directory, ignore_errors=True)  # a rerun replaces the row's adapter
    os.replace(tmp, directory)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_compare(args: argparse.Namespace) -> int:
    from evaluation.inprocess import AdapterBank, Silo, train_centralized, train_federated, train_isolated
    from evaluation.report import write_report
    from evaluation.runner import PROTOCOL_LABELS, EvalSettings, SuiteReport, run_choice, run_code
    from evaluation.scoring import majority_baseline
    from silo_node.app.data import load_silo_records
    from silo_node.app.templates import get_template
    from silo_node.app.training import encode_records
    from silo_node.ops.split import split_file
    from silotune.adapters import peft_config_dict
    from silotune.config import parse_run_config, parse_silo_config
    from silotune.modeling import load_model

    started = time.monotonic()
    if args.silos < 1:
        raise UserError("--silos must be at least 1")
    if args.eval_limit is not None and args.eval_limit < 0:
        raise UserError("--eval-limit must be 0 (all items) or more")
    if args.eval_limit == 0:
        args.eval_limit = None
    if args.split in ("dirichlet", "column") and not args.label_column:
        raise UserError(f"--split {args.split} needs --label-column (the column it splits by)")
    approaches = _approaches(args.approaches)
    flex_ranks = _parse_ranks(args.ranks, args.silos)
    source = _source(args)
    run = parse_run_config(
        {
            "num-rounds": args.rounds,
            "domain": args.domain,
            "model.name": args.base,
            "peft.rank": args.rank,
            "peft.target-modules": args.target_modules,
            "train.local-steps": args.local_steps,
            "train.batch-size": args.batch_size,
            "train.seq-length": args.seq_length,
            "train.lr-max": args.lr_max,
            "train.lr-min": args.lr_min,
            "train.seed": args.seed,
            "train.prompt-style": args.prompt_style,
            "train.keep-optimizer-state": args.keep_optimizer_state,
            "strategy.proximal-mu": args.proximal_mu,
            "strategy.weighting": args.weighting,
            "strategy.aggregator": args.aggregator,
            "strategy.server-lr": args.server_lr,
            "strategy.server-momentum": args.server_momentum,
            "transport.dtype": args.transport_dtype,
            "transport.block-size": args.transport_block_size,
            "transport.error-feedback": not args.no_error_feedback,
        },
        source="compare options",
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. Split, read and tokenize every silo's data.
    written = split_file(
        args.data, out / "silos", args.silos, args.split, args.split_seed, args.alpha, args.label_column
    )
    _log(f"split {args.data} into {args.silos} silos ({args.split}) under {out / 'silos'}")
    loaded = load_model(run.model)
    template = get_template(args.domain)
    silos, silo_meta = [], []
    for i, (path, n_rows, counts) in enumerate(written):
        cfg = parse_silo_config(
            {
                "data-path": str(path),
                "name": path.stem,
                "columns": args.columns,
                "label-map": args.label_map,
            },
            source=f"silo {i}",
        )
        records = load_silo_records(cfg, args.domain)
        examples = encode_records(
            loaded.tokenizer,
            template,
            records,
            run.train.seq_length,
            run.model.use_chat_template,
            run.train.prompt_style,
        )
        silos.append(Silo(cfg.name, examples, flex_ranks[i]))
        silo_meta.append(
            {"name": cfg.name, "rows": n_rows, "labels": counts, "file_bytes": path.stat().st_size}
        )
        _log(f"  {cfg.name}: {n_rows} rows, labels {counts}")
    raw_bytes = sum(m["file_bytes"] for m in silo_meta)

    # 2. Evaluation shared by every row: the same items for every approach, loaded once (and
    # before any training, so a missing benchmark file fails fast).
    settings = EvalSettings(
        protocol=args.protocol,
        limit=args.eval_limit,
        batch_size=args.eval_batch_size,
        finance_max_new_tokens=args.finance_max_new_tokens,
        log=_log,
    )
    benches = _benchmarks(args)
    bench_items = {
        b.name: select_items(b, b.load(source), args.eval_limit, args.eval_sample, args.eval_seed)
        for b in benches
    }
    titles = {b.name: b.title for b in benches}
    items = {name: len(v) for name, v in bench_items.items()}
    identity = loaded.identity.short()

    def evaluate(model: Any, row: Row, state: dict[str, Any] | None = None) -> Row:
        if state is not None:
            save_row_adapter(out / "adapters" / row_slug(row.label), state, peft_config_dict(model))
        t0 = time.monotonic()
        model.eval()
        results = []
        for b in benches:
            run_one = run_code if b.kind == "code" else run_choice
            with eval_precision(args.eval_dtype):
                results.append(run_one(b, bench_items[b.name], model, loaded.tokenizer, settings))
            row.scores[b.name], row.items[b.name] = results[-1].value, results[-1].n
            if "macro_f1" in results[-1].extra:
                row.macro_f1[b.name] = results[-1].extra["macro_f1"]
                row.recall[b.name] = results[-1].extra["label_recall"]
        report = SuiteReport(
            suite=args.domain,
            protocol=args.protocol,
            base_model=args.base,
            adapter=f"compare:{row.label}",
            results=results,
            settings={
                "limit": args.eval_limit,
                "sample": args.eval_sample,
                "sample_seed": args.eval_seed,
                "batch_size": args.eval_batch_size,
                "finance_max_new_tokens": args.finance_max_new_tokens,
                "eval_dtype": args.eval_dtype,
                "protocol_description": PROTOCOL_LABELS[args.protocol],
            },
            seconds=time.monotonic() - t0,
            base_identity=identity,
        )
        write_report(report, out / "evals" / row_slug(row.label))
        row.average = report.average
        row.eval_seconds = time.monotonic() - t0
        _log(f"{row.label}: average {100 * row.average:.2f} ({row.eval_seconds:.0f} s to evaluate)")
        return row

    n, rounds, steps = args.silos, args.rounds, args.local_steps
    split_desc = {
        "iid": "IID",
        "dirichlet": f"Dirichlet non-IID, alpha {args.alpha}",
        "column": f"one silo per value of {args.label_column}",
    }[args.split]
    meta: dict[str, Any] = {
        "data": str(args.data),
        "domain": args.domain,
        "split": args.split,
        "alpha": args.alpha if args.split == "dirichlet" else None,
        "split_desc": split_desc,
        "base": args.base,
        "base_identity": identity,
        "rank": args.rank,
        "flexlora_ranks": flex_ranks,
        "target_modules": args.target_modules,
        "rounds": rounds,
        "local_steps": steps,
        "batch_size": args.batch_size,
        "seq_length": args.seq_length,
        "lr_max": args.lr_max,
        "lr_min": args.lr_min,
        "seed": args.seed,
        "prompt_style": args.prompt_style,
        "keep_optimizer_state": args.keep_optimizer_state,
        "weighting": args.weighting,
        "aggregator": args.aggregator,
        "transport_dtype": args.transport_dtype,
        "silos": silo_meta,
        "silos_desc": "; ".join(f"{m['name']} {m['rows']} rows {m['labels']}" for m in silo_meta),
        "step_rule": step_rule(n, rounds, steps, args.batch_size, args.keep_optimizer_state),
        "protocol": args.protocol,
        "eval_limit": args.eval_limit,
        "eval_sample": args.eval_sample,
        "eval_seed": args.eval_seed,
        "eval_benchmarks": list(titles),
        "eval_items": items,
        "eval_dtype": args.eval_dtype,
        "majority_baseline": {
            b.name: majority_baseline([i.gold for i in bench_items[b.name]])
            for b in benches
            if b.kind != "code"
        },
        "raw_data_bytes": raw_bytes,
        "command": "silotune compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "",
    }
    rows: list[Row] = []

    def flush() -> None:
        meta["wall_seconds"] = round(time.monotonic() - started, 1)
        doc = {
            "schema": SCHEMA,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **meta,
            "rows": [r.as_dict() for r in rows],
        }
        # Rewritten after every row of a run that takes hours: a crash mid-write must not lose
        # the rows already measured.
        atomic_write_json(out / "compare.json", doc, sort_keys=False)
        if rows:
            atomic_write_text(out / "compare.md", to_markdown(meta, rows, titles))

    # 3. Train and evaluate each approach; results are written after every row.
    bank = AdapterBank(loaded.model, loaded.tokenizer, run.peft, run.train.seed)
    for approach in approaches:
        _log(f"== {approach}")
        if approach == "base":
            rows.append(evaluate(bank.base, Row("base", "base (no training)", None, [], 0, 0)))
        elif approach == "isolated":
            per_silo = []
            for silo in silos:
                o = train_isolated(bank, silo, run.train, rounds, _log)
                row = Row("isolated", f"isolated {silo.name}", silo.name, [o.rank], o.steps_per_silo,
                          o.total_steps, train_seconds=o.seconds, losses=o.losses)  # fmt: skip
                per_silo.append(evaluate(bank.with_state(o.state, o.rank), row, o.state))
                rows.append(per_silo[-1])
                flush()
            rows.append(_mean_row(per_silo))
        elif approach in FEDERATED_LABELS:
            approach_run = run.model_copy(
                update={"strategy": run.strategy.model_copy(update={"name": approach})}
            )
            fed_silos = (
                silos if approach == "flexlora" else [Silo(s.name, s.examples, run.peft.rank) for s in silos]
            )
            o = train_federated(bank, fed_silos, approach_run, rounds, _log)
            label = FEDERATED_LABELS[approach] + _strategy_note(approach, args)
            row = Row(approach, f"federated {label}", None, [s.rank for s in fed_silos], o.steps_per_silo,
                      o.total_steps, o.uplink_bytes, o.downlink_bytes, o.fp32_bytes,
                      train_seconds=o.seconds, losses=o.losses)  # fmt: skip
            rows.append(evaluate(bank.with_state(o.state, o.rank), row, o.state))
        else:
            o = train_centralized(bank, silos, run.train, rounds, _log, balanced=args.weighting == "equal")
            row = Row("centralized", "centralized (pooled data)", None, [o.rank], o.steps_per_silo,
                      o.total_steps, raw_data_bytes=raw_bytes, train_seconds=o.seconds,
                      losses=o.losses)  # fmt: skip
            rows.append(evaluate(bank.with_state(o.state, o.rank), row, o.state))
        flush()
    flush()
    print(to_markdown(meta, rows, titles))
    print(f"wrote {out / 'compare.json'} and {out / 'compare.md'} ({meta['wall_seconds']:.0f} s)")
    return 0
