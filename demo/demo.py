"""`silotune demo`: the whole federation on one machine, for real, in a few minutes on a CPU.

CA + server certificate + three silo keys, a TLS SuperLink with node authentication and three
SuperNodes as separate OS processes on loopback, each silo with its own partition of real financial
tweets (a subset of TFNS bundled in demo/data, see demo/tfns.py), a few FedAvg rounds of LoRA on the
embedded SmolLM2-135M-Instruct trained in FlowerTune's evaluation prompt, accuracy and macro-F1 on
held-out TFNS items before and after, a summary of what every round cost, and the run's HTML report.

The workspace (CA, keys, SuperLink state, logs, the silos' FLWR_HOMEs with the app copies Flower
unpacks there, the adapter) lives outside the source checkout by default, in
``$XDG_STATE_HOME/silotune/demo`` (``~/.local/state/silotune/demo``), so that linters, test
collection and ``git status`` of a checkout never see it; ``--workspace`` picks another one.

Run again in the same workspace, the demo starts from a clean run state: it keeps the identity (the
CA, the SuperLink certificate and every silo's node key) and removes everything a run leaves
(SuperLink database and admissions, run journal, runs and their adapter, events, logs, the silos'
FLWR_HOMEs), then admits the same keys again. Two demos at once on one workspace are refused.

The before/after figures are measured on a few hundred held-out tweets of TFNS's validation split:
real text, never trained on, scored the way FlowerTune's finance evaluation scores TFNS. They show
that the federation learns the task; they are one set, not the finance suite (``silotune eval``
and ``benchmarks/finance_quality.py`` are).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from demo import tfns
from silotune import protocol
from silotune.config import ModelConfig, parse_run_config
from silotune.errors import UserError
from silotune.events import EventLog, read_events

HUB_DATASET = "FinGPT/fingpt-sentiment-train"  # FlowerTune's finance training set
BUNDLED_SOURCE = f"{tfns.SOURCE}: the subset bundled in demo/data"
HUB_PROBE_TIMEOUT = 1.5  # seconds for the one TCP connect that decides "offline"
# New tokens per held-out answer. A tuned adapter answers "neutral<eos>"; the base model rambles
# ("\npositive\n\nOutput: ..."), and its first line is its answer. `silotune eval` allows 32 tokens;
# on the demo's 300 items that changes 5 base-model answers (24.0 % / 24.4 % instead of 25.0 % /
# 25.3 %) and costs 97 s instead of 42 s on 2 cores: the demo keeps its five minutes.
MAX_NEW_TOKENS = 8
SILO_NAMES = ("hospital-a", "bank-b", "clinic-c")
LABEL_ORDER = ("negative", "neutral", "positive")
# What a run leaves that the next run keeps: the identity (LocalFederation's layout).
KEEP_CENTRAL, KEEP_SILO = frozenset({"ca", "server"}), frozenset({"keys"})
LOCK_FILE = "demo.lock"


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
    hub: bool = False  # train on FlowerTune's FinGPT set from the hub instead of the bundled TFNS
    model: str = "embedded:smollm2-135m-instruct"
    # Chosen by measurement (README, "Demo figures"): 3 rounds x 6 steps x 8 tweets per silo at a
    # peak lr of 1.5e-3 fit five minutes on 2 cores and learned as much as 7 steps; of 1e-3, 1.5e-3,
    # 2e-3 and 3e-3 (7 steps) 1.5e-3 gave the best held-out macro-F1 (3e-3 swung the answers to
    # "positive"); a TFNS-like 65 % neutral training mix mostly taught "neutral".
    rounds: int = 3
    local_steps: int = 6
    batch_size: int = 8
    seq_length: int = 96  # TFNS tweets plus the evaluation prompt fit in 96 tokens
    lr_max: float = 1.5e-3
    rank: int = 8
    per_silo: int = 500  # training rows per silo (the bundled subset has 1,500)
    eval_limit: int = 300  # held-out items (the bundled subset has 300)
    timeout: float = 3600.0
    offline: bool = False
    transport: str = "fp32"  # transport.dtype: fp32, bf16, int8, int4


@dataclass
class HeldOutScores:
    """One model on the held-out items, scored like FlowerTune's finance evaluation."""

    accuracy: float = 0.0
    macro_f1: float = 0.0
    predicted: dict[str, float] = field(default_factory=dict)  # share of each predicted label
    n: int = 0


