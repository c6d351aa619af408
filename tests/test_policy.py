"""Per-route policy decisions over TLS evidence."""

from __future__ import annotations

from gateway.config import BackendConfig, ListenerConfig, RouteConfig
from gateway.policy import PeerIdentity, check_policy, effective_verify

TLS_REQ = ListenerConfig(name="tls", host="127.0.0.1", port=2762, tls=True,
                         client_cert="required")
TLS_OPT = ListenerConfig(name="opt", host="127.0.0.1", port=2763, tls=True,
                         client_cert="optional")
TLS_NONE = ListenerConfig(name="srv", host="127.0.0.1", port=2764, tls=True, client_cert="none")
PLAIN = ListenerConfig(name="plain", host="127.0.0.1", port=104, tls=False)
B = BackendConfig(host="127.0.0.1", port=104)
GOOD = PeerIdentity(True, True, None, "CT01", ("ct01.example.org",))
UNTRUSTED = PeerIdentity(True, False, "unable to get local issuer certificate", "EVIL")
NOCERT = PeerIdentity(False, None, None, None)


def r(**kw) -> RouteConfig:
    return RouteConfig(name="r", called_ae="A", backend=B, **kw)


def test_defaults_follow_listener() -> None:
    assert effective_verify(r(), TLS_REQ) == "chain"
    assert effective_verify(r(), TLS_OPT) == "chain"
    assert effective_verify(r(), TLS_NONE) == "none"
    assert effective_verify(r(), PLAIN) == "none"
    assert effective_verify(r(verify="none"), TLS_REQ) == "none"


def test_chain_accepts_verified_and_refuses_untrusted() -> None:
    assert check_policy(r(), TLS_REQ, GOOD, "CT01").allowed
    d = check_policy(r(), TLS_REQ, UNTRUSTED, "CT01")
    assert not d.allowed and "unable to get local issuer" in d.reason


def test_optional_listener_without_certificate() -> None:
    assert check_policy(r(verify="none"), TLS_OPT, NOCERT, "X").allowed
    d = check_policy(r(), TLS_OPT, NOCERT, "X")
    assert not d.allowed and d.reason == "client presented no certificate"


def test_plain_connection_cannot_satisfy_chain() -> None:
    assert not check_policy(r(verify="chain"), PLAIN, None, "X").allowed
    assert check_policy(r(), PLAIN, None, "X").allowed


def test_bind_calling_ae() -> None:
    assert check_policy(r(bind_calling_ae=True), TLS_REQ, GOOD, "CT01").allowed
    assert check_policy(r(bind_calling_ae=True), TLS_REQ, GOOD, "ct01.example.org").allowed
    d = check_policy(r(bind_calling_ae=True), TLS_REQ, GOOD, "MR01")
    assert not d.allowed and d.check == "bind_calling_ae" and "'MR01'" in d.reason
