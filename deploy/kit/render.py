"""Rendering: one function per generated file, from the federation's schema objects to bytes.

``render_central`` and ``render_silo`` map each site's file paths (relative to the site's kit) to
those functions' output; deploy.kit.build puts them beside the copied bundle files. Long texts are
templates shipped with the package (templates/*.tmpl, ``string.Template``); a .env template places
each variable with a ``${NAME}`` line that becomes ``NAME=value`` (names from deploy.kit.names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from string import Template
from typing import Any

from deploy.kit.names import (
    ADMISSION_FILE,
    CA_FILE,
    CENTRAL_TARGETS_FILE,
    COMPOSE_FILE,
    COMPOSE_GPU_FILE,
    ENV_FILE,
    LABEL_FEDERATION,
    LABEL_SITE,
    LABELS,
    POLICY_CA_PIN,
    POLICY_FILE,
    README_FILE,
    SILO_TARGETS_FILE,
    TARGETS,
    EnvKey,
)
from deploy.kit.schema import FederationFile, SiloSite
from deploy.kit.sources import template
from silotune.errors import UserError

# --- helpers ---------------------------------------------------------------------------------


def _fill(name: str, values: dict[str, Any]) -> str:
    """Template ``name`` with every placeholder filled; a value the template does not place is a bug."""
    tmpl = Template(template(name))
    unused = set(values) - set(tmpl.get_identifiers())
    if unused:
        raise RuntimeError(f"template {name} does not place {sorted(unused)}")
    return tmpl.substitute(values)


def _env_line(key: EnvKey, value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if "\n" in text or "$" in text:
        raise UserError(f"value for {key} must not contain newlines or '$': {text!r}")
    return f"{key}={text}"


def _env(name: str, header: dict[str, str], values: dict[EnvKey, Any]) -> bytes:
    """A .env file from template ``name``: ``header`` fills its comments, ``values`` its variables."""
    lines = {str(key): _env_line(key, value) for key, value in values.items()}
    return _fill(name, {**header, **lines}).encode()


def _targets(entries: list[tuple[str, str]], federation: str) -> bytes:
    """Prometheus file_sd targets: one entry per (host:port, site)."""
    targets = [
        {TARGETS: [target], LABELS: {LABEL_SITE: site, LABEL_FEDERATION: federation}}
        for target, site in entries
    ]
    return (json.dumps(targets, indent=2) + "\n").encode()


def node_config_string(settings: dict[str, Any]) -> str:
    """Flower's ``--node-config`` form, as the silo launcher renders it (one source)."""
    from silo_node.ops.launch import format_node_config

    return format_node_config(settings)


# --- the central site ------------------------------------------------------------------------


def central_env(fed: FederationFile) -> bytes:
    f, img, mon, c = fed.federation, fed.images, fed.monitoring, fed.central
    return _env(
        "central.env.tmpl",
        {"federation": repr(f.name)},
        {
            EnvKey.COMPOSE_PROJECT_NAME: f"silotune-{f.name}-central",
            EnvKey.SILOTUNE_CENTRAL_IMAGE: img.central,
            EnvKey.PROMETHEUS_IMAGE: img.prometheus,
            EnvKey.GRAFANA_IMAGE: img.grafana,
            EnvKey.SUPERLINK_PUBLIC_ADDRESS: f.superlink_address,
            EnvKey.SUPERLINK_PUBLISH_ADDRESS: c.publish_address,
            EnvKey.SUPERLINK_PORT: f.superlink_port,
            EnvKey.SILOTUNE_CA_CERT: f"./{CA_FILE}",
            EnvKey.SILOTUNE_SERVER_CERT: "./pki/server.pem",
            EnvKey.SILOTUNE_SERVER_KEY: "./pki/server.key",
            EnvKey.SILOTUNE_MODEL_DIR: c.model_dir or "./models",
            EnvKey.SILOTUNE_SILO_KEYS_DIR: "./keys",
            EnvKey.SILOTUNE_MONITORING_DIR: "./monitoring",
            EnvKey.MONITORING_BIND: mon.bind_address,
            EnvKey.CENTRAL_EXPORTER_PORT: mon.central_exporter_port,
            EnvKey.PROMETHEUS_PORT: mon.prometheus_port,
            EnvKey.PROMETHEUS_RETENTION: "30d",
            EnvKey.GRAFANA_PORT: mon.grafana_port,
            EnvKey.GRAFANA_ADMIN_PASSWORD_FILE: "./secrets/grafana-admin-password",
        },
    )


def central_targets(fed: FederationFile) -> bytes:
    """The silo exporters central Prometheus scrapes (silos with an exporter address only)."""
    port = fed.monitoring.silo_exporter_port
    entries = [(f"{s.exporter_address}:{port}", s.name) for s in fed.silos if s.exporter_address]
    return _targets(entries, fed.federation.name)


def central_admission(fed: FederationFile) -> bytes:
    """Each silo and the public node key file its operator sends to be admitted."""
    return "".join(f"{s.name}\tkeys/{s.name}.pub\n" for s in fed.silos).encode()


