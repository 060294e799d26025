"""`silotune kit`: kits from a federation file; no private keys; valid compose; safe regeneration."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from command_line.main import main
from deploy.kit import MANIFEST, generate, load_federation
from silotune.errors import UserError
from tests.support.compose_files import env_example, interpolate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "federation.example.toml"
SILOS = ["bank-a", "bank-b", "insurer-c"]


@pytest.fixture()
def fed(tmp_path: Path) -> Path:
    """The example federation file beside a real CA (ca.crt + ca.key) made by the certs tool."""
    from certs.pki import create_ca

    create_ca(tmp_path / "pki")
    path = tmp_path / "federation.toml"
    shutil.copy(EXAMPLE, path)
    return path


def _kit(fed: Path, out: Path, *extra: str) -> int:
    return main(["kit", "--federation", str(fed), "--out", str(out), *extra])


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_example_is_valid() -> None:
    fed = load_federation(EXAMPLE)
    assert [s.name for s in fed.silos] == SILOS


def test_kits_generated(fed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kits"
    assert _kit(fed, out) == 0
    assert "created" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(["central", *SILOS])
    ca = (tmp_path / "pki" / "ca.crt").read_bytes()
    for site in ["central", *SILOS]:
        kit = out / site
        for name in ("docker-compose.yml", ".env", "ca.crt", "README.md"):
            assert (kit / name).is_file(), f"{site}/{name}"
        assert (kit / "ca.crt").read_bytes() == ca
    # Per-silo settings reach the silo's .env; GPU silos add the GPU compose file.
    a = _read_env(out / "bank-a" / ".env")
    assert a["SUPERLINK_ADDRESS"] == "superlink.finance-eu.example.org:8000"
    assert a["SILO_DATA_DIR"] == "/srv/silotune/data" and a["SILO_DATA_FILE"] == "tfns-bank-a.jsonl"
    assert "lora-rank=8" in a["SILO_NODE_CONFIG"] and 'domain="finance"' in a["SILO_NODE_CONFIG"]
    assert a["COMPOSE_FILE"] == "docker-compose.yml:docker-compose.gpu.yml"
    assert a["SILOTUNE_SILO_IMAGE"].endswith("-cuda")
    c = _read_env(out / "insurer-c" / ".env")
    assert c["COMPOSE_FILE"] == "docker-compose.yml" and c["SILOTUNE_SILO_IMAGE"].endswith("-cpu")
    # Prometheus targets: only silos with an exporter address are scraped centrally.
    targets = json.loads((out / "central" / "targets" / "silos.json").read_text())
    assert targets == [
        {
            "targets": ["metrics.bank-a.example.org:9464"],
            "labels": {"site": "bank-a", "federation": "finance-eu"},
        }
    ]
    assert json.loads((out / "bank-b" / "prometheus-targets.json").read_text())[0]["targets"]
    # READMEs tell the next steps: the node-key command and the CA fingerprint to compare.
    from cryptography import x509

    from certs.pki import cert_fingerprint

    fp = cert_fingerprint(x509.load_pem_x509_certificate(ca))
    readme = (out / "bank-b" / "README.md").read_text()
    assert "silotune certs node-key --out keys --name bank-b" in readme and fp in readme
    assert fp in (out / "central" / "README.md").read_text()
    # The central kit carries the monitoring files Grafana and Prometheus mount.
    assert (out / "central" / "monitoring").is_dir()


def test_silo_kits_ship_a_policy_pinned_to_the_federation(fed: Path, tmp_path: Path) -> None:
    """Every silo kit carries policy.toml (mounted by its compose file): the federation's CA pinned,
    no local-path model, no remote code; the Kubernetes base mounts the same file."""
    from certs.pki import create_ca
    from silo_node.app.policy import check_federation, load_policy

    out = tmp_path / "kits"
    assert _kit(fed, out) == 0
    ca = tmp_path / "pki" / "ca.crt"
    for silo in SILOS:
        policy = load_policy(out / silo / "policy.toml")
        assert policy.federation_ca_sha256 and not policy.allow_local_paths
        assert not policy.allow_trust_remote_code and policy.max_batch_size == 64
        check_federation(policy, ca)  # the kit's CA: accepted
        compose = yaml.safe_load((out / silo / "docker-compose.yml").read_text())["services"]["supernode"]
        assert compose["command"][-2:] == ["--policy", "/etc/silotune/policy.toml"]
        mount = "${SILOTUNE_SILO_POLICY_FILE:-./policy.toml}:/etc/silotune/policy.toml:ro"
        assert mount in compose["volumes"]
    other = tmp_path / "other"
    create_ca(other)
    with pytest.raises(UserError, match="not the federation"):
        check_federation(load_policy(out / SILOS[0] / "policy.toml"), other / "ca.crt")
    # The bundle's own file (no kit): the defaults, loadable, CA left to fill in.
    bundle = load_policy(ROOT / "deploy" / "compose" / "silo" / "policy.toml")
    assert bundle == load_policy(None)
    k8s = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "silo" / "policy-configmap.yaml").read_text())
    assert k8s["data"]["policy.toml"] == (ROOT / "deploy" / "compose" / "silo" / "policy.toml").read_text()
    sts = (ROOT / "deploy" / "k8s" / "base" / "silo" / "statefulset.yaml").read_text()
    assert "/etc/silotune/policy/policy.toml" in sts and "silotune-silo-policy" in sts


def test_env_matches_templates(fed: Path, tmp_path: Path) -> None:
    out = tmp_path / "kits"
    _kit(fed, out)
    central_keys = set(env_example(ROOT / "deploy/compose/central"))
    silo_keys = set(env_example(ROOT / "deploy/compose/silo"))
    assert set(_read_env(out / "central" / ".env")) == central_keys
    for silo in SILOS:
        assert set(_read_env(out / silo / ".env")) == silo_keys


def test_no_private_key_material(fed: Path, tmp_path: Path) -> None:
    out = tmp_path / "kits"
    _kit(fed, out)
    ca_key = (tmp_path / "pki" / "ca.key").read_bytes()
    key_body = b"".join(ca_key.splitlines()[1:-1])
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"PRIVATE KEY" not in data, f
            assert key_body[:40] not in data.replace(b"\n", b""), f
            assert not f.name.endswith(".key"), f


def test_refuses_private_key_as_ca(fed: Path, tmp_path: Path) -> None:
    text = fed.read_text().replace('ca-cert = "pki/ca.crt"', 'ca-cert = "pki/ca.key"')
    fed.write_text(text)
    out = tmp_path / "kits"
    with pytest.raises(UserError, match="PRIVATE KEY"):
        generate(fed, out)
    assert not out.exists(), "nothing may be written when a kit is refused"


def test_refuses_private_key_in_monitoring(fed: Path, tmp_path: Path) -> None:
    mon = tmp_path / "monitoring"
    shutil.copytree(ROOT / "monitoring", mon)
    shutil.copy(tmp_path / "pki" / "ca.key", mon / "grafana" / "oops.pem")
    with pytest.raises(UserError, match="oops.pem.*PRIVATE KEY"):
        generate(fed, tmp_path / "kits", monitoring=mon)


def test_kit_compose_is_valid(fed: Path, tmp_path: Path) -> None:
    import compose_spec

    out = tmp_path / "kits"
    _kit(fed, out)
    compose = shutil.which("docker-compose")
    for site in ["central", *SILOS]:
        kit = out / site
        env = _read_env(kit / ".env")
        files = env.get("COMPOSE_FILE", "docker-compose.yml").split(":")
        for f in files:
            doc = yaml.safe_load(interpolate((kit / f).read_text(), env))
            compose_spec.PyCompose.from_yaml(yaml.safe_dump(doc)).to_spec()
        res = subprocess.run(
            [shutil.which("check-jsonschema") or "check-jsonschema", "--builtin-schema",
             "vendor.compose-spec", *(str(kit / f) for f in files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout
        if compose:  # semantic check by docker-compose itself, reading the kit's .env
            (kit / "keys").mkdir(exist_ok=True)
            (kit / "keys" / f"{site}.key").write_text("placeholder\n")
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
            res = subprocess.run(
                [compose, "config", "-q"], cwd=kit, env=clean, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            assert res.returncode == 0, f"{site}: {res.stderr}"


def test_regeneration_keeps_edits(fed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "kits"
    _kit(fed, out)
    capsys.readouterr()
    # Unchanged input: nothing changes.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _kit(fed, out)
    assert "0 created, 0 updated" in capsys.readouterr().out
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # An operator edits bank-a's .env; the federation then changes bank-a and bank-b.
    env_a = out / "bank-a" / ".env"
    edited = env_a.read_text() + "SILO_EXPORTER_PORT=19464\n"
    env_a.write_text(edited)
    fed.write_text(fed.read_text().replace("lora-rank = 8", "lora-rank = 12").replace(
        "lora-rank = 16", "lora-rank = 32"))  # fmt: skip
    _kit(fed, out)
    report = capsys.readouterr().out
    assert "kept your edited bank-a/.env" in report
    assert env_a.read_text() == edited, "an edited file must not be overwritten silently"
    assert "lora-rank=12" in (out / "bank-a" / ".env.new").read_text()
    # Files the operator did not touch follow the federation file.
    assert "lora-rank=32" in (out / "bank-b" / ".env").read_text()
    assert not (out / "bank-b" / ".env.new").exists()

    # Running again still protects the edit (the manifest keeps the last generated hash).
    _kit(fed, out)
    assert env_a.read_text() == edited

    # --force replaces it and keeps the operator's version as .bak.
    assert _kit(fed, out, "--force") == 0
    assert "lora-rank=12" in env_a.read_text()
    assert (out / "bank-a" / ".env.bak").read_text() == edited
    manifest = json.loads((out / MANIFEST).read_text())
    assert "bank-a/.env" in manifest["files"]


BAD_CASES = [
    # (edit to the example, expected key in the message)
    (lambda t: t.replace("lora-rank = 16", "lora-rnak = 16"), r"silos\[1\] \(bank-b\)\.lora-rnak"),
    (lambda t: t.replace("lora-rank = 16", 'lora-rank = "big"'), r"silos\[1\] \(bank-b\)\.lora-rank"),
    (lambda t: t.replace("lora-rank = 4", "lora-rank = 0"), r"silos\[2\] \(insurer-c\)\.lora-rank"),
    (lambda t: re.sub(r'superlink-address = ".*"', "", t), r"federation\.superlink-address"),
    (
        lambda t: t.replace('"superlink.finance-eu.example.org"', '"https://x.org:8000"'),
        r"federation\.superlink-address",
    ),
    (lambda t: t.replace("superlink-port = 8000", "superlink-port = 70000"), r"superlink-port"),
    (
        lambda t: t.replace('data-path = "/data/fl/fiqa.jsonl"', 'data-path = "fiqa.jsonl"'),
        r"silos\[1\] \(bank-b\)\.data-path",
    ),  # fmt: skip
    (lambda t: t.replace('name = "bank-b"', 'name = "bank-a"'), r"silos\[1\]\.name"),
    (lambda t: t.replace('name = "bank-b"', 'name = "Bank B"'), r"silos\[1\].*\.name"),
    (
        lambda t: t.replace('domain = "finance"\nlora-rank = 4', 'domain = "law"\nlora-rank = 4'),
        r"silos\[2\] \(insurer-c\)\.domain",
    ),  # fmt: skip
    (lambda t: t.replace("eval-fraction = 0.1", "eval-fraction = 2"), r"insurer-c.*eval-fraction"),
    (lambda t: t.replace("grafana-port = 3000", "grafana-port = 9090"), r"monitoring\.grafana-port"),
    (lambda t: t + "\n[extras]\nfoo = 1\n", r"extras"),
    (lambda t: t.replace("[federation]", "[federation"), r"not valid TOML"),
]


@pytest.mark.parametrize("edit,pattern", BAD_CASES)
def test_bad_federation_names_key_and_file(
    edit, pattern: str, fed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed.write_text(edit(fed.read_text()))
    rc = _kit(fed, tmp_path / "kits")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(fed) in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "kits").exists()


def test_missing_federation_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _kit(tmp_path / "nope.toml", tmp_path / "kits") == 2
    assert "nope.toml: not found" in capsys.readouterr().err


def test_check_only(fed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kit", "--federation", str(fed), "--check"]) == 0
    assert "is valid" in capsys.readouterr().out
    assert not (tmp_path / "kits").exists()
