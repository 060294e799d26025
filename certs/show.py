"""Human-readable summaries of certificates and node public keys (never of private keys)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from certs.node_key import ssh_fingerprint
from certs.pki import cert_fingerprint, server_sans
from silotune.errors import UserError


def describe_cert(cert: x509.Certificate, now: dt.datetime | None = None) -> dict[str, object]:
    now = now or dt.datetime.now(dt.UTC)
    dns, ips = server_sans(cert)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    not_after = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "is_ca": is_ca,
        "dns_names": dns,
        "ips": ips,
        "not_before": cert.not_valid_before_utc,
        "not_after": not_after,
        # Floor division: "0 days left" already means "expires within a day".
        "days_left": (not_after - now) // dt.timedelta(days=1),
        "expired": not_after <= now,
        "sha256_fingerprint": cert_fingerprint(cert),
    }


def show_path(path: Path) -> str:
    """Text block for one file: every certificate in a PEM bundle, or a node public key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        # Showing a private key's contents is never useful here; say what it is and stop.
        return f"{path}: private key (contents not shown)"
    text = data.decode("ascii", errors="replace").strip()
    if text.startswith(("ecdsa-sha2-", "ssh-")):
        return f"{path}: OpenSSH public key {text.split()[0]}  fingerprint {ssh_fingerprint(text)}"
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UserError(f"{path}: neither a PEM certificate nor an OpenSSH public key") from None
    blocks = []
    for cert in certs:
        d = describe_cert(cert)
        sans = [f"DNS:{n}" for n in d["dns_names"]] + [f"IP:{i}" for i in d["ips"]]  # type: ignore[union-attr]
        state = "EXPIRED" if d["expired"] else f"{d['days_left']} days left"
        blocks.append(
            "\n".join(
                [
                    f"{path}:",
                    f"  subject:     {d['subject']}" + ("  (CA)" if d["is_ca"] else ""),
                    f"  issuer:      {d['issuer']}",
                    f"  SANs:        {', '.join(sans) if sans else '(none)'}",
                    f"  valid from:  {d['not_before']:%Y-%m-%d %H:%M} UTC",
                    f"  valid until: {d['not_after']:%Y-%m-%d %H:%M} UTC ({state})",
                    f"  SHA-256:     {d['sha256_fingerprint']}",
                ]
            )
        )
    return "\n".join(blocks)
