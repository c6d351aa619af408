"""Per-route certificate policy: a pure decision over the TLS evidence.

The handshake only gathers evidence (chain verified or not, subject, names);
the route, known after the A-ASSOCIATE-RQ, decides. A failed decision is an
A-ASSOCIATE-RJ (1, 1, 3) and nothing is forwarded to the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ListenerConfig, RouteConfig


@dataclass(frozen=True)
class PeerIdentity:
    """The part of the TLS evidence the policy needs (None: plain connection)."""

    has_certificate: bool
    chain_verified: bool | None
    verify_error: str | None
    common_name: str | None
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """Outcome of a policy check; ``reason`` says which check failed."""

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
) -> Decision:
    """Decide whether ``peer`` may use ``route`` when it calls as ``calling_ae``."""
    verify = effective_verify(route, listener)
    if verify != "none":
        if peer is None:
            return Decision(False, verify, "route requires TLS with a client certificate")
        if not peer.has_certificate:
            return Decision(False, verify, "client presented no certificate")
        if peer.chain_verified is not True:
            why = peer.verify_error or "chain not verified"
            return Decision(False, verify, f"client certificate chain not trusted: {why}")
    if route.bind_calling_ae:
        if peer is None or not peer.has_certificate:
            return Decision(False, "bind_calling_ae", "no client certificate to bind to")
        names = {n for n in (peer.common_name, *peer.names) if n}
        if calling_ae not in names:
            shown = ", ".join(sorted(names)) or "none"
            return Decision(
                False,
                "bind_calling_ae",
                f"Calling AE {calling_ae!r} is not a name of the certificate ({shown})",
            )
    return Decision(True, verify)
