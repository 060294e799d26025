"""Site kits: one federation description in, one folder of plain files per site out.

``silotune kit --federation federation.toml --out kits/`` writes ``kits/central/`` and one
``kits/<silo>/`` per silo: the compose bundle from deploy/compose, an ``.env`` with the site's
settings, the federation CA certificate (public), Prometheus targets and a README with the site's
next steps. Private keys never enter a kit: node keys are made AT each silo (the README says how),
and any file that looks like a private key is refused before anything is written.

Kits are meant to be edited. Every generated file's hash is recorded in ``.silotune-kit.json``;
regenerating overwrites only files still as generated, and writes ``<file>.new`` beside a file the
operator changed (``--force`` overwrites it, keeping the edited one as ``<file>.bak``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from silotune.atomic_files import atomic_write_bytes, atomic_write_json
from silotune.config import ConfigError, Domain, StrictSection, parse_silo_config
from silotune.errors import UserError

MANIFEST = ".silotune-kit.json"
CENTRAL = "central"
# Where the hand-written bundles live in a source checkout (deploy/ is not a Python package).
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLES = REPO_ROOT / "deploy" / "compose"
DEFAULT_MONITORING = REPO_ROOT / "monitoring"

_PRIVATE_KEY_RE = re.compile(
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----|PuTTY-User-Key-File-|-----BEGIN PGP PRIVATE KEY BLOCK"
)
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$|^\[?[0-9a-fA-F:.]+\]?$")


class FederationSettings(StrictSection):
    name: str
    # Public DNS name (or IP) silos use to reach the SuperLink; it must be in the server
    # certificate's SANs (`silotune certs server --dns ...`).
    superlink_address: str
    superlink_port: int = Field(8000, ge=1, le=65535)
    # The federation CA certificate (public part only), relative to the federation file.
    ca_cert: str = "ca.crt"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use 1-40 lower-case letters, digits and dashes (e.g. 'finance-eu')")
        return v

    @field_validator("superlink_address")
    @classmethod
    def _address(cls, v: str) -> str:
        if "://" in v or not _HOST_RE.match(v) or (":" in v and not v.startswith("[")):
            raise ValueError(
                "give a bare host name or IP without scheme or port (the port is "
                "superlink-port), e.g. 'superlink.example.org'"
            )
        return v


class Images(StrictSection):
    central: str = "silotune-central:0.1.0"
    silo_cpu: str = "silotune-silo:0.1.0-cpu"
    silo_cuda: str = "silotune-silo:0.1.0-cuda"
    prometheus: str = "prom/prometheus:v2.53.2"
    grafana: str = "grafana/grafana-oss:11.2.0"


class Monitoring(StrictSection):
    central_exporter_port: int = Field(9464, ge=1, le=65535)
    silo_exporter_port: int = Field(9464, ge=1, le=65535)
    prometheus_port: int = Field(9090, ge=1, le=65535)
    grafana_port: int = Field(3000, ge=1, le=65535)
    # Host address Prometheus and Grafana are published on at the central site (loopback: reach
    # them through an SSH tunnel or a reverse proxy with authentication).
    bind_address: str = "127.0.0.1"


class CentralSite(StrictSection):
    # Host address the SuperLink port is published on.
    publish_address: str = "0.0.0.0"
    # Host directory holding the base model (mounted read-only); "" = model from the image/hub.
    model_dir: str = ""


class SiloSite(StrictSection):
    name: str
    # Absolute path of the private data file ON THE SILO HOST; its folder is mounted read-only.
    data_path: str
    domain: Domain | None = None
    lora_rank: int | None = Field(None, ge=1, le=1024)
    gpu: bool = True
    gpu_count: str = "all"
    model_dir: str = ""
    # Host name central Prometheus uses to scrape this silo's exporter; "" = not scraped.
    exporter_address: str = ""
    # Further SuperNode settings handed to the ClientApp (silotune.config.SiloConfig keys).
    node_config: dict[str, str | int | float | bool] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v == CENTRAL:
            raise ValueError(
                "use 1-40 lower-case letters, digits and dashes, not 'central' (it names the "
                "silo's kit folder, its node key and its containers)"
            )
        return v

    @field_validator("data_path")
    @classmethod
    def _data_path(cls, v: str) -> str:
        p = Path(v)
        if not p.is_absolute() or p.name in ("", ".", ".."):
            raise ValueError("give the absolute path of the data file on the silo host")
        return v

    @field_validator("gpu_count")
    @classmethod
    def _gpu_count(cls, v: str) -> str:
        if v != "all" and not (v.isdigit() and int(v) > 0):
            raise ValueError("use 'all' or a positive number")
        return v

    def extra_settings(self) -> dict[str, Any]:
        """Node config beyond name and data path (those have their own .env variables)."""
        out: dict[str, Any] = {}
        if self.domain:
            out["domain"] = self.domain
        if self.lora_rank:
            out["lora-rank"] = self.lora_rank
        out.update(self.node_config)
        return out

    def settings(self) -> dict[str, Any]:
        """The silo's whole node config as the SuperNode gets it inside the container."""
        data_path = f"/data/{Path(self.data_path).name}"
        return {"name": self.name, "data-path": data_path, **self.extra_settings()}


