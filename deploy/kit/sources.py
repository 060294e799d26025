"""What a kit is made from, read as package resources: the compose bundles (deploy/compose), the
monitoring files (monitoring/), the kit's text templates (deploy/kit/templates), and the
federation's CA certificate. Everything read into a kit passes the private-key check here.

The bundles and templates are package data (pyproject.toml ``[tool.setuptools.package-data]``), so
an installed SiloTune finds them inside its own packages; in a source checkout the same lookup
finds the checkout's files. ``--bundles`` and ``--monitoring`` point elsewhere.
"""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from silotune.errors import UserError

# A folder or file the kit reads: a Path (--bundles, --monitoring, the CA) or a package resource.
Source = Path | Traversable

DEFAULT_BUNDLES: Source = files("deploy") / "compose"
DEFAULT_MONITORING: Source = files("monitoring")
TEMPLATES: Source = files("deploy.kit") / "templates"

_PRIVATE_KEY_RE = re.compile(
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----|PuTTY-User-Key-File-|-----BEGIN PGP PRIVATE KEY BLOCK"
)


def template(name: str) -> str:
    """A text template shipped with the package (templates/<name>)."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def looks_like_private_key(data: bytes) -> bool:
    return bool(_PRIVATE_KEY_RE.search(data))


def read_public_file(path: Source | str, what: str) -> bytes:
    """Read a file to copy into a kit; refuse anything that looks like a private key."""
    source = Path(path) if isinstance(path, str) else path
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read: {exc}") from None
    if looks_like_private_key(data):
        raise UserError(
            f"{what} {path} looks like a PRIVATE KEY; refusing to put it into a kit. Kits carry "
            "only public files; private keys stay where they were made."
        )
    return data


def _tree_files(src: Source, parts: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Source]]:
    out = []
    for child in src.iterdir():
        if child.name == "__pycache__":
            continue
        if child.is_dir():
            out.extend(_tree_files(child, (*parts, child.name)))
        elif child.is_file() and not child.name.endswith(".pyc"):
            out.append(((*parts, child.name), child))
    return out


def read_tree(src: Source, prefix: str, what: str) -> dict[str, bytes]:
    """Every file under ``src`` (no Python caches) as ``prefix/<relative path>`` -> content, in
    path order; nothing if ``src`` is not a folder."""
    if not src.is_dir():
        return {}
    found = sorted(_tree_files(src), key=lambda item: item[0])
    return {"/".join((prefix, *parts)): read_public_file(f, what) for parts, f in found}


def ca_fingerprint(data: bytes, path: Path) -> str:
    """The SHA-256 fingerprint of the federation CA certificate, as `silotune certs show` prints it."""
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
