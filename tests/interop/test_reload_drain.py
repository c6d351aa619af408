"""SIGHUP reload and SIGTERM/SIGINT drain, each proven with a live DCMTK storescu
transfer running across the signal (issue 4, DESIGN §5)."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from pydicom import dcmread

from .helpers import (
    HOST,
    MB,
    assert_no_tracebacks,
    count_store_successes,
    dcmtk,
    dcmtk_env,
    echoscu_ok,
    free_port,
    is_listening,
    plain_listener,
    route,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

SETTINGS = {"artim_timeout": 2, "idle_timeout": 30, "release_timeout": 2}


def _storescu(procs, port, files, called="ARCHIVE"):
    proc, out, err = procs.spawn(
        [dcmtk("storescu"), "-v", "-aec", called, HOST, port, *files],
        "storescu-live",
        env=dcmtk_env(),
    )
    return proc, _Output(out, err)


class _Output:
    """storescu's stdout + stderr (DCMTK logs to stderr)."""

    def __init__(self, *paths):
        self.paths = paths

    def read_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.paths)


def _wait_stored(scp, n, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while len(scp.stored) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(scp.stored) >= n and proc.poll() is None, "live transfer did not get going"


def _refuses(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _uids(paths) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _wait(pred, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def test_sighup_reload_keeps_live_transfer_and_applies_new_config(
    pynetdicom_scp, gateway, procs, dicom_files
):
    files = dicom_files("reload30", [2 * MB] * 30)
    scp = pynetdicom_scp("ARCHIVE", store_delay=0.12)
    scp_new = pynetdicom_scp("NEWAE")
    gw = gateway(
        [plain_listener(), plain_listener("old")],
        [route("archive", "ARCHIVE", scp.port)],
        settings=SETTINGS,
    )
    assert not echoscu_ok(gw.port("plain"), "NEWAE")[0], "NEWAE routed before the reload"
    proc, out = _storescu(procs, gw.port("plain"), files)
    _wait_stored(scp, 2, proc)

    new_port = free_port()
    cfg = dict(gw.config)
    cfg["listener"] = [cfg["listener"][0], plain_listener("new", listen=f"{HOST}:{new_port}")]
    cfg["route"] = [*cfg["route"], route("new", "NEWAE", scp_new.port)]
    gw.write_config(cfg)
    gw.signal(signal.SIGHUP)
    assert gw.wait_for_event("config.reloaded", 10), gw.output()
    assert proc.poll() is None and len(scp.stored) < len(files), "transfer ended too early"

    # new associations use the new routes; listeners added and removed
    assert echoscu_ok(gw.port("plain"), "NEWAE")[0], gw.output()
    assert _wait(lambda: is_listening(new_port)), "new listener not started\n" + gw.output()
    ok, out_new = echoscu_ok(new_port, "ARCHIVE")
    assert ok, out_new + gw.output()
    assert _wait(lambda: _refuses(gw.port("old"))), "removed listener still accepts"

    # the live association continues untouched to the end
    assert proc.wait(60) == 0, out.read_text()[-3000:] + gw.output()
    assert count_store_successes(out.read_text()) == len(files)
    assert {str(ds.SOPInstanceUID) for ds in scp.stored} == _uids(files)
    assert 0x07 not in scp.pdu_types
    assert_no_tracebacks(gw)


def test_sighup_invalid_config_refused_old_kept(pynetdicom_scp, gateway, procs, dicom_files):
    files = dicom_files("reload10", [2 * MB] * 10)
    scp = pynetdicom_scp("ARCHIVE", store_delay=0.1)
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)], settings=SETTINGS)
    proc, out = _storescu(procs, gw.port("plain"), files)
    _wait_stored(scp, 1, proc)
    bad = dict(gw.config)
    bad["route"] = [route("broken", "ARCHIVE", 0)]
    gw.write_config(bad)
    gw.signal(signal.SIGHUP)
    failed = gw.wait_for_event("config.reload_failed", 10)
    assert failed, gw.output()
    text = str(failed[0])
    assert "backend.port" in text and "broken" in text, f"reason lacks the key path: {failed[0]}"
    assert gw.proc.poll() is None
    assert echoscu_ok(gw.port("plain"), "ARCHIVE")[0], "old route lost\n" + gw.output()
    assert proc.wait(60) == 0, out.read_text()[-3000:] + gw.output()
    assert {str(ds.SOPInstanceUID) for ds in scp.stored} == _uids(files)
    assert_no_tracebacks(gw)


def test_sigterm_drains_live_transfer_within_grace(pynetdicom_scp, gateway, procs, dicom_files):
    files = dicom_files("reload10", [2 * MB] * 10)
    scp = pynetdicom_scp("ARCHIVE", store_delay=0.15)
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port)],
        settings={**SETTINGS, "shutdown_grace": 30},
    )
    proc, out = _storescu(procs, gw.port("plain"), files)
    _wait_stored(scp, 1, proc)
    gw.signal(signal.SIGTERM)
    # stops accepting at once ...
    assert _wait(lambda: _refuses(gw.port("plain")), 3), "still accepting after SIGTERM"
    assert proc.poll() is None, "transfer ended before the drain could be observed"
    # ... the live transfer finishes, then the gateway exits 0
    assert proc.wait(60) == 0, out.read_text()[-3000:] + gw.output()
    assert {str(ds.SOPInstanceUID) for ds in scp.stored} == _uids(files)
    assert gw.proc.wait(10) == 0, gw.output()
    assert gw.events("gateway.stopped"), gw.output()
    assert_no_tracebacks(gw)


def test_sigterm_short_grace_aborts_the_rest(pynetdicom_scp, gateway, procs, dicom_files):
    files = dicom_files("reload30", [2 * MB] * 30)
    scp = pynetdicom_scp("ARCHIVE", store_delay=0.3)
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port)],
        settings={**SETTINGS, "shutdown_grace": 1},
    )
    proc, out = _storescu(procs, gw.port("plain"), files)
    _wait_stored(scp, 1, proc)
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert _wait(lambda: _refuses(gw.port("plain")), 3), "still accepting after SIGTERM"
    rc = proc.wait(30)
    text = out.read_text()
    assert rc != 0, "storescu succeeded although the grace period was 1 s\n" + text[-2000:]
    ok = count_store_successes(text)
    assert ok < len(files)
    assert ok <= len(scp.stored), "a success was reported that the backend did not get"
    assert gw.proc.wait(10) == 0, gw.output()
    assert time.monotonic() - t0 < 1 + 4, "gateway took too long to exit after the grace"
    assert gw.events("association.aborted"), gw.output()
    assert _wait(lambda: 0x07 in scp.pdu_types, 5), "backend got no A-ABORT"
    assert_no_tracebacks(gw)


def test_sigint_drains_like_sigterm(pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([plain_listener()], [route("archive", "ARCHIVE", scp.port)], settings=SETTINGS)
    assert echoscu_ok(gw.port("plain"))[0]
    gw.signal(signal.SIGINT)
    assert gw.proc.wait(10) == 0, gw.output()
    assert _refuses(gw.port("plain"))
    assert_no_tracebacks(gw)
