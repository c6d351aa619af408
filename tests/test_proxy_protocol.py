"""PROXY protocol v1/v2 parser: whole buffer, byte by byte, trailing data, caps, errors."""

from __future__ import annotations

import ipaddress
import struct

import pytest
import trio
import trio.testing

from gateway.errors import ProtocolError
from gateway.proxy_protocol import (
    V2_SIGNATURE,
    Command,
    ProxyHeader,
    ProxyParser,
    parse_proxy_header,
    read_proxy_header,
)

IP = ipaddress.ip_address


def v2(cmd: int, fam: int, body: bytes) -> bytes:
    """A v2 header: signature, version 2 | cmd, family byte, length, body."""
    return V2_SIGNATURE + struct.pack(">BBH", 0x20 | cmd, fam, len(body)) + body


V2_TCP4 = v2(
    1, 0x11, bytes([10, 1, 2, 3]) + bytes([192, 0, 2, 9]) + struct.pack(">HH", 40000, 2762)
)
V2_TCP6 = v2(
    1, 0x21, IP("2001:db8::1").packed + IP("2001:db8::2").packed + struct.pack(">HH", 1, 65535)
)
# HAProxy appends TLVs (here PP2_TYPE_ALPN "dicom" and PP2_TYPE_UNIQUE_ID): skipped.
_TLVS = b"\x01\x00\x05dicom" + b"\x05\x00\x03abc"
V2_TCP4_TLV = v2(
    1, 0x11, bytes([10, 1, 0, 7]) + bytes([127, 0, 0, 1]) + struct.pack(">HH", 5, 6) + _TLVS
)
V2_LOCAL = v2(0, 0x00, b"")

CASES: list[tuple[bytes, ProxyHeader]] = [
    (
        b"PROXY TCP4 10.1.2.3 192.0.2.9 40000 2762\r\n",
        ProxyHeader(1, Command.PROXY, "TCP4", (IP("10.1.2.3"), 40000), (IP("192.0.2.9"), 2762)),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
        ProxyHeader(1, Command.PROXY, "TCP6", (IP("2001:db8::1"), 1), (IP("2001:db8::2"), 65535)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, Command.LOCAL, "UNKNOWN")),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(1, Command.LOCAL, "UNKNOWN")),
    (
        V2_TCP4,
        ProxyHeader(2, Command.PROXY, "TCP4", (IP("10.1.2.3"), 40000), (IP("192.0.2.9"), 2762)),
    ),
    (
        V2_TCP6,
        ProxyHeader(2, Command.PROXY, "TCP6", (IP("2001:db8::1"), 1), (IP("2001:db8::2"), 65535)),
    ),
    (
        V2_TCP4_TLV,
        ProxyHeader(2, Command.PROXY, "TCP4", (IP("10.1.0.7"), 5), (IP("127.0.0.1"), 6)),
    ),
    (V2_LOCAL, ProxyHeader(2, Command.LOCAL, "UNKNOWN")),
    # PROXY over AF_UNIX: valid, but no IP address to report.
    (v2(1, 0x31, b"\x00" * 216), ProxyHeader(2, Command.PROXY, "UNIX")),
]

TRAILING = b"\x16\x03\x01\x02\x00\x01"  # the start of a TLS ClientHello


def _expect(header: ProxyHeader, wire: bytes) -> ProxyHeader:
    return ProxyHeader(header.version, header.command, header.family, header.source,
                       header.destination, len(wire))


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_whole_buffer(wire: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(wire) == _expect(expected, wire)


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_byte_by_byte(wire: bytes, expected: ProxyHeader) -> None:
    parser = ProxyParser()
    for i in range(len(wire) - 1):
        assert parser.feed(wire[i : i + 1]) is None, f"complete after {i + 1} bytes"
    assert parser.feed(wire[-1:]) == _expect(expected, wire)
    assert parser.rest == b""


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_trailing_data_is_handed_back(wire: bytes, expected: ProxyHeader) -> None:
    parser = ProxyParser()
    assert parser.feed(wire + TRAILING) == _expect(expected, wire)
    assert parser.rest == TRAILING


def test_client_formatting() -> None:
    assert parse_proxy_header(CASES[0][0]).client == "10.1.2.3:40000"
    assert parse_proxy_header(V2_TCP6).client == "[2001:db8::1]:1"
    assert parse_proxy_header(V2_LOCAL).client is None


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x16\x03\x01\x02\x00", "TLS ClientHello"),
        (b"\x01\x00\x00\x00\x00\xcd", "DICOM PDU"),
        (b"GET / HTTP/1.1\r\n", "expected a PROXY v1 or v2 header"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", "6 space-separated fields"),
        (b"PROXY TCP4 1.2.3.4  1.2.3.5 1 2\r\n", "6 space-separated fields"),
        (b"PROXY TCP4 1.2.3.999 1.2.3.5 1 2\r\n", "source address"),
        (b"PROXY TCP4 ::1 1.2.3.5 1 2\r\n", "is not IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "is not IPv6"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 01 2\r\n", "source port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 65536\r\n", "out of range"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\n", "CRLF"),
        (b"PROXY UNKNOWN " + b"x" * 120, "no CRLF within 107 bytes"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version nibble"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "command 2"),
        (V2_SIGNATURE + b"\x21\x41\x00\x00", "0x41 is not defined"),
        (v2(1, 0x11, b"\x00" * 8), "shorter than 12"),
        (v2(1, 0x21, b"\x00" * 12), "shorter than 36"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "exceeds the 4096-byte limit"),
    ],
)
def test_errors(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        parse_proxy_header(wire)
    assert str(info.value).startswith("PROXY protocol: ")
    # Byte by byte fails too (at the latest on the last byte), never hangs.
    parser = ProxyParser()
    with pytest.raises(ProtocolError):
        for i in range(len(wire)):
            parser.feed(wire[i : i + 1])


def test_wrong_first_byte_fails_at_once() -> None:
    """A misconfigured balancer is reported on the first byte, not after a timeout."""
    with pytest.raises(ProtocolError, match="TLS ClientHello"):
        ProxyParser().feed(b"\x16")


def test_partial_prefixes_need_more() -> None:
    for wire in (b"PROX", b"PROXY TCP4 1.2", V2_SIGNATURE[:5], V2_TCP4[:20]):
        assert parse_proxy_header(wire) is None


def test_custom_cap() -> None:
    with pytest.raises(ProtocolError, match="exceeds the 40-byte limit"):
        parse_proxy_header(V2_TCP4_TLV, max_size=40)


async def _read(chunks: list[bytes]) -> tuple[ProxyHeader, bytes]:
    send, recv = trio.testing.memory_stream_one_way_pair()
    for c in chunks:
        await send.send_all(c)
    await send.aclose()
    return await read_proxy_header(recv)


def test_read_proxy_header_from_stream() -> None:
    header, rest = trio.run(_read, [V2_TCP4[:7], V2_TCP4[7:] + TRAILING])
    assert header.client == "10.1.2.3:40000"
    assert rest == TRAILING


def test_read_proxy_header_eof() -> None:
    with pytest.raises(ProtocolError, match="closed before a complete header"):
        trio.run(_read, [b"PROXY TCP4 "])
    with pytest.raises(ProtocolError, match="before any byte"):
        trio.run(_read, [])
