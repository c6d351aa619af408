"""The bad-input matrix (issue 4, DESIGN §2): every input gets its exact answer on the
wire, is logged once without a traceback, and the gateway serves the next client.

Each test speaks raw bytes through ``RawPeer`` (no DICOM tool would send these) and
reads the answer byte for byte; the gateway's JSON log lines about that connection
are found by their ``peer`` field. docs/robustness.md lists these tests by name.
"""

from __future__ import annotations

import random
import time

import pytest

from .conftest import client_ssl_context
from .helpers import (
    HOST,
    RELEASE_RP,
    RELEASE_RQ,
    RawPeer,
    abort_bytes,
    assert_no_tracebacks,
    assoc_ac_for,
    assoc_rq_bytes,
    echo_pdata,
    echoscu_ok,
    peer_records,
    plain_listener,
    raw_associate,
    raw_pdu,
    reject_bytes,
    route,
    run_dcmtk,
    tls_client_hello,
    tls_listener,
    wait_peer_records,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

ARTIM = 1.0
#: the gateway may wait up to ARTIM for us to close after its answer, then closes itself
CLOSE_WITHIN = 2 * ARTIM + 2.0
MAX_PDU = 65536
#: log events that each end one connection's story
END_EVENTS = ("association.aborted", "association.rejected", "tls.handshake_failed")


@pytest.fixture(scope="module")
def gw(pki, module_pynetdicom_scp, module_gateway):
    """One gateway for the module: a plain and a TLS listener, route ARCHIVE to a
    pynetdicom SCP, small timeouts. Returns (gateway, scp)."""
    scp = module_pynetdicom_scp("ARCHIVE")
    gateway_proc = module_gateway(
        [plain_listener(), tls_listener(pki)],
        [route("archive", "ARCHIVE", scp.port)],
        settings={
            "artim_timeout": ARTIM,
            "handshake_timeout": 1,
            "idle_timeout": 10,
            "release_timeout": 2,
            "max_pdu_length": MAX_PDU,
        },
    )
    return gateway_proc, scp


def backend_aborted(scp, since: int, timeout: float = 5.0) -> bool:
    """Did the backend receive an A-ABORT after its ``since``-th PDU?"""
    deadline = time.monotonic() + timeout
    while 0x07 not in scp.pdu_types[since:] and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0x07 in scp.pdu_types[since:]


def assert_still_serving(gw) -> None:
    """After any bad input: a normal echoscu still works and nothing crashed."""
    ok, out = echoscu_ok(gw[0].port("plain"))
    assert ok, "gateway no longer serves echoscu after the bad input\n" + out + gw[0].output()
    assert gw[0].proc.poll() is None, gw[0].output()
    assert_no_tracebacks(gw[0])


def ended_once(gateway_proc, peer: RawPeer, event: str, timeout: float = 5.0) -> dict:
    """The one record ending this connection; fails if there is none or several."""
    found = wait_peer_records(gateway_proc, peer, event, timeout)
    assert found, f"no {event!r} log line for peer {peer.peer_field}\n" + gateway_proc.output()
    time.sleep(0.2)  # a duplicate would be written right after the first
    ends = [r for r in peer_records(gateway_proc, peer) if r.get("event") in END_EVENTS]
    assert len(ends) == 1, f"connection logged {len(ends)} times, want once: {ends}"
    return ends[0]


def answer_and_close(peer: RawPeer, timeout: float = CLOSE_WITHIN) -> bytes:
    data = peer.read_until_close(timeout)
    assert peer.closed, f"gateway kept the connection open after answering {data.hex()}"
    return data


# ------------------------------------------------------------------ not DICOM at all


def test_random_bytes(gw):
    rng = random.Random(4)
    junk = bytes([rng.choice([b for b in range(256) if not 1 <= b <= 7 and b != 0x16])])
    junk += rng.randbytes(63)
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(junk)
        assert answer_and_close(peer) == abort_bytes(2, 1)
        rec = ended_once(gw[0], peer, "association.aborted")
    assert rec.get("by") == "gateway", rec
    assert "unrecognized PDU type" in rec.get("reason", ""), rec
    assert_still_serving(gw)


def test_http_request_on_dicom_port(gw):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\n\r\n")
        assert answer_and_close(peer) == abort_bytes(2, 1)
        rec = ended_once(gw[0], peer, "association.aborted")
    assert "HTTP request on a DICOM port" in rec.get("reason", ""), rec
    assert_still_serving(gw)


def test_plain_dicom_on_tls_listener(gw):
    with RawPeer(gw[0].port("tls")) as peer:
        peer.send(assoc_rq_bytes())
        # in clear, so a plain DICOM tool can read it and report "aborted"
        assert answer_and_close(peer) == abort_bytes(2, 0)
        rec = ended_once(gw[0], peer, "tls.handshake_failed")
    assert "plain DICOM (A-ASSOCIATE-RQ) received on a TLS port" in rec.get("reason", ""), rec
    # and what an operator sees with DCMTK:
    rc, out = run_dcmtk(["echoscu", "-v", "-aec", "ARCHIVE", HOST, gw[0].port("tls")], 20)
    assert rc != 0, out
    assert "abort" in out.lower(), "echoscu does not report an abort\n" + out
    assert_still_serving(gw)


def test_tls_client_hello_on_plain_listener(gw):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(tls_client_hello())
        assert answer_and_close(peer) == b"", "gateway answered a TLS client in DICOM"
        rec = ended_once(gw[0], peer, "association.aborted")
    assert "TLS ClientHello received on a plain DICOM listener" in rec.get("reason", ""), rec
    assert_still_serving(gw)


# ------------------------------------------------------------------ broken framing


def test_truncated_rq_then_close(gw):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(assoc_rq_bytes()[:40])
        peer.shutdown_write()
        assert answer_and_close(peer) == b""
        rec = ended_once(gw[0], peer, "association.aborted")
    assert rec.get("by") == "client", rec
    assert_still_serving(gw)


@pytest.mark.parametrize(
    "length", [0xFFFFFFFF, MAX_PDU + 1], ids=["0xFFFFFFFF", "max_pdu_length+1"]
)
def test_pdu_length_over_limit_aborted_at_once(gw, length):
    with RawPeer(gw[0].port("plain")) as peer:
        t0 = time.monotonic()
        peer.send(raw_pdu(0x01, b"", length=length))
        answer = peer.read_pdu(5)
        elapsed = time.monotonic() - t0
        assert answer == abort_bytes(2, 6), (answer, gw[0].output())
        assert elapsed < 0.5, f"A-ABORT after {elapsed:.2f} s: waited for the body"
        ended_once(gw[0], peer, "association.aborted")
    assert_still_serving(gw)


@pytest.mark.parametrize("pdu_type", [0x08, 0x10, 0x80, 0xFF], ids=lambda t: f"0x{t:02X}")
def test_unknown_pdu_type(gw, pdu_type):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(raw_pdu(pdu_type, bytes(4)))
        assert answer_and_close(peer) == abort_bytes(2, 1)
        ended_once(gw[0], peer, "association.aborted")
    assert_still_serving(gw)


BEFORE_ASSOCIATION = {
    "P-DATA-TF": echo_pdata(),
    "A-RELEASE-RQ": RELEASE_RQ,
    "A-RELEASE-RP": RELEASE_RP,
    "A-ASSOCIATE-AC": assoc_ac_for(assoc_rq_bytes()),
    "A-ASSOCIATE-RJ": reject_bytes(1, 1, 7),
}


@pytest.mark.parametrize("name", list(BEFORE_ASSOCIATION))
def test_pdu_before_association(gw, name):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(BEFORE_ASSOCIATION[name])
        assert answer_and_close(peer) == abort_bytes(2, 2), "want A-ABORT unexpected PDU"
        ended_once(gw[0], peer, "association.aborted")
    assert_still_serving(gw)


def test_abort_before_association(gw):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(abort_bytes(0, 0))
        assert answer_and_close(peer) == b"", "an A-ABORT is never answered"
        ended_once(gw[0], peer, "association.aborted")
    assert_still_serving(gw)


def test_item_length_overruns_pdu(gw):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(assoc_rq_bytes(user_info_length=0x1000))
        assert answer_and_close(peer) == abort_bytes(2, 6)
        ended_once(gw[0], peer, "association.aborted")
    assert_still_serving(gw)


# ------------------------------------------------------------------ well framed, refused


def test_bad_protocol_version(gw):
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(assoc_rq_bytes(protocol_version=0x0002))
        assert answer_and_close(peer) == reject_bytes(1, 2, 2)
        ended_once(gw[0], peer, "association.rejected")
    assert_still_serving(gw)


@pytest.mark.parametrize(("field", "want"), [("called", (1, 1, 7)), ("calling", (1, 1, 3))])
def test_all_space_ae_title(gw, field, want):
    kw = {f"{field}_raw": b" " * 16}
    with RawPeer(gw[0].port("plain")) as peer:
        peer.send(assoc_rq_bytes(**kw))
        assert answer_and_close(peer) == reject_bytes(*want)
        ended_once(gw[0], peer, "association.rejected")
    assert_still_serving(gw)


# ------------------------------------------------------------------ during an association


def test_second_rq_after_association(gw):
    gateway_proc, scp = gw
    n0 = len(scp.pdu_types)
    with raw_associate(gateway_proc.port("plain")) as peer:
        peer.send(assoc_rq_bytes())
        assert answer_and_close(peer) == abort_bytes(2, 2)
        rec = ended_once(gateway_proc, peer, "association.aborted")
    assert rec.get("by") == "gateway", rec
    assert backend_aborted(scp, n0), f"backend got no A-ABORT; PDU types {scp.pdu_types[n0:]}"
    assert_still_serving(gw)


def test_unknown_pdu_type_after_association(gw):
    # Used to be logged as "client sent PDU type 0x00 ..." and answered with
    # reason 2 (unexpected PDU); PS3.8 table 9-26 wants 1 (unrecognized PDU).
    gateway_proc, scp = gw
    n0 = len(scp.pdu_types)
    with raw_associate(gateway_proc.port("plain")) as peer:
        peer.send(raw_pdu(0x09, bytes(4)))
        assert answer_and_close(peer) == abort_bytes(2, 1)
        rec = ended_once(gateway_proc, peer, "association.aborted")
    assert rec.get("by") == "gateway", rec
    assert "unrecognized PDU type 0x09" in rec.get("reason", ""), rec
    assert backend_aborted(scp, n0), f"backend got no A-ABORT; PDU types {scp.pdu_types[n0:]}"
    assert_still_serving(gw)


TLS_JUNK = {
    # a plaintext fatal alert (handshake_failure) where only encrypted records may come
    "alert": bytes.fromhex("15030300020228"),
    # an application-data record whose authentication tag cannot verify
    "garbage-record": bytes.fromhex("1703030020") + bytes(range(32)),
}


@pytest.mark.parametrize("kind", list(TLS_JUNK))
def test_tls_junk_mid_association(pki, gw, kind):
    gateway_proc, scp = gw
    n0 = len(scp.pdu_types)
    ctx = client_ssl_context(pki)
    with raw_associate(gateway_proc.port("tls"), ssl_context=ctx) as peer:
        peer.send_raw_under_tls(TLS_JUNK[kind])
        peer.read_until_close(CLOSE_WITHIN)
        rec = ended_once(gateway_proc, peer, "association.aborted")
    assert rec.get("by") == "client", rec
    assert backend_aborted(scp, n0), f"backend got no A-ABORT; PDU types {scp.pdu_types[n0:]}"
    assert_still_serving(gw)


def test_whole_matrix_back_to_back_then_serving(gw):
    """Every pre-association input in a row on one gateway, then a normal client."""
    inputs = [
        bytes(range(0x40, 0x80)),
        b"GET / HTTP/1.1\r\n\r\n",
        tls_client_hello(),
        raw_pdu(0x01, b"", length=0xFFFFFFFF),
        raw_pdu(0x09, bytes(4)),
        *BEFORE_ASSOCIATION.values(),
        abort_bytes(0, 0),
        assoc_rq_bytes(user_info_length=0x1000),
        assoc_rq_bytes(protocol_version=2),
        assoc_rq_bytes(called_raw=b" " * 16),
        assoc_rq_bytes(calling_raw=b" " * 16),
    ]
    peers = []
    for data in inputs:
        peer = RawPeer(gw[0].port("plain"))
        peer.send(data)
        peers.append(peer)
    for peer, data in zip(peers, inputs, strict=True):
        peer.read_until_close(CLOSE_WITHIN)
        assert peer.closed, f"still open after {data[:16].hex()}"
        peer.close()
    assert_still_serving(gw)
