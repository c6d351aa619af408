"""Loading and inspecting certificates, keys and thumbprints.

Formats are recognised by content, never by file extension: operators rename
files, and a ``.crt`` may be PEM, DER or even a PKCS#12 bundle. Every error
is a :class:`~gateway.errors.CertificateError` whose message names the file
and says what is wrong with it.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import CertificateError

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "CertNames",
    "CertStatus",
    "certificate_names",
    "check_identity",
    "describe",
    "is_pkcs12",
    "key_strength_problem",
    "load_certificates",
    "load_identity",
    "load_pkcs12",
    "load_private_key",
    "parse_thumbprint",
    "thumbprint",
]

#: A certificate expiring sooner than this is reported as a warning.
EXPIRY_WARNING_DAYS = 30

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


# ----------------------------------------------------------------------
# Reading files


def _read(path: Path | str, what: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{p}: {what} file not found") from None
    except IsADirectoryError:
        raise CertificateError(f"{p}: is a directory, expected a {what} file") from None
    except OSError as exc:
        raise CertificateError(f"{p}: cannot read {what} file ({exc.strerror})") from exc


def is_pkcs12(data: bytes) -> bool:
    """True when ``data`` looks like a DER PKCS#12 ``PFX`` (SEQUENCE then INTEGER 3)."""
    if len(data) < 8 or data[0] != 0x30:
        return False
    # Skip the outer SEQUENCE length (short or long form).
    n = data[1]
    pos = 2 if n < 0x80 else 2 + (n & 0x7F)
    return data[pos : pos + 3] == b"\x02\x01\x03"


def _is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


def load_certificates(path: Path | str, password: bytes | None = None) -> list[x509.Certificate]:
    """Load every certificate in a PEM (one or many), DER or PKCS#12 file.

    For PKCS#12 the leaf comes first, then the bundled chain. Raises
    :class:`CertificateError` when the file holds no certificate.
    """
    p = Path(path)
    data = _read(p, "certificate")
    if _is_pem(data):
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            if b"-----BEGIN CERTIFICATE-----" in data:
                raise CertificateError(f"{p}: damaged PEM certificate ({exc})") from exc
            raise CertificateError(
                f"{p}: not a certificate (PEM without a CERTIFICATE block)"
            ) from None
        return certs
    if is_pkcs12(data):
        _key, cert, chain = _parse_pkcs12(p, data, password)
        return ([cert] if cert is not None else []) + chain
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise CertificateError(f"{p}: not a certificate (neither PEM, DER nor PKCS#12)") from None


def _parse_pkcs12(
    p: Path, data: bytes, password: bytes | None
) -> tuple[PrivateKeyTypes | None, x509.Certificate | None, list[x509.Certificate]]:
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, password)
    except ValueError as exc:
        if password is None:
            raise CertificateError(
                f"{p}: cannot open the PKCS#12 bundle without a password ({exc})"
            ) from exc
        raise CertificateError(
            f"{p}: cannot open the PKCS#12 bundle (wrong password?) ({exc})"
        ) from exc
    if cert is None and chain:
        cert, chain = chain[0], chain[1:]
    return key, cert, list(chain)


def load_pkcs12(
    path: Path | str, password: bytes | None
) -> tuple[PrivateKeyTypes, x509.Certificate, list[x509.Certificate]]:
    """Load ``(key, certificate, chain)`` from a PKCS#12 (.p12/.pfx) bundle."""
    p = Path(path)
    data = _read(p, "PKCS#12")
    if not is_pkcs12(data):
        raise CertificateError(f"{p}: not a PKCS#12 bundle")
    key, cert, chain = _parse_pkcs12(p, data, password)
    if cert is None:
        raise CertificateError(f"{p}: PKCS#12 bundle holds no certificate")
    if key is None:
        raise CertificateError(f"{p}: PKCS#12 bundle holds no private key")
    return key, cert, chain


