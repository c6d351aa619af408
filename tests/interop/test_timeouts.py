"""Every timeout of issue 4, each against a deliberately slow peer: ARTIM, TLS
handshake, backend connect, backend answer, idle association, release — and a
slowloris client that must not starve anyone else. Timeouts are ~1 s to keep it fast.
"""

from __future__ import annotations

import selectors
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
    echo_pdata,
    echoscu_ok,
    free_port,
    plain_listener,
    raw_associate,
    reject_bytes,
    route,
    tls_client_hello,
    tls_listener,
    wait_peer_records,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

FAST = {
    "artim_timeout": 1,
    "handshake_timeout": 1,
    "connect_timeout": 1,
    "backend_timeout": 1,
    "idle_timeout": 10,
    "release_timeout": 1,
}


@pytest.fixture
def fake_backend():
    made: list[FakeBackend] = []

    def make(mode: str = "accept") -> FakeBackend:
        fb = FakeBackend(mode)
        made.append(fb)
        return fb

    yield make
    for fb in made:
        fb.close()


def serving(gw, port_name: str = "plain", called: str = "ARCHIVE") -> None:
    ok, out = echoscu_ok(gw.port(port_name), called)
    assert ok, out + gw.output()
    assert_no_tracebacks(gw)


# ------------------------------------------------------------------ ARTIM


@pytest.mark.parametrize(
    "sent",
    [b"", assoc_rq_bytes()[:50]],
    ids=["nothing", "half-rq"],
)
def test_artim_incomplete_rq(pynetdicom_scp, gateway, sent):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", scp.port)], settings=FAST)
    with RawPeer(gw.port("plain")) as peer:
        if sent:
            peer.send(sent)
        answer = peer.read_pdu(4)
        at = time.monotonic() - peer.connected_at
        assert answer == abort_bytes(2, 0), (answer, gw.output())
        assert 0.8 <= at <= 2.0, f"A-ABORT {at:.2f} s after connect, ARTIM is 1 s"
        # PS3.8: after the A-ABORT, ARTIM again for the peer to close, then close ourselves
        peer.read_until_close(4)
        assert peer.closed, "not closed after the ARTIM A-ABORT"
        assert peer.closed_at - peer.connected_at <= 3.5
        recs = wait_peer_records(gw, peer, "association.aborted")
    assert recs and "ARTIM" in recs[0].get("reason", ""), recs or gw.output()
    serving(gw)


def test_slowloris_cannot_starve_others(pynetdicom_scp, gateway):
    """200 connections that send one byte and hold: a real client still gets through
    meanwhile, and every held connection is closed at ARTIM."""
    artim = 3
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [plain_listener()],
        [route("a", "ARCHIVE", scp.port)],
        settings={**FAST, "artim_timeout": artim, "max_associations": 100},
    )
    held: list[socket.socket] = []
    opened = time.monotonic()
    try:
        for _ in range(200):
            s = socket.create_connection((HOST, gw.port("plain")), timeout=5)
            s.sendall(b"\x01")
            held.append(s)
        t_echo = time.monotonic()
        ok, out = echoscu_ok(gw.port("plain"))
        assert ok, "echoscu starved by 200 half-open connections\n" + out + gw.output()
        assert time.monotonic() - opened < artim, "echoscu only got through after ARTIM"
        assert time.monotonic() - t_echo < 2.0
        # every held connection is closed by the gateway (A-ABORT, then close)
        sel = selectors.DefaultSelector()
        for s in held:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        open_ = set(held)
        deadline = opened + 2 * artim + 4
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    open_.discard(s)
        assert not open_, f"{len(open_)} of 200 held connections still open after ARTIM"
    finally:
        for s in held:
            s.close()
    serving(gw)


# ------------------------------------------------------------------ TLS handshake


