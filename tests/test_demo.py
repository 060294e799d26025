"""The README's main job, shrunk: `silotune demo` end to end on the embedded SmolLM2 (real TLS
SuperLink, three SuperNodes, two rounds), twice in a row in one workspace, then no process of it is
left behind. And its hygiene, fast: its workspace stays out of the checkout (and is ignored if put
there), a second run starts from a clean run state keeping only the identity, two runs at once are
refused, the bundled TFNS subset is what its licence file says and ships in the wheel, held-out
items are asked and scored like FlowerTune's evaluation, offline is known in under 2 s without
retries, logs carry no progress-bar fragments, irrelevant warnings are dropped."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from demo import demo as demo_mod
from demo import tfns
from demo.demo import (
    BUNDLED_SOURCE,
    DemoOptions,
    DemoReport,
    HeldOutScores,
    WorkspaceLock,
    default_workspace,
    format_summary,
    hub_offline_reason,
    prepare_data,
    reset_run_state,
    run_config,
    run_demo,
    score_heldout,
)
from silotune import quiet_libraries
from silotune.errors import UserError

REPO = Path(__file__).resolve().parent.parent
BAD_PY = "import sys\nimport os\nx=1;y = os\n"  # I001 (unsorted imports), E702, F401


def _closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No HF_*_OFFLINE (CI exports HF_HUB_OFFLINE=1); whatever the code sets is undone afterwards."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        monkeypatch.setenv(name, "")  # recorded, so that the delenv below is undone too
        monkeypatch.delenv(name)
    return monkeypatch


# -- workspace --------------------------------------------------------------------------------------
def test_default_workspace_is_outside_the_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    ws = default_workspace()
    assert ws == Path.home() / ".local" / "state" / "silotune" / "demo"
    assert ws.is_absolute() and not ws.resolve().is_relative_to(REPO)
    assert DemoOptions().workspace == ws
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_workspace() == tmp_path / "silotune" / "demo"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # not absolute: ignored, as XDG says
    assert default_workspace().is_absolute()


def test_cli_demo_defaults_to_the_workspace_outside_the_checkout() -> None:
    import argparse

    from demo import cli as run_cli

    parser = argparse.ArgumentParser()
    run_cli.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--offline"])
    assert args.workspace is None  # _demo then takes default_workspace()
    assert parser.parse_args(["demo", "--workspace", "w"]).workspace == Path("w")


def _fake_workspace(root: Path) -> list[Path]:
    """What a demo run inside a checkout leaves: Flower's unpacked app copies, with lint errors."""
    files = [
        root / "silotune-demo/federation/silos/bank-b/flwr-home/apps/silotune.1.0/demo/demo.py",
        root / "my-ws/silos/bank-b/flwr-home/apps/silotune.1.0/tests/test_copy.py",
    ]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(BAD_PY + "def test_copy():\n    raise AssertionError\n", encoding="utf-8")
    return files


