"""Limits of issue 4: max_associations globally and per route (A-ASSOCIATE-RJ 2,3,2
beyond it), an upper bound on the A-ASSOCIATE-RQ length, and bounded memory per
connection whatever the peer sends (backpressure instead of buffering)."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import pytest

from .helpers import (
    HOST,
    RELEASE_RQ,
    FakeBackend,
    RawPeer,
    abort_bytes,
    assert_no_tracebacks,
    assoc_rq_bytes,
    echoscu_ok,
    plain_listener,
    raw_associate,
    raw_item,
    raw_pdu,
    reject_bytes,
    route,
    rss_kib,
    run_dcmtk,
    wait_peer_records,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

FAST = {"artim_timeout": 2, "handshake_timeout": 2, "idle_timeout": 20, "release_timeout": 2}


def _release(peer: RawPeer) -> None:
    peer.send(RELEASE_RQ)
    peer.read_pdu(3)


def test_global_max_associations(pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [plain_listener()],
        [route("a", "ARCHIVE", scp.port)],
        settings={**FAST, "max_associations": 2},
    )
    port = gw.port("plain")
    first, second = raw_associate(port), raw_associate(port)
    try:
        with RawPeer(port) as third:
            third.send(assoc_rq_bytes())
            assert third.read_pdu(5) == reject_bytes(2, 3, 2), gw.output()
            recs = wait_peer_records(gw, third, "association.rejected")
            assert recs, gw.output()
        rc, out = run_dcmtk(["echoscu", "-v", "-aec", "ARCHIVE", HOST, port], 20)
        assert rc != 0 and "Local Limit Exceeded" in out, out
    finally:
        _release(first)
        first.close()
    # one slot free again: served
    ok, out = echoscu_ok(port)
    assert ok, out + gw.output()
    _release(second)
    second.close()
    assert_no_tracebacks(gw)


def test_route_max_associations(pynetdicom_scp, gateway):
    scp_a, scp_b = pynetdicom_scp("ARCHIVE"), pynetdicom_scp("OTHER")
    gw = gateway(
        [plain_listener()],
        [
            route("a", "ARCHIVE", scp_a.port, max_associations=1),
            route("b", "OTHER", scp_b.port),
        ],
        settings={**FAST, "max_associations": 50},
    )
    port = gw.port("plain")
    held = raw_associate(port, "ARCHIVE")
    try:
        with RawPeer(port) as second:
            second.send(assoc_rq_bytes("ARCHIVE"))
            assert second.read_pdu(5) == reject_bytes(2, 3, 2), gw.output()
            assert wait_peer_records(gw, second, "association.rejected"), gw.output()
        ok, out = echoscu_ok(port, "OTHER")
        assert ok, "another route is not limited by route a's max_associations\n" + out
    finally:
        _release(held)
        held.close()
    ok, out = echoscu_ok(port, "ARCHIVE")
    assert ok, out + gw.output()
    assert_no_tracebacks(gw)


def test_limit_counts_associations_not_connections(pynetdicom_scp, gateway):
    """Connections still in ARTIM (no RQ yet) do not use up max_associations."""
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [plain_listener()],
        [route("a", "ARCHIVE", scp.port)],
        settings={**FAST, "artim_timeout": 5, "max_associations": 2},
    )
    idle = [socket.create_connection((HOST, gw.port("plain"))) for _ in range(5)]
    try:
        ok, out = echoscu_ok(gw.port("plain"))
        assert ok, out + gw.output()
    finally:
        for s in idle:
            s.close()
    assert_no_tracebacks(gw)


def _padded_rq(total_body: int) -> bytes:
    """A valid RQ whose body is ``total_body`` bytes, padded with an unknown item (0x7F)."""
    base = assoc_rq_bytes()
    pad = total_body - (len(base) - 6) - 4
    assert pad >= 0
    return raw_pdu(0x01, base[6:] + raw_item(0x7F, bytes(pad)))


def test_rq_length_upper_bound(gateway):
    fb = FakeBackend("accept")
    try:
        gw = gateway(
            [plain_listener()],
            [route("a", "ARCHIVE", fb.port)],
            settings={**FAST, "max_pdu_length": 4096},
        )
        with RawPeer(gw.port("plain")) as peer:  # at the limit: accepted
            peer.send(_padded_rq(4096))
            answer = peer.read_pdu(5)
            assert answer is not None and answer[0] == 0x02, (answer, gw.output())
            _release_quietly(peer)
        with RawPeer(gw.port("plain")) as peer:  # one byte more: A-ABORT (2, 6)
            peer.send(_padded_rq(4097))
            assert peer.read_pdu(5) == abort_bytes(2, 6), gw.output()
            assert wait_peer_records(gw, peer, "association.aborted"), gw.output()
    finally:
        fb.close()
    assert_no_tracebacks(gw)


def _release_quietly(peer: RawPeer) -> None:
    with contextlib.suppress(OSError):
        peer.send(RELEASE_RQ)


def _pdata(n: int) -> bytes:
    return raw_pdu(0x04, struct.pack(">L", n + 2) + bytes([1, 0]) + bytes(n))


def test_backpressure_client_floods_stalled_backend(gateway):
    """The backend stops reading: the gateway must stop reading the client too,
    not buffer the flood. What the client manages to send is bounded by socket
    buffers, and so is the gateway's memory."""
    fb = FakeBackend("stall")
    try:
        gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=FAST)
        rss0 = rss_kib(gw.proc.pid)
        with raw_associate(gw.port("plain")) as peer:
            peer.sock.setblocking(False)
            chunk = _pdata(1 << 20)
            sent, end = 0, time.monotonic() + 2.5
            view = memoryview(chunk)
            pos = 0
            while time.monotonic() < end:
                try:
                    n = peer.sock.send(view[pos:])
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                sent += n
                pos = (pos + n) % len(chunk)
            rss1 = rss_kib(gw.proc.pid)
        growth_mb = (rss1 - rss0) / 1024
        assert sent < 96 << 20, f"client pushed {sent >> 20} MB into a stalled path"
        assert growth_mb < 48, f"gateway RSS grew {growth_mb:.0f} MB buffering the flood"
    finally:
        fb.close()
    assert gw.proc.poll() is None
    assert_no_tracebacks(gw)


def test_backpressure_backend_floods_client_that_does_not_read(gateway):
    fb = FakeBackend("flood")
    try:
        gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=FAST)
        rss0 = rss_kib(gw.proc.pid)
        with raw_associate(gw.port("plain")):
            time.sleep(2.5)  # we never read; the backend keeps sending
            rss1 = rss_kib(gw.proc.pid)
            flooded = fb.flooded
        growth_mb = (rss1 - rss0) / 1024
        assert flooded < 96 << 20, f"backend pushed {flooded >> 20} MB towards a stalled client"
        assert growth_mb < 48, f"gateway RSS grew {growth_mb:.0f} MB buffering the flood"
    finally:
        fb.close()
    assert gw.proc.poll() is None
    assert_no_tracebacks(gw)