class FederationFile(StrictSection):
    federation: FederationSettings
    images: Images = Images()
    monitoring: Monitoring = Monitoring()
    central: CentralSite = CentralSite()
    silos: list[SiloSite] = Field(min_length=1)


def _format_loc(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, int):
            name = ""
            if i > 0 and loc[i - 1] == "silos":
                try:
                    name = f" ({data['silos'][p]['name']})"
                except (KeyError, IndexError, TypeError):
                    pass
            parts[-1] += f"[{p}]{name}" if parts else f"[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


def load_federation(path: Path) -> FederationFile:
    """Read and validate a federation file; every error names the file and the key."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (start from deploy/federation.example.toml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    try:
        fed = FederationFile.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = _format_loc(e["loc"], data)
            if e["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; keys use dashes, e.g. 'lora-rank')"
            elif e["type"] == "missing":
                msg = "missing (required)"
            else:
                msg = e["msg"] + (f" (got {e['input']!r})" if not isinstance(e["input"], dict) else "")
            lines.append(f"  {key}: {msg}")
        raise UserError(f"invalid federation file {path}:\n" + "\n".join(lines)) from None
    problems = []
    seen: set[str] = set()
    for i, silo in enumerate(fed.silos):
        if silo.name in seen:
            problems.append(f"  silos[{i}].name: {silo.name!r} is used by another silo")
        seen.add(silo.name)
        try:  # the same checks the SuperNode launcher applies, so typos surface now
            parse_silo_config(silo.settings(), source=f"silos[{i}] ({silo.name})")
        except ConfigError as exc:
            for line in str(exc).splitlines()[1:]:
                key, _, msg = line.strip().partition(": ")
                own = key in ("name", "data-path", "domain", "lora-rank")
                where = key if own else f"node-config.{key}"
                problems.append(f"  silos[{i}] ({silo.name}).{where}: {msg}")
    mon, port = fed.monitoring, fed.federation.superlink_port
    central_ports = {
        "federation.superlink-port": port,
        "monitoring.central-exporter-port": mon.central_exporter_port,
        "monitoring.prometheus-port": mon.prometheus_port,
        "monitoring.grafana-port": mon.grafana_port,
    }
    by_port: dict[int, str] = {}
    for key, value in central_ports.items():
        if value in by_port:
            problems.append(f"  {key}: port {value} is already used by {by_port[value]}")
        by_port[value] = key
    if problems:
        raise UserError(f"invalid federation file {path}:\n" + "\n".join(problems))
    return fed


def looks_like_private_key(data: bytes) -> bool:
    return bool(_PRIVATE_KEY_RE.search(data))


def read_public_file(path: Path, what: str) -> bytes:
    """Read a file to copy into a kit; refuse anything that looks like a private key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read: {exc}") from None
    if looks_like_private_key(data):
        raise UserError(
            f"{what} {path} looks like a PRIVATE KEY; refusing to put it into a kit. Kits carry "
            "only public files; private keys stay where they were made."
        )
    return data


