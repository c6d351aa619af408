"""TLS termination: TLS clients (DCMTK, pynetdicom) -> gateway TLS listener -> plain backend."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from .conftest import client_ssl_context
from .helpers import (
    assert_received_identical,
    count_store_successes,
    datasets_differences,
    dcmtk_tls_client,
    find_patients,
    plain_listener,
    route,
    run_dcmtk,
    scu_args,
    scu_associate,
    tls_listener,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def test_echoscu_tls_to_plain_storescp(pki, storescp, gateway):
    scp = storescp()
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    # DCMTK TLS client: CT01 key + cert (client CA), trusting the gateway CA.
    args = scu_args("echoscu", gw.port("tls"), "-v", *dcmtk_tls_client(pki), calling="CT01")
    rc, out = run_dcmtk(args, timeout=30)
    assert rc == 0, out + gw.output()


def test_storescu_tls_mixed_sizes_arrive_identical(pki, storescp, gateway, mixed_files):
    """>= 20 files, 10 KB .. 55 MB, through TLS termination; every dataset identical."""
    scp = storescp()
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    args = scu_args(
        "storescu", gw.port("tls"), "-v", *dcmtk_tls_client(pki), calling="CT01", files=mixed_files
    )
    rc, out = run_dcmtk(args, timeout=100)
    assert rc == 0, out[-3000:] + gw.output()
    assert count_store_successes(out) == len(mixed_files), out[-3000:]
    assert_received_identical(scp.outdir, mixed_files)


def test_storescu_plain_routing(storescp, gateway, small_files):
    """Plain listener -> plain backend (the fourth combination)."""
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    rc, out = run_dcmtk(scu_args("storescu", gw.port("plain"), "-v", files=small_files), timeout=30)
    assert rc == 0, out + gw.output()
    assert_received_identical(scp.outdir, small_files)


def test_pynetdicom_tls_echo_store_find(pki, pynetdicom_scp, gateway, small_files, qr_files):
    scp = pynetdicom_scp("PACS", instances=qr_files)
    gw = gateway([tls_listener(pki)], [route("pacs", "PACS", scp.port)])
    res = scu_associate(gw.port("tls"), "PACS", ssl_context=client_ssl_context(pki))
    assert res.established, res.state() + gw.output()
    try:
        assert res.assoc.send_c_echo().Status == 0x0000
        sent = [dcmread(p) for p in small_files]
        for ds in sent:
            assert res.assoc.send_c_store(ds).Status == 0x0000
        matches, statuses = find_patients(res.assoc, "QR*")
        assert statuses and statuses[-1] == 0x0000, statuses
        assert [str(m.PatientID) for m in matches] == ["QR001"]
        assert str(matches[0].PatientName) == "Query^Retrieve"
    finally:
        res.assoc.release()
    assert scp.echoes == 1
    by_uid = {str(d.SOPInstanceUID): d for d in scp.stored}
    assert set(by_uid) == {str(d.SOPInstanceUID) for d in sent}
    for ds in sent:
        assert datasets_differences(ds, by_uid[str(ds.SOPInstanceUID)]) == []
    assert res.assoc.is_released
