"""Site kits: one federation description in, one folder of plain files per site out.

``silotune kit --federation federation.toml --out kits/`` writes ``kits/central/`` and one
``kits/<silo>/`` per silo: the compose bundle from deploy/compose, an ``.env`` with the site's
settings, the federation CA certificate (public), Prometheus targets and a README with the site's
next steps. Private keys never enter a kit: node keys are made AT each silo (the README says how),
and any file that looks like a private key is refused before anything is written.

Kits are meant to be edited. Every generated file's hash is recorded in ``.silotune-kit.json``;
regenerating overwrites only files still as generated, and writes ``<file>.new`` beside a file the
operator changed (``--force`` overwrites it, keeping the edited one as ``<file>.bak``).

The modules: ``schema`` (the federation file), ``names`` (every file name and key a kit writes),
``sources`` (bundles, monitoring files and templates as package resources; the private-key check),
``render`` (one function per generated file), ``build`` (a whole set of kits in memory) and
``write`` (writing with edit protection).
"""

from __future__ import annotations

from deploy.kit.build import build_kits, generate
from deploy.kit.names import CENTRAL, MANIFEST, POLICY_FILE
from deploy.kit.render import node_config_string, render_central, render_policy, render_silo
from deploy.kit.schema import (
    CentralSite,
    FederationFile,
    FederationSettings,
    Images,
    Monitoring,
    SiloSite,
    load_federation,
)
from deploy.kit.sources import DEFAULT_BUNDLES, DEFAULT_MONITORING, looks_like_private_key, read_public_file
from deploy.kit.write import KitReport, write_kits

__all__ = [
    "CENTRAL",
    "DEFAULT_BUNDLES",
    "DEFAULT_MONITORING",
    "MANIFEST",
    "POLICY_FILE",
    "CentralSite",
    "FederationFile",
    "FederationSettings",
    "Images",
    "KitReport",
    "Monitoring",
    "SiloSite",
    "build_kits",
    "generate",
    "load_federation",
    "looks_like_private_key",
    "node_config_string",
    "read_public_file",
    "render_central",
    "render_policy",
    "render_silo",
    "write_kits",
]
