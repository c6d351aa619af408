"""OCSP response evaluation, caching and staples (no network: a fake transport)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import CertificateError
from gateway.tls.ocsp import (
    OCSPChecker,
    OCSPStatus,
    build_request,
    evaluate_response,
    load_staple,
    responder_url,
)
from tests.tls_helpers import get_pki, key_for, make_leaf

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
URL = "http://127.0.0.1:9/ocsp"


def _response(
    cert: x509.Certificate,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    *,
    signer: tuple[x509.Certificate, object] | None = None,
    next_update: dt.datetime | None = None,
    certs: list[x509.Certificate] | None = None,
) -> bytes:
    pki = get_pki()
    sc, sk = signer or (pki.ca_cert, key_for("ca"))
    revoked_at = NOW - dt.timedelta(hours=1) if status == ocsp.OCSPCertStatus.REVOKED else None
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=pki.ca_cert, algorithm=hashes.SHA1(), cert_status=status,
        this_update=NOW - dt.timedelta(minutes=1),
        next_update=next_update or NOW + dt.timedelta(hours=1),
        revocation_time=revoked_at,
        revocation_reason=x509.ReasonFlags.key_compromise if revoked_at else None,
    ).responder_id(ocsp.OCSPResponderEncoding.NAME, sc)
    if certs:
        b = b.certificates(certs)
    return b.sign(sk, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_request_is_parseable_and_names_the_serial() -> None:
    pki = get_pki()
    req = ocsp.load_der_ocsp_request(build_request(pki.client_cert, pki.ca_cert))
    assert req.serial_number == pki.client_cert.serial_number


@pytest.mark.parametrize(
    ("status", "expected"),
    [(ocsp.OCSPCertStatus.GOOD, OCSPStatus.GOOD),
     (ocsp.OCSPCertStatus.REVOKED, OCSPStatus.REVOKED),
     (ocsp.OCSPCertStatus.UNKNOWN, OCSPStatus.UNKNOWN)],
)
def test_signed_by_issuer(status: ocsp.OCSPCertStatus, expected: OCSPStatus) -> None:
    pki = get_pki()
    res = evaluate_response(_response(pki.client_cert, status), pki.client_cert, pki.ca_cert)
    assert res.status is expected
    if expected is OCSPStatus.REVOKED:
        assert "(keyCompromise)" in res.detail


def test_delegated_responder_needs_ocsp_signing_eku() -> None:
    pki = get_pki()
    good = make_leaf(key_for("ca"), pki.ca_cert, "Responder", key_for("resp"),
                     eku=(ExtendedKeyUsageOID.OCSP_SIGNING,))
    der = _response(pki.client_cert, signer=(good, key_for("resp")), certs=[good])
    assert evaluate_response(der, pki.client_cert, pki.ca_cert).status is OCSPStatus.GOOD
    plain = make_leaf(key_for("ca"), pki.ca_cert, "NotResponder", key_for("resp2"))
    der = _response(pki.client_cert, signer=(plain, key_for("resp2")), certs=[plain])
    res = evaluate_response(der, pki.client_cert, pki.ca_cert)
    assert res.status is OCSPStatus.UNAVAILABLE and "not signed" in res.detail


def test_forged_and_stale_answers_are_unavailable() -> None:
    pki = get_pki()
    rogue = get_pki().rogue_client_cert
    forged = _response(pki.client_cert, ocsp.OCSPCertStatus.GOOD,
                       signer=(rogue, key_for("rogue")), certs=[rogue])
    assert evaluate_response(forged, pki.client_cert, pki.ca_cert).status \
        is OCSPStatus.UNAVAILABLE
    stale = _response(pki.client_cert, next_update=NOW - dt.timedelta(hours=1))
    res = evaluate_response(stale, pki.client_cert, pki.ca_cert)
    assert res.status is OCSPStatus.UNAVAILABLE and "stale" in res.detail
    other = _response(pki.server_cert)
    res = evaluate_response(other, pki.client_cert, pki.ca_cert)
    assert res.status is OCSPStatus.UNAVAILABLE and "does not cover" in res.detail
    assert evaluate_response(b"junk", pki.client_cert, pki.ca_cert).status \
        is OCSPStatus.UNAVAILABLE


def test_responder_url_configured_wins_then_aia() -> None:
    pki = get_pki()
    assert responder_url(pki.client_cert, URL) == URL
    assert responder_url(pki.client_cert) is None


def test_checker_caches_until_next_update() -> None:
    pki = get_pki()
    calls: list[str] = []
    clock = [NOW]

    async def post(url: str, body: bytes) -> bytes:
        calls.append(url)
        return _response(pki.client_cert, next_update=NOW + dt.timedelta(minutes=10))

    checker = OCSPChecker(post=post, clock=lambda: clock[0])

    async def main() -> None:
        first = await checker.check(pki.client_cert, pki.ca_cert, URL)
        second = await checker.check(pki.client_cert, pki.ca_cert, URL)
        assert first.status is OCSPStatus.GOOD and not first.cached
        assert second.status is OCSPStatus.GOOD and second.cached
        clock[0] = NOW + dt.timedelta(minutes=11)
        third = await checker.check(pki.client_cert, pki.ca_cert, URL)
        assert not third.cached

    trio.run(main)
    assert calls == [URL, URL]


def test_checker_timeout_and_errors_are_unavailable_and_not_cached() -> None:
    pki = get_pki()

    async def slow(url: str, body: bytes) -> bytes:
        await trio.sleep(10)
        return b""

    async def down(url: str, body: bytes) -> bytes:
        raise ConnectionRefusedError(111, "Connection refused")

    async def main() -> None:
        res = await OCSPChecker(post=slow, timeout=0.05).check(pki.client_cert, pki.ca_cert, URL)
        assert res.status is OCSPStatus.UNAVAILABLE and "within 0.05 s" in res.detail
        checker = OCSPChecker(post=down)
        for _ in range(2):
            res = await checker.check(pki.client_cert, pki.ca_cert, URL)
            assert res.status is OCSPStatus.UNAVAILABLE and not res.cached
            assert "Connection refused" in res.detail
        res = await checker.check(pki.client_cert, pki.ca_cert, None)
        assert res.status is OCSPStatus.UNAVAILABLE and "no OCSP responder" in res.detail

    trio.run(main)


def test_staple_loading(tmp_path: Path) -> None:
    pki = get_pki()
    good = tmp_path / "server.ocsp"
    good.write_bytes(_response(pki.server_cert))
    staple = load_staple(good, pki.server_cert)
    assert staple.current() == good.read_bytes()
    assert staple.current(NOW + dt.timedelta(hours=2)) == b""  # stale: send none
    with pytest.raises(CertificateError, match="not for this certificate"):
        load_staple(good, pki.client_cert)
    junk = tmp_path / "junk.ocsp"
    junk.write_bytes(b"nope")
    with pytest.raises(CertificateError, match="not a DER OCSP response"):
        load_staple(junk, pki.server_cert)
