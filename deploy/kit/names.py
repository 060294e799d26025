"""Every name a kit writes: its files, the keys of its .env files and the keys of its configs.

The .env templates (templates/*.env.tmpl) place each variable by a ``${NAME}`` line; the renderer
fills that line with ``NAME=value`` from the constants here, so a key is spelled in this file only.
"""

from __future__ import annotations

from enum import StrEnum

# --- folders and files of a kit --------------------------------------------------------------

CENTRAL = "central"  # the central site's kit folder (a silo may not take this name)
MANIFEST = ".silotune-kit.json"  # hashes of the generated files, beside the kit folders
ENV_FILE = ".env"
README_FILE = "README.md"
CA_FILE = "ca.crt"
POLICY_FILE = "policy.toml"
COMPOSE_FILE = "docker-compose.yml"
COMPOSE_GPU_FILE = "docker-compose.gpu.yml"
ADMISSION_FILE = "admission.txt"
CENTRAL_TARGETS_FILE = "targets/silos.json"
SILO_TARGETS_FILE = "prometheus-targets.json"
MONITORING_DIR = "monitoring"

# The compose bundles (deploy/compose/<bundle>/) and the files of each a kit carries as they are.
CENTRAL_BUNDLE = "central"
SILO_BUNDLE = "silo"
CENTRAL_BUNDLE_FILES = (COMPOSE_FILE, "prometheus.yml", "grafana-datasources.yml")
SILO_BUNDLE_FILES = (COMPOSE_FILE, COMPOSE_GPU_FILE)

# --- configs ---------------------------------------------------------------------------------

# The manifest: {"generator": ..., "files": {relative path: sha256}}.
MANIFEST_GENERATOR = "generator"
MANIFEST_FILES = "files"
GENERATOR = "silotune kit"

# Prometheus file_sd targets: [{"targets": [host:port], "labels": {"site": ..., "federation": ...}}].
TARGETS = "targets"
LABELS = "labels"
LABEL_SITE = "site"
LABEL_FEDERATION = "federation"

# A silo's node config (silotune.config.SiloConfig keys) as the kit hands it to the SuperNode.
NODE_NAME = "name"
NODE_DATA_PATH = "data-path"
NODE_DOMAIN = "domain"
NODE_LORA_RANK = "lora-rank"
# Where the silo's data folder is mounted in the container (the data path the node config gets).
DATA_MOUNT = "/data"

# The silo policy's CA pin: the bundle's policy.toml carries it commented out and empty.
POLICY_CA_PIN = "federation-ca-sha256"


class EnvKey(StrEnum):
    """The variables of the kits' .env files (the compose bundles read them; .env.example lists them)."""

    # Both sites.
    COMPOSE_PROJECT_NAME = "COMPOSE_PROJECT_NAME"
    SILOTUNE_CA_CERT = "SILOTUNE_CA_CERT"
    SILOTUNE_MODEL_DIR = "SILOTUNE_MODEL_DIR"
    # Central site.
    SILOTUNE_CENTRAL_IMAGE = "SILOTUNE_CENTRAL_IMAGE"
    PROMETHEUS_IMAGE = "PROMETHEUS_IMAGE"
    GRAFANA_IMAGE = "GRAFANA_IMAGE"
    SUPERLINK_PUBLIC_ADDRESS = "SUPERLINK_PUBLIC_ADDRESS"
    SUPERLINK_PUBLISH_ADDRESS = "SUPERLINK_PUBLISH_ADDRESS"
    SUPERLINK_PORT = "SUPERLINK_PORT"
    SILOTUNE_SERVER_CERT = "SILOTUNE_SERVER_CERT"
    SILOTUNE_SERVER_KEY = "SILOTUNE_SERVER_KEY"
    SILOTUNE_SILO_KEYS_DIR = "SILOTUNE_SILO_KEYS_DIR"
    SILOTUNE_MONITORING_DIR = "SILOTUNE_MONITORING_DIR"
    MONITORING_BIND = "MONITORING_BIND"
    CENTRAL_EXPORTER_PORT = "CENTRAL_EXPORTER_PORT"
    PROMETHEUS_PORT = "PROMETHEUS_PORT"
    PROMETHEUS_RETENTION = "PROMETHEUS_RETENTION"
    GRAFANA_PORT = "GRAFANA_PORT"
    GRAFANA_ADMIN_PASSWORD_FILE = "GRAFANA_ADMIN_PASSWORD_FILE"
    # Silo site.
    COMPOSE_FILE = "COMPOSE_FILE"
    SILOTUNE_SILO_IMAGE = "SILOTUNE_SILO_IMAGE"
    SILO_NAME = "SILO_NAME"
    SUPERLINK_ADDRESS = "SUPERLINK_ADDRESS"
    SILOTUNE_NODE_KEY = "SILOTUNE_NODE_KEY"
    SILO_DATA_DIR = "SILO_DATA_DIR"
    SILO_DATA_FILE = "SILO_DATA_FILE"
    SILOTUNE_SILO_POLICY_FILE = "SILOTUNE_SILO_POLICY_FILE"
    SILO_NODE_CONFIG = "SILO_NODE_CONFIG"
    SILO_EXPORTER_PUBLISH_ADDRESS = "SILO_EXPORTER_PUBLISH_ADDRESS"
    SILO_EXPORTER_PORT = "SILO_EXPORTER_PORT"
    SILO_GPU_COUNT = "SILO_GPU_COUNT"
