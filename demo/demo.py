"""`silotune demo`: the whole federation on one machine, for real, in a few minutes on a CPU.

CA + server certificate + three silo keys, a TLS SuperLink with node authentication and three
SuperNodes as separate OS processes on loopback, each silo with its own partition of a finance
sentiment set, a few FedAvg rounds of LoRA on the embedded SmolLM2-135M-Instruct, accuracy on
held-out data before and after, and a summary of what every round cost.

The workspace (CA, keys, SuperLink state, logs, the silos' FLWR_HOMEs with the app copies Flower
unpacks there, the adapter) lives outside the source checkout by default, in
``$XDG_STATE_HOME/silotune/demo`` (``~/.local/state/silotune/demo``), so that linters, test
collection and ``git status`` of a checkout never see it; ``--workspace`` picks another one.

The before/after accuracy is measured on held-out items of the data the demo trained on (offline:
SiloTune's own authored headlines). It shows that the federation trains; it is not a benchmark
(``silotune eval`` is).
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from silotune import protocol
from silotune.config import ModelConfig, parse_run_config
from silotune.errors import UserError
from silotune.events import read_events

HUB_DATASET = "FinGPT/fingpt-sentiment-train"  # FlowerTune's finance training set
AUTHORED_SOURCE = "SiloTune's own authored headline sample"
HUB_PROBE_TIMEOUT = 1.5  # seconds for the one TCP connect that decides "offline"
# What the demo's adapter scores on FlowerTune's whole finance suite (FPB, FiQA, TFNS average),
# against the base model: the demo's before/after accuracy does not carry over to real benchmarks.
SUITE_SCORE_ADAPTER, SUITE_SCORE_BASE = 35.24, 35.26


def default_workspace() -> Path:
    """``$XDG_STATE_HOME/silotune/demo``, else ``~/.local/state/silotune/demo``: outside any checkout."""
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "silotune" / "demo"


@dataclass
class DemoOptions:
    workspace: Path = field(default_factory=default_workspace)
    data: Path | None = None
    columns: str = ""
    label_map: str = ""
    model: str = "embedded:smollm2-135m-instruct"
    rounds: int = 3
    local_steps: int = 4
    batch_size: int = 4
    seq_length: int = 128
    lr_max: float = 3e-3
    rank: int = 8
    per_silo: int = 60
    eval_limit: int = 60
    timeout: float = 3600.0
    offline: bool = False
    transport: str = "fp32"  # transport.dtype: fp32, bf16, int8, int4


@dataclass
class DemoReport:
    timings: dict[str, float] = field(default_factory=dict)
    accuracy_before: float = 0.0
    accuracy_after: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    silo_peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    adapter_dir: str = ""
    adapter_raw_bytes: int = 0
    data_source: str = ""


def _say(msg: str) -> None:
    print(f"[silotune demo] {msg}", flush=True)


# -- data ----------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_address() -> tuple[str, int]:
    """HOST, PORT to probe: the hub ($HF_ENDPOINT, default huggingface.co:443), or the HTTPS proxy
    when one is set (then the proxy is what a request reaches first)."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
    if not url:
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "huggingface.co", parts.port or (80 if parts.scheme == "http" else 443)


def hub_offline_reason(
    host: str | None = None, port: int | None = None, timeout: float = HUB_PROBE_TIMEOUT
) -> str | None:
    """Why the Hugging Face hub is out of reach, or None when it answers.

    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE decide without any network access; otherwise one TCP
    connect to ``host:port`` (default: ``hub_address()``), name resolution included, bounded by
    ``timeout`` seconds in all (a daemon thread, since getaddrinfo ignores socket timeouts). No
    retries, nothing printed: offline is known within ``timeout`` instead of after the ~25 s of
    retries ``datasets.load_dataset`` spends on an unreachable hub.
    """
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_flag(name):
            return f"{name} is set"
    if host is None or port is None:
        default_host, default_port = hub_address()
        host, port = host or default_host, port or default_port
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if result.get("ok"):
        return None
    if "error" in result:
        return f"{host}:{port} is not reachable ({result['error'].__class__.__name__}: {result['error']})"
    return f"{host}:{port} did not answer within {timeout:.1f} s"


def _rows_from_hub(n: int, seed: int) -> list[dict[str, str]] | None:
    """FlowerTune's finance data from the hub, or None when the hub cannot be reached (offline)."""
    try:
        from datasets import load_dataset

        ds = load_dataset(HUB_DATASET, split="train")
    except Exception:
        return None
    idx = random.Random(seed).sample(range(len(ds)), min(n, len(ds)))
    return [{k: str(ds[i][k]) for k in ("instruction", "input", "output")} for i in idx]


