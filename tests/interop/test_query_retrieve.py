"""Query/retrieve through the gateway (DESIGN §7).

movescu (MODALITY, own storage SCP) -> gateway plain listener -> pynetdicom Q/R SCP
(QRSCP); QRSCP's move destination MODALITY points at the gateway, which routes Called
AE MODALITY to movescu's storage port.
"""

from __future__ import annotations

import pytest

from .conftest import client_ssl_context
from .helpers import (
    HOST,
    assert_received_identical,
    dcmtk_tls_client,
    find_patients,
    free_port,
    movescu_args,
    plain_listener,
    route,
    run_dcmtk,
    scu_args,
    scu_associate,
    tls_listener,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


def test_movescu_round_trip_through_gateway(pynetdicom_scp, gateway, qr_files, tmp_path):
    modality_port = free_port()  # movescu's own storage SCP
    gw_port = free_port()
    qr = pynetdicom_scp(
        "QRSCP", instances=qr_files, move_destinations={"MODALITY": (HOST, gw_port)}
    )
    gw = gateway(
        [plain_listener(listen=f"{HOST}:{gw_port}")],
        [
            route("pacs", "QRSCP", qr.port),
            route("modality", "MODALITY", modality_port),
        ],
    )
    outdir = tmp_path / "retrieved"
    outdir.mkdir()
    rc, out = run_dcmtk(
        movescu_args(HOST, gw.port("plain"), "QRSCP", modality_port, outdir, "QR001"), 60
    )
    assert rc == 0, out + gw.output()
    assert_received_identical(outdir, qr_files)
    # QRSCP saw the movescu association; the sub-association went out as QRSCP -> MODALITY
    assert [(s.called_ae, s.calling_ae) for s in qr.seen] == [("QRSCP", "MODALITY")]


def test_findscu_tls_through_gateway(pki, pynetdicom_scp, gateway, qr_files):
    qr = pynetdicom_scp("QRSCP", instances=qr_files)
    gw = gateway([tls_listener(pki)], [route("pacs", "QRSCP", qr.port)])
    keys = ["-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=QR*", "-k", "PatientName"]
    options = ["-v", "-P", *dcmtk_tls_client(pki), *keys]
    args = scu_args("findscu", gw.port("tls"), *options, called="QRSCP", calling="CT01")
    rc, out = run_dcmtk(args, timeout=30)
    assert rc == 0, out + gw.output()
    assert "QR001" in out and "Query^Retrieve" in out, out
    assert "Received Final Find Response (Success)" in out, out


def test_pynetdicom_find_tls_no_match(pki, pynetdicom_scp, gateway, qr_files):
    qr = pynetdicom_scp("QRSCP", instances=qr_files)
    gw = gateway([tls_listener(pki)], [route("pacs", "QRSCP", qr.port)])
    res = scu_associate(gw.port("tls"), "QRSCP", ssl_context=client_ssl_context(pki))
    assert res.established, res.state() + gw.output()
    try:
        matches, statuses = find_patients(res.assoc, "NOBODY")
    finally:
        res.assoc.release()
    assert matches == [] and statuses == [0x0000]
