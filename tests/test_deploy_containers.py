"""Real containers: the images built offline, the kits' compose files, one round over TLS.

No registry is reachable, so the base image is made here (debootstrap, Debian bookworm with
Python 3.11), the project's wheels are downloaded on the host, and the Dockerfile installs them
with --no-index. A Docker daemon runs sealed in its own network namespace (no uplink) and every
container sits on an --internal network in 198.18.0.0/15. The kits from `silotune kit` are started
with docker-compose 1.29: one central site and two silos, admitted by their public keys, then one
round of training on a tiny random Llama (mounted read-only) completes.

Cached between runs under $SILOTUNE_TEST_CACHE (default /var/cache/silotune-test): the base
rootfs tarball, the wheels and the daemon's data root (image layers). From scratch this takes
about 15-20 minutes on 2 busy cores; with the cache a few minutes. Containers, volumes, networks,
the daemon and its namespace are removed at teardown; the tagged test images stay in the cache.

Needs root, debootstrap, docker.io and docker-compose (apt).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SILOTUNE_TEST_CACHE", "/var/cache/silotune-test"))
BASE_TAR = CACHE / "base-bookworm.tar"
WHEELS = CACHE / "wheels"
BASE_IMAGE = "silotune-test/base:bookworm"
CENTRAL_IMAGE = "silotune-test/central:e2e"
SILO_IMAGE = "silotune-test/silo:e2e"
BUILD_CACHE_IMAGE = "silotune-test/build-cache:e2e"
PREFIX = f"stdeploy{os.getpid() % 100000}"
LAB_SUBNET = "198.18.120.0/24"
SILOS = ("silo-a", "silo-b")
UID = 10001  # the images' user


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, dockerd)"
    for exe, pkg in (
        ("dockerd", "docker.io"),
        ("docker-compose", "docker-compose"),
        ("debootstrap", "debootstrap"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(exe) is None:
            return f"{exe} not found (apt-get install {pkg})"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]

FINANCE_ROWS = [
    {"input": "Shares rose after strong earnings", "output": "positive"},
    {"input": "The company cut its guidance", "output": "negative"},
    {"input": "The board meets on Tuesday", "output": "neutral"},
    {"input": "Profit doubled year on year", "output": "positive"},
    {"input": "Sales fell sharply in the quarter", "output": "negative"},
    {"input": "The CEO spoke at a conference", "output": "neutral"},
]


def sh(argv: list[str], timeout: float, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


# --- cached inputs ---------------------------------------------------------------------------


def ensure_base_tar() -> None:
    if not BASE_TAR.exists():
        sh([str(ROOT / "deploy/offline/make-base-rootfs.sh"), str(BASE_TAR)], timeout=1200)


def ensure_wheels() -> None:
    """pip download exactly the locked runtime set (what the Dockerfile installs), once per lock."""
    lock = ROOT / "requirements" / "runtime.lock"
    stamp = WHEELS / f".lock-{hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}"
    if stamp.exists():
        return
    WHEELS.mkdir(parents=True, exist_ok=True)
    # torch==2.13.0 resolves to the CPU wheel the machine's pip configuration provides.
    sh(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS),
         "-r", str(lock), "dumb-init==1.2.5"],
        timeout=1500,
    )  # fmt: skip
    stamp.touch()


def build_context(dest: Path) -> Path:
    """The repository's files (as git sees them) plus the wheels, hard-linked when possible."""
    files = sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], 60, cwd=ROOT).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    wheel_dir = dest / "deploy" / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for whl in WHEELS.glob("*.whl"):
        try:
            os.link(whl, wheel_dir / whl.name)
        except OSError:
            shutil.copy2(whl, wheel_dir / whl.name)
    # The legacy builder's cache keys include file times: fixed times let an unchanged
    # pyproject.toml + wheels reuse the cached dependency layer (minutes) across runs and clones.
    for p in dest.rglob("*"):
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    return dest


# --- sealed docker daemon --------------------------------------------------------------------


