"""Certificate loading, thumbprints, names and identity checks."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import CertificateError
from gateway.tls.certs import (
    CertStatus,
    certificate_names,
    check_identity,
    describe,
    load_certificates,
    load_pkcs12,
    load_private_key,
    parse_thumbprint,
    thumbprint,
)
from tests.tls_helpers import NOW, get_pki, key_for, key_pem, make_leaf, pem

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------
# Loading


def test_load_pem_bundle_der_and_pkcs12_by_content(tmp_path: Path) -> None:
    pki = get_pki()
    bundle = tmp_path / "bundle.der"  # extension lies: content is PEM
    bundle.write_bytes(pem(pki.server_cert) + pem(pki.ca_cert))
    assert load_certificates(bundle) == [pki.server_cert, pki.ca_cert]

    der = tmp_path / "server.pem"  # extension lies: content is DER
    der.write_bytes(pki.server_cert.public_bytes(serialization.Encoding.DER))
    assert load_certificates(der) == [pki.server_cert]

    p12 = tmp_path / "id.pem"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"x",
            key_for("server"),
            pki.server_cert,
            [pki.ca_cert],
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    assert load_certificates(p12, b"pw") == [pki.server_cert, pki.ca_cert]
    key, cert, chain = load_pkcs12(p12, b"pw")
    assert cert == pki.server_cert and chain == [pki.ca_cert]
    assert key.public_key().public_numbers() == key_for("server").public_key().public_numbers()  # type: ignore[union-attr]
    with pytest.raises(CertificateError, match=r"id\.pem: cannot open the PKCS#12 bundle"):
        load_pkcs12(p12, b"wrong")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"hello, I am not a certificate")
    with pytest.raises(CertificateError, match=r"junk\.pem: not a certificate"):
        load_certificates(junk)
    key_only = tmp_path / "key-only.pem"
    key_only.write_bytes(key_pem(key_for("server")))
    with pytest.raises(CertificateError, match=r"key-only\.pem: not a certificate"):
        load_certificates(key_only)
    with pytest.raises(CertificateError, match=r"absent\.pem: certificate file not found"):
        load_certificates(tmp_path / "absent.pem")
    with pytest.raises(CertificateError, match=r"junk\.pem: not a readable private key"):
        load_private_key(junk)


def test_load_private_key_passwords(tmp_path: Path) -> None:
    enc = tmp_path / "enc.key"
    enc.write_bytes(key_pem(key_for("server"), b"pw"))
    load_private_key(enc, b"pw")
    expected = r"enc\.key: private key unreadable \(wrong password"
    with pytest.raises(CertificateError, match=expected):
        load_private_key(enc, b"bad")
    with pytest.raises(CertificateError, match="encrypted and no password"):
        load_private_key(enc, None)
    der = tmp_path / "key.der"
    der.write_bytes(
        key_for("a").private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    load_private_key(der)


# ----------------------------------------------------------------------
# Thumbprints


def test_thumbprint_format() -> None:
    cert = get_pki().server_cert
    tp = thumbprint(cert)
    assert len(tp) == 32 * 3 - 1 and tp == tp.upper() and tp.count(":") == 31
    assert len(thumbprint(cert, "sha1")) == 20 * 3 - 1


def test_parse_thumbprint_forms() -> None:
    cert = get_pki().server_cert
    tp = thumbprint(cert)
    digest = bytes.fromhex(tp.replace(":", ""))
    assert parse_thumbprint(f"sha256:{tp}") == ("sha256", digest)
    assert parse_thumbprint(f"SHA256:{tp.lower()}") == ("sha256", digest)
    assert parse_thumbprint(tp.replace(":", "")) == ("sha256", digest)
    assert parse_thumbprint(tp.replace(":", " ")) == ("sha256", digest)
    assert parse_thumbprint("  " + tp + "  ") == ("sha256", digest)
    sha1 = thumbprint(cert, "sha1")
    assert parse_thumbprint(sha1.replace(":", "")) == ("sha1", bytes.fromhex(sha1.replace(":", "")))
    assert parse_thumbprint("sha1:" + sha1)[0] == "sha1"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("sha256:", "empty"),
        ("AB:CD:EF", "expected 64"),
        ("zz" * 32, "not a hex digit"),
        ("A" * 63, "odd number"),
        ("sha256:" + "AB" * 20, "needs 64 hex digits"),
        ("sha1:" + "AB" * 32, "needs 40 hex digits"),
        ("md5:" + "AB" * 16, "unknown hash 'md5'"),
        ("sha-256:" + "AB" * 20, "needs 64 hex digits"),
    ],
)
def test_parse_thumbprint_errors(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_thumbprint(text)


# ----------------------------------------------------------------------
# Names


def test_certificate_names_and_describe() -> None:
    pki = get_pki()
    names = certificate_names(pki.client_cert)
    assert names.common_name == "CT01"
    assert names.uris == ("dicom-ae:CT01",)
    assert names.ae_titles == ("CT01",)
    server = certificate_names(pki.server_cert)
    assert server.dns == ("localhost",) and server.ips == ("127.0.0.1",)
    line = describe(pki.server_cert)
    assert "subject CN=localhost" in line and "issuer CN=Test CA" in line
    assert "DNS:localhost" in line and "IP:127.0.0.1" in line
    assert thumbprint(pki.server_cert) in line and "\n" not in line


# ----------------------------------------------------------------------
# check_identity


def _write_leaf(tmp_path: Path, stem: str, **kw: object) -> tuple[Path, Path]:
    pki = get_pki()
    cert = make_leaf(key_for("ca"), pki.ca_cert, stem, key_for("server"), dns=("x.example",), **kw)  # type: ignore[arg-type]
    c = tmp_path / f"{stem}.pem"
    c.write_bytes(pem(cert))
    return c, pki.server_key


def levels(statuses: list[CertStatus]) -> list[str]:
    return [s.level for s in statuses]


def test_check_identity_ok() -> None:
    pki = get_pki()
    st = check_identity(pki.server, pki.server_key)
    assert levels(st) == ["ok"]
    assert "OK" in st[0].message and "sha256" in st[0].message and str(pki.server) in st[0].message


def test_check_identity_no_certificate() -> None:
    assert check_identity(None, None) == [CertStatus("error", "no certificate configured")]


def test_check_identity_missing_files(tmp_path: Path) -> None:
    pki = get_pki()
    st = check_identity(tmp_path / "gone.pem", pki.server_key)
    assert levels(st) == ["error"] and "gone.pem: certificate file not found" in st[0].message
    st = check_identity(pki.server, tmp_path / "gone.key")
    assert levels(st) == ["error"] and "gone.key: private key file not found" in st[0].message


def test_check_identity_not_a_certificate(tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("not a cert")
    st = check_identity(junk, get_pki().server_key)
    assert levels(st) == ["error"] and "junk.crt: not a certificate" in st[0].message


def test_check_identity_wrong_password(tmp_path: Path) -> None:
    pki = get_pki()
    enc = tmp_path / "enc.key"
    enc.write_bytes(key_pem(key_for("server"), b"right"))
    st = check_identity(pki.server, enc, password=b"wrong")
    assert st[0].level == "error"
    assert "enc.key: private key unreadable" in st[0].message and "wrong password" in st[0].message
    st = check_identity(pki.server, enc)  # no password at all
    assert "enc.key: private key unreadable" in st[0].message
    assert levels(check_identity(pki.server, enc, password=b"right")) == ["ok"]


def test_check_identity_mismatched_key() -> None:
    pki = get_pki()
    st = check_identity(pki.server, pki.a_key)
    assert st[0].level == "error" and "does not match certificate" in st[0].message
    assert "a.key" in st[0].message


def test_check_identity_expired(tmp_path: Path) -> None:
    c, k = _write_leaf(
        tmp_path,
        "expired",
        not_before=NOW - dt.timedelta(days=400),
        not_after=NOW - dt.timedelta(days=2),
    )
    st = check_identity(c, k)
    assert levels(st) == ["error"] and "expired.pem: certificate expired on" in st[0].message


def test_check_identity_not_yet_valid(tmp_path: Path) -> None:
    c, k = _write_leaf(
        tmp_path,
        "future",
        not_before=NOW + dt.timedelta(days=2),
        not_after=NOW + dt.timedelta(days=400),
    )
    st = check_identity(c, k)
    assert levels(st) == ["error"] and "future.pem: certificate not yet valid" in st[0].message


def test_check_identity_expires_soon(tmp_path: Path) -> None:
    c, k = _write_leaf(tmp_path, "soon", not_after=NOW + dt.timedelta(days=10, hours=1))
    st = check_identity(c, k)
    assert levels(st) == ["warning", "ok"]
    assert "soon.pem: certificate expires in 10 days" in st[0].message


def test_check_identity_client_only_eku_as_server(tmp_path: Path) -> None:
    pki = get_pki()
    st = check_identity(pki.client, pki.client_key, purpose="server")
    assert levels(st) == ["error"]
    assert "not usable for TLS server authentication" in st[0].message
    assert "clientAuth" in st[0].message
    assert levels(check_identity(pki.client, pki.client_key, purpose="client")) == ["ok"]
    # No EKU at all: usable for anything.
    c, k = _write_leaf(tmp_path, "noeku", eku=None)
    assert levels(check_identity(c, k)) == ["ok"]
    c, k = _write_leaf(tmp_path, "srv", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    assert levels(check_identity(c, k, purpose="client"))[0] == "error"


# ----------------------------------------------------------------------
# The shipped example PKI


def test_make_certs_script(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "certs-example" / "make-certs.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for stem in ("gateway", "pacs-a", "backend"):
        assert levels(check_identity(tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key")) == ["ok"]
    assert levels(
        check_identity(tmp_path / "modality.pem", tmp_path / "modality.key", purpose="client")
    ) == ["ok"]
    names = certificate_names(load_certificates(tmp_path / "gateway.pem")[0])
    assert set(names.dns) == {"localhost", "gateway.example.org"} and names.ips == ("127.0.0.1",)
    modality = certificate_names(load_certificates(tmp_path / "modality.pem")[0])
    assert modality.common_name == "CT01" and modality.ae_titles == ("CT01",)
    backend = load_certificates(tmp_path / "backend.pem")[0]
    assert backend.issuer == load_certificates(tmp_path / "backend-ca.pem")[0].subject


def test_shipped_example_files_are_consistent() -> None:
    d = REPO / "certs-example"
    if not (d / "gateway.pem").exists():
        pytest.skip("example certificates not generated")
    status = levels(check_identity(d / "gateway.pem", d / "gateway.key"))
    assert status in (["ok"], ["warning", "ok"])
    ca = load_certificates(d / "ca.pem")[0]
    assert load_certificates(d / "gateway.pem")[0].issuer == ca.subject
