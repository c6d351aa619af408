"""PROXY protocol v1 and v2: the real client address behind a load balancer.

A TCP load balancer (HAProxy ``send-proxy`` / ``send-proxy-v2``, AWS NLB,
nginx ``proxy_protocol on``) connects to the gateway itself, so the socket's
peer is the balancer.  With the PROXY protocol it first sends one header
naming the original client; the gateway reads it before anything else (before
the TLS handshake), and logs, route ``source`` matching and audit then see the
real client.  Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

Wire formats (the spec's section numbers in brackets):

v1 [2.1], one ASCII line of at most 107 bytes including CRLF::

    PROXY TCP4 192.0.2.1 198.51.100.2 56324 2762\\r\\n
    PROXY TCP6 2001:db8::1 2001:db8::2 56324 2762\\r\\n
    PROXY UNKNOWN[ anything]\\r\\n            (balancer's own connection)

v2 [2.2], binary::

    offset  size  field
    0       12    signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    12      1     version (high nibble, must be 2) | command (low: 0 LOCAL, 1 PROXY)
    13      1     family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
                  | transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
    14      2     length of what follows, big-endian
    16      ...   addresses: INET 4+4+2+2, INET6 16+16+2+2, UNIX 108+108;
                  then TLVs (skipped: the gateway needs only the address)

LOCAL (v2) and UNKNOWN (v1) mean "this connection is the balancer's own, e.g. a
health check": the socket address is kept.

This module is sans-IO (bytes in, header out) except for
:func:`read_proxy_header`, the small trio helper the session uses.  A cap on
the header size is part of the parser: a peer cannot make the gateway buffer
more than ``max_size`` bytes before it has said who it is.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

import trio

from .errors import ProtocolError

__all__ = [
    "MAX_HEADER_SIZE",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyParser",
    "parse_proxy_header",
    "read_proxy_header",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
#: v1 [2.1]: "the maximum line length is 107 bytes including the CRLF".
V1_MAX_LENGTH = 107
_V2_HEAD = struct.Struct(">BBH")  # ver_cmd, fam, len (after the 12-byte signature)
_V2_FIXED = len(V2_SIGNATURE) + _V2_HEAD.size  # 16
_V2_INET = struct.Struct(">4s4sHH")
_V2_INET6 = struct.Struct(">16s16sHH")
#: Default bound on a v2 header (fixed part + addresses + TLVs).  HAProxy's TLVs
#: (ALPN, authority, unique id, SSL info) stay well under 1 KiB; the protocol
#: allows 64 KiB, which nobody needs in front of a DICOM port.
MAX_HEADER_SIZE = 4096

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


class Command(enum.Enum):
    """What the balancer says the connection is."""

    PROXY = "PROXY"  # relayed on behalf of the client named in the header
    LOCAL = "LOCAL"  # the balancer's own connection (health check); keep socket address


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY header.

    ``source``/``destination`` are ``None`` for LOCAL, UNKNOWN and non-IP
    families (AF_UNIX, UNSPEC): the caller keeps the socket's own address.
    """

    version: int
    command: Command
    family: str  # "TCP4", "TCP6", "UDP4", "UDP6", "UNIX", "UNKNOWN"
    source: Address | None = None
    destination: Address | None = None
    length: int = 0  # bytes the header occupied on the wire

    @property
    def client(self) -> str | None:
        """The client as the gateway writes peers: ``1.2.3.4:5`` / ``[2001:db8::1]:5``."""
        if self.source is None:
            return None
        ip, port = self.source
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _fail(message: str) -> ProtocolError:
    return ProtocolError(f"PROXY protocol: {message}")


def _describe_start(data: bytes) -> str:
    """Name what arrived instead of a PROXY header, for an operator-friendly error."""
    first = data[0]
    if first == 0x16:
        return "a TLS ClientHello (the balancer does not send PROXY headers: " \
               "set send-proxy / send-proxy-v2, or proxy_protocol = false)"
    if 0x01 <= first <= 0x07:
        return "a DICOM PDU (the client connected directly, or the balancer does not " \
               "send PROXY headers)"
    return f"bytes {data[:8].hex(' ')}"


def _port(text: bytes, what: str) -> int:
    # The spec forbids leading zeros and signs; int() would accept "+1" or "01".
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0"):
        raise _fail(f"v1 {what} port {text[:8]!r} is not a decimal number")
    port = int(text)
    if port > 65535:
        raise _fail(f"v1 {what} port {port} is out of range")
    return port