class SealedDocker:
    """dockerd inside its own network namespace (only lo): nothing it runs can reach a network."""

    def __init__(self, data_root: Path, run_dir: Path) -> None:
        self.netns = f"{PREFIX}-engine"
        self.data_root, self.run_dir = data_root, run_dir
        self.sock = run_dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "0"}
        self.env.pop("COMPOSE_FILE", None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        sh(["ip", "netns", "add", self.netns], 30)
        sh(["ip", "-n", self.netns, "link", "set", "lo", "up"], 30)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        log = open(self.run_dir / "dockerd.log", "ab")  # noqa: SIM115 - closed after Popen
        # nsenter (not `ip netns exec`, which hides the cgroup mounts dockerd needs).
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "dockerd",
             "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
             "--host", f"unix://{self.sock}", "--pidfile", str(self.run_dir / "docker.pid"),
             "--bip", "198.18.8.1/24",
             "--default-address-pool", "base=198.18.64.0/18,size=24"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        wait_until(lambda: self.docker(["version"], check=False).returncode == 0, 60, "dockerd")

    def docker(self, args: list[str], timeout: float = 120, check: bool = True, **kw: Any):
        return sh(["docker", *args], timeout, check=check, env=self.env, **kw)

    def compose(self, kit: Path, files: list[Path], args: list[str], timeout: float = 300,
                env: dict[str, str] | None = None, check: bool = True):  # fmt: skip
        argv = ["docker-compose", "--project-directory", str(kit)]
        for f in files:
            argv += ["-f", str(f)]
        return sh([*argv, *args], timeout, check=check, cwd=kit, env={**self.env, **(env or {})})

    def cleanup_leftovers(self) -> None:
        """Containers (also half-built ones), volumes and networks of an earlier, killed run.

        The daemon and its data root belong to this test alone (the lock), so all are ours.
        """
        ids = self.docker(["ps", "-aq"]).stdout
        if ids.split():
            self.docker(["rm", "-f", "-v", *ids.split()], timeout=120, check=False)
        self.docker(["volume", "prune", "-f"], check=False)
        self.docker(["network", "prune", "-f"], check=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containerd too
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # Anything still inside the namespace was started by this test's daemon.
        pids = sh(["ip", "netns", "pids", self.netns], 30, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh(["ip", "netns", "del", self.netns], 30, check=False)


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[SealedDocker]:
    CACHE.mkdir(parents=True, exist_ok=True)
    # One run at a time per cache: two daemons must never share a data root.
    with open(CACHE / "docker.lock", "w") as lock:
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{CACHE}/docker.lock held for 30 min by another run")
                time.sleep(5)
        eng = SealedDocker(CACHE / "docker", Path("/run") / PREFIX)
        try:
            eng.start()
            eng.cleanup_leftovers()
            yield eng
        finally:
            try:
                eng.cleanup_leftovers()
                eng.docker(["image", "prune", "-f"], timeout=300, check=False)
            finally:
                eng.stop()
                shutil.rmtree(eng.run_dir, ignore_errors=True)


def build_images(eng: SealedDocker, tmp_path: Path) -> None:
    ensure_base_tar()
    ensure_wheels()
    if eng.docker(["image", "inspect", BASE_IMAGE], check=False).returncode != 0:
        eng.docker(["import", str(BASE_TAR), BASE_IMAGE], timeout=600)
    ctx = build_context(tmp_path / "context")
    # The `build` stage is tagged too: its layers (the dependency install, minutes) are then no
    # dangling image, so the teardown's prune keeps them as the next run's cache.
    for target, tag in (("build", BUILD_CACHE_IMAGE), ("silo", SILO_IMAGE),
                        ("central", CENTRAL_IMAGE)):  # fmt: skip
        eng.docker(
            ["build", "-q", "-f", str(ctx / "deploy/docker/Dockerfile"), "--target", target,
             "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, str(ctx)],
            timeout=1800,
        )  # fmt: skip
    shutil.rmtree(ctx, ignore_errors=True)


# --- the federation --------------------------------------------------------------------------


def make_sites(tmp_path: Path) -> dict[str, Any]:
    """Federation file, CA, server cert, kits, node keys made in each silo's kit, data, model."""
    from certs.node_key import generate_node_key
    from certs.pki import create_ca, issue_server_cert
    from deploy.kit import generate
    from tests.support.tiny_model import make_tiny_llama

    pki = tmp_path / "pki"
    create_ca(pki)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "finance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FINANCE_ROWS))
    silos = "".join(
        f'[[silos]]\nname = "{n}"\ndata-path = "{data_dir / "finance.jsonl"}"\n'
        f'domain = "finance"\ngpu = false\nlora-rank = 4\n\n'
        for n in SILOS
    )
    fed = tmp_path / "federation.toml"
    fed.write_text(
        f'[federation]\nname = "lab"\nsuperlink-address = "superlink"\nsuperlink-port = 8000\n'
        f'ca-cert = "pki/ca.crt"\n\n[images]\ncentral = "{CENTRAL_IMAGE}"\n'
        f'silo-cpu = "{SILO_IMAGE}"\nsilo-cuda = "{SILO_IMAGE}"\n\n{silos}'
    )
    kits = tmp_path / "kits"
    generate(fed, kits)
    for name in SILOS:  # the run's base model is the directory mounted at /models: list it
        with open(kits / name / "policy.toml", "a") as fh:
            fh.write('\n[[models]]\nname = "/models"\n')
    central = kits / "central"
    # The operator issues the server certificate (SANs: the name silos use, and loopback for
    # the health check and the CLI inside the container).
    issue_server_cert(pki, central / "pki", ["superlink", "localhost"], ["127.0.0.1"])
    (central / "secrets").mkdir()
    (central / "secrets" / "grafana-admin-password").write_text("unused-in-this-test\n")
    (central / "keys").mkdir()
    for name in SILOS:
        nk = generate_node_key(kits / name / "keys", name)  # made AT the silo
        shutil.copy(nk.public_path, central / "keys" / f"{name}.pub")  # only the .pub travels
        os.chown(nk.private_path, UID, UID)
    os.chown(central / "pki" / "server.key", UID, UID)
    model = make_tiny_llama(tmp_path / "model")
    for d in (data_dir, model, central / "keys"):
        for p in [d, *d.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    return {"kits": kits, "model": model}


def test_federation_round_in_containers(engine: SealedDocker, tmp_path: Path) -> None:
    build_images(engine, tmp_path)
    sites = make_sites(tmp_path)
    kits, model = sites["kits"], sites["model"]

    net = f"{PREFIX}-lab"
    engine.docker(["network", "create", "--internal", "--subnet", LAB_SUBNET, net])
    override = tmp_path / "lab-network.yml"
    override.write_text(f"networks:\n  default:\n    external: true\n    name: {net}\n")
    # Host paths differ per test run; compose reads them from the environment over .env.
    env = {"SILOTUNE_MODEL_DIR": str(model), "SUPERLINK_PUBLISH_ADDRESS": "127.0.0.1",
           "SILO_EXPORTER_PUBLISH_ADDRESS": "127.0.0.1"}  # fmt: skip
    projects: list[Path] = []

    def compose(kit: Path, args: list[str], timeout: float = 300, check: bool = True):
        return engine.compose(kit, [kit / "docker-compose.yml", override], args, timeout, env,
                              check)  # fmt: skip

    def central(args: list[str], timeout: float = 120, check: bool = True):
        return compose(kits / "central", ["exec", "-T", "superlink", *args], timeout, check)

    try:
        projects.append(kits / "central")
        compose(kits / "central", ["up", "-d", "superlink", "exporter"])
        wait_until(
            lambda: central(["python", "/opt/silotune/healthcheck.py"], 30, False).returncode == 0,
            180, "SuperLink /health",
        )  # fmt: skip
        for name in SILOS:
            central(["silotune", "silos", "admit", f"/keys/{name}.pub", "--name", name,
                     "--superlink", "127.0.0.1:8001", "--ca", "/run/secrets/ca.crt"])  # fmt: skip
        for name in SILOS:
            projects.append(kits / name)
            compose(kits / name, ["up", "-d"])

        def online() -> bool:
            out = central(["silotune", "silos", "list"], 60, False).stdout
            return sum(" online " in line for line in out.splitlines()) == len(SILOS)

        wait_until(online, 240, "both silos online", interval=5)

        run_config = (
            'model.name="/models" num-rounds=1 run-dir="/var/lib/silotune/runs/e2e" '
            "strategy.min-nodes=2 strategy.round-timeout=300.0 train.local-steps=1 "
            "train.batch-size=2 train.seq-length=64"
        )
        out = central(["flwr", "run", "/opt/silotune/app", "silotune", "--run-config",
                       run_config, "--format", "json"], 300).stdout  # fmt: skip
        submitted = json.loads(out[out.find("{") :])
        assert submitted.get("success"), submitted
        run_id = submitted["run-id"]

        def finished() -> str | None:
            res = central(["flwr", "ls", "silotune", "--run-id", str(run_id), "--format",
                           "json"], 60, False)  # fmt: skip
            try:
                runs = json.loads(res.stdout[res.stdout.find("{") :]).get("runs", [])
            except ValueError:
                return None
            status = runs[0]["status"] if runs else ""
            return status if status.startswith("finished") else None

        status = wait_until(finished, 600, f"run {run_id} to finish", interval=5)
        events_text = central(["cat", "/var/lib/silotune/runs/e2e/events.jsonl"]).stdout
        events = [json.loads(line) for line in events_text.splitlines() if line.strip()]
        assert status == "finished:completed", (status, events[-3:])
        rounds = [e for e in events if e["kind"] == "round_end"]
        assert [r["round"] for r in rounds] == [1] and rounds[0]["answered"] == 2, rounds
        # The exporters serve what the apps logged; the SuperNodes report healthy.
        metrics = compose(kits / "central", ["exec", "-T", "exporter", "python", "-c",
                          "import urllib.request;print(urllib.request.urlopen("
                          "'http://127.0.0.1:9464/metrics').read().decode())"]).stdout  # fmt: skip
        assert "silotune_" in metrics
        for name in SILOS:
            compose(kits / name, ["exec", "-T", "supernode", "python",
                                  "/opt/silotune/healthcheck.py"], 60)  # fmt: skip
            # The data volume is read-only inside the container.
            res = compose(kits / name, ["exec", "-T", "supernode", "touch", "/data/x"], 60,
                          check=False)  # fmt: skip
            assert res.returncode != 0
    except BaseException:
        for kit in projects:  # the logs are the only record once the containers are gone
            logs = compose(kit, ["logs", "--no-color", "--tail", "80"], 120, False)
            print(f"===== {kit.name} =====\n{logs.stdout[-6000:]}")
        raise
    finally:
        for kit in reversed(projects):
            compose(kit, ["down", "-v", "--timeout", "30"], 300, False)
        engine.docker(["network", "rm", net], check=False)