def _ca_fingerprint(data: bytes, path: Path) -> str:
    from cryptography import x509

    from certs.pki import cert_fingerprint

    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise UserError(
            f"federation.ca-cert {path}: not a PEM certificate (give the CA's ca.crt, made by "
            "`silotune certs ca`)"
        ) from None
    return cert_fingerprint(cert)


# ---------------------------------------------------------------------------------------------
# Rendering: each site is a mapping relative path -> bytes, built in memory before any write.


def _env(lines: list[tuple[str, Any] | str]) -> bytes:
    out = []
    for item in lines:
        if isinstance(item, str):
            out.append(f"# {item}" if item else "")
            continue
        key, value = item
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if "\n" in text or "$" in text:
            raise UserError(f"value for {key} must not contain newlines or '$': {text!r}")
        out.append(f"{key}={text}")
    return ("\n".join(out) + "\n").encode()


def node_config_string(settings: dict[str, Any]) -> str:
    """Flower's ``--node-config`` form, as the silo launcher renders it (one source)."""
    from silo_node.ops.launch import format_node_config

    return format_node_config(settings)


def render_central(fed: FederationFile, fingerprint: str) -> dict[str, bytes]:
    f, img, mon, c = fed.federation, fed.images, fed.monitoring, fed.central
    env = _env(
        [
            f"SiloTune central site for federation {f.name!r}; generated by `silotune kit`.",
            "Edit freely: regeneration keeps your edits (it writes .env.new beside this file).",
            "",
            ("COMPOSE_PROJECT_NAME", f"silotune-{f.name}-central"),
            ("SILOTUNE_CENTRAL_IMAGE", img.central),
            ("PROMETHEUS_IMAGE", img.prometheus),
            ("GRAFANA_IMAGE", img.grafana),
            "The SuperLink, as silos reach it (must be in the server certificate's SANs).",
            ("SUPERLINK_PUBLIC_ADDRESS", f.superlink_address),
            ("SUPERLINK_PUBLISH_ADDRESS", c.publish_address),
            ("SUPERLINK_PORT", f.superlink_port),
            "TLS files on this host: ca.crt is in this kit; server.pem/server.key come from",
            "`silotune certs server` (run where the CA key is kept).",
            ("SILOTUNE_CA_CERT", "./ca.crt"),
            ("SILOTUNE_SERVER_CERT", "./pki/server.pem"),
            ("SILOTUNE_SERVER_KEY", "./pki/server.key"),
            ("SILOTUNE_MODEL_DIR", c.model_dir or "./models"),
            "Silos' public node keys (.pub) to admit; mounted read-only at /keys.",
            ("SILOTUNE_SILO_KEYS_DIR", "./keys"),
            "Monitoring (published on MONITORING_BIND only).",
            ("SILOTUNE_MONITORING_DIR", "./monitoring"),
            ("MONITORING_BIND", mon.bind_address),
            ("CENTRAL_EXPORTER_PORT", mon.central_exporter_port),
            ("PROMETHEUS_PORT", mon.prometheus_port),
            ("PROMETHEUS_RETENTION", "30d"),
            ("GRAFANA_PORT", mon.grafana_port),
            ("GRAFANA_ADMIN_PASSWORD_FILE", "./secrets/grafana-admin-password"),
        ]
    )
    targets = [
        {
            "targets": [f"{s.exporter_address}:{mon.silo_exporter_port}"],
            "labels": {"site": s.name, "federation": f.name},
        }
        for s in fed.silos
        if s.exporter_address
    ]
    return {
        ".env": env,
        "targets/silos.json": (json.dumps(targets, indent=2) + "\n").encode(),
        "admission.txt": "".join(f"{s.name}\tkeys/{s.name}.pub\n" for s in fed.silos).encode(),
        "README.md": _central_readme(fed, fingerprint).encode(),
    }