def load_private_key(path: Path | str, password: bytes | None = None) -> PrivateKeyTypes:
    """Load a private key from PEM, DER or a PKCS#12 bundle (any of them encrypted)."""
    p = Path(path)
    data = _read(p, "private key")
    if is_pkcs12(data):
        key, _cert, _chain = _parse_pkcs12(p, data, password)
        if key is None:
            raise CertificateError(f"{p}: PKCS#12 bundle holds no private key")
        return key
    pem = _is_pem(data)
    if pem and b"PRIVATE KEY-----" not in data:
        raise CertificateError(f"{p}: no private key in this PEM file")
    try:
        if pem:
            return serialization.load_pem_private_key(data, password)
        return serialization.load_der_private_key(data, password)
    except TypeError as exc:
        # cryptography says TypeError for "encrypted but no password" and the reverse.
        if password is None:
            raise CertificateError(
                f"{p}: private key is encrypted and no password was given"
            ) from exc
        raise CertificateError(
            f"{p}: private key is not encrypted, but a password was given"
        ) from exc
    except ValueError as exc:
        if password is not None:
            raise CertificateError(f"{p}: private key unreadable (wrong password?)") from exc
        raise CertificateError(f"{p}: not a readable private key ({exc})") from exc
    except Exception as exc:  # unsupported algorithm and the like
        raise CertificateError(f"{p}: not a readable private key ({exc})") from exc


def load_identity(
    cert_path: Path | str, key_path: Path | str | None, password: bytes | None = None
) -> tuple[PrivateKeyTypes, x509.Certificate, list[x509.Certificate]]:
    """Load ``(key, leaf, chain)`` for a TLS identity.

    ``key_path`` None means the key is inside ``cert_path``: a PKCS#12 bundle,
    or a PEM holding both the certificate(s) and the key. The key is checked
    against the certificate.
    """
    cp = Path(cert_path)
    data = _read(cp, "certificate")
    if is_pkcs12(data):
        key, leaf, chain = load_pkcs12(cp, password)
    else:
        certs = load_certificates(cp)
        if not certs:
            raise CertificateError(f"{cp}: no certificate in this file")
        leaf, chain = certs[0], certs[1:]
        if key_path is None:
            if not (_is_pem(data) and b"PRIVATE KEY-----" in data):
                raise CertificateError(
                    f"{cp}: no private key configured and none found in the certificate file"
                )
            key = load_private_key(cp, password)
        else:
            key = load_private_key(key_path, password)
    if not _key_matches(key, leaf):
        where = key_path if key_path is not None else cp
        raise CertificateError(f"{where}: private key does not match certificate {cp}")
    return key, leaf, chain


def _key_matches(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    try:
        return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)
    except (ValueError, TypeError, AttributeError):
        return False


# ----------------------------------------------------------------------
# Thumbprints


def thumbprint(cert: x509.Certificate, algo: str = "sha256") -> str:
    """Return the certificate fingerprint as ``AB:CD:...`` (upper-case hex)."""
    try:
        h = _HASHES[algo.lower()]
    except KeyError:
        raise ValueError(f"unknown hash {algo!r}; use one of {', '.join(_HASHES)}") from None
    return cert.fingerprint(h()).hex(":").upper()


