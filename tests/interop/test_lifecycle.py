"""DESIGN §5/§7: SIGHUP reloads config and certificates without dropping live
associations (a bad new config is refused, the old one kept); SIGTERM stops accepting
and drains live associations for the grace period, then aborts the rest."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import time

import pytest

from .conftest import client_ssl_context
from .helpers import (
    HOST,
    assert_prefix_stored,
    assert_received_identical,
    count_store_successes,
    dcmtk,
    dcmtk_env,
    is_listening,
    plain_listener,
    route,
    run_dcmtk,
    sha256_thumbprint,
    tls_listener,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

SLOW = ["--sleep-after", "1"]  # storescp sleeps 1 s after each response: ~N-1 s per association


def _start_storescu(procs, files, port, *extra):
    proc, out, _ = procs.spawn(
        [dcmtk("storescu"), "-v", *extra, "-aet", "CT01", "-aec", "ARCHIVE", HOST, port, *files],
        "storescu",
        env=dcmtk_env(),
    )
    return proc, out


def _wait_files(scp, n, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while len(scp.files()) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert len(scp.files()) >= n, "transfer did not start"


def _served_cert_sha256(pki, port) -> str:
    ctx = client_ssl_context(pki)
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def test_sighup_rotates_certificate_without_dropping_live_association(
    pki, storescp, gateway, procs, dicom_files, tmp_path
):
    files = dicom_files("slow5", [10 * 1024] * 5)
    cert, key = tmp_path / "gw-live.pem", tmp_path / "gw-live.key"
    shutil.copy(pki.gateway_server.cert, cert)
    shutil.copy(pki.gateway_server.key, key)
    scp = storescp(extra=SLOW)
    listener = tls_listener(pki, certificates=[{"cert": str(cert), "key": str(key)}])
    gw = gateway([listener], [route("archive", "ARCHIVE", scp.port)])
    old = sha256_thumbprint(cert)
    assert _served_cert_sha256(pki, gw.port("tls")) == old

    proc, out = _start_storescu(
        procs, files, gw.port("tls"), *pki.client.dcmtk_tls, "+cf", pki.gateway_ca
    )
    _wait_files(scp, 1, proc)
    new = pki.issue_server_cert("gateway", tmp_path, "gw-new")
    shutil.copy(new.cert, cert)
    shutil.copy(new.key, key)
    gw.signal(signal.SIGHUP)

    want = sha256_thumbprint(new.cert)
    deadline = time.monotonic() + 10
    served = old
    while served != want and time.monotonic() < deadline:
        time.sleep(0.2)
        served = _served_cert_sha256(pki, gw.port("tls"))
    assert served == want, "new certificate not served after SIGHUP\n" + gw.output()

    assert proc.wait(30) == 0, out.read_text() + gw.output()
    assert_received_identical(scp.outdir, files)


def test_sighup_with_bad_config_keeps_old_one(storescp, gateway, small_files):
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    gw.write_config("[gateway]\nartim_timeout = = broken\n")
    gw.signal(signal.SIGHUP)
    time.sleep(1)
    assert gw.proc.poll() is None, gw.output()
    rc, out = run_dcmtk(
        ["storescu", "-aec", "ARCHIVE", HOST, gw.port("plain"), *small_files], timeout=30
    )
    assert rc == 0, out + gw.output()
    assert_received_identical(scp.outdir, small_files)


def test_sighup_new_route_applies_to_new_associations(storescp, gateway, small_files):
    scp = storescp()
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)])
    rc, out = run_dcmtk(["echoscu", "-aec", "NEWAE", HOST, gw.port("plain")], timeout=30)
    assert rc != 0, out
    cfg = dict(gw.config)
    cfg["route"] = [*cfg["route"], route("new", "NEWAE", scp.port)]
    gw.write_config(cfg)
    gw.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        rc, out = run_dcmtk(["echoscu", "-aec", "NEWAE", HOST, gw.port("plain")], timeout=30)
        if rc == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert rc == 0, out + gw.output()


def test_sigterm_drains_live_association(storescp, gateway, procs, dicom_files):
    files = dicom_files("slow5", [10 * 1024] * 5)
    scp = storescp(extra=SLOW)
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port)],
        settings={"shutdown_grace": 30},
    )
    proc, out = _start_storescu(procs, files, gw.port("plain"))
    _wait_files(scp, 1, proc)
    gw.signal(signal.SIGTERM)
    # stops accepting ...
    deadline = time.monotonic() + 3
    while is_listening(gw.port("plain")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_listening(gw.port("plain")), "still listening after SIGTERM\n" + gw.output()
    # ... but the live transfer finishes
    assert proc.wait(30) == 0, out.read_text() + gw.output()
    assert_received_identical(scp.outdir, files)
    try:
        rc = gw.proc.wait(10)
    except Exception:
        rc = None
    assert rc == 0, f"gateway exit status {rc} after draining\n{gw.output()}"


def test_sigterm_grace_expiry_aborts_without_false_success(storescp, gateway, procs, dicom_files):
    files = dicom_files("slow5", [10 * 1024] * 5)
    scp = storescp(extra=SLOW)
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port)],
        settings={"shutdown_grace": 1},
    )
    proc, out = _start_storescu(procs, files, gw.port("plain"))
    _wait_files(scp, 1, proc)
    gw.signal(signal.SIGTERM)
    rc = proc.wait(30)
    text = out.read_text()
    assert rc != 0, "storescu succeeded although the grace period (1 s) was shorter\n" + text
    successes = count_store_successes(text)
    assert successes < len(files)
    assert_prefix_stored(scp.outdir, files, successes)
    gw.proc.wait(10)
    # every association's end is logged, also one cut by the grace period
    assert gw.events("association.aborted"), gw.output()


def test_sigterm_grace_expiry_sends_a_abort_both_ways(pynetdicom_scp, gateway, small_files):
    from pydicom import dcmread

    from .helpers import scu_associate

    scp = pynetdicom_scp("ARCHIVE", store_delay=0.7)
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port)],
        settings={"shutdown_grace": 1},
    )
    res = scu_associate(gw.port("plain"), "ARCHIVE")
    assert res.established, res.state() + gw.output()
    ds = [dcmread(p) for p in small_files]
    assert res.assoc.send_c_store(ds[0]).Status == 0
    gw.signal(signal.SIGTERM)
    ok = 1
    try:
        for _ in range(6):
            if not res.assoc.is_established:
                break
            try:
                status = res.assoc.send_c_store(ds[ok % len(ds)])
            except RuntimeError:  # pynetdicom: association already aborted
                break
            if not status or status.Status != 0:
                break
            ok += 1
    finally:
        if res.assoc.is_established:
            res.assoc.release()
    assert ok < 7, "the association outlived the 1 s grace period\n" + gw.output()
    assert len(scp.stored) >= ok
    types = sorted({pdu[0] for pdu in res.raw_received if pdu})
    assert 0x07 in types, f"client got no A-ABORT; PDU types: {types}\n{gw.output()}"
    deadline = time.monotonic() + 5
    while 0x07 not in scp.pdu_types and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0x07 in scp.pdu_types, f"backend got no A-ABORT; {sorted(set(scp.pdu_types))}"