def render_silo(fed: FederationFile, silo: SiloSite, fingerprint: str) -> dict[str, bytes]:
    f, img, mon = fed.federation, fed.images, fed.monitoring
    data = Path(silo.data_path)
    compose_files = "docker-compose.yml:docker-compose.gpu.yml" if silo.gpu else "docker-compose.yml"
    env = _env(
        [
            f"SiloTune silo {silo.name!r} in federation {f.name!r}; generated by `silotune kit`.",
            "Edit freely: regeneration keeps your edits (it writes .env.new beside this file).",
            "",
            ("COMPOSE_PROJECT_NAME", f"silotune-{f.name}-{silo.name}"),
            ("COMPOSE_FILE", compose_files),
            ("SILOTUNE_SILO_IMAGE", img.silo_cuda if silo.gpu else img.silo_cpu),
            ("SILO_NAME", silo.name),
            ("SUPERLINK_ADDRESS", f"{f.superlink_address}:{f.superlink_port}"),
            "Federation CA (public; compare its fingerprint out of band) and this silo's own",
            "private node key, made here with `silotune certs node-key` (never leaves this host).",
            ("SILOTUNE_CA_CERT", "./ca.crt"),
            ("SILOTUNE_NODE_KEY", f"./keys/{silo.name}.key"),
            "Private data: this folder is mounted read-only at /data in the container.",
            ("SILO_DATA_DIR", str(data.parent)),
            ("SILO_DATA_FILE", data.name),
            ("SILOTUNE_MODEL_DIR", silo.model_dir or "./models"),
            "This silo's policy (allowed models, compute limits, approval; the federation's CA",
            "pinned), mounted read-only at /etc/silotune/policy.toml.",
            ("SILOTUNE_SILO_POLICY_FILE", f"./{POLICY_FILE}"),
            "Handed to the ClientApp as Flower --node-config (silotune.config.SiloConfig keys).",
            ("SILO_NODE_CONFIG", node_config_string(silo.extra_settings())),
            ("SILO_EXPORTER_PUBLISH_ADDRESS", "0.0.0.0" if silo.exporter_address else "127.0.0.1"),
            ("SILO_EXPORTER_PORT", mon.silo_exporter_port),
            ("SILO_GPU_COUNT", silo.gpu_count),
        ]
    )
    target_host = silo.exporter_address or "127.0.0.1"
    targets = [
        {
            "targets": [f"{target_host}:{mon.silo_exporter_port}"],
            "labels": {"site": silo.name, "federation": f.name},
        }
    ]
    return {
        ".env": env,
        "prometheus-targets.json": (json.dumps(targets, indent=2) + "\n").encode(),
        "README.md": _silo_readme(fed, silo, fingerprint).encode(),
    }


def _central_readme(fed: FederationFile, fingerprint: str) -> str:
    f, mon = fed.federation, fed.monitoring
    silos = "\n".join(
        f"| {s.name} | {s.domain or '(run domain)'} | {s.lora_rank or '-'} | "
        f"{'GPU' if s.gpu else 'CPU'} | {s.exporter_address or 'not scraped'} |"
        for s in fed.silos
    )
    return f"""# Central site kit: federation `{f.name}`

Generated by `silotune kit`. Plain files: edit them; regenerating keeps your edits (see
`*.new`). Full procedures: docs/runbook-central.md in the SiloTune repository.

Silos reach the SuperLink at **{f.superlink_address}:{f.superlink_port}**.
CA certificate (`ca.crt`) SHA-256 fingerprint, to read to every silo operator out of band:

    {fingerprint}

## Next steps
1. TLS certificate for the SuperLink, where the CA key is kept (never copy `ca.key` here):

       silotune certs server --ca-dir <ca-dir> --out pki \\
           --dns {f.superlink_address} localhost superlink --ip 127.0.0.1
       sudo chown -R 10001:10001 pki   # the containers run as uid 10001

2. Grafana admin password: `mkdir -p secrets && openssl rand -base64 24 > secrets/grafana-admin-password`
3. Copy the images or load them (`docker load`), then start: `docker-compose up -d`
   (or `docker compose up -d`), and check `docker-compose ps` shows every service healthy.
4. Open TCP {f.superlink_port} to the silos only. It is the Envoy Fleet proxy: it forwards the
   silos' Fleet API and refuses Flower's Control API (admit, remove, run, stop, ls, log), which
   the SuperLink serves on 127.0.0.1:8001 inside the container only. Prometheus
   ({mon.prometheus_port}) and Grafana ({mon.grafana_port}) listen on {mon.bind_address}.
5. Admit each silo when its operator sends `<silo>.pub` (see `admission.txt`): put it into `keys/`,
   confirm its fingerprint with the silo operator by phone, then

       docker-compose exec superlink silotune silos admit /keys/<silo>.pub --name <silo> \\
           --superlink 127.0.0.1:8001 --ca /run/secrets/ca.crt
       docker-compose exec superlink silotune silos list

   Operator commands (`silotune silos ...`, `flwr run/stop/ls/log`) work only there, on
   loopback; from elsewhere, use `docker-compose exec` over SSH on this host.

## Silos in this federation
| silo | domain | LoRA rank | device | exporter |
| --- | --- | --- | --- | --- |
{silos}

Silo exporters listed in `targets/silos.json` are scraped from here on port {mon.silo_exporter_port}.
"""