def test_demo_workspace_inside_a_checkout_is_ignored_by_ruff_and_pytest(tmp_path: Path) -> None:
    """ruff's extend-exclude and pytest's norecursedirs (not only .gitignore: a tarball has no git)."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_ok.py").write_text("def test_ok():\n    pass\n", encoding="utf-8")
    _fake_workspace(tmp_path)
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    env = {**os.environ, "RUFF_NO_CACHE": "true"}
    lint = subprocess.run([ruff, "check", "."], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    (tmp_path / "control.py").write_text(BAD_PY, encoding="utf-8")  # the same file elsewhere fails
    lint = subprocess.run([ruff, "check", "."], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert lint.returncode == 1 and "I001" in lint.stdout and "control.py" in lint.stdout
    assert "apps" not in lint.stdout
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert collect.returncode == 0, collect.stdout + collect.stderr
    assert "test_ok" in collect.stdout and "test_copy" not in collect.stdout


def test_demo_workspace_inside_the_checkout_is_git_ignored() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [str(p.relative_to(REPO)) for p in _paths_only(REPO)]
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(paths) and all(not ln.startswith("::") for ln in lines), out.stdout


def _paths_only(root: Path) -> list[Path]:
    return [
        root / "silotune-demo/federation/silos/bank-b/flwr-home/apps/silotune.1.0/demo/demo.py",
        root / "silotune-demo/data/silo-0.jsonl",
        root / "my-ws/silos/bank-b/flwr-home/apps/silotune.1.0/demo/demo.py",
    ]


# -- offline detection ------------------------------------------------------------------------------
def test_offline_probe_against_a_closed_loopback_port_is_fast(hub_env: pytest.MonkeyPatch) -> None:
    port = _closed_loopback_port()
    t = time.monotonic()
    reason = hub_offline_reason("127.0.0.1", port)
    assert time.monotonic() - t < 2.0
    assert reason is not None and f"127.0.0.1:{port}" in reason


def test_offline_probe_finds_a_listening_loopback_port(hub_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        assert hub_offline_reason("127.0.0.1", srv.getsockname()[1]) is None


def test_offline_probe_is_bounded_even_when_connecting_hangs(hub_env: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(*_a: object, **_k: object) -> None:  # e.g. a name lookup that never returns
        release.wait(10)
        raise OSError("released")

    hub_env.setattr(demo_mod.socket, "create_connection", hang)
    t = time.monotonic()
    try:
        reason = hub_offline_reason("127.0.0.1", 9, timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - t < 1.0
    assert reason is not None and "did not answer within 0.3 s" in reason


@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_env_decides_without_any_network(hub_env: pytest.MonkeyPatch, name: str) -> None:
    def no_network(*_a: object, **_k: object) -> None:
        raise AssertionError("no connection may be tried when HF_*_OFFLINE is set")

    hub_env.setattr(demo_mod.socket, "create_connection", no_network)
    hub_env.setenv(name, "1")
    t = time.monotonic()
    assert hub_offline_reason() == f"{name} is set"
    assert time.monotonic() - t < 0.1


def test_default_data_is_the_bundled_tfns_subset_without_any_probe(
    hub_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub_env.setattr(demo_mod, "hub_offline_reason", lambda: pytest.fail("probed without --hub"))
    paths, held, source = prepare_data(DemoOptions(workspace=tmp_path), tmp_path)
    assert source == BUNDLED_SOURCE
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the silos it starts will not try the hub either
    rows = [json.loads(x) for p in paths for x in p.read_text().splitlines()]
    assert len(paths) == 3 and len(rows) == 1500  # 3 x 500: the whole bundled training subset
    assert {r["instruction"] for r in rows} == {tfns.INSTRUCTION}
    assert Counter(r["output"] for r in rows) == {"negative": 500, "neutral": 500, "positive": 500}
    assert len(held) == 300 and not {r["input"] for r in held} & {r["input"] for r in rows}


def test_hub_unreachable_falls_back_to_the_bundled_subset_in_under_2_s_without_retry_noise(
    hub_env: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    port = _closed_loopback_port()
    hub_env.setattr(demo_mod, "hub_address", lambda: ("127.0.0.1", port))
    t = time.monotonic()
    opts = DemoOptions(workspace=tmp_path, per_silo=5, eval_limit=4, hub=True)
    paths, held, source = prepare_data(opts, tmp_path)
    assert time.monotonic() - t < 2.0
    assert source.startswith(BUNDLED_SOURCE) and f"127.0.0.1:{port}" in source
    assert len(paths) == 3 and len(held) == 4
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the silos it starts will not retry either
    out, err = capfd.readouterr()
    assert "Retrying" not in out + err


def test_explicit_offline_flag_never_probes_even_with_hub(
    hub_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub_env.setattr(demo_mod, "hub_offline_reason", lambda: pytest.fail("probed despite --offline"))
    _, _, source = prepare_data(
        DemoOptions(workspace=tmp_path, per_silo=2, eval_limit=2, hub=True, offline=True), tmp_path
    )
    assert source == f"{BUNDLED_SOURCE} (not the hub: --offline)"


def test_local_data_file_holds_out_its_own_rows(tmp_path: Path) -> None:
    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"item {i},{i % 3}\n" for i in range(20)), encoding="utf-8")
    opts = DemoOptions(
        workspace=tmp_path, data=data, columns="input=text,output=label",
        label_map="0=negative,1=neutral,2=positive", per_silo=4, eval_limit=10,
    )  # fmt: skip
    paths, held, source = prepare_data(opts, tmp_path / "out")
    trained = {json.loads(x)["input"] for p in paths for x in p.read_text().splitlines()}
    assert source == f"local file {data}" and len(held) == 4 and len(trained) == 12  # a fifth held out
    assert not trained & {r["input"] for r in held}


# -- the bundled TFNS subset ------------------------------------------------------------------------
def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_bundled_subset_is_what_its_licence_file_says() -> None:
    train = _csv_rows(tfns.DATA_DIR / tfns.TRAIN_FILE)
    held = _csv_rows(tfns.DATA_DIR / tfns.HELDOUT_FILE)
    assert Counter(r["label"] for r in train) == {"0": 500, "1": 500, "2": 500}
    # Stratified like TFNS's validation split (1,566 / 475 / 347 of 2,388).
    assert Counter(r["label"] for r in held) == {"2": 197, "1": 60, "0": 43}
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert len({r["source_row"] for r in train}) == 1500 and len({r["source_row"] for r in held}) == 300
    licence = (tfns.DATA_DIR / "LICENSE-TFNS.md").read_text(encoding="utf-8")
    for fact in (
        "https://huggingface.co/datasets/zeroshot/twitter-financial-news-sentiment",
        "MIT License", "Permission is hereby granted", "Ricky Costa", "python -m demo.tfns",
        f"seed {tfns.SEED}", "500 per label", "197 neutral, 60 positive, 43 negative",
    ):  # fmt: skip
        assert fact in licence, fact
    records = tfns.load(tfns.HELDOUT_FILE)
    assert Counter(r["output"] for r in records) == {"neutral": 197, "positive": 60, "negative": 43}


def test_subset_derivation_is_seeded_and_reproducible(tmp_path: Path) -> None:
    """`python -m demo.tfns DIR` on a TFNS-shaped source: same bytes twice, balanced / stratified."""
    src = tmp_path / "tfns"
    src.mkdir()
    labels = [2] * 1300 + [1] * 600 + [0] * 520  # train: skewed to neutral, like TFNS
    (src / "sent_train.csv").write_text(
        "text,label\n" + "".join(f'"tweet {i}, $X",{lab}\n' for i, lab in enumerate(labels)), encoding="utf-8"
    )
    valid = [2] * 656 + [1] * 200 + [0] * 144
    (src / "sent_valid.csv").write_text(
        "text,label\n" + "".join(f"valid {i},{lab}\n" for i, lab in enumerate(valid)), encoding="utf-8"
    )
    one, two = tmp_path / "one", tmp_path / "two"
    assert tfns.main([str(src), "--out", str(one)]) == 0
    tfns.derive(src, two)
    for name in (tfns.TRAIN_FILE, tfns.HELDOUT_FILE):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    train, held = _csv_rows(one / tfns.TRAIN_FILE), _csv_rows(one / tfns.HELDOUT_FILE)
    assert Counter(r["label"] for r in train) == {"0": 500, "1": 500, "2": 500}
    assert Counter(r["label"] for r in held) == {"2": 197, "1": 60, "0": 43}
    assert all(r["text"] == f"valid {r['source_row']}" for r in held)  # source_row points back


def test_bundled_subset_ships_in_the_wheel(tmp_path: Path) -> None:
    """package-data: a non-editable install (the Docker image's) must carry the CSVs and licence."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "demo", src / "demo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", src / "pyproject.toml")
    shutil.copy(REPO / "README.md", src / "README.md")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path / "wheel"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (tfns.TRAIN_FILE, tfns.HELDOUT_FILE, "LICENSE-TFNS.md"):
        assert f"demo/data/{name}" in names


def test_the_demo_never_reads_shared_data_at_run_time() -> None:
    for path in (REPO / "demo").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "/work/shared" not in text and "shared/data" not in text, path


# -- held-out evaluation ----------------------------------------------------------------------------
def test_heldout_items_are_asked_in_flowertune_eval_prompt_and_scored_by_its_extraction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import evaluation.generation
    from evaluation.benchmarks.finance import _TWEET

    assert tfns.INSTRUCTION == _TWEET  # the instruction FlowerTune's TFNS evaluation asks with
    held = tfns.load(tfns.HELDOUT_FILE)[:6]
    golds = [r["output"] for r in held]
    seen: dict[str, object] = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, **kw):  # type: ignore[no-untyped-def]
        seen.update(prompts=list(prompts), max_new_tokens=max_new_tokens)
        # Right on all but the first item; "Positive" anywhere wins, as FlowerTune extracts.
        wrong = "I think it is Positive, maybe negative" if golds[0] != "positive" else "neutral"
        return [wrong] + [f"{g}." for g in golds[1:]]

    monkeypatch.setattr(evaluation.generation, "greedy_generate", fake_generate)
    scores = score_heldout(object(), object(), held)
    prompts = seen["prompts"]
    assert seen["max_new_tokens"] == demo_mod.MAX_NEW_TOKENS == 8
    assert all(p.startswith(f"Instruction: {_TWEET}\nInput: ") and p.endswith("\nAnswer: ") for p in prompts)
    assert scores.n == 6 and scores.accuracy == pytest.approx(5 / 6)
    assert 0 < scores.macro_f1 < 1 and sum(scores.predicted.values()) == pytest.approx(1.0)
    assert list(scores.predicted) == ["negative", "neutral", "positive"]