def parse_thumbprint(text: str) -> tuple[str, bytes]:
    """Parse ``sha256:AB:CD:...``, ``sha1:...`` or bare hex into ``(algo, digest)``.

    Bare hex of 64 digits is SHA-256, of 40 digits SHA-1. Case, colons and
    spaces do not matter. Raises ``ValueError`` saying what is wrong.
    """
    original = text
    s = text.strip()
    algo: str | None = None
    m = re.match(r"^([A-Za-z][A-Za-z0-9-]*)\s*[:=]\s*", s)
    # "AB:CD:..." also looks like "name:"; only a non-hex name is a hash prefix.
    if m and not re.fullmatch(r"[0-9a-fA-F]+", m.group(1)):
        algo = m.group(1).lower().replace("-", "")
        if algo not in _DIGEST_SIZES:
            raise ValueError(
                f"thumbprint {original!r}: unknown hash {m.group(1)!r}; use sha256 or sha1"
            )
        s = s[m.end() :]
    digits = re.sub(r"[\s:]", "", s)
    if not digits:
        raise ValueError(f"thumbprint {original!r} is empty")
    if not re.fullmatch(r"[0-9a-fA-F]+", digits):
        bad = next(c for c in digits if c not in "0123456789abcdefABCDEF")
        raise ValueError(f"thumbprint {original!r} contains {bad!r}, which is not a hex digit")
    if len(digits) % 2:
        raise ValueError(f"thumbprint {original!r} has an odd number of hex digits")
    size = len(digits) // 2
    if algo is None:
        by_size = {20: "sha1", 32: "sha256"}
        if size not in by_size:
            raise ValueError(
                f"thumbprint {original!r} has {len(digits)} hex digits; expected 64 (SHA-256) "
                "or 40 (SHA-1), or a prefix such as 'sha256:'"
            )
        algo = by_size[size]
    elif size != _DIGEST_SIZES[algo]:
        raise ValueError(
            f"thumbprint {original!r}: {algo} needs {_DIGEST_SIZES[algo] * 2} hex digits, "
            f"got {len(digits)}"
        )
    return algo, bytes.fromhex(digits)


def fingerprint_bytes(cert: x509.Certificate, algo: str) -> bytes:
    """Raw digest of the DER certificate with ``algo`` (sha1, sha256, ...)."""
    return cert.fingerprint(_HASHES[algo]())


# ----------------------------------------------------------------------
# Names and descriptions


@dataclass(frozen=True)
class CertNames:
    """The names a certificate carries."""

    common_name: str | None
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()

    @property
    def ae_titles(self) -> tuple[str, ...]:
        """AE titles from ``dicom-ae:`` style URI SANs (``dicom-ae:CT01``, ``dicom-ae://CT01``)."""
        out: list[str] = []
        for uri in self.uris:
            scheme, sep, rest = uri.partition(":")
            if sep and scheme.lower() in ("dicom-ae", "dicomae", "ae", "dicom"):
                out.append(rest.lstrip("/"))
        return tuple(out)

    def all_sans(self) -> tuple[str, ...]:
        """All SANs, each prefixed like OpenSSL prints them (``DNS:``, ``IP:``...)."""
        return (
            tuple(f"DNS:{d}" for d in self.dns)
            + tuple(f"IP:{i}" for i in self.ips)
            + tuple(f"URI:{u}" for u in self.uris)
            + tuple(f"email:{e}" for e in self.emails)
        )


