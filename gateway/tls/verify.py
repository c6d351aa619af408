"""Route-level verification material, prepared once per configuration generation.

The handshake only gathers evidence; a route, known after the A-ASSOCIATE-RQ,
verifies the client's chain against *its own* trust bundle and CRLs
(DESIGN.md §3). Parsing trust files, CRLs and thumbprints is done here at load
time — a bad file is a startup error naming the file, never a surprise during
an association — and the objects are immutable afterwards, so one
:class:`RouteVerifier` serves every association of its route concurrently.

Chain verification uses pyOpenSSL's ``X509Store``/``X509StoreContext`` (the
same OpenSSL code path as the handshake, so "certificate has expired" reads
the same in both places) with ``cryptography`` CRLs.
"""

from __future__ import annotations

import datetime as _dt
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto

from gateway.errors import CertificateError
from gateway.tls.certs import (
    fingerprint_bytes,
    key_strength_problem,
    load_certificates,
    parse_thumbprint,
    thumbprint,
)

__all__ = [
    "STRICT_KEY_PROFILES",
    "ChainResult",
    "RouteVerifier",
    "build_route_verifier",
    "issued_by",
    "key_strength_problem",
    "leaf_summary",
    "load_crls",
]

#: Profiles whose certificate minimums (RSA ≥ 2048, ECC ≥ 256, SHA-256+) are
#: enforced on our own certificates at load and on peers' by the route policy.
STRICT_KEY_PROFILES = frozenset({"bcp195-rfc8996-mod"})

# OpenSSL X509_V_ERR_* codes that come from revocation checking, so the
# operator reads "crl" rather than "chain" as the failed check.
_CRL_ERRORS = frozenset({
    3,   # unable to get certificate CRL
    6,   # unable to decrypt CRL's signature
    8,   # CRL signature failure
    11,  # CRL is not yet valid
    12,  # CRL has expired
    15,  # format error in CRL's lastUpdate field
    16,  # format error in CRL's nextUpdate field
    23,  # certificate revoked
    33,  # unable to get CRL issuer certificate
    35,  # key usage does not include CRL signing
    44,  # different CRL scope
})


@dataclass(frozen=True)
class ChainResult:
    """Outcome of verifying a presented chain; ``crl`` marks revocation failures."""

    ok: bool
    error: str | None = None
    crl: bool = False


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Load every CRL in a PEM (one or many) or DER file; CertificateError names the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read CRL file ({exc.strerror})") from None
    crls: list[x509.CertificateRevocationList] = []
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            marker = b"-----BEGIN X509 CRL-----"
            for part in data.split(marker)[1:]:
                crls.append(x509.load_pem_x509_crl(marker + part))
        else:
            crls.append(x509.load_der_x509_crl(data))
    except ValueError as exc:
        raise CertificateError(f"{path}: not a certificate revocation list ({exc})") from None
    return crls


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s name and key produced ``cert``'s signature."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _eku_allows_client(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return (ExtendedKeyUsageOID.CLIENT_AUTH in eku
            or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku)


