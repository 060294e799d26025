"""A silo's node key: the identity the SuperLink admits (Flower node authentication).

The key pair is generated AT the silo; only the ``.pub`` file travels to the federation operator,
who registers it (`silotune silos admit`). Flower wants EC keys in OpenSSH format; P-384 is what
Flower's own tooling generates. The SHA256 fingerprint is printed in OpenSSH's style so both
sides can compare it out of band (phone, ticket) before admission.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.files import replace_files
from silotune.errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class NodeKey:
    private_path: Path
    public_path: Path
    fingerprint: str  # "SHA256:<base64 without padding>", as `ssh-keygen -l` prints it
    public_key: str  # the one-line OpenSSH public key (safe to share)


def ssh_fingerprint(public_line: str) -> str:
    """OpenSSH SHA256 fingerprint of a one-line public key (``ecdsa-sha2-nistp384 AAAA... c``)."""
    parts = public_line.split()
    if len(parts) < 2:
        raise UserError("not an OpenSSH public key line (expected 'TYPE BASE64 [comment]')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise UserError("not an OpenSSH public key: the key field is not base64") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_node_public_key(path: Path) -> str:
    """Validate a silo's ``.pub`` (EC, OpenSSH format) before admission; return its fingerprint."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read public key {path}: {exc}") from None
    if "PRIVATE KEY" in text:
        # The most damaging mix-up: never ship or register the private half.
        raise UserError(f"{path} is a PRIVATE key; send and register only the .pub file")
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError):
        raise UserError(f"{path} is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UserError(
            f"{path}: Flower node authentication needs an EC key (ecdsa-sha2-nistp256/384/521); "
            "create one with `silotune certs node-key`"
        )
    return ssh_fingerprint(text)


def generate_node_key(out_dir: Path, name: str = "silo", force: bool = False) -> NodeKey:
    """Write ``<name>.key`` (OpenSSH private key, 0600) and ``<name>.pub`` in ``out_dir``."""
    if not _NAME_RE.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (max 63 chars)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        # Unencrypted: the SuperNode reads it unattended (Flower passes no password); mode 0600.
        serialization.NoEncryption(),
    )
    public_line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + f" {name}"
    )
    out_dir = Path(out_dir)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    replace_files({priv_path: private}, {pub_path: (public_line + "\n").encode()}, force)
    return NodeKey(priv_path, pub_path, ssh_fingerprint(public_line), public_line)
