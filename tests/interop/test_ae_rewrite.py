"""AE title rewriting towards the backend, and the AC echoing the client's own titles."""

from __future__ import annotations

import pytest

from .conftest import client_ssl_context
from .helpers import plain_listener, route, scu_associate, tls_listener

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


def test_called_ae_rewritten_and_restored_in_ac(pynetdicom_scp, gateway):
    scp = pynetdicom_scp("PACS_REAL")  # require_called_aet: rejects anything but PACS_REAL
    gw = gateway(
        [plain_listener()], [route("archive", "ARCHIVE", scp.port, backend_called_ae="PACS_REAL")]
    )
    res = scu_associate(gw.port("plain"), "ARCHIVE", calling_ae="CT01")
    assert res.established, res.state() + gw.output()
    try:
        assert res.assoc.send_c_echo().Status == 0
    finally:
        res.assoc.release()
    assert [(s.called_ae, s.calling_ae) for s in scp.seen] == [("PACS_REAL", "CT01")]
    # DESIGN §2: the AC's Called/Calling AE fields echo what the client sent
    assert res.ac_ae_titles() == ("ARCHIVE", "CT01"), res.raw_received[:1]
    assert res.assoc.acceptor.ae_title == "ARCHIVE"


def test_called_and_calling_ae_rewritten_over_tls(pki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("PACS_REAL")
    gw = gateway(
        [tls_listener(pki)],
        [
            route(
                "archive",
                "ARCHIVE",
                scp.port,
                backend_called_ae="PACS_REAL",
                backend_calling_ae="GATEWAY",
            )
        ],
    )
    res = scu_associate(gw.port("tls"), "ARCHIVE", ssl_context=client_ssl_context(pki))
    assert res.established, res.state() + gw.output()
    try:
        assert res.assoc.send_c_echo().Status == 0
    finally:
        res.assoc.release()
    assert [(s.called_ae, s.calling_ae) for s in scp.seen] == [("PACS_REAL", "GATEWAY")]
    assert res.ac_ae_titles() == ("ARCHIVE", "CT01")


def test_without_rewrite_titles_pass_unchanged(pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    res = scu_associate(gw.port("plain"), "ARCHIVE", calling_ae="MR01")
    assert res.established, res.state() + gw.output()
    res.assoc.release()
    assert [(s.called_ae, s.calling_ae) for s in scp.seen] == [("ARCHIVE", "MR01")]
    assert res.ac_ae_titles() == ("ARCHIVE", "MR01")


def test_backend_rejection_passed_through_unchanged(pynetdicom_scp, gateway):
    """The backend (require_called_aet) rejects 1/1/7; the client sees exactly that."""
    scp = pynetdicom_scp("PACS_REAL")
    gw = gateway(
        [plain_listener()], [route("archive", "ARCHIVE", scp.port, backend_called_ae="WRONG")]
    )
    res = scu_associate(gw.port("plain"), "ARCHIVE")
    assert res.reject_triplet() == (1, 1, 7), res.state() + gw.output()
    assert [s.called_ae for s in scp.seen] == ["WRONG"]
