"""Assembling the kits: the bundle files copied as they are, the CA certificate, and the rendered
files, per site, in memory; then ``generate`` writes them (deploy.kit.write)."""

from __future__ import annotations

from pathlib import Path

from deploy.kit.names import (
    CA_FILE,
    CENTRAL,
    CENTRAL_BUNDLE,
    CENTRAL_BUNDLE_FILES,
    COMPOSE_FILE,
    MONITORING_DIR,
    POLICY_FILE,
    SILO_BUNDLE,
    SILO_BUNDLE_FILES,
)
from deploy.kit.render import render_central, render_policy, render_silo
from deploy.kit.schema import FederationFile, load_federation
from deploy.kit.sources import (
    DEFAULT_BUNDLES,
    DEFAULT_MONITORING,
    Source,
    ca_fingerprint,
    read_public_file,
    read_tree,
)
from deploy.kit.write import KitReport, write_kits
from silotune.errors import UserError


def _bundle_files(src: Source, names: tuple[str, ...], site: str) -> dict[str, bytes]:
    """The bundle's files a site's kit carries as they are (those present in the bundle)."""
    return {
        f"{site}/{name}": read_public_file(src / name, "bundle file")
        for name in names
        if (src / name).is_file()
    }


def build_kits(
    fed: FederationFile,
    fed_path: Path,
    bundles: Source = DEFAULT_BUNDLES,
    monitoring: Source = DEFAULT_MONITORING,
) -> dict[str, bytes]:
    """Every kit file, relative to the output folder, rendered in memory."""
    for bundle in (CENTRAL_BUNDLE, SILO_BUNDLE):
        needed = bundles / bundle / COMPOSE_FILE
        if not needed.is_file():
            raise UserError(
                f"compose bundle {needed} not found; pass --bundles DIR (the repository's "
                "deploy/compose), or reinstall SiloTune if that is its own bundle"
            )
    ca_path = Path(fed.federation.ca_cert)
    if not ca_path.is_absolute():
        ca_path = fed_path.parent / ca_path
    ca = read_public_file(ca_path, "federation.ca-cert")
    fingerprint = ca_fingerprint(ca, ca_path)

    files: dict[str, bytes] = {}
    files.update(_bundle_files(bundles / CENTRAL_BUNDLE, CENTRAL_BUNDLE_FILES, CENTRAL))
    files[f"{CENTRAL}/{CA_FILE}"] = ca
    files.update(read_tree(monitoring, f"{CENTRAL}/{MONITORING_DIR}", "monitoring file"))
    files.update({f"{CENTRAL}/{k}": v for k, v in render_central(fed, fingerprint).items()})
    silo_src = bundles / SILO_BUNDLE
    for silo in fed.silos:
        files.update(_bundle_files(silo_src, SILO_BUNDLE_FILES, silo.name))
        if (silo_src / POLICY_FILE).is_file():
            policy = read_public_file(silo_src / POLICY_FILE, "bundle file")
            files[f"{silo.name}/{POLICY_FILE}"] = render_policy(policy, fingerprint)
        files[f"{silo.name}/{CA_FILE}"] = ca
        files.update({f"{silo.name}/{k}": v for k, v in render_silo(fed, silo, fingerprint).items()})
    return files


def generate(
    fed_path: Path,
    out: Path,
    force: bool = False,
    bundles: Source = DEFAULT_BUNDLES,
    monitoring: Source = DEFAULT_MONITORING,
) -> KitReport:
    """Read the federation file, build every kit in memory, then write them (edits kept)."""
    fed = load_federation(fed_path)
    files = build_kits(fed, fed_path, bundles, monitoring)
    return write_kits(files, out, force=force)