@pytest.mark.parametrize("sent", [b"", None], ids=["silent", "half-client-hello"])
def test_tls_handshake_never_finishes(pki, pynetdicom_scp, gateway, sent):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [plain_listener(), tls_listener(pki)],
        [route("a", "ARCHIVE", scp.port)],
        settings={**FAST, "artim_timeout": 10},
    )
    with RawPeer(gw.port("tls")) as peer:
        if sent is None:
            hello = tls_client_hello()
            peer.send(hello[: len(hello) // 2])
        peer.read_until_close(5)
        assert peer.closed, "half-done TLS handshake never closed\n" + gw.output()
        took = peer.closed_at - peer.connected_at
        assert 0.8 <= took <= 3.0, f"closed after {took:.2f} s, handshake_timeout is 1 s"
        assert wait_peer_records(gw, peer, "tls.handshake_failed"), gw.output()
    serving(gw)


# ------------------------------------------------------------------ backend


def test_backend_never_answers_rq(fake_backend, gateway):
    fb = fake_backend("silent")
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=FAST)
    with RawPeer(gw.port("plain")) as peer:
        t0 = time.monotonic()
        peer.send(assoc_rq_bytes())
        answer = peer.read_pdu(6)
        took = time.monotonic() - t0
        assert answer == reject_bytes(2, 3, 1), (answer, gw.output())
        assert 0.8 <= took <= 3.0, f"RJ after {took:.2f} s, backend_timeout is 1 s"
        assert wait_peer_records(gw, peer, "association.rejected"), gw.output()
    assert fb.pdu_types == [0x01], "the backend should have had the RQ"
    assert_no_tracebacks(gw)


def _blackholed_port() -> tuple[socket.socket, list[socket.socket]] | None:
    """A listening socket with a full accept queue: further SYNs are dropped, so a
    connect() hangs. None if this kernel still completes connections."""
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex((HOST, port))
        fillers.append(c)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect((HOST, port))
    except OSError:
        return srv, fillers
    finally:
        probe.close()
    srv.close()
    for c in fillers:
        c.close()
    return None


def test_backend_connect_timeout(gateway):
    hole = _blackholed_port()
    if hole is None:
        pytest.skip("cannot black-hole a loopback port here (accept queue not enforced)")
    srv, fillers = hole
    try:
        gw = gateway(
            [plain_listener()],
            [route("a", "ARCHIVE", srv.getsockname()[1])],
            settings={**FAST, "backend_timeout": 10},
        )
        with RawPeer(gw.port("plain")) as peer:
            t0 = time.monotonic()
            peer.send(assoc_rq_bytes())
            answer = peer.read_pdu(8)
            took = time.monotonic() - t0
            assert answer == reject_bytes(2, 3, 1), (answer, gw.output())
            assert 0.8 <= took <= 3.0, f"RJ after {took:.2f} s, connect_timeout is 1 s"
            assert wait_peer_records(gw, peer, "association.rejected"), gw.output()
    finally:
        srv.close()
        for c in fillers:
            c.close()
    assert_no_tracebacks(gw)


def test_backend_port_closed(gateway):
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", free_port())], settings=FAST)
    with RawPeer(gw.port("plain")) as peer:
        t0 = time.monotonic()
        peer.send(assoc_rq_bytes())
        assert peer.read_pdu(5) == reject_bytes(2, 3, 1), gw.output()
        assert time.monotonic() - t0 < 1.0
        assert wait_peer_records(gw, peer, "association.rejected"), gw.output()
    assert_no_tracebacks(gw)


def test_backend_malformed_rj_is_a_gateway_reject(fake_backend, gateway):
    # A backend RJ with a bad body used to raise ProtocolError out of the session
    # (association.crashed, traceback, the client got nothing but a close).
    fb = fake_backend("bad-rj")
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=FAST)
    with RawPeer(gw.port("plain")) as peer:
        peer.send(assoc_rq_bytes())
        assert peer.read_pdu(5) == reject_bytes(2, 3, 1), gw.output()
        recs = wait_peer_records(gw, peer, "association.rejected")
        assert recs and "malformed A-ASSOCIATE-RJ" in recs[0].get("why", ""), gw.output()
    assert_no_tracebacks(gw)


