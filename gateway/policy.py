"""Per-route certificate policy: a pure decision over the TLS evidence.

The handshake only gathers evidence (the peer's chain, names, thumbprints);
the route, known after the A-ASSOCIATE-RQ, decides. A failed decision is an
A-ASSOCIATE-RJ (1, 1, 3) and nothing is forwarded to the backend.

Everything that needs I/O or parsing happens elsewhere: the route's trust,
CRLs and thumbprints are prepared at load time (:class:`RouteVerifier`), and
an OCSP answer is fetched by the session before the decision. What remains
here is a function of its arguments (and the clock, for validity periods).

Checks run in a fixed order and the first failure names itself in
``Decision.check``: ``chain`` / ``thumbprint`` (a certificate is needed and
missing), ``key-strength`` (B.13 minimums), ``chain`` or ``crl`` (the route's
trust and revocation lists), ``thumbprint``, ``ocsp``, ``bind_calling_ae``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from cryptography import x509

from .config import ListenerConfig, RouteConfig
from .tls.certs import fingerprint_bytes, parse_thumbprint, thumbprint
from .tls.ocsp import OCSPResult, OCSPStatus
from .tls.verify import STRICT_KEY_PROFILES, RouteVerifier, key_strength_problem


@dataclass(frozen=True)
class PeerIdentity:
    """The part of the TLS evidence the policy needs (None: plain connection).

    ``names`` are the names ``bind_calling_ae`` accepts besides the CN: DNS
    SANs and ``dicom-ae:`` URI SANs, without prefixes. ``chain`` is the leaf
    followed by whatever intermediates the client sent.
    """

    has_certificate: bool
    chain_verified: bool | None
    verify_error: str | None
    common_name: str | None
    names: tuple[str, ...] = ()
    chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Decision:
    """Outcome of a policy check; ``check`` names the check that failed (or the verify mode)."""

    allowed: bool
    check: str
    reason: str = ""


def effective_verify(route: RouteConfig, listener: ListenerConfig) -> str:
    """The verification a route applies on a listener (DESIGN §3 defaults)."""
    if route.verify is not None:
        return route.verify
    if listener.tls and listener.client_cert != "none":
        return "chain"
    return "none"


def check_policy(
    route: RouteConfig,
    listener: ListenerConfig,
    peer: PeerIdentity | None,
    calling_ae: str,
    *,
    verifier: RouteVerifier | None = None,
    ocsp: OCSPResult | None = None,
) -> Decision:
    """Decide whether ``peer`` may use ``route`` when it calls as ``calling_ae``.

    ``verifier`` holds the route's prepared trust/CRLs/pins for this listener;
    without one the chain check falls back to the handshake's own verdict
    (listener trust). ``ocsp`` is the already-fetched answer when the route
    has ``ocsp`` on; None there counts as "unavailable".
    """
    verify = effective_verify(route, listener)
    has_cert = peer is not None and peer.has_certificate
    leaf = peer.chain[0] if peer is not None and peer.chain else None

    if verify != "none":
        check = "thumbprint" if verify == "thumbprint" else "chain"
        if peer is None:
            return Decision(False, check, f"route requires TLS with a client certificate "
                                          f"(verify = {verify!r}); this connection is plain")
        if not has_cert:
            return Decision(False, check, f"client presented no certificate "
                                          f"(route verifies by {verify})")

    if peer is not None and peer.chain and listener.profile in STRICT_KEY_PROFILES:
        for cert in peer.chain:
            problem = key_strength_problem(cert)
            if problem:
                return Decision(False, "key-strength",
                                f"client certificate {cert.subject.rfc4514_string()}: {problem}"
                                f" (listener profile {listener.profile})")

    if verify in ("chain", "chain+thumbprint"):
        assert peer is not None
        if verifier is not None and leaf is not None and not (
            verifier.same_as_handshake and peer.chain_verified is True
        ):
            result = verifier.verify_chain(peer.chain)
            if not result.ok:
                what = "revoked or revocation unknown" if result.crl else "not trusted"
                return Decision(False, "crl" if result.crl else "chain",
                                f"client certificate {what} on this route: {result.error}")
        elif peer.chain_verified is not True:
            why = peer.verify_error or "chain not verified"
            return Decision(False, "chain", f"client certificate chain not trusted: {why}")

    if verify in ("thumbprint", "chain+thumbprint"):
        if leaf is None:
            return Decision(False, "thumbprint", "no client certificate to compare")
        pins = verifier.pins if verifier is not None else tuple(
            parse_thumbprint(t) for t in route.thumbprints)
        if not any(hmac.compare_digest(fingerprint_bytes(leaf, algo), digest)
                   for algo, digest in pins):
            return Decision(False, "thumbprint",
                            f"client certificate sha256 {thumbprint(leaf)} is not among the "
                            f"route's {len(pins)} thumbprint(s)")

    if route.ocsp != "off":
        decision = _ocsp_decision(route, ocsp, has_cert)
        if decision is not None:
            return decision

    if route.bind_calling_ae:
        if peer is None or not has_cert:
            return Decision(False, "bind_calling_ae", "no client certificate to bind to")
        if not _names_match(calling_ae, peer):
            shown = ", ".join(n for n in (peer.common_name, *peer.names) if n) or "none"
            return Decision(
                False,
                "bind_calling_ae",
                f"Calling AE {calling_ae!r} is not a name of the certificate ({shown})",
            )
    return Decision(True, verify)


def _ocsp_decision(route: RouteConfig, ocsp: OCSPResult | None, has_cert: bool) -> Decision | None:
    """Reject on revoked always; on unknown/unavailable only when ``ocsp = "hard"``."""
    if not has_cert:
        if route.ocsp == "hard":
            return Decision(False, "ocsp", "no client certificate to check by OCSP (ocsp = hard)")
        return None
    if ocsp is None:
        status, detail = OCSPStatus.UNAVAILABLE, "no OCSP answer"
    else:
        status, detail = ocsp.status, ocsp.detail
    if status is OCSPStatus.REVOKED:
        return Decision(False, "ocsp", f"client certificate revoked (OCSP): {detail}")
    if status is not OCSPStatus.GOOD and route.ocsp == "hard":
        return Decision(False, "ocsp", f"OCSP status {status.value} and ocsp = 'hard': {detail}")
    return None


def _names_match(calling_ae: str, peer: PeerIdentity) -> bool:
    # AE titles and CNs compare exactly (AE titles are case-sensitive); DNS
    # names (they hold a dot, AE titles rarely do) are case-insensitive.
    if peer.common_name is not None and calling_ae == peer.common_name:
        return True
    return any(calling_ae == n or ("." in n and calling_ae.lower() == n.lower())
               for n in peer.names)
