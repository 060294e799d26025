"""The federation file (federation.toml): its sections as strict models, and reading it with errors
that name the file and the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from deploy.kit.names import CENTRAL, DATA_MOUNT, NODE_DATA_PATH, NODE_DOMAIN, NODE_LORA_RANK, NODE_NAME
from silotune.config import ConfigError, Domain, StrictSection, parse_silo_config
from silotune.errors import UserError

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
            out[NODE_DOMAIN] = self.domain
        if self.lora_rank:
            out[NODE_LORA_RANK] = self.lora_rank
        out.update(self.node_config)
        return out

    def settings(self) -> dict[str, Any]:
        """The silo's whole node config as the SuperNode gets it inside the container."""
        data_path = f"{DATA_MOUNT}/{Path(self.data_path).name}"
        return {NODE_NAME: self.name, NODE_DATA_PATH: data_path, **self.extra_settings()}


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


def _validation_problems(err: ValidationError, data: dict[str, Any]) -> list[str]:
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
    return lines


def _federation_problems(fed: FederationFile) -> list[str]:
    """What the models cannot see alone: duplicate silo names, node configs the SuperNode would
    refuse, and two central services on one port."""
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
                own = key in (NODE_NAME, NODE_DATA_PATH, NODE_DOMAIN, NODE_LORA_RANK)
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
    return problems


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
        lines = _validation_problems(err, data)
        raise UserError(f"invalid federation file {path}:\n" + "\n".join(lines)) from None
    problems = _federation_problems(fed)
    if problems:
        raise UserError(f"invalid federation file {path}:\n" + "\n".join(problems))
    return fed
