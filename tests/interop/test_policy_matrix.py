"""Per-route certificate policy (issue 3 acceptance matrix), one test per row.

Each test checks what the client sees (DCMTK's output / pynetdicom's reject
triplet) *and* the gateway's JSON log event, and that a refused association
never reached the backend (the pynetdicom SCP saw nothing).
"""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import client_ssl_context
from .helpers import (
    HOST,
    PKI,
    CertKey,
    issue_cert,
    new_ca,
    route,
    run_dcmtk,
    scu_associate,
    sha256_thumbprint,
    tls_listener,
    write_crl,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@dataclass(frozen=True)
class PolicyPKI:
    expired: CertKey  # CN CT01, client CA, expired yesterday
    revoked: CertKey  # CN CT02, client CA, on the CRL
    crl: Path  # client CA's CRL listing `revoked`
    site_b_ca: Path  # a second client CA
    site_b: CertKey  # CN SITEB01, by site_b_ca
    sni_a: CertKey  # gateway CA, SAN a.example
    sni_b: CertKey  # gateway CA, SAN b.example
    sni_wild: CertKey  # gateway CA, SAN *.wild.example
    dicom_ae: CertKey  # CN "Modality 7", SAN dicom-ae:MOD7, client CA


@pytest.fixture(scope="module")
def ppki(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> PolicyPKI:
    d = tmp_path_factory.mktemp("policy-pki")
    now = datetime.datetime.now(datetime.timezone.utc)
    client_ca, gw_ca = pki.cas["client"], pki.cas["gateway"]
    revoked = issue_cert(client_ca, d, "revoked-ct02", "CT02")
    site_b = new_ca("Site B CA")
    return PolicyPKI(
        expired=issue_cert(client_ca, d, "expired-ct01", "CT01",
                           not_before=now - datetime.timedelta(days=10),
                           not_after=now - datetime.timedelta(days=1)),
        revoked=revoked,
        crl=write_crl(client_ca, d / "client-ca.crl", [revoked.cert]),
        site_b_ca=site_b.write(d / "site-b-ca.pem"),
        site_b=issue_cert(site_b, d, "site-b-01", "SITEB01"),
        sni_a=issue_cert(gw_ca, d, "sni-a", "a.example", dns=["a.example"]),
        sni_b=issue_cert(gw_ca, d, "sni-b", "b.example", dns=["b.example"]),
        sni_wild=issue_cert(gw_ca, d, "sni-wild", "wild", dns=["*.wild.example"]),
        dicom_ae=issue_cert(client_ca, d, "mod7", "Modality 7", uris=["dicom-ae:MOD7"]),
    )


def _ssl(pki: PKI, ck: CertKey | None):
    ctx = client_ssl_context(pki, "")
    if ck is not None:
        ctx.load_cert_chain(str(ck.cert), str(ck.key))
    return ctx


def _associate(gw, pki, ck, called="ARCHIVE", calling="CT01", listener="tls", **kw):
    res = scu_associate(gw.port(listener), called, calling_ae=calling,
                        ssl_context=_ssl(pki, ck), **kw)
    if res.established:
        res.assoc.release()
    return res


def _accepted(res) -> bool:
    """The gateway answered with an A-ASSOCIATE-AC (the helper released it since)."""
    return res.ac_ae_titles() is not None


def _echoscu(gw, pki, ck: CertKey | None, called="ARCHIVE", calling="CT01"):
    tls = [*ck.dcmtk_tls] if ck else ["+tla"]
    return run_dcmtk(["echoscu", "-v", *tls, "+cf", pki.gateway_ca, "-aet", calling,
                      "-aec", called, HOST, gw.port("tls")], timeout=30)


def _rejections(gw, n: int = 1) -> list[dict]:
    gw.wait_for_event("association.rejected")
    recs = gw.events("association.rejected")
    assert len(recs) >= n, gw.output()
    return recs


def _rj_received(res) -> tuple[int, int, int] | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ the client received on the wire.

    Read from the raw PDU rather than pynetdicom's state flags: pynetdicom now and
    then reports a received RJ as "aborted" when the close follows quickly.
    """
    for pdu in res.raw_received:
        if pdu[:1] == b"\x03" and len(pdu) >= 10:
            return pdu[7], pdu[8], pdu[9]
    return None


def _assert_rj_113(res, gw) -> None:
    assert _rj_received(res) == (1, 1, 3), res.state() + gw.output()
    assert not _accepted(res), res.state()


def _last_rejection(gw, check: str, contains: str) -> dict:
    rec = _rejections(gw)[-1]
    assert (rec.get("result"), rec.get("source"), rec.get("reason")) == (1, 1, 3), rec
    assert rec.get("check") == check, rec
    assert contains in rec.get("why", ""), rec
    return rec


def _optional_listener(pki, **extra) -> dict:
    return tls_listener(pki, client_cert="optional", **extra)


# --------------------------------------------------------------------------- chain


def test_trusted_client_accepted(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    rc, out = _echoscu(gw, pki, pki.client)
    assert rc == 0, out + gw.output()
    acc = gw.wait_for_event("association.accepted")
    assert acc and "CN=CT01" in acc[0]["client_subject"], acc
    assert scp.echoes == 1


def test_client_from_untrusted_ca_rejected_by_route(pki, pynetdicom_scp, gateway):
    # The route has its own trust, so the handshake only gathers evidence.
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_optional_listener(pki)],
                 [route("archive", "ARCHIVE", scp.port, trust=str(pki.client_ca))])
    res = _associate(gw, pki, pki.evil_client)
    _assert_rj_113(res, gw)
    _last_rejection(gw, "chain", "unable to get local issuer certificate")
    rc, out = _echoscu(gw, pki, pki.evil_client)
    assert rc != 0 and "Calling AE Title Not Recognized" in out, out
    assert scp.seen == []


def test_expired_client_cert_rejected(pki, ppki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_optional_listener(pki)],
                 [route("archive", "ARCHIVE", scp.port, trust=str(pki.client_ca))])
    rc, out = _echoscu(gw, pki, ppki.expired)
    assert rc != 0 and "Calling AE Title Not Recognized" in out, out + gw.output()
    _last_rejection(gw, "chain", "certificate has expired")
    assert scp.seen == []


def test_revoked_by_crl_rejected(pki, ppki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_optional_listener(pki)],
                 [route("archive", "ARCHIVE", scp.port, trust=str(pki.client_ca),
                        crl=[str(ppki.crl)])])
    res = _associate(gw, pki, ppki.revoked, calling="CT02")
    _assert_rj_113(res, gw)
    _last_rejection(gw, "crl", "certificate revoked")
    assert scp.seen == []
    # The same route still takes a client whose certificate is not on the CRL.
    ok = _associate(gw, pki, pki.client)
    assert _accepted(ok), ok.state() + gw.output()


# --------------------------------------------------------------------------- thumbprints


def test_thumbprint_listed_accepted(pki, pynetdicom_scp, gateway):
    # A certificate from a CA nobody trusts, pinned by its SHA-256 thumbprint.
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [_optional_listener(pki)],
        [route("pinned", "ARCHIVE", scp.port, verify="thumbprint",
               thumbprints=[f"sha256:{sha256_thumbprint(pki.evil_client.cert)}"])],
    )
    rc, out = _echoscu(gw, pki, pki.evil_client)
    assert rc == 0, out + gw.output()
    assert gw.wait_for_event("association.accepted"), gw.output()
    assert scp.echoes == 1


def test_thumbprint_not_listed_rejected(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [_optional_listener(pki)],
        [route("pinned", "ARCHIVE", scp.port, verify="thumbprint",
               thumbprints=[sha256_thumbprint(pki.evil_client.cert)])],
    )
    res = _associate(gw, pki, pki.client)  # trusted CA, but not pinned
    _assert_rj_113(res, gw)
    _last_rejection(gw, "thumbprint", "is not among the route's 1 thumbprint(s)")
    assert scp.seen == []


def test_chain_plus_thumbprint_needs_both(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    pins = [sha256_thumbprint(pki.client.cert), sha256_thumbprint(pki.evil_client.cert)]
    gw = gateway(
        [_optional_listener(pki)],
        [route("both", "ARCHIVE", scp.port, verify="chain+thumbprint", thumbprints=pins)],
    )
    ok = _associate(gw, pki, pki.client)  # trusted and pinned
    assert _accepted(ok), ok.state() + gw.output()
    res = _associate(gw, pki, pki.client2, calling="MR01")  # trusted, not pinned
    _assert_rj_113(res, gw)
    _last_rejection(gw, "thumbprint", "thumbprint")
    res = _associate(gw, pki, pki.evil_client)  # pinned, not trusted
    _assert_rj_113(res, gw)
    _last_rejection(gw, "chain", "unable to get local issuer certificate")
    assert len(scp.seen) == 1


# --------------------------------------------------------------------------- listeners


def test_no_client_cert_on_required_listener_handshake_refused(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    rc, out = _echoscu(gw, pki, None)
    assert rc != 0, out
    assert "Association Request Failed" in out or "TLS" in out, out
    failed = gw.wait_for_event("tls.handshake_failed")
    assert failed, gw.output()
    assert "certificate" in failed[-1]["reason"].lower(), failed
    assert scp.seen == []


def test_optional_listener_without_cert_verify_none_accepted(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_optional_listener(pki)],
                 [route("open", "ARCHIVE", scp.port, verify="none")])
    rc, out = _echoscu(gw, pki, None)
    assert rc == 0, out + gw.output()
    assert gw.wait_for_event("association.accepted"), gw.output()
    assert scp.echoes == 1


def test_optional_listener_without_cert_chain_route_rejected(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_optional_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    res = _associate(gw, pki, None)
    _assert_rj_113(res, gw)
    _last_rejection(gw, "chain", "client presented no certificate")
    assert scp.seen == []


# --------------------------------------------------------------------------- bind_calling_ae


def test_bind_calling_ae_match_accepted(pki, ppki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([tls_listener(pki)],
                 [route("bound", "ARCHIVE", scp.port, bind_calling_ae=True)])
    rc, out = _echoscu(gw, pki, pki.client, calling="CT01")  # CN CT01
    assert rc == 0, out + gw.output()
    res = _associate(gw, pki, ppki.dicom_ae, calling="MOD7")  # SAN dicom-ae:MOD7
    assert _accepted(res), res.state() + gw.output()
    assert len(gw.wait_for_event("association.accepted")) >= 1
    assert [s.calling_ae for s in scp.seen] == ["CT01", "MOD7"]


def test_bind_calling_ae_mismatch_rejected(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([tls_listener(pki)],
                 [route("bound", "ARCHIVE", scp.port, bind_calling_ae=True)])
    rc, out = _echoscu(gw, pki, pki.client, calling="MR01")  # cert says CT01
    assert rc != 0 and "Calling AE Title Not Recognized" in out, out + gw.output()
    _last_rejection(gw, "bind_calling_ae", "'MR01' is not a name of the certificate")
    assert scp.seen == []


# --------------------------------------------------------------------------- trust per route


def test_two_routes_each_accept_only_their_own_clients(pki, ppki, pynetdicom_scp, gateway):
    a = pynetdicom_scp("SITEA")
    b = pynetdicom_scp("SITEB")
    gw = gateway(
        [_optional_listener(pki)],
        [route("site-a", "SITEA", a.port, trust=str(pki.client_ca)),
         route("site-b", "SITEB", b.port, trust=str(ppki.site_b_ca))],
    )
    assert _accepted(_associate(gw, pki, pki.client, called="SITEA")), gw.output()
    assert _accepted(_associate(gw, pki, ppki.site_b, called="SITEB", calling="SITEB01"))
    _assert_rj_113(_associate(gw, pki, pki.client, called="SITEB"), gw)
    rec = _last_rejection(gw, "chain", "unable to get local issuer certificate")
    assert rec["route"] == "site-b", rec
    _assert_rj_113(_associate(gw, pki, ppki.site_b, called="SITEA", calling="SITEB01"), gw)
    rec = _last_rejection(gw, "chain", "unable to get local issuer certificate")
    assert rec["route"] == "site-a", rec
    assert [s.calling_ae for s in a.seen] == ["CT01"]
    assert [s.calling_ae for s in b.seen] == ["SITEB01"]


# --------------------------------------------------------------------------- SNI


def _served_subject(port: int, servername: str | None, ca: Path) -> str:
    args = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-CAfile", str(ca),
            "-brief"]
    if servername:
        args += ["-servername", servername]
    else:
        args += ["-noservername"]
    cp = subprocess.run(args, input=b"", capture_output=True, timeout=15, check=False)
    text = (cp.stdout + cp.stderr).decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("Peer certificate:"):
            return line.split(":", 1)[1].replace(" ", "")
    raise AssertionError(f"openssl s_client printed no peer certificate:\n{text}")


def test_sni_selects_certificate_and_route(pki, ppki, pynetdicom_scp, gateway):
    a = pynetdicom_scp("ARCHIVE")
    b = pynetdicom_scp("ARCHIVE")
    listener = tls_listener(pki, client_cert="none")
    listener["certificates"] = [
        {"cert": str(pki.gateway_server.cert), "key": str(pki.gateway_server.key)},
        {"cert": str(ppki.sni_a.cert), "key": str(ppki.sni_a.key)},
        {"cert": str(ppki.sni_b.cert), "key": str(ppki.sni_b.key)},
        {"cert": str(ppki.sni_wild.cert), "key": str(ppki.sni_wild.key)},
    ]
    gw = gateway([listener], [route("a", "ARCHIVE", a.port, sni="a.example"),
                              route("b", "ARCHIVE", b.port, sni="b.example")])
    port = gw.port("tls")
    assert "CN=a.example" in _served_subject(port, "a.example", pki.gateway_ca)
    assert "CN=b.example" in _served_subject(port, "b.example", pki.gateway_ca)
    assert "CN=wild" in _served_subject(port, "x.wild.example", pki.gateway_ca)
    assert "CN=localhost" in _served_subject(port, "other.example", pki.gateway_ca)
    assert "CN=localhost" in _served_subject(port, None, pki.gateway_ca)

    ra = scu_associate(port, "ARCHIVE", ssl_context=_ssl(pki, None),
                       server_hostname="a.example")
    assert ra.established, ra.state() + gw.output()
    ra.assoc.release()
    rb = scu_associate(port, "ARCHIVE", ssl_context=_ssl(pki, None),
                       server_hostname="b.example")
    assert rb.established, rb.state() + gw.output()
    rb.assoc.release()
    assert len(a.seen) == 1 and len(b.seen) == 1
    accepted = gw.wait_for_event("association.accepted")
    assert {(r.get("sni"), r.get("route")) for r in accepted} >= {
        ("a.example", "a"), ("b.example", "b")}, accepted
    # No route for a name nobody configured: Called AE unknown there (1, 1, 7).
    rc = scu_associate(port, "ARCHIVE", ssl_context=_ssl(pki, None),
                       server_hostname="localhost")
    assert _rj_received(rc) == (1, 1, 7), rc.state()


# --------------------------------------------------------------------------- backend TLS


def test_backend_tls_wrong_server_name_transient_reject(pki, storescp, gateway):
    scp = storescp(tls=True)
    btls = {"verify": "chain", "ca": str(pki.backend_ca), "server_name": "pacs.wrong.example",
            "cert": str(pki.gateway_client.cert), "key": str(pki.gateway_client.key)}
    gw = gateway([tls_listener(pki)],
                 [route("archive", "ARCHIVE", scp.port, backend_tls=btls)])
    rc, out = _echoscu(gw, pki, pki.client)
    assert rc != 0, out
    assert "Rejected Transient" in out and "Temporary Congestion" in out, out + gw.output()
    rec = _rejections(gw)[-1]
    assert (rec["result"], rec["source"], rec["reason"]) == (2, 3, 1), rec
    assert "pacs.wrong.example" in rec["why"] and rec.get("tls_failure") is True, rec
