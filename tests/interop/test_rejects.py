"""A-ASSOCIATE-RJ the gateway itself sends (DESIGN §2), as DCMTK and pynetdicom see them."""

from __future__ import annotations

import time

import pytest

from .conftest import client_ssl_context
from .helpers import (
    HOST,
    dcmtk_tls_client,
    free_port,
    plain_listener,
    route,
    run_dcmtk,
    scu_args,
    scu_associate,
    tls_listener,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


def _assert_rejected_logged(gw) -> None:
    assert gw.wait_for_event("association.rejected"), (
        "no JSON log line with event 'association.rejected'\n" + gw.output()
    )


def test_unknown_called_ae(storescp, gateway):
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    rc, out = run_dcmtk(["echoscu", "-aec", "NOSUCHAE", HOST, gw.port("plain")], timeout=30)
    assert rc != 0, out
    assert "Rejected Permanent" in out, out + gw.output()
    assert "Called AE Title Not Recognized" in out, out + gw.output()

    res = scu_associate(gw.port("plain"), "NOSUCHAE")
    assert res.rejected, res.state() + gw.output()
    assert res.reject_triplet() == (1, 1, 7)
    _assert_rejected_logged(gw)
    assert scp.files() == []


def test_unknown_called_ae_over_tls(pki, storescp, gateway):
    scp = storescp()
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    res = scu_associate(gw.port("tls"), "NOSUCHAE", ssl_context=client_ssl_context(pki))
    assert res.reject_triplet() == (1, 1, 7), res.state() + gw.output()
    _assert_rejected_logged(gw)


def test_calling_ae_not_in_allow_list(storescp, gateway):
    scp = storescp()
    gw = gateway(
        [plain_listener()], [route("archive", "ARCHIVE", scp.port, calling_ae=["CT01", "MR_*"])]
    )
    rc, out = run_dcmtk(
        ["echoscu", "-aet", "INTRUDER", "-aec", "ARCHIVE", HOST, gw.port("plain")], timeout=30
    )
    assert rc != 0, out
    assert "Rejected Permanent" in out, out + gw.output()
    assert "Calling AE Title Not Recognized" in out, out + gw.output()

    res = scu_associate(gw.port("plain"), "ARCHIVE", calling_ae="INTRUDER")
    assert res.reject_triplet() == (1, 1, 3), res.state() + gw.output()
    _assert_rejected_logged(gw)

    # the allow-list itself works: exact and glob entries pass
    for calling in ("CT01", "MR_7"):
        ok = scu_associate(gw.port("plain"), "ARCHIVE", calling_ae=calling)
        assert ok.established, f"{calling}: {ok.state()}\n{gw.output()}"
        ok.assoc.release()


def test_backend_port_closed_is_transient_congestion(gateway):
    dead_port = free_port()  # nothing listens here
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", dead_port)])
    rc, out = run_dcmtk(["echoscu", "-aec", "ARCHIVE", HOST, gw.port("plain")], timeout=30)
    assert rc != 0, out
    assert "Rejected Transient" in out, out + gw.output()
    assert "Service Provider (Presentation Related)" in out, out
    assert "Temporary Congestion" in out, out

    res = scu_associate(gw.port("plain"), "ARCHIVE")
    assert res.reject_triplet() == (2, 3, 1), res.state() + gw.output()
    _assert_rejected_logged(gw)


def test_client_cert_from_unrelated_ca_is_refused(pki, storescp, gateway):
    """Either the handshake refuses the chain, or the route's policy rejects 1/1/3;
    never an established association (DESIGN §3)."""
    scp = storescp()
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    res = scu_associate(
        gw.port("tls"), "ARCHIVE", ssl_context=client_ssl_context(pki, "evil_client")
    )
    if res.established:
        res.assoc.release()
    assert not res.established, res.state() + gw.output()
    if res.rejected:
        assert res.reject_triplet() == (1, 1, 3), res.state()

    rc, out = run_dcmtk(
        scu_args("echoscu", gw.port("tls"), *dcmtk_tls_client(pki, "evil_client")), timeout=30
    )
    assert rc != 0, out + gw.output()


def test_no_client_cert_on_required_listener(pki, storescp, gateway):
    scp = storescp()
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    res = scu_associate(gw.port("tls"), "ARCHIVE", ssl_context=client_ssl_context(pki, ""))
    if res.established:
        # TLS 1.3 reports a missing client cert only after the client's handshake ended
        try:
            status = res.assoc.send_c_echo()
            ok = bool(status) and status.Status == 0
        finally:
            res.assoc.abort()
        assert not ok, res.state() + gw.output()
    assert not res.rejected or res.reject_triplet()[0] in (1, 2), res.state()

    # DCMTK anonymous TLS (+tla: no client certificate), which sends no SNI
    rc, out = run_dcmtk(
        ["echoscu", "+tla", "+cf", pki.gateway_ca, "-aec", "ARCHIVE", HOST, gw.port("tls")],
        timeout=30,
    )
    assert rc != 0, out + gw.output()
    # the same listener still serves a proper client
    rc, out = run_dcmtk(scu_args("echoscu", gw.port("tls"), *dcmtk_tls_client(pki)), timeout=30)
    assert rc == 0, out + gw.output()


def _records_saying(gw, word: str, timeout: float = 5.0) -> list[dict]:
    """Log records other than startup ones with ``word`` in a string value."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            r
            for r in gw.logs()
            if r.get("event") not in ("listener.started", "gateway.started")
            and any(
                isinstance(v, str) and word in v.lower()
                for k, v in r.items()
                if k not in ("listener", "timestamp", "level")
            )
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_tls_client_on_plain_listener_is_recognised(pki, storescp, gateway):
    """DESIGN §2: a TLS ClientHello on a plain listener is logged as exactly that."""
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    rc, out = run_dcmtk(scu_args("echoscu", gw.port("plain"), *dcmtk_tls_client(pki)), timeout=30)
    assert rc != 0, out
    assert _records_saying(gw, "tls"), "no log line says TLS arrived\n" + gw.output()


def test_plain_dicom_on_tls_listener_is_recognised(pki, storescp, gateway):
    scp = storescp()
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    rc, out = run_dcmtk(["echoscu", "-aec", "ARCHIVE", HOST, gw.port("tls")], timeout=30)
    assert rc != 0, out
    assert _records_saying(gw, "plain"), "no log line says plain DICOM arrived\n" + gw.output()