def _silo_readme(fed: FederationFile, silo: SiloSite, fingerprint: str) -> str:
    f = fed.federation
    data = Path(silo.data_path)
    gpu = (
        "This silo trains on the GPU: install the NVIDIA driver and the NVIDIA Container Toolkit, "
        "and check `docker run --rm --gpus all <image> nvidia-smi` works."
        if silo.gpu
        else "This silo trains on the CPU (no GPU reservation; COMPOSE_FILE has no gpu file)."
    )
    return f"""# Silo kit: `{silo.name}` in federation `{f.name}`

Generated by `silotune kit`. Plain files: edit them; regenerating keeps your edits (see
`*.new`). Full procedure: docs/runbook-join.md in the SiloTune repository.

Your data never leaves this host: only adapter updates and metrics go to the SuperLink at
**{f.superlink_address}:{f.superlink_port}** (outbound HTTPS; no inbound port is needed).

## Next steps
1. Check the CA certificate out of band. Run `silotune certs show ca.crt` (or
   `openssl x509 -in ca.crt -noout -fingerprint -sha256`) and compare, by phone or in person,
   with the federation operator's value. It must be exactly:

       {fingerprint}

2. Make this silo's node key HERE (the private key never leaves this host):

       silotune certs node-key --out keys --name {silo.name}
       sudo chown 10001:10001 keys/{silo.name}.key   # the container runs as uid 10001

   Send ONLY `keys/{silo.name}.pub` to the federation operator and read its fingerprint to them.
3. Data: `{data}` must exist on this host (its folder `{data.parent}` is mounted read-only).
   The SuperNode checks it before connecting and stops with a message naming the problem.
4. {gpu}
5. Clock: node authentication signs each request with a timestamp; keep this host within a few
   seconds of true time (chrony or systemd-timesyncd).
6. Start after the operator confirms your key is admitted: `docker-compose up -d`, then
   `docker-compose logs -f supernode`.
"""


# ---------------------------------------------------------------------------------------------
# Writing with edit protection.


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class KitReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # operator-edited; new version in <file>.new
    overwritten: list[str] = field(default_factory=list)  # edited, replaced with --force

    def summary(self) -> str:
        lines = [
            f"{len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.kept)} kept (edited), "
            f"{len(self.overwritten)} overwritten"
        ]
        for rel in self.kept:
            lines.append(f"  kept your edited {rel}; the regenerated version is {rel}.new")
        for rel in self.overwritten:
            lines.append(f"  overwrote edited {rel} (--force); your version is {rel}.bak")
        return "\n".join(lines)