def test_evaluation_uses_the_cores_other_work_leaves_idle(tmp_path: Path) -> None:
    from demo.demo import evaluation_threads, runnable_elsewhere

    assert evaluation_threads(2, 0) == 2 and evaluation_threads(2, 1) == 1 and evaluation_threads(2, 5) == 1
    assert evaluation_threads(16, 3) == 13 and evaluation_threads(4, None) == 4
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("4.66 4.86 4.67 3/139 21038\n")  # 3 running: this reader and 2 others
    assert runnable_elsewhere(loadavg, samples=3) == 2
    loadavg.write_text("garbled")
    assert runnable_elsewhere(loadavg) is None
    assert runnable_elsewhere(tmp_path / "missing") is None


def test_run_config_trains_in_the_evaluation_prompt() -> None:
    cfg = run_config(DemoOptions())
    assert cfg["train.prompt-style"] == "eval" and cfg["resume"] is False
    assert cfg["train.seq-length"] <= 128  # TFNS tweets are short


# -- a second run in the same workspace --------------------------------------------------------------
def _previous_run(fed: Path) -> dict[str, Path]:
    """What a finished demo leaves under its federation directory (LocalFederation's layout)."""
    kept = {
        "ca": fed / "central/ca/ca.crt",
        "server": fed / "central/server/server.pem",
        "key": fed / "silos/hospital-a/keys/hospital-a.key",
        "pub": fed / "silos/bank-b/keys/bank-b.pub",
    }
    gone = {
        "db": fed / "central/state.db",
        "ledger": fed / "central/flwr-home/admitted-silos.json",
        "journal": fed / "central/journal/open.json",
        "adapter": fed / "central/runs/demo/adapter/adapter_model.safetensors",
        "events": fed / "central/events/server.jsonl",
        "log": fed / "logs/superlink.log",
        "silo-home": fed / "silos/hospital-a/flwr-home/apps/x.py",
        "silo-events": fed / "silos/bank-b/events/silo.jsonl",
        "stray": fed / "stray.txt",
    }
    for path in (*kept.values(), *gone.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name, encoding="utf-8")
    return {**{f"keep:{k}": v for k, v in kept.items()}, **{f"gone:{k}": v for k, v in gone.items()}}