@dataclass(frozen=True)
class RouteVerifier:
    """A route's trust anchors, CRLs and pinned thumbprints, ready to use.

    ``store`` is None when no trust bundle applies (verify = "thumbprint"/"none"
    on a listener without trust): then no chain can be verified.
    """

    trust: Path | None
    store: crypto.X509Store | None = field(repr=False)
    anchors: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    crl_files: tuple[Path, ...] = ()
    pins: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    #: True when this verifier would repeat exactly what the handshake already
    #: checked (the listener's own trust, no CRLs): a verified handshake then
    #: stands, and the per-association cost of a second chain walk is saved.
    same_as_handshake: bool = False

    def verify_chain(self, chain: Sequence[x509.Certificate]) -> ChainResult:
        """Verify ``chain`` (leaf first, then what the client sent) now."""
        if not chain:
            return ChainResult(False, "client presented no certificate")
        if self.store is None:
            return ChainResult(False, "no trust bundle configured for this route")
        leaf, *rest = chain
        ctx = crypto.X509StoreContext(
            self.store,
            crypto.X509.from_cryptography(leaf),
            [crypto.X509.from_cryptography(c) for c in rest],
        )
        try:
            ctx.verify_certificate()
        except crypto.X509StoreContextError as exc:
            # pyOpenSSL reports [error code, depth, OpenSSL's text].
            errors = list(exc.errors)
            code = int(errors[0]) if errors else 0
            depth = errors[1] if len(errors) > 1 else 0
            text = str(errors[2]) if len(errors) > 2 else str(exc)
            return ChainResult(False, f"{text} (depth {depth})", crl=int(code) in _CRL_ERRORS)
        if not _eku_allows_client(leaf):
            return ChainResult(False, "certificate is not usable for TLS client authentication "
                                      "(extended key usage lacks clientAuth)")
        return ChainResult(True)

    def thumbprint_matches(self, leaf: x509.Certificate) -> bool:
        """True when ``leaf`` matches one of the pinned thumbprints (constant time)."""
        return any(hmac.compare_digest(fingerprint_bytes(leaf, algo), digest)
                   for algo, digest in self.pins)

    def issuer_of(
        self, leaf: x509.Certificate, presented: Sequence[x509.Certificate] = ()
    ) -> x509.Certificate | None:
        """The certificate that signed ``leaf``: from the client's chain, else our anchors."""
        for cand in (*presented, *self.anchors):
            if cand is not leaf and issued_by(leaf, cand):
                return cand
        return None

    def describe(self) -> str:
        """Short text for ``dicom-gateway check``: which trust, CRLs and pins apply."""
        parts = [f"trust {self.trust.name}" if self.trust else "no trust bundle"]
        if self.crl_files:
            parts.append("crl " + ",".join(p.name for p in self.crl_files))
        if self.pins:
            parts.append(f"{len(self.pins)} thumbprint(s)")
        return ", ".join(parts)


def build_route_verifier(
    trust: Path | None,
    crl_files: Sequence[Path] = (),
    thumbprints: Sequence[str] = (),
    *,
    now: _dt.datetime | None = None,
) -> RouteVerifier:
    """Parse trust, CRLs and thumbprints now; raise CertificateError naming the bad one.

    ``now`` only decides whether a stale CRL is worth a load-time error: an
    expired CRL would reject every client, which an operator must see at once.
    """
    pins = []
    for text in thumbprints:
        try:
            pins.append(parse_thumbprint(text))
        except ValueError as exc:
            raise CertificateError(str(exc)) from None
    store: crypto.X509Store | None = None
    anchors: list[x509.Certificate] = []
    if trust is not None:
        store = crypto.X509Store()
        if trust.is_dir():
            try:
                store.load_locations(None, str(trust))
            except crypto.Error as exc:
                raise CertificateError(f"{trust}: cannot use trust directory ({exc})") from None
        else:
            anchors = load_certificates(trust)
            if not anchors:
                raise CertificateError(f"{trust}: trust file holds no certificate")
            for cert in anchors:
                store.add_cert(crypto.X509.from_cryptography(cert))
    if crl_files:
        if store is None:
            raise CertificateError(
                f"{crl_files[0]}: a CRL needs a trust bundle to check it against (set trust)"
            )
        t = now or _dt.datetime.now(_dt.timezone.utc)
        for path in crl_files:
            for crl in load_crls(path):
                signer = next((a for a in anchors if a.subject == crl.issuer), None)
                if anchors and signer is None:
                    raise CertificateError(
                        f"{path}: CRL issuer {crl.issuer.rfc4514_string()} is not in the "
                        f"trust bundle {trust}"
                    )
                if signer is not None and not crl.is_signature_valid(signer.public_key()):
                    raise CertificateError(f"{path}: CRL signature does not verify with "
                                           f"{signer.subject.rfc4514_string()}")
                nxt = crl.next_update_utc
                if nxt is not None and nxt < t:
                    raise CertificateError(
                        f"{path}: CRL expired on {nxt:%Y-%m-%d %H:%M:%SZ} "
                        "(every client would be refused); publish a fresh one"
                    )
                store.add_crl(crl)
        # Revocation of the client's own certificate; intermediate CAs are
        # checked by their issuer's CRL only when the operator lists one for
        # every level (CRL_CHECK_ALL would refuse chains lacking any).
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    return RouteVerifier(
        trust=trust,
        store=store,
        anchors=tuple(anchors),
        crl_files=tuple(crl_files),
        pins=tuple(pins),
    )


def leaf_summary(cert: x509.Certificate) -> str:
    """``subject …, sha256 …`` for messages about a client certificate."""
    return f"subject {cert.subject.rfc4514_string()}, sha256 {thumbprint(cert)}"