def test_client_gone_before_ac_aborts_backend(fake_backend, gateway):
    # The client resets while the backend is still deciding. The AC then cannot be
    # delivered: the backend (which believes the association is up) gets an A-ABORT,
    # and the gateway logs one "aborted" line instead of a crash traceback.
    fb = fake_backend("slow-accept")
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=FAST)
    peer = RawPeer(gw.port("plain"))
    peer.send(assoc_rq_bytes())
    assert fb.wait_for_pdu(0x01), gw.output()
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST
    assert fb.wait_for_pdu(0x07), (fb.pdu_types, gw.output())
    recs = wait_peer_records(gw, peer, "association.aborted")
    assert recs and recs[0].get("by") == "client", gw.output()
    assert recs[0].get("abort_sent_to") == ["backend"], recs
    assert_no_tracebacks(gw)


# ------------------------------------------------------------------ established


def test_idle_association_aborted_both_ways(pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [plain_listener()],
        [route("a", "ARCHIVE", scp.port)],
        settings={**FAST, "idle_timeout": 1.5},
    )
    with raw_associate(gw.port("plain")) as peer:
        t0 = time.monotonic()
        answer = peer.read_pdu(5)
        took = time.monotonic() - t0
        assert answer == abort_bytes(2, 0), (answer, gw.output())
        assert 1.2 <= took <= 3.0, f"A-ABORT after {took:.2f} s, idle_timeout is 1.5 s"
        recs = wait_peer_records(gw, peer, "association.aborted")
    assert recs and "idle" in recs[0].get("reason", "").lower(), recs or gw.output()
    deadline = time.monotonic() + 5
    while 0x07 not in scp.pdu_types and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0x07 in scp.pdu_types, f"backend got no A-ABORT: {scp.pdu_types}"
    serving(gw)


def test_idle_timer_restarts_on_traffic(pynetdicom_scp, gateway):
    """idle means *no bytes*: an association echoing every 0.5 s outlives idle_timeout."""
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway(
        [plain_listener()],
        [route("a", "ARCHIVE", scp.port)],
        settings={**FAST, "idle_timeout": 1.5},
    )
    with raw_associate(gw.port("plain")) as peer:
        for _ in range(6):  # 2.4 s in all, idle_timeout 1.5 s
            peer.send(echo_pdata())
            rsp = peer.read_pdu(2)
            assert rsp is not None and rsp[0] == 0x04, (rsp, gw.output())
            time.sleep(0.4)
        peer.send(RELEASE_RQ)
        assert peer.read_pdu(3) == bytes.fromhex("060000000004") + bytes(4)
    assert scp.echoes == 6
    assert_no_tracebacks(gw)


def test_release_not_answered(fake_backend, gateway):
    fb = fake_backend("accept")
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", fb.port)], settings=FAST)
    with raw_associate(gw.port("plain")) as peer:
        t0 = time.monotonic()
        peer.send(RELEASE_RQ)
        answer = peer.read_pdu(5)
        took = time.monotonic() - t0
        assert answer is not None and answer[0] == 0x07, (answer, gw.output())
        assert 0.8 <= took <= 3.0, f"A-ABORT after {took:.2f} s, release_timeout is 1 s"
        assert wait_peer_records(gw, peer, "association.aborted"), gw.output()
    assert fb.wait_for_pdu(0x05), "backend never saw the A-RELEASE-RQ"
    assert_no_tracebacks(gw)


def test_slow_but_steady_rq_is_served(pynetdicom_scp, gateway):
    """Counter-check for ARTIM: an RQ dribbled over 0.6 s (< ARTIM) is accepted."""
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([plain_listener()], [route("a", "ARCHIVE", scp.port)], settings=FAST)
    rq = assoc_rq_bytes()
    with RawPeer(gw.port("plain")) as peer:
        step = len(rq) // 6 + 1
        for i in range(0, len(rq), step):
            peer.send(rq[i : i + step])
            time.sleep(0.1)
        answer = peer.read_pdu(5)
        assert answer is not None and answer[0] == 0x02, (answer, gw.output())
        peer.send(RELEASE_RQ)
        assert peer.read_pdu(3) is not None