def test_a_second_run_starts_clean_and_keeps_only_the_identity(tmp_path: Path) -> None:
    fed = tmp_path / "federation"
    assert reset_run_state(fed) is False  # nothing there yet: nothing to say
    paths = _previous_run(fed)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    (fed / "silos" / "linked").symlink_to(outside)  # a link is removed, never followed
    assert reset_run_state(fed) is True
    for key, path in paths.items():
        assert path.exists() == key.startswith("keep:"), key
    assert (outside / "precious.txt").exists() and not (fed / "silos" / "linked").exists()
    assert reset_run_state(fed) is False  # idempotent: only the identity is left


def test_processes_an_earlier_killed_demo_left_are_found(tmp_path: Path) -> None:
    from demo.demo import leftover_processes

    fed = tmp_path / "ws" / "federation"
    proc = tmp_path / "proc"
    for pid, args in ((101, f"flower-superlink\0--database\0{fed}/central/state.db\0"), (102, "bash\0")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(args.encode())
    (proc / "103").mkdir()  # no cmdline (exited meanwhile)
    (proc / "self").mkdir()
    assert leftover_processes(fed, proc) == [101]
    assert leftover_processes(fed) == []  # the real /proc: nothing of this workspace runs


def test_two_demos_at_once_in_one_workspace_are_refused(tmp_path: Path) -> None:
    with WorkspaceLock(tmp_path):
        with pytest.raises(UserError, match=rf"another silotune demo \(pid {os.getpid()}\) is running"):
            with WorkspaceLock(tmp_path):
                pass
    with WorkspaceLock(tmp_path):  # released: the next run goes ahead
        pass


# -- logs -------------------------------------------------------------------------------------------
def test_rounds_print_plain_lines_when_stdout_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    class FakeFederation:
        def submit(self, run_cfg: dict, timeout: float, on_round) -> str:  # type: ignore[no-untyped-def]
            on_round({"round": 1, "answered": 3, "sampled": 3, "train_loss": 1.5})
            on_round({"round": 2, "answered": 2, "sampled": 3, "train_loss": None})
            return "done"

    assert demo_mod._submit_with_progress(FakeFederation(), {}, DemoOptions(rounds=2)) == "done"
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out and "━" not in out
    assert out.splitlines() == [
        "[silotune demo] round 1: 3/3 silos answered, loss 1.5000",
        "[silotune demo] round 2: 2/3 silos answered, loss - (no valid update)",
    ]


def test_quiet_for_a_log_file_disables_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    for key in quiet_libraries.PROGRESS_BAR_ENV:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("TQDM_DISABLE", "0")  # a value the user set is kept
    monkeypatch.setenv("PYTHONWARNINGS", "default::DeprecationWarning")
    assert quiet_libraries.quiet_for(io.StringIO()) is False
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TQDM_DISABLE"] == "0"
    assert os.environ["PYTHONWARNINGS"] == (
        "default::DeprecationWarning,ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    )
    quiet_libraries.silence_in_child_processes()  # idempotent
    assert os.environ["PYTHONWARNINGS"].count("is_gradient_checkpointing") == 1


def test_library_output_in_a_log_file_has_no_progress_fragments_or_kernel_warning(tmp_path: Path) -> None:
    """A process logging to a file: tqdm, huggingface_hub's bars and peft's bitsandbytes import."""
    script = (
        "import sys\n"
        "from silotune.quiet_libraries import quiet_for\n"
        "quiet_for(sys.stderr)\n"
        "import peft\n"
        "from tqdm import tqdm\n"
        "from huggingface_hub.utils import tqdm as hub_tqdm\n"
        "for _ in tqdm(range(50)): pass\n"
        "for _ in hub_tqdm(range(50)): pass\n"
        "import subprocess\n"  # a child process (like a silo's) inherits the quiet environment
        "subprocess.run([sys.executable, '-c', 'import warnings; warnings.warn("
        '"`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning); '
        "from tqdm import tqdm; [_ for _ in tqdm(range(50))]'], check=True)\n"
        "print('done')\n"
    )
    hidden = (*quiet_libraries.PROGRESS_BAR_ENV, "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, stdout=fh, stderr=fh, env=env)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "done" in text and "\r" not in text and "it/s" not in text
    assert "gemm_4bit_forward" not in text and "is_gradient_checkpointing" not in text


def test_bitsandbytes_cpu_kernel_warning_is_dropped_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet_libraries.silence_irrelevant_warnings()
    quiet_libraries.silence_irrelevant_warnings()  # idempotent
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x"
        )
        logger.warning("some other bitsandbytes warning")
        logging.getLogger("other").warning("Failed to load CPU gemm_4bit_forward elsewhere")
    assert [r.getMessage() for r in caplog.records] == [
        "some other bitsandbytes warning",
        "Failed to load CPU gemm_4bit_forward elsewhere",
    ]


# -- the summary says what the accuracy measures -----------------------------------------------------
def test_summary_gives_accuracy_macro_f1_and_answer_shares_and_what_they_are_not() -> None:
    report = DemoReport(
        before=HeldOutScores(0.30, 0.28, {"negative": 0.3, "neutral": 0.2, "positive": 0.5}, 300),
        after=HeldOutScores(0.72, 0.61, {"negative": 0.15, "neutral": 0.6, "positive": 0.25}, 300),
        gold={"negative": 0.143, "neutral": 0.657, "positive": 0.2},
        majority_accuracy=0.657,
        majority_macro_f1=0.264,
        heldout_source="300 held-out tweets of TFNS's validation split",
        data_source=BUNDLED_SOURCE,
        adapter_dir="/x/adapter",
        report_html="/x/report.html",
        removed_previous_run=True,
    )
    summary = format_summary(report)
    lines = summary.splitlines()
    assert next(ln for ln in lines if ln.startswith("accuracy ")).split() == ["accuracy", "30.0%", "72.0%"]
    assert next(ln for ln in lines if ln.startswith("macro-F1 ")).split() == ["macro-F1", "28.0%", "61.0%"]
    assert next(ln for ln in lines if ln.startswith("answers neutral")).split()[-2:] == ["20.0%", "60.0%"]
    assert "65.7% accuracy, 26.4% macro-F1" in summary  # what always answering "neutral" scores
    assert "it is not FlowerTune's finance suite" in summary and "silotune eval --suite finance" in summary
    assert "benchmarks/finance_quality.py" in summary and "35.24" not in summary
    assert "run report (HTML): /x/report.html" in summary and "CA and keys were reused" in summary


# -- end to end -------------------------------------------------------------------------------------
def _assert_demo_run(report: DemoReport, rounds: int) -> None:
    assert [r["round"] for r in report.rounds] == list(range(1, rounds + 1))
    assert all(r["answered"] == 3 for r in report.rounds)
    for scores in (report.before, report.after):
        assert scores.n == 6 and 0.0 <= scores.accuracy <= 1.0 and 0.0 <= scores.macro_f1 <= 1.0
        assert sum(scores.predicted.values()) == pytest.approx(1.0)
    html = Path(report.report_html).read_text(encoding="utf-8")
    assert "round 0: base model" in html and f"round {rounds}: federated adapter" in html
    assert 'class="empty"' not in html  # every panel has data, the evaluation ones included


@pytest.mark.slow
def test_demo_runs_end_to_end_twice_in_one_workspace_and_cleans_up(tmp_path: Path) -> None:
    """Run 1 in process; run 2, the `silotune demo` command, in the same workspace, also succeeds
    (it used to stop at once: 'a silo named hospital-a is already admitted')."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    opts = DemoOptions(
        workspace=tmp_path / "demo",
        offline=True,
        rounds=2,
        local_steps=1,
        per_silo=8,
        eval_limit=6,
        seq_length=64,
    )
    report = run_demo(opts)
    _assert_demo_run(report, 2)
    assert report.data_source == BUNDLED_SOURCE and not report.removed_previous_run
    assert set(report.silo_peaks) == {"hospital-a", "bank-b", "clinic-c"}
    assert all(p["peak_rss_bytes"] > 0 for p in report.silo_peaks.values())
    # Every silo sends one adapter up per round: payload = silos x raw adapter size (+ small headers).
    for r in report.rounds:
        assert 3 * report.adapter_raw_bytes <= r["uplink_bytes"] < 3 * report.adapter_raw_bytes * 1.1
        # fp32 transport, packed: a little less than the same tensors one array each (fp32 figure).
        assert (
            r["uplink_bytes"] + r["downlink_bytes"]
            < r["fp32_bytes"]
            < 1.05 * (r["uplink_bytes"] + r["downlink_bytes"])
        )
    for key in ("setup", "model_load", "rounds", "evaluation", "total"):
        assert report.timings[key] >= 0
    summary = format_summary(report)
    assert "macro-F1" in summary and report.adapter_dir in summary and report.report_html in summary
    adapter = Path(report.adapter_dir)
    assert (adapter / "adapter_model.safetensors").exists()
    from silotune.modeling import _gguf_cache_dir, resolve_source  # the cache exists by now

    base = AutoModelForCausalLM.from_pretrained(_gguf_cache_dir(resolve_source(opts.model)))
    PeftModel.from_pretrained(base, adapter)
    fed = opts.workspace / "federation"
    identity = {p: p.read_bytes() for p in (fed / "central/ca/ca.crt", fed / "silos/bank-b/keys/bank-b.pub")}

    # The second run: the README's command (its entry point), same workspace, smaller still.
    summary_json = tmp_path / "second.json"
    env = {k: v for k, v in os.environ.items() if k != "SILOTUNE_RUNS_ROOT"}  # set by run 1's federation
    second = subprocess.run(
        [sys.executable, "-m", "command_line.main", "demo", "--workspace", str(opts.workspace),
         "--rounds", "1", "--local-steps", "1", "--per-silo", "8", "--eval-limit", "6",
         "--seq-length", "64", "--summary-json", str(summary_json)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already admitted" not in second.stdout + second.stderr
    assert "starting clean" in second.stdout and "SiloTune demo summary" in second.stdout
    doc = json.loads(summary_json.read_text())
    before, after = HeldOutScores(**doc.pop("before")), HeldOutScores(**doc.pop("after"))
    again = DemoReport(**doc, before=before, after=after)
    _assert_demo_run(again, 1)
    assert again.removed_previous_run
    assert all(p.read_bytes() == b for p, b in identity.items())  # the same CA and node keys
    assert not adapter.exists()  # run 1's adapter went with its run state
    # Nothing either run started is still running.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(opts.workspace) not in ps
