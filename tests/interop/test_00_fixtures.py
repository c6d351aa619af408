"""The fixtures against each other, without the gateway.

If one of these fails, the gateway tests that use the same fixture are not telling
anything about the gateway.
"""

from __future__ import annotations

import pytest
from pydicom import dcmread

from .conftest import client_ssl_context, server_ssl_context
from .helpers import (
    HOST,
    assert_prefix_stored,
    assert_received_identical,
    count_store_successes,
    find_patients,
    free_port,
    movescu_args,
    run_dcmtk,
    scu_args,
    scu_associate,
    store_and_kill_backend,
    stored_files,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


def test_echoscu_tls_to_storescp_tls(pki, storescp):
    scp = storescp(tls=True)
    tls = pki.gateway_client.dcmtk_client(pki.backend_ca)
    rc, out = run_dcmtk(scu_args("echoscu", scp.port, "-v", *tls, called="ANY"), timeout=20)
    assert rc == 0, out


def test_echoscu_tls_untrusted_client_refused_by_storescp(pki, storescp):
    scp = storescp(tls=True)
    rc, out = run_dcmtk(
        ["echoscu", *pki.evil_client.dcmtk_tls, "+cf", pki.backend_ca, HOST, scp.port],
        timeout=20,
    )
    assert rc != 0, out


def test_storescu_plain_and_tls_to_storescp(pki, storescp, small_files):
    scp = storescp()
    rc, out = run_dcmtk(["storescu", "-v", HOST, scp.port, *small_files], timeout=30)
    assert rc == 0, out
    assert count_store_successes(out) == len(small_files), out
    assert_received_identical(scp.outdir, small_files)

    tscp = storescp(tls=True)
    tls = pki.gateway_client.dcmtk_client(pki.backend_ca)
    args = scu_args("storescu", tscp.port, "-v", *tls, called=None, files=small_files)
    rc, out = run_dcmtk(args, timeout=30)
    assert rc == 0, out
    assert_received_identical(tscp.outdir, small_files)


def test_pynetdicom_tls_scu_to_pynetdicom_tls_scp(pki, pynetdicom_scp, small_files, qr_files):
    scp = pynetdicom_scp(
        "PACS",
        ssl_context=server_ssl_context(pki, require_client_from=pki.client_ca),
        instances=qr_files,
    )
    res = scu_associate(scp.port, "PACS", ssl_context=client_ssl_context(pki, trust=pki.backend_ca))
    assert res.established, res.state()
    try:
        assert res.assoc.send_c_echo().Status == 0
        ds = dcmread(small_files[0])
        assert res.assoc.send_c_store(ds).Status == 0
        matches, statuses = find_patients(res.assoc, "QR*")
        assert statuses[-1] == 0
        assert [m.PatientID for m in matches] == ["QR001"]
    finally:
        res.assoc.release()
    assert scp.seen[0].called_ae == "PACS" and scp.seen[0].calling_ae == "CT01"
    assert scp.stored[0].SOPInstanceUID == ds.SOPInstanceUID


def test_wrong_called_ae_rejected_by_pynetdicom_scp(pynetdicom_scp):
    """What a 1/1/7 rejection looks like to DCMTK and to pynetdicom."""
    scp = pynetdicom_scp("PACS")
    rc, out = run_dcmtk(["echoscu", "-aec", "NOPE", HOST, scp.port], timeout=20)
    assert rc != 0
    assert "Rejected Permanent" in out and "Called AE Title Not Recognized" in out, out
    res = scu_associate(scp.port, "NOPE")
    assert res.reject_triplet() == (1, 1, 7), res.state()


def test_movescu_to_pynetdicom_qr_scp_direct(pynetdicom_scp, qr_files, tmp_path):
    move_port = free_port()
    scp = pynetdicom_scp(
        "QRSCP", instances=qr_files, move_destinations={"MODALITY": (HOST, move_port)}
    )
    outdir = tmp_path / "moved"
    outdir.mkdir()
    rc, out = run_dcmtk(
        movescu_args(HOST, scp.port, "QRSCP", move_port, outdir, "QR001"), timeout=30
    )
    assert rc == 0, out
    assert_received_identical(outdir, qr_files)


def test_storescp_killed_mid_transfer_direct(storescp, dicom_files, tmp_path):
    files = dicom_files("kill", [10 * 1024] * 3 + [16 * 1024 * 1024] * 6)
    scp = storescp()
    rc, out, n_at_kill = store_and_kill_backend(
        ["storescu", "-v", HOST, scp.port, *files], scp, after_files=3
    )
    assert n_at_kill >= 3, f"storescu finished before the kill\n{out}"
    assert rc != 0, out
    successes = count_store_successes(out)
    assert successes <= len(stored_files(scp.outdir)), out
    assert successes < len(files), out
    assert_prefix_stored(scp.outdir, files, successes)