def write_kits(files: dict[str, bytes], out: Path, force: bool = False) -> KitReport:
    """Write ``files`` (relative path -> content) under ``out`` without clobbering edits."""
    for rel, data in files.items():  # refuse before writing anything
        if looks_like_private_key(data):
            raise UserError(f"{rel} would contain a private key; refusing to write any kit")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    recorded: dict[str, str] = {}
    if manifest_path.exists():
        try:
            recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(
                f"{manifest_path} is damaged; move it away to regenerate (edited files will "
                "then be treated as yours and kept)"
            ) from None
    report = KitReport()
    new_manifest = dict(recorded)
    for rel, data in sorted(files.items()):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            _write(target, data)
            report.created.append(rel)
        else:
            current = target.read_bytes()
            if current == data:
                report.unchanged.append(rel)
            elif recorded.get(rel) == _sha(current):
                _write(target, data)
                report.updated.append(rel)
            elif force:
                _write(target.with_name(target.name + ".bak"), current)
                _write(target, data)
                report.overwritten.append(rel)
            else:
                _write(target.with_name(target.name + ".new"), data)
                report.kept.append(rel)
                continue  # keep the old record: the file still differs from what we made
        new_manifest[rel] = _sha(data)
    manifest = {"generator": "silotune kit", "files": dict(sorted(new_manifest.items()))}
    atomic_write_json(manifest_path, manifest, sort_keys=False)
    return report


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _copy_tree(src: Path, prefix: str, what: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not src.is_dir():
        return out
    for p in sorted(src.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
            out[f"{prefix}/{p.relative_to(src).as_posix()}"] = read_public_file(p, what)
    return out


POLICY_FILE = "policy.toml"
_CA_PIN = re.compile(rb'(?m)^# federation-ca-sha256 = ""$')


def render_policy(template: bytes, fingerprint: str) -> bytes:
    """The bundle's silo policy with this federation's CA pinned (`silo start` refuses another)."""
    pinned, n = _CA_PIN.subn(f'federation-ca-sha256 = "{fingerprint}"'.encode(), template, count=1)
    if n != 1:
        raise UserError(
            f"the silo bundle's {POLICY_FILE} has no '# federation-ca-sha256 = \"\"' line to fill in"
        )
    return pinned


def build_kits(
    fed: FederationFile,
    fed_path: Path,
    bundles: Path = DEFAULT_BUNDLES,
    monitoring: Path = DEFAULT_MONITORING,
) -> dict[str, bytes]:
    """Every kit file, relative to the output folder, rendered in memory."""
    for needed in ("central/docker-compose.yml", "silo/docker-compose.yml"):
        if not (bundles / needed).is_file():
            raise UserError(
                f"compose bundle {bundles / needed} not found; run from a SiloTune source "
                "checkout or pass --bundles DIR (the repository's deploy/compose)"
            )
    ca_path = Path(fed.federation.ca_cert)
    if not ca_path.is_absolute():
        ca_path = fed_path.parent / ca_path
    ca = read_public_file(ca_path, "federation.ca-cert")
    fingerprint = _ca_fingerprint(ca, ca_path)

    files: dict[str, bytes] = {}
    central_src = bundles / "central"
    for name in ("docker-compose.yml", "prometheus.yml", "grafana-datasources.yml"):
        if (central_src / name).is_file():
            files[f"{CENTRAL}/{name}"] = read_public_file(central_src / name, "bundle file")
    files[f"{CENTRAL}/ca.crt"] = ca
    files.update(_copy_tree(monitoring, f"{CENTRAL}/monitoring", "monitoring file"))
    files.update({f"{CENTRAL}/{k}": v for k, v in render_central(fed, fingerprint).items()})
    silo_src = bundles / "silo"
    for silo in fed.silos:
        for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
            if (silo_src / name).is_file():
                files[f"{silo.name}/{name}"] = read_public_file(silo_src / name, "bundle file")
        if (silo_src / POLICY_FILE).is_file():
            template = read_public_file(silo_src / POLICY_FILE, "bundle file")
            files[f"{silo.name}/{POLICY_FILE}"] = render_policy(template, fingerprint)
        files[f"{silo.name}/ca.crt"] = ca
        files.update({f"{silo.name}/{k}": v for k, v in render_silo(fed, silo, fingerprint).items()})
    return files


def generate(
    fed_path: Path,
    out: Path,
    force: bool = False,
    bundles: Path = DEFAULT_BUNDLES,
    monitoring: Path = DEFAULT_MONITORING,
) -> KitReport:
    fed = load_federation(fed_path)
    files = build_kits(fed, fed_path, bundles, monitoring)
    return write_kits(files, out, force=force)
