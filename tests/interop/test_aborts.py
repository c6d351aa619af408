"""One side of an established association disappears: the other side gets A-ABORT and
no sender believes a transfer succeeded that the receiver did not get (DESIGN §2)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import pytest
from pydicom import dcmread

from .helpers import (
    HOST,
    MB,
    FakeBackend,
    abort_bytes,
    assert_prefix_stored,
    assoc_ac_for,
    count_store_successes,
    datasets_differences,
    dcmtk,
    dcmtk_env,
    dcmtk_tls_client,
    echo_pdata,
    plain_listener,
    raw_associate,
    route,
    scu_args,
    scu_associate,
    split_pdus,
    store_and_kill_backend,
    stored_files,
    tls_listener,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

KILL_SIZES = [10 * 1024] * 3 + [16 * MB] * 6


def _assert_aborted_logged(gw) -> None:
    assert gw.wait_for_event("association.aborted"), (
        "no JSON log line with event 'association.aborted'\n" + gw.output()
    )


def test_backend_killed_mid_storescu_transfer(pki, storescp, gateway, dicom_files):
    files = dicom_files("kill", KILL_SIZES)
    scp = storescp()
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    args = scu_args(
        "storescu", gw.port("tls"), "-v", *dcmtk_tls_client(pki), calling="CT01", files=files
    )
    rc, out, n_at_kill = store_and_kill_backend(args, scp, after_files=3)
    assert n_at_kill >= 3, "storescu finished before the backend was killed\n" + out
    assert rc != 0, out + gw.output()
    successes = count_store_successes(out)
    assert successes < len(files), out
    # every C-STORE reported successful is really in the backend's directory
    assert successes <= len(stored_files(scp.outdir)), out
    assert_prefix_stored(scp.outdir, files, successes)
    _assert_aborted_logged(gw)


def test_backend_killed_mid_transfer_plain(storescp, gateway, dicom_files):
    files = dicom_files("kill", KILL_SIZES)
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    rc, out, n_at_kill = store_and_kill_backend(
        scu_args("storescu", gw.port("plain"), "-v", files=files), scp, after_files=3
    )
    assert n_at_kill >= 3, out
    assert rc != 0, out + gw.output()
    successes = count_store_successes(out)
    assert successes < len(files)
    assert_prefix_stored(scp.outdir, files, successes)
    _assert_aborted_logged(gw)


def test_client_killed_mid_transfer(pki, pynetdicom_scp, gateway, procs, dicom_files):
    """SIGKILL storescu mid-transfer: the backend's association ends, the gateway logs
    the abort, and the backend stored only complete, identical datasets.

    (Whether the backend sees an A-ABORT PDU depends on where the kill lands; the
    deterministic versions are the raw-peer tests below.)"""
    files = dicom_files("kill", KILL_SIZES)
    sent = {str(dcmread(p).SOPInstanceUID): p for p in files}
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)])
    args = scu_args(
        dcmtk("storescu"), gw.port("tls"), "-v", *dcmtk_tls_client(pki), calling="CT01", files=files
    )
    proc, out, _err = procs.spawn(args, "storescu-victim", env=dcmtk_env())
    deadline = time.monotonic() + 60
    while len(scp.stored) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "storescu finished before it could be killed\n" + out.read_text()
    proc.kill()
    proc.wait(5)
    _assert_aborted_logged(gw)
    assert len(scp.stored) < len(files)
    for ds in scp.stored:
        original = dcmread(sent[str(ds.SOPInstanceUID)])
        assert datasets_differences(original, ds) == [], ds.SOPInstanceUID


class _HalfPduBackend:
    """Raw backend: answers the A-ASSOCIATE-RQ with an AC; on ``vanish()`` sends
    ``tail`` (e.g. the first bytes of a P-DATA-TF) and closes the connection."""

    def __init__(self, tail: bytes):
        self.tail = tail
        self.server = socket.create_server((HOST, 0))
        self.port = self.server.getsockname()[1]
        self.go = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.server.settimeout(15)
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            buf = b""
            while len(buf) < 6 or len(buf) < 6 + struct.unpack_from(">L", buf, 2)[0]:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            conn.sendall(assoc_ac_for(buf))
            self.go.wait(15)
            if self.tail:
                conn.sendall(self.tail)
            time.sleep(0.05)

    def vanish(self):
        self.go.set()
        self.thread.join(5)

    def close(self):
        self.go.set()
        with contextlib.suppress(OSError):
            self.server.close()


@pytest.mark.parametrize("where", ["between-pdus", "mid-pdu"])
def test_client_vanishes_backend_gets_a_abort(where, gateway):
    """DESIGN §2: when one side disappears without release the other gets A-ABORT."""
    backend = FakeBackend("accept")
    try:
        gw = gateway([plain_listener()], [route("archive", "ARCHIVE", backend.port)])
        peer = raw_associate(gw.port("plain"))
        if where == "mid-pdu":
            peer.send(echo_pdata()[:10])  # PDU header + 4 bytes of a 74-byte PDU
            time.sleep(0.2)
        peer.close()
        assert backend.wait_for_pdu(0x07, 5), (
            f"backend got no A-ABORT; PDU types: {backend.pdu_types}\n{gw.output()}"
        )
        _assert_aborted_logged(gw)
    finally:
        backend.close()


@pytest.mark.parametrize("where", ["between-pdus", "mid-pdu"])
def test_backend_vanishes_client_gets_a_abort(where, gateway):
    backend = _HalfPduBackend(echo_pdata()[:10] if where == "mid-pdu" else b"")
    try:
        gw = gateway([plain_listener()], [route("archive", "ARCHIVE", backend.port)])
        peer = raw_associate(gw.port("plain"))
        backend.vanish()
        data = peer.read_until_close(5)
        peer.close()
        pdus = split_pdus(data)
        assert pdus and pdus[-1] == abort_bytes(pdus[-1][8], pdus[-1][9]), (
            f"client did not end with an A-ABORT; received {data.hex(' ')}\n{gw.output()}"
        )
        assert all(len(p) >= 6 and len(p) == 6 + struct.unpack_from(">L", p, 2)[0] for p in pdus), (
            f"a partial PDU reached the client: {data.hex(' ')}"
        )
        _assert_aborted_logged(gw)
    finally:
        backend.close()


def test_gateway_still_serves_after_abort(storescp, gateway, dicom_files):
    """After an aborted association the gateway keeps accepting new ones."""
    files = dicom_files("kill", KILL_SIZES)
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    store_and_kill_backend(
        ["storescu", "-aec", "ARCHIVE", HOST, gw.port("plain"), *files], scp, after_files=3
    )
    res = scu_associate(gw.port("plain"), "ARCHIVE")
    # backend is gone: transient reject, but the gateway answered
    assert res.reject_triplet() == (2, 3, 1), res.state() + gw.output()
    assert gw.proc.poll() is None, gw.output()


def test_backend_killed_pynetdicom_client_receives_a_abort(storescp, gateway, dicom_files):
    """On the wire: the client gets an A-ABORT PDU (0x07), and no C-STORE after the
    kill is reported successful."""
    files = dicom_files("kill", KILL_SIZES)
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    res = scu_associate(gw.port("plain"), "ARCHIVE")
    assert res.established, res.state() + gw.output()

    def killer():
        deadline = time.monotonic() + 30
        while len(scp.files()) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        # Let storescp send the 3rd response and get into the 16 MB 4th file: killed
        # right after writing a file, it may die between the header and body writes of
        # its C-STORE-RSP, and a half-relayed PDU cannot be followed by an A-ABORT.
        time.sleep(0.03)
        scp.kill()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    ok = 0
    try:
        for p in files:
            if not res.assoc.is_established:
                break
            try:
                status = res.assoc.send_c_store(dcmread(p))
            except RuntimeError:  # pynetdicom: association already aborted
                break
            if not status or status.Status != 0:
                break
            ok += 1
    finally:
        t.join(35)
        if res.assoc.is_established:
            res.assoc.abort()
    assert ok < len(files), "every C-STORE succeeded although the backend was killed"
    assert_prefix_stored(scp.outdir, files, ok)
    deadline = time.monotonic() + 5
    while not res.assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    types = sorted({pdu[0] for pdu in res.raw_received if pdu})
    assert 0x07 in types, f"client got no A-ABORT PDU; PDU types received: {types}"
    _assert_aborted_logged(gw)