def certificate_names(cert: x509.Certificate) -> CertNames:
    """Extract subject CN and the DNS, IP, URI and e-mail SANs."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = None
    if cns:
        value = cns[0].value
        cn = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return CertNames(common_name=cn)
    return CertNames(
        common_name=cn,
        dns=tuple(san.get_values_for_type(x509.DNSName)),
        ips=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
        uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        emails=tuple(san.get_values_for_type(x509.RFC822Name)),
    )


def _fmt_time(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%SZ")


def describe(cert: x509.Certificate) -> str:
    """One line: subject, issuer, SANs, not-after and SHA-256 thumbprint."""
    names = certificate_names(cert)
    sans = ", ".join(names.all_sans()) or "none"
    return (
        f"subject {cert.subject.rfc4514_string() or '(empty)'}; "
        f"issuer {cert.issuer.rfc4514_string() or '(empty)'}; "
        f"SANs {sans}; not after {_fmt_time(cert.not_valid_after_utc)}; "
        f"sha256 {thumbprint(cert)}"
    )


def key_strength_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert`` fails the B.13 minimums (RSA ≥ 2048, ECC ≥ 256, SHA-256+), or None."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        return f"RSA key of {key.key_size} bits (profile needs at least 2048)"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < 256:
        return f"EC key on {key.curve.name} (profile needs at least 256 bits)"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return None  # EdDSA carries its own hash
    algo = cert.signature_hash_algorithm
    if algo is None or algo.name not in ("sha256", "sha384", "sha512"):
        name = algo.name if algo is not None else "unknown"
        return f"signed with {name.upper()} (profile needs SHA-256 or stronger)"
    return None


# ----------------------------------------------------------------------
# Identity check (for `check-config` and startup)


@dataclass(frozen=True)
class CertStatus:
    """One finding about a configured identity."""

    level: Literal["ok", "warning", "error"]
    message: str


def _eku_problem(cert: x509.Certificate, purpose: str) -> str | None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    wanted = (
        ExtendedKeyUsageOID.SERVER_AUTH if purpose == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    if wanted in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        return None
    have = ", ".join(getattr(oid, "_name", None) or oid.dotted_string for oid in eku) or "none"
    return f"not usable for TLS {purpose} authentication (extended key usage: {have})"


def check_identity(
    cert_path: Path | str | None,
    key_path: Path | str | None,
    *,
    password: bytes | None = None,
    purpose: Literal["server", "client"] = "server",
    now: _dt.datetime | None = None,
    strict_keys: bool = False,
) -> list[CertStatus]:
    """Check a certificate + key pair and report every finding, worst first.

    ``key_path`` None means a PKCS#12 bundle or a PEM with the key inside.
    ``strict_keys`` adds the B.13 minimums (RSA ≥ 2048, ECC ≥ 256, SHA-256+).
    Never raises for a bad file: each problem is a :class:`CertStatus`.
    """
    if cert_path is None or str(cert_path) == "":
        return [CertStatus("error", "no certificate configured")]
    cp = Path(cert_path)
    if not cp.exists():
        return [CertStatus("error", f"{cp}: certificate file not found")]
    if key_path is not None and not Path(key_path).exists():
        return [CertStatus("error", f"{key_path}: private key file not found")]
    try:
        data = cp.read_bytes()
        if is_pkcs12(data):
            _k, leaf, _chain = load_pkcs12(cp, password)
        else:
            certs = load_certificates(cp)
            if not certs:
                return [CertStatus("error", f"{cp}: not a certificate (no certificate inside)")]
            leaf = certs[0]
    except CertificateError as exc:
        return [CertStatus("error", str(exc))]
    except OSError as exc:
        return [CertStatus("error", f"{cp}: cannot read certificate file ({exc.strerror})")]

    findings: list[CertStatus] = []
    try:
        load_identity(cp, key_path, password)
    except CertificateError as exc:
        msg = str(exc)
        if "wrong password" in msg or "no password" in msg or "not encrypted" in msg:
            kp = key_path if key_path is not None else cp
            detail = msg.split(": ", 1)[1] if ": " in msg else msg
            if detail.startswith("private key unreadable"):
                msg = f"{kp}: {detail}"
            else:
                msg = f"{kp}: private key unreadable ({detail}; wrong password?)"
        findings.append(CertStatus("error", msg))

    t = now or _dt.datetime.now(_dt.timezone.utc)
    nb = leaf.not_valid_before_utc
    na = leaf.not_valid_after_utc
    if t < nb:
        findings.append(
            CertStatus("error", f"{cp}: certificate not yet valid (valid from {_fmt_time(nb)})")
        )
    if t > na:
        findings.append(CertStatus("error", f"{cp}: certificate expired on {_fmt_time(na)}"))
    elif (na - t) < _dt.timedelta(days=EXPIRY_WARNING_DAYS):
        days = (na - t).days
        findings.append(
            CertStatus("warning", f"{cp}: certificate expires in {days} days ({_fmt_time(na)})")
        )
    eku = _eku_problem(leaf, purpose)
    if eku:
        findings.append(CertStatus("error", f"{cp}: {eku}"))
    weak = key_strength_problem(leaf) if strict_keys else None
    if weak:
        findings.append(
            CertStatus("error", f"{cp}: {weak}; profile bcp195-rfc8996-mod refuses it"))
    if not any(f.level == "error" for f in findings):
        findings.append(CertStatus("ok", f"{cp}: OK: {describe(leaf)}"))
    order = {"error": 0, "warning": 1, "ok": 2}
    return sorted(findings, key=lambda f: order[f.level])


def is_ip_address(text: str) -> bool:
    """True when ``text`` is an IPv4 or IPv6 literal (SNI must not carry those)."""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
