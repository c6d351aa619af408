"""PDUFramer: whole buffers, byte by byte, trailing data (h11's pattern), caps, TLS."""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dul.codec import decode_pdu
from gateway.dul.framer import (
    PDUFramer,
    RawPDU,
    TLSOnPlainPortError,
    looks_like_dicom,
    looks_like_tls,
)
from gateway.dul.pdus import AssociateRQ, PDataTF, ReleaseRQ
from gateway.errors import ProtocolError
from tests.test_pdu import DCMTK_ECHOSCU_RQ, RELEASE_RQ

H = bytes.fromhex

P_DATA = H("04 00 0000000e 0000000a 01 03") + b"ECHO-RQ!"  # one command PDV, last fragment
ABORT = H("07 00 00000004 0000 02 01")  # service provider, unrecognized PDU
STREAM = DCMTK_ECHOSCU_RQ + P_DATA + RELEASE_RQ + ABORT
EXPECTED = [
    RawPDU(1, DCMTK_ECHOSCU_RQ),
    RawPDU(4, P_DATA),
    RawPDU(5, RELEASE_RQ),
    RawPDU(7, ABORT),
]


def frame(chunks: list[bytes], max_pdu_length: int = 1 << 20) -> tuple[list[RawPDU], PDUFramer]:
    """Feed ``chunks`` one by one, collecting every PDU as soon as it is complete."""
    framer = PDUFramer(max_pdu_length)
    out: list[RawPDU] = []
    for chunk in chunks:
        framer.feed(chunk)
        while (pdu := framer.next_pdu()) is not None:
            out.append(pdu)
    return out, framer


def test_whole_buffer_at_once() -> None:
    pdus, framer = frame([STREAM])
    assert pdus == EXPECTED
    assert framer.buffered() == 0
    assert framer.take_remaining() == b""