@dataclass
class DemoReport:
    timings: dict[str, float] = field(default_factory=dict)
    before: HeldOutScores = field(default_factory=HeldOutScores)
    after: HeldOutScores = field(default_factory=HeldOutScores)
    gold: dict[str, float] = field(default_factory=dict)  # share of each label among held-out items
    majority_accuracy: float = 0.0  # always answering the most frequent held-out label
    majority_macro_f1: float = 0.0
    heldout_source: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    silo_peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    adapter_dir: str = ""
    adapter_raw_bytes: int = 0
    data_source: str = ""
    report_html: str = ""
    removed_previous_run: bool = False


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


def _stay_offline() -> None:
    # Nothing in this process or the silos it starts should try the hub (retries cost ~25 s).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def prepare_data(opts: DemoOptions, out_dir: Path) -> tuple[list[Path], list[dict[str, str]], str]:
    """Three silo files and held-out records. Returns (silo paths, held-out records, source).

    Training rows: the bundled TFNS subset (default), FlowerTune's FinGPT set from the hub
    (``hub``; the bundled subset when the hub cannot be reached) or a local file (``data``).
    Held-out records: the bundled TFNS held-out items, except with a local file, whose own rows
    are held out (one fifth at most, never trained on).
    """
    from silo_node.app.data import load_silo_records
    from silo_node.ops.split import split_indices
    from silotune.config import parse_silo_config

    out_dir.mkdir(parents=True, exist_ok=True)
    n_train = len(SILO_NAMES) * opts.per_silo
    held_rows = tfns.load(tfns.HELDOUT_FILE)[: opts.eval_limit]
    if opts.data is not None:
        silo = parse_silo_config(
            {"data-path": str(opts.data), "columns": opts.columns, "label-map": opts.label_map}
        )
        records = load_silo_records(silo, "finance")
        if len(records) < len(SILO_NAMES) + 1:
            raise UserError(f"{opts.data}: needs at least 4 rows for 3 silos and held-out data")
        random.Random(0).shuffle(records)
        n_eval = min(opts.eval_limit, max(1, len(records) // 5))
        held_rows, train = records[:n_eval], records[n_eval : n_eval + n_train]
        source = f"local file {opts.data}"
    else:
        train, reason = None, None
        if opts.hub:
            reason = "--offline" if opts.offline else hub_offline_reason()
            if reason is None:
                train = _rows_from_hub(n_train, seed=0)
                reason = None if train is not None else f"the hub dataset {HUB_DATASET} could not be loaded"
        if train is None:
            _stay_offline()
            train = tfns.load(tfns.TRAIN_FILE)[:n_train]
            source = BUNDLED_SOURCE + (f" (not the hub: {reason})" if reason else "")
        else:
            source = f"Hugging Face hub dataset {HUB_DATASET} (random sample)"
    parts = split_indices(len(train), len(SILO_NAMES), "iid", seed=0)
    paths = []
    for i, idx in enumerate(parts):
        p = out_dir / f"silo-{i}.jsonl"
        p.write_text("".join(json.dumps(train[j]) + "\n" for j in idx), encoding="utf-8")
        paths.append(p)
    return paths, held_rows, source


def label_shares(labels: list[str]) -> dict[str, float]:
    """Share of each sentiment label (all three always present, in a fixed order)."""
    counts = Counter(labels)
    return {k: counts[k] / max(len(labels), 1) for k in LABEL_ORDER}


# -- evaluation ----------------------------------------------------------------------------------
def runnable_elsewhere(loadavg: Path = Path("/proc/loadavg"), samples: int = 5) -> int | None:
    """How many other threads want a CPU right now (median of a few reads of the kernel's
    running-entities count, this reader excluded), or None where the kernel does not say."""
    counts = []
    for i in range(samples):
        try:
            running = loadavg.read_text().split()[3].split("/")[0]
            counts.append(max(0, int(running) - 1))
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(0.05)
    return sorted(counts)[len(counts) // 2]


def evaluation_threads(cpus: int, busy: int | None) -> int:
    """Torch threads for the demo's own greedy decoding: the cores other work leaves idle (all of
    them on an idle machine), at least one. Decoding is many small operations, each a barrier for
    all of torch's threads, so a thread that shares its core with someone else stalls the others:
    on the 2-core reference machine, busy with other jobs, 2 threads decoded 32 held-out items in
    64-151 s, 1 thread in 17-18 s."""
    return cpus if busy is None else max(1, cpus - busy)


def _set_eval_threads() -> int:
    import torch

    from silo_node.app.allotment import available_cpus

    threads = evaluation_threads(available_cpus(), runnable_elsewhere())
    torch.set_num_threads(threads)
    return threads


def score_heldout(model: Any, tokenizer: Any, records: list[dict[str, str]]) -> HeldOutScores:
    """Greedy-decode each held-out item in FlowerTune's evaluation prompt (what the silos train on:
    ``train.prompt-style = "eval"``) and score the answer with FlowerTune's finance extraction."""
    from evaluation.extraction import sentiment_label
    from evaluation.generation import greedy_generate
    from evaluation.scoring import accuracy, macro_f1
    from silo_node.app.templates import get_template

    template = get_template("finance")
    prompts = [template.render(r, "eval")[0] for r in records]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=16)
    preds = [sentiment_label(o) for o in outputs]
    golds = [sentiment_label(r["output"]) for r in records]
    return HeldOutScores(accuracy(preds, golds), macro_f1(preds, golds), label_shares(preds), len(records))


def _describe_heldout(opts: DemoOptions, held: list[dict[str, str]]) -> str:
    if opts.data is not None:
        return f"{len(held)} held-out rows of {opts.data} (never trained on)"
    return (
        f"{len(held)} held-out tweets of TFNS's validation split (FlowerTune's evaluation split; "
        "bundled in demo/data, never trained on)"
    )


# -- the workspace -------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def reset_run_state(fed_dir: Path) -> bool:
    """Remove what an earlier run left under ``fed_dir``, keeping the identity; True if it did.

    Kept: the CA and the SuperLink certificate (``central/ca``, ``central/server``) and each
    silo's node key pair (``silos/NAME/keys``). Removed: everything else there, i.e. the SuperLink
    database with its node registrations, the admission ledger and connection (central FLWR_HOME),
    the run journal, runs with their adapter and events, logs, and the silos' FLWR_HOMEs and events.
    The next start admits the kept keys afresh, so a second demo is a new run of the same
    federation, not a resumption of the first.
    """
    if not fed_dir.is_dir():
        return False
    doomed: list[Path] = []
    for child in fed_dir.iterdir():
        if child.name == "central" and _real_dir(child):
            doomed += [e for e in child.iterdir() if e.name not in KEEP_CENTRAL]
        elif child.name == "silos" and _real_dir(child):
            for silo in child.iterdir():
                if _real_dir(silo):
                    doomed += [e for e in silo.iterdir() if e.name not in KEEP_SILO]
                else:
                    doomed.append(silo)
        else:
            doomed.append(child)
    for path in doomed:
        _remove(path)
    return bool(doomed)


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def leftover_processes(fed_dir: Path, proc: Path = Path("/proc")) -> list[int]:
    """PIDs of processes whose command line names ``fed_dir``: what an earlier demo that was killed
    outright (SIGKILL, a closed terminal) left running. Empty where /proc does not exist."""
    needle = str(fed_dir).encode()
    found = []
    for entry in proc.glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return sorted(found)


class WorkspaceLock:
    """An exclusive lock on the workspace for one demo (released when the process ends, however)."""

    def __init__(self, ws: Path) -> None:
        self.path = ws / LOCK_FILE
        self.fh: Any = None

    def __enter__(self) -> WorkspaceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until __exit__)
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "?"
            self.fh.close()
            raise UserError(
                f"another silotune demo (pid {holder}) is running in the workspace {self.path.parent}; "
                "wait for it, or give this one another --workspace"
            ) from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the lock


# -- the demo -----------------------------------------------------------------------------------
def run_config(opts: DemoOptions) -> dict[str, Any]:
    """The run config the demo submits (checked by the same parser as any run's)."""
    cfg = {
        "model.name": opts.model,
        "num-rounds": opts.rounds,
        "domain": "finance",
        "run-dir": "demo",
        "resume": False,
        "strategy.name": "fedavg",
        "strategy.min-nodes": len(SILO_NAMES),
        "train.local-steps": opts.local_steps,
        "train.batch-size": opts.batch_size,
        "train.seq-length": opts.seq_length,
        "train.lr-max": opts.lr_max,
        "train.lr-min": opts.lr_max / 10,
        # Train in the prompt the held-out items are asked in (FlowerTune's evaluation format).
        "train.prompt-style": "eval",
        "peft.rank": opts.rank,
        "peft.alpha": 2 * opts.rank,
        "transport.dtype": opts.transport,
    }
    parse_run_config(cfg)
    return cfg


def run_demo(opts: DemoOptions) -> DemoReport:
    ws = opts.workspace.resolve()
    with WorkspaceLock(ws):
        return _run_demo(opts, ws)


def _run_demo(opts: DemoOptions, ws: Path) -> DemoReport:
    from silotune.quiet_libraries import quiet_for

    # Before anything imports peft (and with it bitsandbytes); the env it sets reaches the silos.
    quiet_for(sys.stderr)
    from demo.local_federation import LocalFederation, SiloSpec
    from silo_node.app.data import load_silo_records  # noqa: F401  (fail early if the install is broken)
    from silotune.modeling import load_model

    report = DemoReport()
    t0 = time.monotonic()
    _say(f"workspace: {ws} (choose another with --workspace)")
    cfg = run_config(opts)
    stray = leftover_processes(ws / "federation")
    if stray:  # this run gets fresh ports and state; they only hold memory (and may be a `tail -f`)
        _say(
            f"warning: processes whose command lines name this workspace are running (PIDs "
            f"{' '.join(map(str, stray))}): left by an earlier demo that was killed outright? They do "
            "not disturb this run, but hold memory; stop them with kill PID"
        )
    report.removed_previous_run = reset_run_state(ws / "federation")
    if report.removed_previous_run:
        _say(
            "an earlier run's state is there: starting clean (its runs, adapter, logs, SuperLink "
            "database and admissions removed; the CA, the server certificate and the node keys kept)"
        )
    paths, held, report.data_source = prepare_data(opts, ws / "data")
    report.heldout_source = _describe_heldout(opts, held)
    golds = [str(r["output"]).strip() for r in held]
    report.gold = label_shares(golds)
    _say(f"training data: {report.data_source}")
    _say(f"held out: {report.heldout_source}")
    from evaluation.scoring import macro_f1, majority_accuracy

    report.majority_accuracy = majority_accuracy(golds)
    majority = Counter(golds).most_common(1)[0][0] if golds else "neutral"
    report.majority_macro_f1 = macro_f1([majority] * len(golds), golds)

    t = time.monotonic()
    _say(
        f"loading the base model {opts.model} (the embedded GGUF is converted once into "
        "~/.cache/silotune on first use)"
    )
    loaded = load_model(ModelConfig(name=opts.model), for_training=False)
    report.timings["model_load"] = time.monotonic() - t

    t = time.monotonic()
    threads = _set_eval_threads()
    _say(f"evaluating the base model on the {len(held)} held-out items ({_threads(threads)})")
    report.before = score_heldout(loaded.model, loaded.tokenizer, held)
    _say(f"before: {_scores_line(report.before)}")
    report.timings["evaluation"] = time.monotonic() - t

    silos = [SiloSpec(n, p, {"domain": "finance"}) for n, p in zip(SILO_NAMES, paths, strict=True)]
    t = time.monotonic()
    _say(
        "creating the CA, the SuperLink certificate and one node key per silo (kept from an earlier "
        "run if there is one); starting a TLS SuperLink with node authentication and 3 SuperNodes"
    )
    fed = LocalFederation(ws / "federation", silos)
    with fed:
        report.timings["setup"] = (
            time.monotonic() - t0 - report.timings["model_load"] - report.timings["evaluation"]
        )
        _say(f"SuperLink at {fed.address} (TLS); logs in {fed.ws / 'logs'}")
        t = time.monotonic()
        result = _submit_with_progress(fed, cfg, opts)
        report.timings["rounds"] = time.monotonic() - t
        run_dir = fed.runs_root / "demo"
    report.adapter_dir = result.adapter_dir
    _collect_events(run_dir / "events.jsonl", report)

    t = time.monotonic()
    threads = _set_eval_threads()
    _say(f"evaluating the federated adapter on the same held-out items ({_threads(threads)})")
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(loaded.model, report.adapter_dir)
    report.after = score_heldout(tuned, loaded.tokenizer, held)
    _say(f"after: {_scores_line(report.after)}")
    report.timings["evaluation"] += time.monotonic() - t
    report.report_html = str(write_run_report(run_dir, report))
    report.timings["total"] = time.monotonic() - t0
    return report


def _threads(n: int) -> str:
    return f"{n} torch thread" + ("s" if n > 1 else "")


def _scores_line(s: HeldOutScores) -> str:
    shares = ", ".join(f"{k} {v:.0%}" for k, v in s.predicted.items())
    return f"accuracy {s.accuracy:.1%}, macro-F1 {s.macro_f1:.1%} (answers: {shares})"


def write_run_report(run_dir: Path, report: DemoReport) -> Path:
    """Add the held-out scores to the run's events (round 0: the base model; the last round: the
    federated adapter) and write the run's HTML report beside them (``silotune report`` rereads)."""
    from monitoring.report import write_report

    last = max((int(r["round"]) for r in report.rounds), default=0)
    log = EventLog("demo")
    log.paths = [run_dir / "events.jsonl"]  # this run's record only, not the exporters' files
    for rnd, scores, what in ((0, report.before, "base model"), (last, report.after, "federated adapter")):
        log.emit(
            protocol.EV_EVALUATION,
            round=rnd,
            model=what,
            heldout=report.heldout_source,
            metrics={
                "accuracy": scores.accuracy,
                "macro_f1": scores.macro_f1,
                "examples": scores.n,
                **{f"predicted_{k}": v for k, v in scores.predicted.items()},
            },
        )
    return write_report(run_dir)


def _submit_with_progress(fed: Any, run_cfg: dict[str, Any], opts: DemoOptions) -> Any:
    from superlink.ops.submit import round_progress

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


def accuracy_caveat(r: DemoReport) -> list[str]:
    """What the before/after figures measure, and what they do not."""
    lines = [f"  ({r.heldout_source}."]
    if r.majority_accuracy:
        lines.append(
            f"  Always answering the most frequent label would score {r.majority_accuracy:.1%} accuracy, "
            f"{r.majority_macro_f1:.1%} macro-F1:"
        )
        lines.append("  macro-F1 is the figure that tells a learned task from a learned prior.")
    lines += [
        "  One set and a few hundred items after a few minutes of training on 2 cores: it shows that the",
        "  federation learns the task on real text, it is not FlowerTune's finance suite (FPB, FiQA, TFNS).",
        "  Measure that: `silotune eval --suite finance --adapter DIR`; benchmarks/finance_quality.py has",
        "  the measured figures.)",
    ]
    return lines


def format_summary(r: DemoReport) -> str:
    mib = 1024 * 1024
    lines = [
        "",
        "SiloTune demo summary",
        "=" * 21,
        f"training data: {r.data_source}",
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
        f"held-out items: {r.before.n}; labels: " + ", ".join(f"{k} {v:.1%}" for k, v in r.gold.items()),
        "                    before (base model)   after (federated adapter)",
        f"accuracy            {r.before.accuracy:>19.1%}   {r.after.accuracy:>25.1%}",
        f"macro-F1            {r.before.macro_f1:>19.1%}   {r.after.macro_f1:>25.1%}",
        *(
            f"answers {k:<11} {r.before.predicted.get(k, 0):>19.1%}   {r.after.predicted.get(k, 0):>25.1%}"
            for k in LABEL_ORDER
        ),
        *accuracy_caveat(r),
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
        f"run report (HTML): {r.report_html}",
    ]
    if r.removed_previous_run:
        lines.append("(an earlier demo's run in this workspace was replaced; its CA and keys were reused)")
    return "\n".join(lines)
