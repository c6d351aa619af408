#!/usr/bin/env python3
"""Generate the demo PKI shipped in certs-example/ (DEMO ONLY: the keys are public).

Usage: python certs-example/make-certs.py [OUTPUT_DIR]

Writes, all RSA-2048 / SHA-256, valid 10 years:

* ca.pem, ca.key                   demo CA for the gateway and its clients
* gateway.pem, gateway.key         gateway server cert (localhost, 127.0.0.1, gateway.example.org)
* pacs-a.pem, pacs-a.key           second server identity, chosen by SNI (pacs-a.example.org)
* modality.pem, modality.key       client cert, CN CT01, SAN URI dicom-ae:CT01
* backend-ca.pem, backend-ca.key   a separate CA for the backend side
* backend.pem, backend.key         backend server cert (localhost, 127.0.0.1, pacs.internal)

Needs only the ``cryptography`` package; no network.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 3650


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str, org: str = "DICOM TLS Gateway demo") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return now - dt.timedelta(days=1), now + dt.timedelta(days=VALID_DAYS)


def make_ca(cn: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A self-signed CA certificate."""
    key = _key()
    start, end = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    sans: list[x509.GeneralName],
    *,
    server: bool,
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A leaf certificate for TLS server (and client) or client-only authentication."""
    key = _key()
    start, end = _validity()
    eku = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if server
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(out: Path, stem: str, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


def main(argv: list[str]) -> int:
    """Write the demo PKI into the given directory (default: next to this script)."""
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)

    dns = x509.DNSName
    ip = x509.IPAddress
    uri = x509.UniformResourceIdentifier
    loopback = ip(ipaddress.ip_address("127.0.0.1"))

    ca_key, ca = make_ca("Demo DICOM Gateway CA")
    _write(out, "ca", ca_key, ca)
    k, c = make_leaf(
        ca_key,
        ca,
        "gateway.example.org",
        [dns("localhost"), loopback, dns("gateway.example.org")],
        server=True,
    )
    _write(out, "gateway", k, c)
    k, c = make_leaf(ca_key, ca, "pacs-a.example.org", [dns("pacs-a.example.org")], server=True)
    _write(out, "pacs-a", k, c)
    k, c = make_leaf(ca_key, ca, "CT01", [uri("dicom-ae:CT01")], server=False)
    _write(out, "modality", k, c)

    bca_key, bca = make_ca("Demo Backend PACS CA")
    _write(out, "backend-ca", bca_key, bca)
    k, c = make_leaf(
        bca_key,
        bca,
        "pacs.internal",
        [dns("localhost"), loopback, dns("pacs.internal")],
        server=True,
    )
    _write(out, "backend", k, c)
    print(f"demo certificates written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
