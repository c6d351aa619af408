"""TLS origination (plain client -> TLS backend) and re-encryption (TLS -> TLS, other CA)."""

from __future__ import annotations

import pytest

from .conftest import client_ssl_context
from .helpers import (
    MB,
    assert_received_identical,
    backend_tls,
    dcmtk_tls_client,
    plain_listener,
    route,
    run_dcmtk,
    scu_args,
    scu_associate,
    tls_listener,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def test_plain_echoscu_and_storescu_to_tls_storescp(pki, storescp, gateway, dicom_files):
    """storescp +tls demands a client cert: the route's backend_tls has cert/key."""
    files = dicom_files("origination", [10 * 1024, 1 * MB, 5 * MB, 30 * 1024])
    scp = storescp(tls=True)
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port, backend_tls=backend_tls(pki))],
    )
    rc, out = run_dcmtk(scu_args("echoscu", gw.port("plain"), "-v"), timeout=30)
    assert rc == 0, out + gw.output() + scp.output()
    rc, out = run_dcmtk(scu_args("storescu", gw.port("plain"), "-v", files=files), timeout=60)
    assert rc == 0, out + gw.output() + scp.output()
    assert_received_identical(scp.outdir, files)


def test_reencryption_echoscu_tls_to_tls_storescp(pki, storescp, gateway, small_files):
    """TLS listener (gateway CA / client CA) -> TLS backend with its own CA."""
    scp = storescp(tls=True)
    gw = gateway(
        [tls_listener(pki)],
        [route("archive", "ARCHIVE", scp.port, backend_tls=backend_tls(pki))],
    )
    client = ["-v", *dcmtk_tls_client(pki)]
    rc, out = run_dcmtk(scu_args("echoscu", gw.port("tls"), *client, calling="CT01"), timeout=30)
    assert rc == 0, out + gw.output() + scp.output()
    args = scu_args("storescu", gw.port("tls"), *client, calling="CT01", files=small_files)
    rc, out = run_dcmtk(args, 60)
    assert rc == 0, out + gw.output() + scp.output()
    assert_received_identical(scp.outdir, small_files)


def test_backend_certificate_from_wrong_ca_is_transient_reject(pki, storescp, gateway):
    """Backend TLS verification failure -> A-ASSOCIATE-RJ 2/3/1 (DESIGN §2)."""
    scp = storescp(tls=True)
    bad = backend_tls(pki)
    bad["ca"] = str(pki.evil_ca)
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port, backend_tls=bad)])
    res = scu_associate(gw.port("tls"), "ARCHIVE", ssl_context=client_ssl_context(pki))
    if res.established:
        res.assoc.release()
    assert res.reject_triplet() == (2, 3, 1), res.state() + gw.output()


def test_backend_requires_client_cert_but_route_has_none(pki, storescp, gateway):
    """No client cert towards a storescp that demands one: the client must not be told
    the association was accepted (reject 2/3/1 or an abort, never an A-ASSOCIATE-AC)."""
    scp = storescp(tls=True)
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port, backend_tls=backend_tls(pki, mutual=False))],
    )
    res = scu_associate(gw.port("plain"), "ARCHIVE")
    established = res.established
    if established:
        # TLS 1.3: the server may only refuse the missing client cert after the client
        # thinks the handshake is done; an echo must then fail.
        try:
            status = res.assoc.send_c_echo()
            established = bool(status) and status.Status == 0
        finally:
            res.assoc.abort()
    assert not established, res.state() + gw.output()
    if res.rejected:
        assert res.reject_triplet() == (2, 3, 1), res.state()
