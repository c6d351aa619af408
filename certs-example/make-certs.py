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
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 3650
DEMO_ORG = "DICOM TLS Gateway demo"

# The builders below are also the test suites' (tests/certgen.py loads this
# file), so the demo PKI and the test PKIs cannot drift apart: options cover
# what the tests need (no key usage, no EKU, extra extensions, other names).

#: Key usage of a CA certificate.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
#: Key usage of a TLS leaf: signatures (ECDHE) and RSA key transport (old suites).
LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
SERVER_AND_CLIENT = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_name(cn: str, org: str | None = DEMO_ORG) -> x509.Name:
    """``O=org, CN=cn``, or only ``CN=cn`` when ``org`` is ``None``."""
    attrs = [] if org is None else [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def general_names(
    dns: Sequence[str] = (), ips: Sequence[str] = (), uris: Sequence[str] = ()
) -> list[x509.GeneralName]:
    """Subject alternative names: DNS names, then IP addresses, then URIs."""
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    return names


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return now - dt.timedelta(days=1), now + dt.timedelta(days=VALID_DAYS)


def _certificate(
    signer: rsa.RSAPrivateKey,
    issuer: x509.Name,
    key: rsa.RSAPrivateKey,
    subject: x509.Name,
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    basic: x509.BasicConstraints,
    key_usage: x509.KeyUsage | None,
    extensions: Sequence[x509.ExtensionType],
) -> x509.Certificate:
    """Sign ``key``'s certificate: basic constraints and key usage critical, the rest not."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(basic, critical=True)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA256())


def build_ca(
    key: rsa.RSAPrivateKey,
    subject: x509.Name,
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    path_length: int | None = 0,
    key_usage: bool = True,
) -> x509.Certificate:
    """A self-signed CA certificate for ``key``."""
    return _certificate(
        key,
        subject,
        key,
        subject,
        not_before,
        not_after,
        basic=x509.BasicConstraints(ca=True, path_length=path_length),
        key_usage=CA_KEY_USAGE if key_usage else None,
        extensions=[x509.SubjectKeyIdentifier.from_public_key(key.public_key())],
    )


def build_leaf(
    ca_key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    key: rsa.RSAPrivateKey,
    subject: x509.Name,
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    sans: Sequence[x509.GeneralName] = (),
    eku: Sequence[x509.ObjectIdentifier] | None = SERVER_AND_CLIENT,
    key_usage: bool = True,
    subject_key_id: bool = False,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """A leaf certificate for ``key`` signed by ``ca_key``.

    No EKU extension when ``eku`` is empty or ``None`` (usable for anything), no
    SAN extension when ``sans`` is empty; ``extensions`` are added non-critical.
    """
    optional: list[x509.ExtensionType] = []
    if eku:
        optional.append(x509.ExtendedKeyUsage(list(eku)))
    if subject_key_id:
        optional.append(x509.SubjectKeyIdentifier.from_public_key(key.public_key()))
    optional.append(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()))
    if sans:
        optional.append(x509.SubjectAlternativeName(list(sans)))
    return _certificate(
        ca_key,
        issuer,
        key,
        subject,
        not_before,
        not_after,
        basic=x509.BasicConstraints(ca=False, path_length=None),
        key_usage=LEAF_KEY_USAGE if key_usage else None,
        extensions=[*optional, *extensions],
    )


def make_ca(cn: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A demo CA: a new key and its self-signed certificate."""
    key = new_key()
    return key, build_ca(key, make_name(cn), *_validity())


def make_leaf(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    sans: list[x509.GeneralName],
    *,
    server: bool,
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A leaf certificate for TLS server (and client) or client-only authentication."""
    key = new_key()
    eku = SERVER_AND_CLIENT if server else (ExtendedKeyUsageOID.CLIENT_AUTH,)
    cert = build_leaf(ca_key, ca_cert.subject, key, make_name(cn), *_validity(), sans=sans, eku=eku)
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of a key, encrypted when ``password`` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    """Write an unencrypted key readable by its owner only."""
    path.write_bytes(key_pem(key))
    path.chmod(0o600)
    return path


def write_pair(
    out: Path, stem: str, key: rsa.RSAPrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    """Write ``stem.pem`` and ``stem.key`` into ``out``; return (cert path, key path)."""
    cert_path = out / f"{stem}.pem"
    cert_path.write_bytes(cert_pem(cert))
    return cert_path, write_key(key, out / f"{stem}.key")


def main(argv: list[str]) -> int:
    """Write the demo PKI into the given directory (default: next to this script)."""
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)

    dns = x509.DNSName
    uri = x509.UniformResourceIdentifier
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))

    def server(ca_key: rsa.RSAPrivateKey, ca: x509.Certificate, stem: str, name: str) -> None:
        # Servers also answer as localhost / 127.0.0.1, so the demo works locally.
        sans = [dns("localhost"), loopback, dns(name)]
        write_pair(out, stem, *make_leaf(ca_key, ca, name, sans, server=True))

    ca_key, ca = make_ca("Demo DICOM Gateway CA")
    write_pair(out, "ca", ca_key, ca)
    server(ca_key, ca, "gateway", "gateway.example.org")
    k, c = make_leaf(ca_key, ca, "pacs-a.example.org", [dns("pacs-a.example.org")], server=True)
    write_pair(out, "pacs-a", k, c)
    k, c = make_leaf(ca_key, ca, "CT01", [uri("dicom-ae:CT01")], server=False)
    write_pair(out, "modality", k, c)

    bca_key, bca = make_ca("Demo Backend PACS CA")
    write_pair(out, "backend-ca", bca_key, bca)
    server(bca_key, bca, "backend", "pacs.internal")
    print(f"demo certificates written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