def _ip(text: bytes, version: int, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _fail(f"v1 {what} address {text[:45]!r} is not an IP address") from None
    if ip.version != version:
        raise _fail(f"v1 {what} address {ip} is not IPv{version}")
    return ip


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(buf) >= V1_MAX_LENGTH:
            raise _fail(f"v1 header has no CRLF within {V1_MAX_LENGTH} bytes")
        if b"\n" in buf or b"\r" in buf[:-1]:
            raise _fail("v1 header line does not end with CRLF")
        return None
    line = buf[:end]
    length = end + 2
    parts = line.split(b" ")
    family = parts[1] if len(parts) > 1 else b""
    if family == b"UNKNOWN":
        # [2.1] "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(1, Command.LOCAL, "UNKNOWN", length=length)
    if family not in (b"TCP4", b"TCP6"):
        raise _fail(f"v1 protocol {family[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 6:
        raise _fail(f"v1 {family.decode()} line needs 6 space-separated fields, "
                    f"got {len(parts)}")
    version = 4 if family == b"TCP4" else 6
    src = (_ip(parts[2], version, "source"), _port(parts[4], "source"))
    dst = (_ip(parts[3], version, "destination"), _port(parts[5], "destination"))
    return ProxyHeader(1, Command.PROXY, family.decode(), src, dst, length)


_V2_FAMILIES = {
    0x00: "UNKNOWN",
    0x11: "TCP4",
    0x12: "UDP4",
    0x21: "TCP6",
    0x22: "UDP6",
    0x31: "UNIX",
    0x32: "UNIX",
}
_IPAddressType = type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
#: Families with IP addresses: their address block (src, dst, src port, dst
#: port) and the address type.
_V2_ADDRESS_BLOCKS: dict[int, tuple[struct.Struct, _IPAddressType]] = {
    0x11: (_V2_INET, ipaddress.IPv4Address),
    0x12: (_V2_INET, ipaddress.IPv4Address),
    0x21: (_V2_INET6, ipaddress.IPv6Address),
    0x22: (_V2_INET6, ipaddress.IPv6Address),
}


def _parse_v2(buf: bytes, max_size: int) -> ProxyHeader | None:
    if len(buf) < _V2_FIXED:
        return None
    ver_cmd, fam, body_len = _V2_HEAD.unpack_from(buf, len(V2_SIGNATURE))
    if ver_cmd >> 4 != 2:
        raise _fail(f"v2 version nibble is {ver_cmd >> 4}, expected 2")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise _fail(f"v2 command {cmd} is neither LOCAL (0) nor PROXY (1)")
    total = _V2_FIXED + body_len
    if total > max_size:
        raise _fail(f"v2 header of {total} bytes exceeds the {max_size}-byte limit")
    if fam not in _V2_FAMILIES:
        raise _fail(f"v2 address family/protocol byte 0x{fam:02X} is not defined")
    if len(buf) < total:
        return None
    family = _V2_FAMILIES[fam]
    if cmd == 0:
        # [2.2] LOCAL: "the receiver must accept this connection as valid and must
        # use the real connection endpoints and discard the protocol block".
        return ProxyHeader(2, Command.LOCAL, family, length=total)
    src = dst = None
    if fam in _V2_ADDRESS_BLOCKS:
        block, address = _V2_ADDRESS_BLOCKS[fam]
        if body_len < block.size:
            raise _fail(f"v2 {family} block of {body_len} bytes is shorter than {block.size}")
        s, d, sp, dp = block.unpack_from(buf, _V2_FIXED)
        src = (address(s), sp)
        dst = (address(d), dp)
    # UNIX / UNSPEC with PROXY: no IP to report; the socket address stays. TLVs
    # after the addresses are skipped: ``total`` already covers them.
    return ProxyHeader(2, Command.PROXY, family, src, dst, total)


def parse_proxy_header(buf: bytes, max_size: int = MAX_HEADER_SIZE) -> ProxyHeader | None:
    """Parse a PROXY header at the start of ``buf``.

    Returns the header (its ``length`` says how many bytes of ``buf`` it used;
    the rest belongs to the next protocol), or ``None`` if more bytes are
    needed.  Raises :class:`~gateway.errors.ProtocolError` as soon as the bytes
    cannot become a valid header -- including on the first byte when it starts
    neither signature, so a misconfigured balancer is reported at once.
    """
    if not buf:
        return None
    n = min(len(buf), len(V2_SIGNATURE))
    if buf[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(buf, max_size) if n == len(V2_SIGNATURE) else None
    n = min(len(buf), len(_V1_PREFIX))
    if buf[:n] == _V1_PREFIX[:n]:
        return _parse_v1(buf) if n == len(_V1_PREFIX) else None
    raise _fail(f"expected a PROXY v1 or v2 header, got {_describe_start(buf)}")


class ProxyParser:
    """Incremental wrapper: ``feed(bytes)`` until it returns a header.

    After that, :attr:`rest` holds the bytes that followed the header (the
    start of the TLS handshake or the A-ASSOCIATE-RQ).
    """

    def __init__(self, max_size: int = MAX_HEADER_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self.header: ProxyHeader | None = None
        self.rest = b""

    @property
    def buffered(self) -> int:
        """Bytes received so far that are not yet a complete header."""
        return len(self._buf)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add ``data``; return the header once complete (then ``rest`` is set)."""
        if self.header is not None:
            raise RuntimeError("PROXY header already complete; read .rest")
        self._buf += data
        header = parse_proxy_header(bytes(self._buf), self.max_size)
        if header is None:
            # v1 is self-bounding (107 bytes); v2 announces its length, checked in
            # _parse_v2.  This catches nothing else but keeps the bound obvious.
            if len(self._buf) > self.max_size:
                raise _fail(f"header exceeds {self.max_size} bytes")
            return None
        self.header = header
        self.rest = bytes(self._buf[header.length:])
        self._buf.clear()
        return header


async def read_proxy_header(
    stream: trio.abc.ReceiveStream, max_size: int = MAX_HEADER_SIZE
) -> tuple[ProxyHeader, bytes]:
    """Read one PROXY header from ``stream``: (header, bytes read past it).

    Reads in small pieces so that little is read past the header; whatever is
    must be handed back to the next reader (``PrefixedStream``).  Raises
    ProtocolError on a bad header or on EOF before a complete one; the caller
    bounds the time (ARTIM).
    """
    parser = ProxyParser(max_size)
    while True:
        # 536 = one v1 line or a v2 header with its usual TLVs in one read.
        data = await stream.receive_some(536)
        if not data:
            raise _fail("connection closed before a complete header" if parser.buffered else
                        "connection closed before any byte was sent")
        header = parser.feed(data)
        if header is not None:
            return header, parser.rest
