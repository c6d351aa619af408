"""PDUTracker: boundaries across arbitrary splits, flags, no copies, never raises."""

from __future__ import annotations

import struct
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dul.framer import PDUFramer
from gateway.dul.tracker import PDUTracker
from tests.test_pdu import DCMTK_ECHOSCU_RQ, RELEASE_RP, RELEASE_RQ

H = bytes.fromhex

P_DATA = H("04 00 0000000e 0000000a 01 03") + b"ECHO-RQ!"  # context 1, command, last
ABORT = H("07 00 00000004 0000 00 00")  # A-ABORT from the service user
STREAM = [P_DATA, P_DATA, RELEASE_RQ, RELEASE_RP]


def ends(pdus: list[bytes]) -> set[int]:
    """Offsets where a PDU ends (and 0): where ``at_boundary`` must be True."""
    out, pos = {0}, 0
    for pdu in pdus:
        pos += len(pdu)
        out.add(pos)
    return out


def test_fresh_tracker_is_at_a_boundary() -> None:
    tracker = PDUTracker()
    assert tracker.at_boundary
    assert tracker.pdus == 0
    assert tracker.last_type is None
    assert not (tracker.seen_release_rq or tracker.seen_release_rp or tracker.seen_abort)


def test_whole_pdus() -> None:
    tracker = PDUTracker()
    tracker.feed(b"".join(STREAM))
    assert tracker.at_boundary
    assert tracker.pdus == tracker.completed == 4
    assert tracker.last_type == 6
    assert tracker.seen_release_rq and tracker.seen_release_rp
    assert not tracker.seen_abort
    assert not tracker.broken


def test_every_two_way_split_and_byte_by_byte() -> None:
    stream = b"".join(STREAM)
    boundaries = ends(STREAM)
    for cut in range(len(stream) + 1):
        tracker = PDUTracker()
        tracker.feed(stream[:cut])
        assert tracker.at_boundary is (cut in boundaries), cut
        tracker.feed(stream[cut:])
        assert tracker.at_boundary and tracker.pdus == 4
    tracker = PDUTracker()
    for i in range(len(stream)):
        tracker.feed(memoryview(stream)[i : i + 1])
        assert tracker.at_boundary is (i + 1 in boundaries), i
    assert tracker.pdus == 4


def test_last_type_is_known_from_the_header() -> None:
    tracker = PDUTracker()
    tracker.feed(ABORT[:5])
    assert tracker.last_type is None  # header incomplete
    tracker.feed(ABORT[5:6])
    assert tracker.last_type == 7 and tracker.seen_abort  # body not yet seen
    assert not tracker.at_boundary
    assert (tracker.pdus, tracker.completed, tracker.remaining) == (1, 0, 4)
    tracker.feed(ABORT[6:])
    assert tracker.at_boundary and tracker.completed == 1


def test_on_pdu_hook() -> None:
    seen: list[tuple[int, int]] = []
    tracker = PDUTracker(on_pdu=lambda pdu_type, length: seen.append((pdu_type, length)))
    tracker.feed(DCMTK_ECHOSCU_RQ + P_DATA + RELEASE_RQ)
    assert seen == [(1, 205), (4, 14), (5, 4)]


def test_zero_length_pdu_completes_at_its_header() -> None:
    tracker = PDUTracker()
    tracker.feed(H("04 00 00000000"))
    assert tracker.at_boundary and tracker.completed == 1


def test_unknown_type_marks_broken_and_never_raises() -> None:
    tracker = PDUTracker()
    tracker.feed(P_DATA + b"\x16\x03\x01\x00\x05hello")
    assert tracker.broken
    assert not tracker.at_boundary
    assert tracker.pdus == 1
    tracker.feed(RELEASE_RQ)  # ignored: the stream cannot be followed any more
    assert tracker.broken and not tracker.seen_release_rq


def test_a_large_p_data_is_skipped_without_copying() -> None:
    # 1 MiB P-DATA-TF fed in 256 KiB memoryview slices: every feed after the
    # header is a subtraction, and nothing proportional to the chunk is allocated.
    body = bytes(1 << 20)
    pdu = struct.pack(">BBL", 4, 0, len(body)) + body
    view = memoryview(pdu)
    tracker = PDUTracker()
    tracemalloc.start()
    try:
        for start in range(0, len(pdu), 256 * 1024):
            tracker.feed(view[start : start + 256 * 1024])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096
    assert tracker.at_boundary and tracker.pdus == 1


raw_pdus = st.builds(
    lambda t, body: struct.pack(">BBL", t, 0, len(body)) + body,
    st.integers(1, 7),
    st.binary(max_size=40),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(raw_pdus, max_size=8), st.data())
def test_property_tracker_agrees_with_the_framer(pdus: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pdus)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    tracker = PDUTracker()
    framer = PDUFramer(1 << 16)
    framed: list[int] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        tracker.feed(stream[a:b])
        framer.feed(stream[a:b])
        while (pdu := framer.next_pdu()) is not None:
            framed.append(pdu.pdu_type)
        assert tracker.at_boundary is (framer.buffered() == 0)
        assert tracker.completed == len(framed)
        if tracker.at_boundary and framed:
            assert tracker.last_type == framed[-1]
    assert tracker.pdus == len(pdus)
    assert tracker.seen_release_rq is (5 in framed)
    assert tracker.seen_release_rp is (6 in framed)
    assert tracker.seen_abort is (7 in framed)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_property_garbage_never_raises(chunks: list[bytes]) -> None:
    tracker = PDUTracker()
    for chunk in chunks:
        tracker.feed(chunk)
    assert tracker.broken or tracker.pdus >= 0


def test_unknown_type_is_kept_in_last_type() -> None:
    # The relay names the offending type in its abort reason (session._why_ended).
    t = PDUTracker()
    t.feed(b"\x09\x00\x00\x00\x00\x00")
    assert t.broken and t.last_type == 0x09