def test_one_byte_at_a_time() -> None:
    pdus, framer = frame([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert pdus == EXPECTED
    assert framer.buffered() == 0


def test_each_pdu_is_returned_only_when_complete() -> None:
    framer = PDUFramer(1 << 20)
    for i in range(len(DCMTK_ECHOSCU_RQ) - 1):
        framer.feed(DCMTK_ECHOSCU_RQ[i : i + 1])
        assert framer.next_pdu() is None
        assert framer.buffered() == i + 1
    framer.feed(DCMTK_ECHOSCU_RQ[-1:])
    assert framer.next_pdu() == RawPDU(1, DCMTK_ECHOSCU_RQ)
    assert framer.next_pdu() is None


@pytest.mark.parametrize("cut", [1, 5, 6, 7, len(P_DATA) - 1])
def test_trailing_data_is_handed_over(cut: int) -> None:
    trailing = P_DATA[:cut]  # the start of the next PDU, as a relay would see it
    pdus, framer = frame([DCMTK_ECHOSCU_RQ + trailing])
    assert pdus == [RawPDU(1, DCMTK_ECHOSCU_RQ)]
    assert framer.buffered() == cut
    assert framer.take_remaining() == trailing
    assert framer.buffered() == 0
    assert framer.next_pdu() is None


def test_raw_pdus_decode() -> None:
    pdus, _ = frame([STREAM])
    decoded = [decode_pdu(p.data) for p in pdus]
    assert isinstance(decoded[0], AssociateRQ)
    assert isinstance(decoded[1], PDataTF)
    assert decoded[2] == ReleaseRQ()
    assert pdus[1].length == 14


def test_memoryview_and_bytearray_chunks() -> None:
    view = memoryview(STREAM)
    pdus, _ = frame([view[:100], bytearray(view[100:300]), view[300:]])
    assert pdus == EXPECTED


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    framer = PDUFramer(max_pdu_length=1000)
    framer.feed(H("04 00 0000"))  # header incomplete: nothing to say yet
    with pytest.raises(ProtocolError) as info:
        framer.feed(H("03e9"))  # 1001 announced: refused on this very feed
    assert info.value.abort_reason == 6
    assert info.value.offset == 2
    assert "1001" in str(info.value) and "1000" in str(info.value)
    assert framer.buffered() == 6
    # The framer stays failed: the stream has lost sync.
    with pytest.raises(ProtocolError):
        framer.feed(b"\x00")
    with pytest.raises(ProtocolError):
        framer.next_pdu()


def test_the_limit_itself_is_allowed() -> None:
    body = bytes(6) + bytes(994)  # a P-DATA body of exactly 1000 bytes
    raw = struct.pack(">BBL", 4, 0, 1000) + body
    pdus, _ = frame([raw], max_pdu_length=1000)
    assert pdus == [RawPDU(4, raw)]


def test_huge_length_in_a_later_pdu_is_refused() -> None:
    framer = PDUFramer(100)
    framer.feed(RELEASE_RQ + H("04 00 ffffffff"))
    assert framer.next_pdu() == RawPDU(5, RELEASE_RQ)
    with pytest.raises(ProtocolError) as info:
        framer.next_pdu()
    assert info.value.abort_reason == 6


def test_max_pdu_length_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PDUFramer(0)


def client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl over memory BIOs)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="pacs.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_client_hello_on_a_plain_port() -> None:
    hello = client_hello()
    assert hello[:2] == b"\x16\x03"
    assert looks_like_tls(hello)
    assert not looks_like_dicom(hello)
    framer = PDUFramer(1 << 20)
    with pytest.raises(TLSOnPlainPortError) as info:
        framer.feed(hello)
    assert isinstance(info.value, ProtocolError)
    assert info.value.abort_reason == 1
    assert "TLS" in str(info.value)


def test_tls_detection_waits_for_the_second_byte() -> None:
    framer = PDUFramer(1 << 20)
    framer.feed(b"\x16")  # could be TLS; one more byte decides
    assert framer.next_pdu() is None
    with pytest.raises(TLSOnPlainPortError):
        framer.feed(b"\x03")


def test_0x16_without_tls_version_is_just_unrecognized() -> None:
    framer = PDUFramer(1 << 20)
    with pytest.raises(ProtocolError) as info:
        framer.feed(b"\x16\x00\x00")
    assert not isinstance(info.value, TLSOnPlainPortError)
    assert info.value.abort_reason == 1


def test_tls_bytes_after_the_first_pdu_are_not_called_tls() -> None:
    framer = PDUFramer(1 << 20)
    framer.feed(RELEASE_RQ + b"\x16\x03\x01")
    assert framer.next_pdu() is not None
    with pytest.raises(ProtocolError) as info:
        framer.next_pdu()
    assert not isinstance(info.value, TLSOnPlainPortError)


@pytest.mark.parametrize("first", [b"\x00", b"\x08", b"GET / HTTP/1.1\r\n", b"\xff"])
def test_first_byte_not_a_pdu_type(first: bytes) -> None:
    framer = PDUFramer(1 << 20)
    with pytest.raises(ProtocolError) as info:
        framer.feed(first)  # refused on the first byte, before any header
    assert info.value.abort_reason == 1
    assert info.value.offset == 0
    assert f"0x{first[0]:02X}" in str(info.value)


@pytest.mark.parametrize(
    ("first", "tls", "dicom"),
    [
        (b"", False, False),
        (b"\x16", True, False),
        (b"\x16\x03\x01\x02\x00", True, False),
        (b"\x16\x02", False, False),
        (b"\x01", False, True),
        (b"\x01\x00\x00\x00\x00\xcd", False, True),
        (b"\x01\x01", False, False),
        (b"\x04\x00", False, False),
    ],
)
def test_sniffing(first: bytes, tls: bool, dicom: bool) -> None:
    assert looks_like_tls(first) is tls
    assert looks_like_dicom(first) is dicom


raw_pdus = st.builds(
    lambda t, r, body: struct.pack(">BBL", t, r, len(body)) + body,
    st.integers(1, 7),
    st.integers(0, 255),
    st.binary(max_size=64),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(raw_pdus, max_size=8), st.data())
def test_property_any_chunking_gives_the_same_pdus(pdus: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pdus)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got, framer = frame(chunks)
    assert [p.data for p in got] == pdus
    assert [p.pdu_type for p in got] == [p[0] for p in pdus]
    assert framer.buffered() == 0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_property_garbage_raises_only_protocol_error(garbage: bytes) -> None:
    try:
        frame([garbage], max_pdu_length=64)
    except ProtocolError as exc:
        assert exc.abort_reason in (1, 6)
