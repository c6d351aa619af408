"""Abort semantics with DCMTK (issue 4): when one side of an established association
vanishes the other gets an A-ABORT, a sender never believes a transfer succeeded that
the receiver did not get, and a receiver never keeps a half-received instance as a
complete file. (tests/interop/test_aborts.py covers the TLS variants.)"""

from __future__ import annotations

import re
import struct
import time

import pytest
from pydicom import dcmread
from pynetdicom import evt

from .helpers import (
    HOST,
    KB,
    MB,
    FakeBackend,
    abort_bytes,
    assert_no_tracebacks,
    assert_prefix_stored,
    assert_received_identical,
    count_store_successes,
    dcmtk,
    dcmtk_env,
    plain_listener,
    raw_associate,
    raw_pdu,
    route,
    store_and_kill_backend,
    stored_files,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

SETTINGS = {"artim_timeout": 2, "idle_timeout": 20, "release_timeout": 2}


def _rchar(pid: int) -> int:
    """Bytes a process has read so far (/proc/PID/io), to time a kill mid-instance."""
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def test_backend_killed_mid_multifile_storescu_reports_failure(storescp, gateway, dicom_files):
    files = dicom_files("abort-multi", [2 * MB] * 12)
    scp = storescp()
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", scp.port)], settings=SETTINGS)
    rc, out, n_at_kill = store_and_kill_backend(
        ["storescu", "-v", "-aec", "ARCHIVE", HOST, gw.port("plain"), *files],
        scp,
        after_files=3,
    )
    assert n_at_kill >= 3, "storescu finished before the backend was killed\n" + out
    assert rc != 0, "storescu exit 0 although the backend died\n" + out + gw.output()
    assert re.search(r"abort|fail", out, re.I), "storescu does not report the failure\n" + out
    ok = count_store_successes(out)
    assert ok < len(files)
    assert_prefix_stored(scp.outdir, files, ok)  # every success is really stored
    assert gw.wait_for_event("association.aborted"), gw.output()
    assert_no_tracebacks(gw)


def test_client_killed_mid_large_file_storescp_keeps_no_partial(
    storescp, gateway, procs, dicom_files
):
    files = dicom_files("abort-large", [10 * KB, 10 * KB, 48 * MB])
    scp = storescp()
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", scp.port)], settings=SETTINGS)
    r0 = _rchar(scp.proc.pid)
    proc, out, _ = procs.spawn(
        [dcmtk("storescu"), "-v", "-aec", "ARCHIVE", HOST, gw.port("plain"), *files],
        "storescu-victim",
        env=dcmtk_env(),
    )
    deadline = time.monotonic() + 30
    while _rchar(scp.proc.pid) - r0 < 10 * MB and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.001)
    assert proc.poll() is None, "storescu finished before it could be killed\n" + out.read_text()
    proc.kill()
    proc.wait(5)
    assert gw.wait_for_event("association.aborted", 10), gw.output()
    # storescp sees the association fail (an A-ABORT, or the connection closed when
    # the client died in the middle of a PDU, where no A-ABORT can follow cleanly)
    failed = re.compile(r"Association Aborted|Store SCP Failed|aborting association")
    deadline = time.monotonic() + 10
    while not failed.search(scp.output()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failed.search(scp.output()), scp.output()[-2000:] + gw.output()
    # only the two small instances, complete and identical; nothing of the large one
    time.sleep(0.5)
    assert len(stored_files(scp.outdir)) == 2, [p.name for p in stored_files(scp.outdir)]
    assert_received_identical(scp.outdir, files[:2])
    assert_no_tracebacks(gw)


def test_client_killed_mid_transfer_pynetdicom_backend_aborted(
    pynetdicom_scp, gateway, procs, dicom_files
):
    files = dicom_files("abort-large", [10 * KB, 10 * KB, 48 * MB])
    scp = pynetdicom_scp("ARCHIVE")
    aborted: list[float] = []
    scp.server.bind(evt.EVT_ABORTED, lambda event: aborted.append(time.monotonic()))
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", scp.port)], settings=SETTINGS)
    proc, out, _ = procs.spawn(
        [dcmtk("storescu"), "-v", "-aec", "ARCHIVE", HOST, gw.port("plain"), *files],
        "storescu-victim",
        env=dcmtk_env(),
    )
    deadline = time.monotonic() + 30
    while len(scp.stored) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    mark = len(scp.pdu_types)
    while len(scp.pdu_types) - mark < 100 and proc.poll() is None:  # ~1.6 MB into file 3
        time.sleep(0.001)
    assert proc.poll() is None, "storescu finished before it could be killed\n" + out.read_text()
    proc.kill()
    proc.wait(5)
    deadline = time.monotonic() + 10
    while not aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted, "pynetdicom EVT_ABORTED never fired\n" + gw.output()
    assert len(scp.stored) == 2, "the interrupted instance was handed to the SCP as complete"
    stored_uids = {str(ds.SOPInstanceUID) for ds in scp.stored}
    assert stored_uids == {str(dcmread(p).SOPInstanceUID) for p in files[:2]}
    assert gw.wait_for_event("association.aborted"), gw.output()
    assert_no_tracebacks(gw)


def test_storescu_reports_every_success_truthfully_under_backend_kill(
    storescp, gateway, dicom_files
):
    """Many small files, backend killed early: no success line without the file."""
    files = dicom_files("abort-many", [64 * KB] * 25)
    scp = storescp()
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", scp.port)], settings=SETTINGS)
    rc, out, n_at_kill = store_and_kill_backend(
        ["storescu", "-v", "-aec", "ARCHIVE", HOST, gw.port("plain"), *files], scp, after_files=5
    )
    if n_at_kill < 0:
        pytest.skip("transfer finished before the kill could land")
    assert rc != 0, out
    ok = count_store_successes(out)
    assert ok <= len(stored_files(scp.outdir))
    assert_prefix_stored(scp.outdir, files, ok)
    assert_no_tracebacks(gw)


def test_client_dies_mid_pdu_backend_gets_a_abort(gateway):
    """The client vanishes in the middle of a P-DATA-TF: the backend must still be told
    with an A-ABORT PDU (DESIGN §2), not only see the connection drop."""
    fb = FakeBackend("accept")
    try:
        gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=SETTINGS)
        with raw_associate(gw.port("plain")) as peer:
            pdv = struct.pack(">L", 16384 + 2) + bytes([1, 0]) + bytes(16384)
            pdu = raw_pdu(0x04, pdv)
            peer.send(pdu + pdu[:5000])  # one whole P-DATA-TF, then a third of another
            time.sleep(0.3)
        got = fb.wait_for_pdu(0x07, 5)
        rec = gw.wait_for_event("association.aborted")
        assert got, f"backend got no A-ABORT; PDU types {fb.pdu_types}\n" + gw.output()
        assert rec and rec[0].get("by") == "client", rec
    finally:
        fb.close()
    assert_no_tracebacks(gw)


def test_backend_dies_mid_pdu_client_gets_a_abort(gateway):
    """Mirror image: the backend vanishes in the middle of a PDU towards the client.

    An A-ABORT can only follow whole PDUs, so the gateway must not have forwarded the
    cut PDU's first bytes without being able to finish it (e.g. by holding back an
    incomplete trailing PDU, bounded by the PDU size)."""
    fb = FakeBackend("cut")
    try:
        gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=SETTINGS)
        with raw_associate(gw.port("plain")) as peer:
            first = peer.read_pdu(5)
            assert first is not None and first[0] == 0x04, gw.output()
            peer.read_until_close(5)
        # after the whole P-DATA-TF: exactly an A-ABORT, no fragment of the cut PDU
        rest = bytes(peer.received)
        assert rest == abort_bytes(2, 0), (
            f"client got no A-ABORT after the backend died mid-PDU; got {len(rest)} bytes "
            f"ending {rest[-16:].hex()}\n" + gw.output()
        )
    finally:
        fb.close()
    assert_no_tracebacks(gw)
