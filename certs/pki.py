"""The federation CA and the SuperLink's TLS server certificate.

Flower has no mutual TLS: the CA exists so that SuperNodes and the `flwr` CLI can verify the
SuperLink (``--root-certificates ca.crt``). Silos are identified by their node keys instead
(see certs/node_key.py). EC P-384 keys: small, fast, accepted by every TLS stack Flower uses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.files import replace_files
from silotune.errors import UserError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


@dataclass(frozen=True)
class CAFiles:
    cert_path: Path
    key_path: Path
    fingerprint: str  # SHA-256 of the DER certificate, colon hex (as `openssl x509 -fingerprint`)


@dataclass(frozen=True)
class ServerCertFiles:
    cert_path: Path
    key_path: Path
    dns_names: tuple[str, ...]
    ips: tuple[str, ...]
    not_after: dt.datetime
    backups: tuple[Path, ...] = ()


def cert_fingerprint(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: the SuperLink must read it unattended; file mode 0600 protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(
    out_dir: Path, name: str = "SiloTune Federation CA", days: int = 3650, force: bool = False
) -> CAFiles:
    """Create ``ca.crt`` and ``ca.key`` (0600) in ``out_dir``; refuse to overwrite unless force."""
    if days < 1:
        raise UserError(f"--days must be at least 1 (got {days})")
    out_dir = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdate a little: a silo whose clock is a few minutes behind must still accept it.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    replace_files(
        {key_path: _key_pem(key)},
        {cert_path: cert.public_bytes(serialization.Encoding.PEM)},
        force,
    )
    return CAFiles(cert_path, key_path, cert_fingerprint(cert))


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise UserError(f"{p} not found; create the CA first with `silotune certs ca --out {ca_dir}`")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{key_path}: expected an EC private key")
    return cert, key


def _parse_ips(
    ips: list[str] | tuple[str, ...],
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for ip in ips:
        try:
            out.append(ipaddress.ip_address(ip))
        except ValueError:
            raise UserError(f"--ip {ip!r} is not an IP address (put host names in --dns)") from None
    return out


def issue_server_cert(
    ca_dir: Path,
    out_dir: Path,
    dns_names: list[str] | tuple[str, ...] = (),
    ips: list[str] | tuple[str, ...] = (),
    days: int = 365,
    force: bool = False,
    include_loopback: bool = True,
) -> ServerCertFiles:
    """Issue ``server.pem`` + ``server.key`` (0600) for the SuperLink, signed by the CA.

    Every name and address that SuperNodes or the `flwr` CLI use to reach the SuperLink must be in
    the SANs, or their TLS handshake fails with a host name mismatch. 127.0.0.1 is added by
    default: the SuperLink's own `flower-superexec` child connects to it over 127.0.0.1 with the
    same CA, and without that SAN no ServerApp can start.
    """
    dns_names, ip_list = tuple(dns_names), _parse_ips(ips)
    if not dns_names and not ip_list:
        raise UserError("give at least one --dns NAME or --ip ADDRESS the silos will use to connect")
    loopback = ipaddress.ip_address("127.0.0.1")
    if include_loopback and loopback not in ip_list:
        ip_list.append(loopback)
    if days < 1:
        raise UserError(f"--days must be at least 1 (got {days})")
    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_list]
    cn = dns_names[0] if dns_names else str(ip_list[0])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    backups = replace_files(
        {key_path: _key_pem(key)},
        {cert_path: cert.public_bytes(serialization.Encoding.PEM)},
        force,
    )
    return ServerCertFiles(
        cert_path, key_path, dns_names, tuple(str(i) for i in ip_list), not_after, tuple(backups)
    )


def server_sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate's SubjectAlternativeName, empty if absent."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ext.get_values_for_type(x509.DNSName), [str(i) for i in ext.get_values_for_type(x509.IPAddress)]


def rotate_server_cert(
    ca_dir: Path,
    server_dir: Path,
    dns_names: list[str] | None = None,
    ips: list[str] | None = None,
    days: int = 365,
) -> ServerCertFiles:
    """Reissue the server certificate with a NEW key; the old pair is kept as *.bak-<time>.

    SANs default to the current certificate's. The CA and the silos' node keys are untouched, so
    silos keep trusting the SuperLink (same CA) and stay admitted (same node keys).
    """
    cert_path = Path(server_dir) / SERVER_CERT
    if not cert_path.is_file():
        raise UserError(f"{cert_path} not found; issue one first with `silotune certs server`")
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    old_dns, old_ips = server_sans(old)
    return issue_server_cert(
        ca_dir,
        server_dir,
        dns_names if dns_names else old_dns,
        ips if ips else old_ips,
        days=days,
        force=True,
    )


def verify_server_cert(server_cert: Path, ca_cert: Path, hostname: str) -> None:
    """Verify that ``server_cert`` chains to ``ca_cert`` and is valid for ``hostname`` (DNS or IP).

    Raises UserError with the reason; the same checks a SuperNode's TLS handshake makes.
    """
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    leaf = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        subject = x509.DNSName(hostname)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    try:
        verifier.verify(leaf, [])
    except VerificationError as exc:
        raise UserError(f"{server_cert} is not valid for {hostname} under {ca_cert}: {exc}") from None
