"""Federation identity tooling: CA, server certificate with SANs, node keys, rotation."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.node_key import check_node_public_key, generate_node_key
from certs.pki import create_ca, issue_server_cert, rotate_server_cert, verify_server_cert
from certs.show import show_path
from command_line.main import main
from silotune.errors import UserError


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, Path]:
    create_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["superlink.test"], ["127.0.0.1"])
    return {"ca": tmp_path / "ca", "srv": tmp_path / "srv"}


def test_ca_files_and_modes(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", name="Test CA", days=30)
    assert _mode(ca.key_path) == 0o600
    cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "Test CA" in cert.subject.rfc4514_string()
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", ca.fingerprint)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ca.fingerprint.replace(":", "") == hashlib.sha256(der).hexdigest().upper()


def test_server_cert_sans_and_chain(pki: dict[str, Path]) -> None:
    srv = pki["srv"]
    assert _mode(srv / "server.key") == 0o600
    cert = x509.load_pem_x509_certificate((srv / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.test"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # Verified the way a TLS client does: chain to the CA, name in the SANs.
    verify_server_cert(srv / "server.pem", pki["ca"] / "ca.crt", "superlink.test")
    verify_server_cert(srv / "server.pem", pki["ca"] / "ca.crt", "127.0.0.1")
    with pytest.raises(UserError, match="not valid for other.test"):
        verify_server_cert(srv / "server.pem", pki["ca"] / "ca.crt", "other.test")
    # Independent check with openssl when available.
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki["ca"] / "ca.crt"), str(srv / "server.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_server_cert_signed_by_other_ca_fails(pki: dict[str, Path], tmp_path: Path) -> None:
    create_ca(tmp_path / "other")
    with pytest.raises(UserError, match="not valid"):
        verify_server_cert(pki["srv"] / "server.pem", tmp_path / "other" / "ca.crt", "127.0.0.1")


def test_server_cert_always_covers_loopback(pki: dict[str, Path], tmp_path: Path) -> None:
    # The SuperLink's own flower-superexec connects over 127.0.0.1 with the same CA.
    sc = issue_server_cert(pki["ca"], tmp_path / "s", ["superlink.example.org"], [])
    assert sc.ips == ("127.0.0.1",)
    verify_server_cert(sc.cert_path, pki["ca"] / "ca.crt", "127.0.0.1")
    bare = issue_server_cert(pki["ca"], tmp_path / "b", ["x.test"], [], include_loopback=False)
    assert bare.ips == ()


def test_server_cert_needs_names_and_valid_ips(pki: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="at least one"):
        issue_server_cert(pki["ca"], tmp_path / "s2", [], [])
    with pytest.raises(UserError, match="not an IP address"):
        issue_server_cert(pki["ca"], tmp_path / "s3", [], ["superlink.test"])
    with pytest.raises(UserError, match="create the CA first"):
        issue_server_cert(tmp_path / "missing", tmp_path / "s4", ["a"], [])


def test_refuses_to_overwrite_keys_then_backs_up_with_force(tmp_path: Path) -> None:
    first = create_ca(tmp_path / "ca")
    old_key = first.key_path.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        create_ca(tmp_path / "ca")
    assert first.key_path.read_bytes() == old_key  # untouched by the refusal
    create_ca(tmp_path / "ca", force=True)
    backups = sorted((tmp_path / "ca").glob("ca.key.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == old_key
    assert _mode(backups[0]) == 0o600
    assert first.key_path.read_bytes() != old_key


def test_node_key_openssh_format_and_fingerprint(tmp_path: Path) -> None:
    nk = generate_node_key(tmp_path / "keys", "hospital-a")
    assert nk.private_path.name == "hospital-a.key" and _mode(nk.private_path) == 0o600
    priv = serialization.load_ssh_private_key(nk.private_path.read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey)
    pub_line = nk.public_path.read_text().strip()
    assert pub_line.startswith("ecdsa-sha2-nistp384 ") and pub_line.endswith(" hospital-a")
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", nk.fingerprint)
    blob = base64.b64decode(pub_line.split()[1])
    expected = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert nk.fingerprint == f"SHA256:{expected}"
    assert check_node_public_key(nk.public_path) == nk.fingerprint
    keygen = subprocess.run(
        ["ssh-keygen", "-lf", str(nk.public_path)], capture_output=True, text=True, check=False
    )
    if keygen.returncode == 0:  # ssh-keygen present: same fingerprint as OpenSSH computes
        assert nk.fingerprint in keygen.stdout
    with pytest.raises(UserError, match="refusing to overwrite"):
        generate_node_key(tmp_path / "keys", "hospital-a")


def test_public_key_check_rejects_private_and_non_ec(tmp_path: Path) -> None:
    nk = generate_node_key(tmp_path, "s")
    with pytest.raises(UserError, match="PRIVATE key"):
        check_node_public_key(nk.private_path)
    rsa = tmp_path / "rsa.pub"
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod

    k = rsa_mod.generate_private_key(public_exponent=65537, key_size=2048)
    rsa.write_bytes(
        k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(UserError, match="EC key"):
        check_node_public_key(rsa)


def test_rotate_keeps_ca_and_silo_keys(pki: dict[str, Path], tmp_path: Path) -> None:
    nk = generate_node_key(tmp_path / "silo", "hospital-a")
    before = {
        p: p.read_bytes()
        for p in [pki["ca"] / "ca.crt", pki["ca"] / "ca.key", nk.private_path, nk.public_path]
    }
    old_cert = (pki["srv"] / "server.pem").read_bytes()
    old_key = (pki["srv"] / "server.key").read_bytes()
    rotated = rotate_server_cert(pki["ca"], pki["srv"])
    assert {p: p.read_bytes() for p in before} == before
    assert (pki["srv"] / "server.key").read_bytes() != old_key  # new key
    assert rotated.dns_names == ("superlink.test",) and rotated.ips == ("127.0.0.1",)
    assert _mode(pki["srv"] / "server.key") == 0o600
    backups = {p.name.split(".bak-")[0]: p for p in pki["srv"].glob("*.bak-*")}
    assert backups["server.pem"].read_bytes() == old_cert
    assert backups["server.key"].read_bytes() == old_key
    verify_server_cert(pki["srv"] / "server.pem", pki["ca"] / "ca.crt", "superlink.test")


def test_show_reports_sans_and_expiry(pki: dict[str, Path], tmp_path: Path) -> None:
    text = show_path(pki["srv"] / "server.pem")
    assert "DNS:superlink.test" in text and "IP:127.0.0.1" in text
    assert re.search(r"valid until: \d{4}-\d\d-\d\d .*\((364|365) days left\)", text)
    assert "(CA)" in show_path(pki["ca"] / "ca.crt")
    key_text = show_path(pki["srv"] / "server.key")
    assert "not shown" in key_text and "BEGIN" not in key_text


def test_show_flags_expired(tmp_path: Path) -> None:
    from certs.show import describe_cert

    create_ca(tmp_path / "ca", days=1)
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    d = describe_cert(cert, now=later)
    assert d["expired"] is True and d["days_left"] < 0


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, srv, silo = tmp_path / "ca", tmp_path / "srv", tmp_path / "silo"
    assert main(["certs", "ca", "--out", str(ca)]) == 0
    out = capsys.readouterr().out
    assert "fingerprint" in out and "PRIVATE" not in out
    assert main(["certs", "server", "--ca-dir", str(ca), "--out", str(srv),
                 "--dns", "localhost", "--ip", "127.0.0.1"]) == 0  # fmt: skip
    assert main(["certs", "node-key", "--out", str(silo), "--name", "lab-1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fingerprint: SHA256:\S+", out)
    assert (silo / "lab-1.key").read_text() not in out  # the private key is never printed
    assert main(["certs", "show", str(srv / "server.pem"), str(silo / "lab-1.pub")]) == 0
    out = capsys.readouterr().out
    assert "DNS:localhost" in out and "SHA256:" in out
    assert main(["certs", "ca", "--out", str(ca)]) == 2  # refused: exists
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["certs", "rotate-server", "--ca-dir", str(ca), "--server-dir", str(srv)]) == 0
    assert "previous file kept as" in capsys.readouterr().out