def prepare_data(opts: DemoOptions, out_dir: Path) -> tuple[list[Path], list[dict[str, str]], str]:
    """Three silo files and held-out records. Returns (silo paths, held-out records, source)."""
    from demo.sample_data import write_demo_data
    from silo_node.data import load_silo_records
    from silo_node.split import split_indices
    from silotune.config import parse_silo_config

    out_dir.mkdir(parents=True, exist_ok=True)
    n_total = 3 * opts.per_silo + opts.eval_limit
    if opts.data is not None:
        silo = parse_silo_config(
            {"data-path": str(opts.data), "columns": opts.columns, "label-map": opts.label_map}
        )
        records = load_silo_records(silo, "finance")
        source = f"local file {opts.data}"
    else:
        reason = "--offline" if opts.offline else hub_offline_reason()
        if reason is not None:
            # Nothing in this process or the silos it starts should try the hub again (retries).
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            records = None
        else:
            records = _rows_from_hub(n_total, seed=0)
            reason = f"the hub dataset {HUB_DATASET} could not be loaded"
        if records is None:
            paths, held = write_demo_data(out_dir, 3, opts.per_silo, opts.eval_limit)
            held_rows = [json.loads(x) for x in held.read_text().splitlines()]
            return (paths, held_rows, f"{AUTHORED_SOURCE} (offline: {reason})")
        source = f"Hugging Face hub dataset {HUB_DATASET} (random sample)"
    rng = random.Random(0)
    rng.shuffle(records)
    if len(records) < 3 + 1:
        raise UserError(f"{opts.data}: needs at least 4 rows for 3 silos and held-out data")
    n_eval = min(opts.eval_limit, max(1, len(records) // 5))
    held_rows, train = records[:n_eval], records[n_eval : n_eval + 3 * opts.per_silo]
    parts = split_indices(len(train), 3, "iid", seed=0)
    paths = []
    for i, idx in enumerate(parts):
        p = out_dir / f"silo-{i}.jsonl"
        p.write_text("".join(json.dumps(train[j]) + "\n" for j in idx), encoding="utf-8")
        paths.append(p)
    return paths, held_rows, source


# -- evaluation ----------------------------------------------------------------------------------
def sentiment_accuracy(model: Any, tokenizer: Any, records: list[dict[str, str]]) -> float:
    """Greedy-decode each held-out item and score it with FlowerTune's finance extraction."""
    from evaluation.extraction import sentiment_label
    from evaluation.generation import greedy_generate
    from silo_node.templates import get_template
    from silo_node.training import build_prompt

    template = get_template("finance")
    prompts = [build_prompt(tokenizer, template.render(r)[0], True) for r in records]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    hits = sum(
        sentiment_label(o) == sentiment_label(r["output"]) for o, r in zip(outputs, records, strict=True)
    )
    return hits / max(len(records), 1)


# -- the demo -----------------------------------------------------------------------------------
def run_demo(opts: DemoOptions) -> DemoReport:
    from silotune.quiet_libraries import quiet_for

    # Before anything imports peft (and with it bitsandbytes); the env it sets reaches the silos.
    quiet_for(sys.stderr)
    from demo.local_federation import LocalFederation, SiloSpec
    from silo_node.data import load_silo_records  # noqa: F401  (fail early if the install is broken)
    from silotune.modeling import load_model

    report = DemoReport()
    ws = opts.workspace.resolve()
    t0 = time.monotonic()
    _say(f"workspace: {ws} (choose another with --workspace)")
    paths, held, report.data_source = prepare_data(opts, ws / "data")
    _say(f"data: {report.data_source}; {len(held)} held-out items")

    t = time.monotonic()
    _say(
        f"loading the base model {opts.model} (the embedded GGUF is converted once into "
        "~/.cache/silotune on first use)"
    )
    model_cfg = ModelConfig(name=opts.model)
    loaded = load_model(model_cfg, for_training=False)
    report.timings["model_load"] = time.monotonic() - t

    t = time.monotonic()
    _say("evaluating the base model on held-out data")
    report.accuracy_before = sentiment_accuracy(loaded.model, loaded.tokenizer, held)
    _say(f"accuracy before: {report.accuracy_before:.1%}")
    report.timings["evaluation"] = time.monotonic() - t

    names = ["hospital-a", "bank-b", "clinic-c"]
    silos = [SiloSpec(n, p, {"domain": "finance"}) for n, p in zip(names, paths, strict=True)]
    t = time.monotonic()
    _say(
        "creating the CA, the SuperLink certificate and one node key per silo; starting a TLS "
        "SuperLink with node authentication and 3 SuperNodes"
    )
    fed = LocalFederation(ws / "federation", silos)
    with fed:
        report.timings["setup"] = (
            time.monotonic() - t0 - report.timings["model_load"] - report.timings["evaluation"]
        )
        _say(f"SuperLink at {fed.address} (TLS); logs in {fed.ws / 'logs'}")
        run_cfg = {
            "model.name": opts.model,
            "num-rounds": opts.rounds,
            "domain": "finance",
            "run-dir": "demo",
            "resume": False,
            "strategy.name": "fedavg",
            "strategy.min-nodes": 3,
            "train.local-steps": opts.local_steps,
            "train.batch-size": opts.batch_size,
            "train.seq-length": opts.seq_length,
            "train.lr-max": opts.lr_max,
            "train.lr-min": opts.lr_max / 10,
            "peft.rank": opts.rank,
            "peft.alpha": 2 * opts.rank,
            "transport.dtype": opts.transport,
        }
        parse_run_config(run_cfg)
        t = time.monotonic()
        result = _submit_with_progress(fed, run_cfg, opts)
        report.timings["rounds"] = time.monotonic() - t
        run_dir = fed.runs_root / "demo"
    report.adapter_dir = result.adapter_dir
    _collect_events(run_dir / "events.jsonl", report)

    t = time.monotonic()
    _say("evaluating the federated adapter on the same held-out data")
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(loaded.model, report.adapter_dir)
    report.accuracy_after = sentiment_accuracy(tuned, loaded.tokenizer, held)
    report.timings["evaluation"] += time.monotonic() - t
    report.timings["total"] = time.monotonic() - t0
    return report


def _submit_with_progress(fed: Any, run_cfg: dict[str, Any], opts: DemoOptions) -> Any:
    from superlink.submit import round_progress

    if not sys.stdout.isatty():  # a log file: one plain line per round, no progress bar
        return fed.submit(run_cfg, timeout=opts.timeout, on_round=_print_round)
    with round_progress(opts.rounds) as on_round:
        return fed.submit(run_cfg, timeout=opts.timeout, on_round=on_round)


def _print_round(info: dict[str, Any]) -> None:
    loss = info.get("train_loss")
    _say(
        f"round {info['round']}: {info['answered']}/{info['sampled']} silos answered, loss "
        + (f"{loss:.4f}" if loss is not None else "- (no valid update)")
    )


def _collect_events(path: Path, report: DemoReport) -> None:
    for e in read_events(path):
        if e["kind"] == protocol.EV_RUN_START:
            report.adapter_raw_bytes = int(e.get("adapter_parameters", 0)) * 4
        elif e["kind"] == protocol.EV_ROUND_END:
            report.rounds.append(
                {
                    k: e.get(k)
                    for k in (
                        "round",
                        "train_loss",
                        "uplink_bytes",
                        "downlink_bytes",
                        "fp32_bytes",
                        "duration_seconds",
                        "answered",
                        "sampled",
                    )
                }
            )
        elif e["kind"] == protocol.EV_SILO_RESULT:
            peaks = report.silo_peaks.setdefault(e["silo"], {})
            for k in ("peak_rss_bytes", "peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes"):
                peaks[k] = max(peaks.get(k, 0), int(e.get(k) or 0))


def accuracy_caveat(data_source: str) -> list[str]:
    """What the before/after accuracy measures, and what it does not."""
    sample = (
        "SiloTune's own authored headlines"
        if data_source.startswith(AUTHORED_SOURCE)
        else "the demo's own data sample"
    )
    return [
        f"  (held-out items of {sample}, like those the silos trained on:",
        "  it shows that the federation learns, not how the model does on real data. On FlowerTune's",
        f"  full finance suite (FPB, FiQA, TFNS) the default demo's adapter scored {SUITE_SCORE_ADAPTER:.2f}",
        f"  against the base model's {SUITE_SCORE_BASE:.2f}. Measure yours: "
        "`silotune eval --suite finance --adapter DIR`.)",
    ]


def format_summary(r: DemoReport) -> str:
    mib = 1024 * 1024
    lines = [
        "",
        "SiloTune demo summary",
        "=" * 21,
        f"data: {r.data_source}",
        "",
        "round  train loss  uplink (payload)  downlink (payload)  both as fp32  silos  seconds",
    ]
    for x in r.rounds:
        loss = f"{x['train_loss']:.4f}" if x.get("train_loss") is not None else "-"
        fp32 = x.get("fp32_bytes") or 0
        lines.append(
            f"{x['round']:>5}  {loss:>10}  {x['uplink_bytes'] / mib:>13.2f} MiB  "
            f"{x['downlink_bytes'] / mib:>15.2f} MiB  {fp32 / mib:>8.2f} MiB  "
            f"{x['answered']}/{x['sampled']:<3} {x['duration_seconds']:>7.1f}"
        )
    lines += [
        "",
        f"adapter raw size: {r.adapter_raw_bytes / mib:.2f} MiB (float32); per round each "
        "silo sends one adapter up and receives one down",
        "",
        f"accuracy on held-out data: before {r.accuracy_before:.1%}  ->  after {r.accuracy_after:.1%}",
        *accuracy_caveat(r.data_source),
        "",
        "peak memory per silo (per round maximum):",
    ]
    for silo, peaks in sorted(r.silo_peaks.items()):
        gpu = peaks.get(protocol.PEAK_GPU_ALLOCATED, 0)
        extra = f", GPU allocated {gpu / mib:.0f} MiB" if gpu else " (no GPU: resident set size)"
        lines.append(f"  {silo:<12} RSS {peaks.get(protocol.PEAK_RSS, 0) / mib:.0f} MiB{extra}")
    t = r.timings
    lines += [
        "",
        "wall time: "
        + ", ".join(
            f"{k} {t.get(k, 0):.0f} s" for k in ("setup", "model_load", "rounds", "evaluation", "total")
        ),
        "",
        f"global adapter: {r.adapter_dir}",
        "load it with: PeftModel.from_pretrained(base_model, '<that directory>')",
    ]
    return "\n".join(lines)
