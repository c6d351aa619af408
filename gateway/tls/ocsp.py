"""OCSP: asking a responder whether a client certificate is revoked, and stapling.

Client-certificate checking (route ``ocsp = "soft" | "hard"``):

* the responder URL is the route's ``ocsp_responder`` or the certificate's
  Authority Information Access entry;
* the request is an HTTP/1.1 POST (RFC 6960 appendix A) over trio with h11,
  the whole exchange bounded by one timeout;
* the answer is trusted only when signed by the issuing CA or by a responder
  certificate that CA issued for OCSP signing, and only while it is fresh
  (``thisUpdate`` … ``nextUpdate``);
* answers are cached per (issuer key, serial) until their ``nextUpdate``, so a
  busy modality costs one request per validity period, not per association.

The outcome is one of good / revoked / unknown / unavailable; the route's
policy (:mod:`gateway.policy`) turns that into a decision.

Stapling (listener ``certificates[].staple``): a DER OCSP response read at
load time and handed to clients that send ``status_request``
(:func:`load_staple`, :func:`staple_callback`).
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h11
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from OpenSSL import SSL

from gateway.errors import CertificateError

__all__ = [
    "OCSPChecker",
    "OCSPResult",
    "OCSPStatus",
    "Staple",
    "build_request",
    "evaluate_response",
    "load_staple",
    "responder_url",
    "staple_callback",
]

#: Clock difference tolerated between us and the responder.
CLOCK_SKEW = _dt.timedelta(minutes=5)
#: How long an answer without nextUpdate is reused.
DEFAULT_TTL = _dt.timedelta(minutes=5)
#: An OCSP answer is a few KiB; anything far larger is not one.
MAX_RESPONSE_BYTES = 256 * 1024


class OCSPStatus(enum.Enum):
    """What OCSP said about a certificate."""

    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # the responder does not know this certificate
    UNAVAILABLE = "unavailable"  # no usable answer (down, slow, bad signature, stale)


@dataclass(frozen=True)
class OCSPResult:
    """One certificate's OCSP status, with enough detail for the log."""

    status: OCSPStatus
    detail: str
    responder: str | None = None
    next_update: _dt.datetime | None = None
    cached: bool = False


# ----------------------------------------------------------------------
# Pure parts: URL, request, response evaluation


def responder_url(cert: x509.Certificate, configured: str | None = None) -> str | None:
    """The configured responder, else the first OCSP URL in the certificate's AIA."""
    if configured:
        return configured
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
            desc.access_location, x509.UniformResourceIdentifier
        ):
            return desc.access_location.value
    return None


def build_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """DER OCSPRequest for ``cert``; SHA-1 CertID, which every responder understands."""
    # RFC 6960 §4.1.1 CertIDs name the hash; SHA-1 remains the interoperable
    # choice (it is an identifier here, not a signature).
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _key_hash(cert: x509.Certificate, algo: hashes.HashAlgorithm) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # CertID.issuerKeyHash hashes the BIT STRING contents of subjectPublicKey.
    h = hashes.Hash(algo)
    h.update(_spki_bit_string(spki))
    return h.finalize()


