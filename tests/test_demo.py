"""The README's main job, shrunk: `silotune demo` end to end on the embedded SmolLM2 (real TLS
SuperLink, three SuperNodes, two rounds), then no process of it is left behind. And its hygiene,
fast: its workspace stays out of the checkout (and is ignored if put there), offline is known in
under 2 s without retries, logs carry no progress-bar fragments, irrelevant warnings are dropped."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo import demo as demo_mod
from demo.demo import (
    AUTHORED_SOURCE,
    DemoOptions,
    DemoReport,
    default_workspace,
    format_summary,
    hub_offline_reason,
    prepare_data,
    run_demo,
)
from silotune import quiet_libraries

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


def test_offline_demo_data_in_under_2_s_without_retry_noise(
    hub_env: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    port = _closed_loopback_port()
    hub_env.setattr(demo_mod, "hub_address", lambda: ("127.0.0.1", port))
    t = time.monotonic()
    paths, held, source = prepare_data(DemoOptions(workspace=tmp_path, per_silo=5, eval_limit=4), tmp_path)
    assert time.monotonic() - t < 2.0
    assert source.startswith(AUTHORED_SOURCE) and f"127.0.0.1:{port}" in source
    assert len(paths) == 3 and len(held) == 4
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the silos it starts will not retry either
    out, err = capfd.readouterr()
    assert "Retrying" not in out + err


def test_explicit_offline_flag_never_probes(hub_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub_env.setattr(demo_mod, "hub_offline_reason", lambda: pytest.fail("probed despite --offline"))
    _, _, source = prepare_data(
        DemoOptions(workspace=tmp_path, per_silo=2, eval_limit=2, offline=True), tmp_path
    )
    assert source == f"{AUTHORED_SOURCE} (offline: --offline)"


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
def test_summary_says_the_accuracy_is_on_its_own_sample_not_a_benchmark() -> None:
    report = DemoReport(
        accuracy_before=0.283,
        accuracy_after=0.95,
        data_source=f"{AUTHORED_SOURCE} (offline: --offline)",
        adapter_dir="/x/adapter",
    )
    summary = format_summary(report)
    assert "28.3%  ->  after 95.0%" in summary
    assert "authored headlines" in summary and "not how the model does on real data" in summary
    assert "35.24" in summary and "35.26" in summary and "silotune eval --suite finance" in summary


# -- end to end -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
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
    assert [r["round"] for r in report.rounds] == [1, 2]
    assert all(r["answered"] == 3 for r in report.rounds)
    assert "authored" in report.data_source
    assert 0.0 <= report.accuracy_before <= 1.0 and 0.0 <= report.accuracy_after <= 1.0
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
    assert "accuracy on held-out data" in summary and report.adapter_dir in summary
    assert "35.24" in summary  # the caveat: its own sample, not a benchmark
    adapter = Path(report.adapter_dir)
    assert (adapter / "adapter_model.safetensors").exists()
    from silotune.modeling import _gguf_cache_dir, resolve_source  # the cache exists by now

    base = AutoModelForCausalLM.from_pretrained(_gguf_cache_dir(resolve_source(opts.model)))
    PeftModel.from_pretrained(base, adapter)
    # Nothing the demo started is still running.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(opts.workspace) not in ps