def central_readme(fed: FederationFile, fingerprint: str) -> bytes:
    f, mon = fed.federation, fed.monitoring
    silo_rows = "\n".join(
        f"| {s.name} | {s.domain or '(run domain)'} | {s.lora_rank or '-'} | "
        f"{'GPU' if s.gpu else 'CPU'} | {s.exporter_address or 'not scraped'} |"
        for s in fed.silos
    )
    text = _fill(
        "central-readme.md.tmpl",
        {
            "federation": f.name,
            "superlink_address": f.superlink_address,
            "superlink_port": f.superlink_port,
            "fingerprint": fingerprint,
            "prometheus_port": mon.prometheus_port,
            "grafana_port": mon.grafana_port,
            "bind_address": mon.bind_address,
            "silo_rows": silo_rows,
            "silo_exporter_port": mon.silo_exporter_port,
        },
    )
    return text.encode()


def render_central(fed: FederationFile, fingerprint: str) -> dict[str, bytes]:
    """The central kit's generated files (relative to the kit folder)."""
    return {
        ENV_FILE: central_env(fed),
        CENTRAL_TARGETS_FILE: central_targets(fed),
        ADMISSION_FILE: central_admission(fed),
        README_FILE: central_readme(fed, fingerprint),
    }


# --- a silo ----------------------------------------------------------------------------------


def silo_env(fed: FederationFile, silo: SiloSite) -> bytes:
    f, img, mon = fed.federation, fed.images, fed.monitoring
    data = Path(silo.data_path)
    compose_files = f"{COMPOSE_FILE}:{COMPOSE_GPU_FILE}" if silo.gpu else COMPOSE_FILE
    return _env(
        "silo.env.tmpl",
        {"silo": repr(silo.name), "federation": repr(f.name)},
        {
            EnvKey.COMPOSE_PROJECT_NAME: f"silotune-{f.name}-{silo.name}",
            EnvKey.COMPOSE_FILE: compose_files,
            EnvKey.SILOTUNE_SILO_IMAGE: img.silo_cuda if silo.gpu else img.silo_cpu,
            EnvKey.SILO_NAME: silo.name,
            EnvKey.SUPERLINK_ADDRESS: f"{f.superlink_address}:{f.superlink_port}",
            EnvKey.SILOTUNE_CA_CERT: f"./{CA_FILE}",
            EnvKey.SILOTUNE_NODE_KEY: f"./keys/{silo.name}.key",
            EnvKey.SILO_DATA_DIR: str(data.parent),
            EnvKey.SILO_DATA_FILE: data.name,
            EnvKey.SILOTUNE_MODEL_DIR: silo.model_dir or "./models",
            EnvKey.SILOTUNE_SILO_POLICY_FILE: f"./{POLICY_FILE}",
            EnvKey.SILO_NODE_CONFIG: node_config_string(silo.extra_settings()),
            EnvKey.SILO_EXPORTER_PUBLISH_ADDRESS: "0.0.0.0" if silo.exporter_address else "127.0.0.1",
            EnvKey.SILO_EXPORTER_PORT: mon.silo_exporter_port,
            EnvKey.SILO_GPU_COUNT: silo.gpu_count,
        },
    )


def silo_targets(fed: FederationFile, silo: SiloSite) -> bytes:
    """The silo's own exporter, for a Prometheus at the silo."""
    host = silo.exporter_address or "127.0.0.1"
    return _targets([(f"{host}:{fed.monitoring.silo_exporter_port}", silo.name)], fed.federation.name)


def silo_readme(fed: FederationFile, silo: SiloSite, fingerprint: str) -> bytes:
    f = fed.federation
    data = Path(silo.data_path)
    device = template("silo-gpu.md.tmpl" if silo.gpu else "silo-cpu.md.tmpl").rstrip("\n")
    text = _fill(
        "silo-readme.md.tmpl",
        {
            "silo": silo.name,
            "federation": f.name,
            "superlink_address": f.superlink_address,
            "superlink_port": f.superlink_port,
            "fingerprint": fingerprint,
            "data_path": data,
            "data_dir": data.parent,
            "device": device,
        },
    )
    return text.encode()


_CA_PIN = re.compile(rb"(?m)^# " + re.escape(f'{POLICY_CA_PIN} = ""'.encode()) + rb"$")


def render_policy(bundle_policy: bytes, fingerprint: str) -> bytes:
    """The bundle's silo policy with this federation's CA pinned (`silo start` refuses another)."""
    pinned, n = _CA_PIN.subn(f'{POLICY_CA_PIN} = "{fingerprint}"'.encode(), bundle_policy, count=1)
    if n != 1:
        raise UserError(f"the silo bundle's {POLICY_FILE} has no '# {POLICY_CA_PIN} = \"\"' line to fill in")
    return pinned


def render_silo(fed: FederationFile, silo: SiloSite, fingerprint: str) -> dict[str, bytes]:
    """A silo kit's generated files (relative to the kit folder); policy.toml comes from the bundle
    through ``render_policy``."""
    return {
        ENV_FILE: silo_env(fed, silo),
        SILO_TARGETS_FILE: silo_targets(fed, silo),
        README_FILE: silo_readme(fed, silo, fingerprint),
    }