def _spki_bit_string(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING contents (without the unused-bits byte)."""

    def read_len(buf: bytes, pos: int) -> tuple[int, int]:
        n = buf[pos]
        if n < 0x80:
            return n, pos + 1
        k = n & 0x7F
        return int.from_bytes(buf[pos + 1 : pos + 1 + k], "big"), pos + 1 + k

    # SEQUENCE { AlgorithmIdentifier SEQUENCE, BIT STRING }
    _, pos = read_len(spki, 1)
    alg_len, alg_start = read_len(spki, pos + 1)
    pos = alg_start + alg_len
    if spki[pos] != 0x03:  # pragma: no cover - malformed SPKI from our own encoder
        raise ValueError("SubjectPublicKeyInfo without BIT STRING")
    length, start = read_len(spki, pos + 1)
    return spki[start + 1 : start + length]


def _name_hash(cert: x509.Certificate, algo: hashes.HashAlgorithm) -> bytes:
    h = hashes.Hash(algo)
    h.update(cert.subject.public_bytes())
    return h.finalize()


def _signature_ok(signer: x509.Certificate, resp: ocsp.OCSPResponse) -> bool:
    key = signer.public_key()
    sig, data, algo = resp.signature, resp.tbs_response_bytes, resp.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if algo is None:
                return False
            key.verify(sig, data, padding.PKCS1v15(), algo)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if algo is None:
                return False
            key.verify(sig, data, ec.ECDSA(algo))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(sig, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _is_signer(resp: ocsp.OCSPResponse, cand: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cand.subject
    return resp.responder_key_hash == _key_hash(cand, hashes.SHA1())


def _may_sign_for(responder: x509.Certificate, issuer: x509.Certificate,
                  now: _dt.datetime) -> bool:
    """RFC 6960 §4.2.2.2: a delegated responder is issued by the CA for OCSPSigning."""
    from gateway.tls.verify import issued_by

    if not issued_by(responder, issuer):
        return False
    try:
        eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        return False
    return responder.not_valid_before_utc - CLOCK_SKEW <= now <= \
        responder.not_valid_after_utc + CLOCK_SKEW


def evaluate_response(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    responder: str | None = None,
    now: _dt.datetime | None = None,
) -> OCSPResult:
    """Turn a DER OCSP response about ``cert`` into a result; never raises."""
    t = now or _dt.datetime.now(_dt.timezone.utc)

    def unavailable(why: str) -> OCSPResult:
        return OCSPResult(OCSPStatus.UNAVAILABLE, why, responder)

    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        return unavailable(f"not an OCSP response ({exc})")
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return unavailable(f"responder answered {resp.response_status.name.lower()}")
    signer = None
    for cand in (issuer, *resp.certificates):
        if _is_signer(resp, cand) and (cand is issuer or _may_sign_for(cand, issuer, t)):
            signer = cand
            break
    if signer is None:
        return unavailable("response is not signed by the issuing CA or a responder it "
                           "authorised for OCSP signing")
    if not _signature_ok(signer, resp):
        return unavailable("response signature does not verify")
    single = None
    for candidate in resp.responses:
        algo = candidate.hash_algorithm
        if (candidate.serial_number == cert.serial_number
                and candidate.issuer_name_hash == _name_hash(issuer, algo)
                and candidate.issuer_key_hash == _key_hash(issuer, algo)):
            single = candidate
            break
    if single is None:
        return unavailable("response does not cover this certificate")
    this_update = single.this_update_utc
    next_update = single.next_update_utc
    if this_update > t + CLOCK_SKEW:
        return unavailable(
            f"response is from the future (thisUpdate {this_update:%Y-%m-%d %H:%M}Z)")
    if next_update is not None and next_update < t - CLOCK_SKEW:
        return unavailable(f"response is stale (nextUpdate {next_update:%Y-%m-%d %H:%M}Z)")
    status = single.certificate_status
    if status == ocsp.OCSPCertStatus.GOOD:
        return OCSPResult(OCSPStatus.GOOD, "certificate is good", responder, next_update)
    if status == ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        reason = single.revocation_reason
        detail = f"revoked on {when:%Y-%m-%d %H:%M:%S}Z" if when else "revoked"
        if reason is not None:
            detail += f" ({reason.value})"
        return OCSPResult(OCSPStatus.REVOKED, detail, responder, next_update)
    return OCSPResult(OCSPStatus.UNKNOWN, "responder does not know this certificate",
                      responder, next_update)


# ----------------------------------------------------------------------
# I/O: one HTTP POST over trio + h11


async def _post(url: str, body: bytes) -> bytes:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise OSError(f"unsupported OCSP responder URL {url!r} (only http:// is supported)")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_BYTES)
    stream = await trio.open_tcp_stream(parts.hostname, port)
    async with stream:
        out = conn.send(h11.Request(method="POST", target=target, headers=[
            ("Host", host_header),
            ("Content-Type", "application/ocsp-request"),
            ("Accept", "application/ocsp-response"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]))
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)  # b"" signals EOF to h11
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise OSError(f"OCSP answer larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    if status != 200:
        raise OSError(f"responder answered HTTP {status}")
    return b"".join(chunks)


# ----------------------------------------------------------------------
# Checker with cache


@dataclass(frozen=True)
class _Entry:
    result: OCSPResult
    expires: _dt.datetime


class OCSPChecker:
    """Fetches and caches OCSP answers; one per configuration generation.

    ``post`` is the transport (tests may replace it); ``clock`` gives the
    current UTC time.
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        max_entries: int = 10_000,
        post: Callable[[str, bytes], object] | None = None,
        clock: Callable[[], _dt.datetime] | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_entries = max_entries
        self._post = post or _post
        self._clock = clock or (lambda: _dt.datetime.now(_dt.timezone.utc))
        self._cache: OrderedDict[tuple[bytes, int], _Entry] = OrderedDict()

    @staticmethod
    def _key(cert: x509.Certificate, issuer: x509.Certificate) -> tuple[bytes, int]:
        spki = issuer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(spki).digest(), cert.serial_number

    async def check(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate | None,
        configured_url: str | None = None,
    ) -> OCSPResult:
        """Status of ``cert``: from the cache while fresh, else from the responder."""
        url = responder_url(cert, configured_url)
        if issuer is None:
            return OCSPResult(OCSPStatus.UNAVAILABLE,
                              "issuer of the client certificate not found (needed for OCSP)", url)
        if url is None:
            return OCSPResult(OCSPStatus.UNAVAILABLE, "no OCSP responder: the certificate has "
                              "no AIA OCSP URL and the route sets no ocsp_responder")
        key = self._key(cert, issuer)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > now:
                return OCSPResult(entry.result.status, entry.result.detail,
                                  entry.result.responder, entry.result.next_update, cached=True)
            del self._cache[key]
        try:
            with trio.fail_after(self.timeout):
                der = await self._post(url, build_request(cert, issuer))  # type: ignore[misc]
        except trio.TooSlowError:
            return OCSPResult(OCSPStatus.UNAVAILABLE,
                              f"responder did not answer within {self.timeout:g} s", url)
        except (OSError, h11.ProtocolError, trio.BrokenResourceError) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return OCSPResult(OCSPStatus.UNAVAILABLE, f"responder unreachable: {why}", url)
        result = evaluate_response(der, cert, issuer, responder=url, now=now)
        if result.status is not OCSPStatus.UNAVAILABLE:
            # Cache for the answer's validity; never cache failures, so a
            # responder coming back is noticed on the next association.
            expires = result.next_update or (now + DEFAULT_TTL)
            self._cache[key] = _Entry(result, expires)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return result


# ----------------------------------------------------------------------
# Stapling


@dataclass(frozen=True)
class Staple:
    """A DER OCSP response for one of our own certificates, served while fresh."""

    path: Path
    der: bytes
    next_update: _dt.datetime | None

    def current(self, now: _dt.datetime | None = None) -> bytes:
        """The bytes to staple now, or b"" once the response is stale."""
        t = now or _dt.datetime.now(_dt.timezone.utc)
        if self.next_update is not None and self.next_update < t:
            # A stale staple makes strict clients fail hard; sending none lets
            # them fall back to their own policy.
            return b""
        return self.der


def load_staple(path: Path, leaf: x509.Certificate) -> Staple:
    """Read and sanity-check a staple file; CertificateError names the file."""
    try:
        der = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read OCSP staple file ({exc.strerror})") from None
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise CertificateError(f"{path}: not a DER OCSP response ({exc})") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise CertificateError(
            f"{path}: OCSP staple is an error answer ({resp.response_status.name.lower()})")
    if resp.serial_number != leaf.serial_number:
        raise CertificateError(
            f"{path}: OCSP staple is for serial {resp.serial_number:x}, not for this "
            f"certificate (serial {leaf.serial_number:x})")
    return Staple(path, der, resp.next_update_utc)


def staple_callback(staple: Staple) -> Callable[[SSL.Connection, object], bytes]:
    """A pyOpenSSL OCSP server callback serving ``staple`` (b"" = no staple)."""

    def callback(_conn: SSL.Connection, _data: object) -> bytes:
        return staple.current()

    return callback
