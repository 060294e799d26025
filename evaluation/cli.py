"""``silotune eval`` and ``silotune compare``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from silotune.errors import UserError

DATA_ENV = "SILOTUNE_EVAL_DATA"
FLOWERTUNE_BATCH = 32  # evaluation.generation.FLOWERTUNE_BATCH_SIZE, not imported: keeps --help fast


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a base model (+ adapter) on a FlowerTune suite",
        description="Run one FlowerTune leaderboard suite and write JSON + a markdown table.",
    )
    p.add_argument("--suite", required=True, choices=("general", "finance", "medical", "code"))
    p.add_argument(
        "--base", required=True, help="base model: hub id, local directory or embedded:smollm2-135m-instruct"
    )
    p.add_argument("--adapter", help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("--limit", type=int, help="first N items of each benchmark (quick checks)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help=f"folder with the benchmark files (docs/evaluation.md); default ${DATA_ENV}",
    )
    p.add_argument(
        "--from-hub",
        action="store_true",
        help="download the benchmarks from the Hugging Face hub instead of --data-dir",
    )
    p.add_argument(
        "--out", type=Path, default=Path("eval-results"), help="output folder (default: ./eval-results)"
    )
    p.add_argument(
        "--protocol",
        choices=("generate", "loglik", "flowertune"),
        default="generate",
        help="generate: FlowerTune's prompts and answer extraction, greedy, bounded answers (default, "
        "fast); loglik: pick the most likely option (faster, NOT comparable to FlowerTune); "
        "flowertune: FlowerTune's exact finance protocol, as the leaderboard runs it (slow on CPU)",
    )
    p.add_argument("--benchmarks", help="comma-separated subset of the suite, e.g. tfns,fpb")
    p.add_argument(
        "--batch-size", type=int, help=f"default {FLOWERTUNE_BATCH} for flowertune (its README), else 8"
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument(
        "--quantization",
        choices=("none", "4bit"),
        help="4bit: bitsandbytes 4-bit weights (flowertune: FlowerTune's config, its default; falls back "
        "to float32 where bitsandbytes cannot run, and says so); other protocols default to none",
    )
    p.add_argument(
        "--finance-max-new-tokens", type=int, default=32, help="generate only (flowertune: 512 in total)"
    )
    p.add_argument("--code-max-new-tokens", type=int, default=512)
    p.add_argument(
        "--code-timeout",
        type=float,
        default=10.0,
        help="seconds each generated program may run (compilation has its own 60 s)",
    )
    p.add_argument(
        "--require-sandbox-isolation",
        action="store_true",
        help="refuse to run generated code when no network namespace is available",
    )
    p.set_defaults(func=cmd_eval)

    c = subparsers.add_parser(
        "compare",
        help="isolated vs federated (FedAvg, FlexLoRA) vs centralized training on one data set",
        description="Split one data set into N silos; train isolated, federated (FedAvg, FlexLoRA) and "
        "centralized adapters in-process with the same compute; evaluate each; report accuracy and bytes.",
    )
    from evaluation.compare import register_arguments

    register_arguments(c)
    c.set_defaults(func=cmd_compare)


def _source(args: argparse.Namespace):  # -> DataSource (imported lazily: keeps --help fast)
    from evaluation.benchmarks import DataSource

    if args.from_hub:
        return DataSource(hub=True)
    root = args.data_dir or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    if root is None:
        raise UserError(
            f"no evaluation data: pass --data-dir DIR (layout in docs/evaluation.md), set "
            f"{DATA_ENV}=DIR, or pass --from-hub to download from the Hugging Face hub"
        )
    if not root.is_dir():
        raise UserError(f"--data-dir {root}: not a directory")
    return DataSource(root=root)


def _load(args: argparse.Namespace, quantization: str) -> tuple[Any, str, str]:
    """(loaded model, quantization used, note on it) for the chosen protocol."""
    if args.protocol == "flowertune":
        from evaluation.generation import load_flowertune_model

        if args.dtype != "fp32":
            raise UserError("--protocol flowertune loads float32 weights, as FlowerTune does; drop --dtype")
        loaded = load_flowertune_model(args.base, args.adapter, quantization)
        return loaded, loaded.quantization, loaded.quantization_note
    from evaluation.models import load_for_eval

    # The fast protocols load as training does; its 4-bit is not FlowerTune's eval config.
    note = "silotune.modeling's 4-bit (nf4, double quantization)" if quantization == "4bit" else ""
    return load_for_eval(args.base, args.adapter, args.dtype, quantization), quantization, note


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation.report import to_markdown, write_report
    from evaluation.runner import EvalSettings, evaluate_suite
    from evaluation.sandbox import SandboxLimits

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    flowertune = args.protocol == "flowertune"
    batch_size = args.batch_size if args.batch_size is not None else (FLOWERTUNE_BATCH if flowertune else 8)
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if flowertune and args.suite != "finance":
        raise UserError("--protocol flowertune is FlowerTune's finance protocol: use it with --suite finance")
    source = _source(args)
    if args.require_sandbox_isolation:
        os.environ["SILOTUNE_SANDBOX_REQUIRE_ISOLATION"] = "1"
    loaded, quantization, note = _load(args, args.quantization or ("4bit" if flowertune else "none"))
    settings = EvalSettings(
        protocol=args.protocol,
        limit=args.limit,
        batch_size=batch_size,
        finance_max_new_tokens=args.finance_max_new_tokens,
        code_max_new_tokens=args.code_max_new_tokens,
        sandbox=SandboxLimits(timeout_s=args.code_timeout),
        benchmarks=tuple(b.strip() for b in args.benchmarks.split(",")) if args.benchmarks else None,
        quantization=quantization,
        quantization_note=note,
    )
    report = evaluate_suite(
        args.suite,
        loaded.model,
        loaded.tokenizer,
        source,
        settings,
        base_model=args.base,
        adapter=args.adapter,
        base_identity=loaded.identity,
    )
    paths = write_report(report, args.out)
    print(to_markdown(report))
    print(f"wrote {paths['json']} and {paths['markdown']} (per-item records in {paths['items']})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from evaluation.compare import run_compare

    return run_compare(args)
