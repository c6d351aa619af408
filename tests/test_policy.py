"""Per-route policy decisions over TLS evidence."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import BackendConfig, ListenerConfig, RouteConfig
from gateway.errors import CertificateError
from gateway.policy import PeerIdentity, check_policy, effective_verify
from gateway.tls.certs import certificate_names, thumbprint
from gateway.tls.ocsp import OCSPResult, OCSPStatus
from gateway.tls.verify import build_route_verifier
from tests.tls_helpers import get_pki, key_for, make_leaf

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
    assert not d.allowed and d.reason.startswith("client presented no certificate")


def test_plain_connection_cannot_satisfy_chain() -> None:
    assert not check_policy(r(verify="chain"), PLAIN, None, "X").allowed
    assert check_policy(r(), PLAIN, None, "X").allowed


def test_bind_calling_ae() -> None:
    assert check_policy(r(bind_calling_ae=True), TLS_REQ, GOOD, "CT01").allowed
    assert check_policy(r(bind_calling_ae=True), TLS_REQ, GOOD, "ct01.example.org").allowed
    d = check_policy(r(bind_calling_ae=True), TLS_REQ, GOOD, "MR01")
    assert not d.allowed and d.check == "bind_calling_ae" and "'MR01'" in d.reason


# --------------------------------------------------------------------------- with a verifier
# Real certificates from the shared test PKI; the verifier is what build_runtime
# prepares from the route's trust, CRLs and thumbprints.





def peer_of(*chain: x509.Certificate) -> PeerIdentity:
    names = certificate_names(chain[0])
    return PeerIdentity(True, None, None, names.common_name, names.dns + names.ae_titles,
                        chain=chain)


def _crl(tmp_path: Path, revoked: list[x509.Certificate], *, expired: bool = False) -> Path:
    pki = get_pki()
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateRevocationListBuilder().issuer_name(pki.ca_cert.subject)
         .last_update(now - dt.timedelta(days=2))
         .next_update(now - dt.timedelta(days=1) if expired else now + dt.timedelta(days=1)))
    for c in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder()
                                      .serial_number(c.serial_number)
                                      .revocation_date(now - dt.timedelta(hours=1)).build())
    path = tmp_path / "ca.crl"
    path.write_bytes(b.sign(key_for("ca"), hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM))
    return path


def test_route_trust_decides_not_the_handshake() -> None:
    pki = get_pki()
    v = build_route_verifier(pki.ca)
    good = check_policy(r(), TLS_OPT, peer_of(pki.client_cert), "CT01", verifier=v)
    assert good.allowed and good.check == "chain"
    bad = check_policy(r(), TLS_OPT, peer_of(pki.rogue_client_cert), "X", verifier=v)
    assert not bad.allowed and bad.check == "chain"
    assert "unable to get local issuer certificate" in bad.reason


def test_expired_client_is_chain_failure() -> None:
    pki = get_pki()
    now = dt.datetime.now(dt.timezone.utc)
    old = make_leaf(key_for("ca"), pki.ca_cert, "OLD", key_for("old"),
                    not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1))
    d = check_policy(r(), TLS_OPT, peer_of(old), "OLD", verifier=build_route_verifier(pki.ca))
    assert not d.allowed and d.check == "chain" and "expired" in d.reason


def test_crl_revocation_is_named_crl(tmp_path: Path) -> None:
    pki = get_pki()
    v = build_route_verifier(pki.ca, [_crl(tmp_path, [pki.client_cert])])
    d = check_policy(r(), TLS_OPT, peer_of(pki.client_cert), "CT01", verifier=v)
    assert not d.allowed and d.check == "crl" and "revoked" in d.reason
    other = make_leaf(key_for("ca"), pki.ca_cert, "MR01", key_for("mr01"))
    assert check_policy(r(), TLS_OPT, peer_of(other), "MR01", verifier=v).allowed


def test_expired_crl_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="CRL expired"):
        build_route_verifier(get_pki().ca, [_crl(tmp_path, [], expired=True)])


def test_crl_without_trust_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="needs a trust bundle"):
        build_route_verifier(None, [_crl(tmp_path, [])])


def test_bad_thumbprint_refused_at_load() -> None:
    with pytest.raises(CertificateError, match="hex digits"):
        build_route_verifier(None, (), ["abc"])


def test_thumbprint_pins_sha256_and_sha1() -> None:
    pki = get_pki()
    leaf = pki.rogue_client_cert
    for pin in (f"sha256:{thumbprint(leaf)}", thumbprint(leaf, "sha1").replace(":", "")):
        v = build_route_verifier(None, (), [pin])
        route = r(verify="thumbprint", thumbprints=(pin,))
        assert check_policy(route, TLS_OPT, peer_of(leaf), "X", verifier=v).allowed
        d = check_policy(route, TLS_OPT, peer_of(pki.client_cert), "CT01", verifier=v)
        assert not d.allowed and d.check == "thumbprint"


def test_chain_plus_thumbprint_needs_both() -> None:
    pki = get_pki()
    pins = (thumbprint(pki.client_cert), thumbprint(pki.rogue_client_cert))
    v = build_route_verifier(pki.ca, (), pins)
    route = r(verify="chain+thumbprint", thumbprints=pins)
    assert check_policy(route, TLS_OPT, peer_of(pki.client_cert), "CT01", verifier=v).allowed
    d = check_policy(route, TLS_OPT, peer_of(pki.rogue_client_cert), "X", verifier=v)
    assert d.check == "chain"
    unpinned = make_leaf(key_for("ca"), pki.ca_cert, "MR01", key_for("mr01"))
    d = check_policy(route, TLS_OPT, peer_of(unpinned), "MR01", verifier=v)
    assert not d.allowed and d.check == "thumbprint"


def test_client_eku_required_by_route() -> None:
    pki = get_pki()
    # The server certificate carries serverAuth+clientAuth; a serverAuth-only one must fail.
    srv_only = make_leaf(key_for("ca"), pki.ca_cert, "SRV", key_for("srv"),
                         eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    d = check_policy(r(), TLS_OPT, peer_of(srv_only), "SRV", verifier=build_route_verifier(pki.ca))
    assert not d.allowed and "clientAuth" in d.reason


def test_bind_calling_ae_to_dicom_ae_san() -> None:
    pki = get_pki()  # client: CN CT01, URI dicom-ae:CT01
    route = r(bind_calling_ae=True)
    v = build_route_verifier(pki.ca)
    assert check_policy(route, TLS_OPT, peer_of(pki.client_cert), "CT01", verifier=v).allowed
    d = check_policy(route, TLS_OPT, peer_of(pki.client_cert), "ct01", verifier=v)
    assert not d.allowed and d.check == "bind_calling_ae"


def test_key_strength_on_b13_listener() -> None:
    pki = get_pki()
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = make_leaf(key_for("ca"), pki.ca_cert, "WEAK", weak_key)
    mod = ListenerConfig(name="mod", host="127.0.0.1", port=1, tls=True,
                         client_cert="optional", profile="bcp195-rfc8996-mod")
    d = check_policy(r(verify="none"), mod, peer_of(weak), "WEAK")
    assert not d.allowed and d.check == "key-strength" and "1024" in d.reason
    # The same certificate is no concern of a listener with another profile.
    assert check_policy(r(verify="none"), TLS_OPT, peer_of(weak), "WEAK").allowed


@pytest.mark.parametrize(
    ("mode", "status", "allowed"),
    [("soft", OCSPStatus.GOOD, True), ("hard", OCSPStatus.GOOD, True),
     ("soft", OCSPStatus.REVOKED, False), ("hard", OCSPStatus.REVOKED, False),
     ("soft", OCSPStatus.UNAVAILABLE, True), ("hard", OCSPStatus.UNAVAILABLE, False),
     ("soft", OCSPStatus.UNKNOWN, True), ("hard", OCSPStatus.UNKNOWN, False)],
)
def test_ocsp_modes(mode: str, status: OCSPStatus, allowed: bool) -> None:
    pki = get_pki()
    route = r(ocsp=mode)
    d = check_policy(route, TLS_OPT, peer_of(pki.client_cert), "CT01",
                     verifier=build_route_verifier(pki.ca),
                     ocsp=OCSPResult(status, "detail"))
    assert d.allowed is allowed
    if not allowed:
        assert d.check == "ocsp"


def test_ocsp_missing_answer_counts_as_unavailable() -> None:
    pki = get_pki()
    v = build_route_verifier(pki.ca)
    assert check_policy(r(ocsp="soft"), TLS_OPT, peer_of(pki.client_cert), "CT01",
                        verifier=v).allowed
    d = check_policy(r(ocsp="hard"), TLS_OPT, peer_of(pki.client_cert), "CT01", verifier=v)
    assert not d.allowed and d.check == "ocsp"
