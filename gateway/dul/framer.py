"""Incremental PDU framing: arbitrary chunks in, complete PDUs out.

The transport hands over bytes in whatever pieces the network produced;
``PDUFramer`` reassembles them into whole PDUs using the 6-byte header
(PS3.8 §9.3.1):

======  ======================================
offset  field
======  ======================================
0       PDU type (01H-07H)
1       reserved
2-5     PDU length: bytes after the header,
        unsigned 32-bit big endian
======  ======================================

It is the gateway's first line of defence, so it decides as early as it can:

* the first byte alone tells whether the peer speaks DICOM at all; a TLS
  ClientHello on a plain port (16H 03H ...) gets its own error,
  ``TLSOnPlainPortError``, so the operator reads "this client speaks TLS"
  instead of "PDU length 50 MB";
* a header that announces more than ``max_pdu_length`` bytes is refused as soon
  as the header is complete, before any of the body is buffered: the 4-byte
  length is the peer's word, and trusting it would let anyone make the gateway
  hold up to 4 GiB per connection (h11 caps incomplete input the same way).

Like h11's receive buffer it performs no I/O: ``feed`` then call ``next_pdu``
until it returns ``None``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.dul.constants import AbortReason, PDUType
from gateway.errors import ProtocolError

__all__ = [
    "PDUFramer",
    "RawPDU",
    "TLSOnPlainPortError",
    "looks_like_dicom",
    "looks_like_tls",
]

_HEADER = struct.Struct(">BBL")
_HEADER_LENGTH = _HEADER.size
_TLS_HANDSHAKE = 0x16  # TLS record content type "handshake"
_TLS_MAJOR_VERSION = 0x03  # every SSLv3/TLS 1.x record version starts with 3
_FIRST_TYPE = min(PDUType)
_LAST_TYPE = max(PDUType)


class TLSOnPlainPortError(ProtocolError):
    """A TLS handshake arrived where plain DICOM was expected."""


def looks_like_tls(first_bytes: bytes | bytearray | memoryview) -> bool:
    """Whether a stream starting with ``first_bytes`` is a TLS client's.

    A TLS client opens with a handshake record: content type 16H, then the record
    version 03H xx.  One byte is already telling (16H is no PDU type); with two or
    more bytes the version's major number must be 3 too.
    """
    if len(first_bytes) == 0 or first_bytes[0] != _TLS_HANDSHAKE:
        return False
    return len(first_bytes) < 2 or first_bytes[1] == _TLS_MAJOR_VERSION


def looks_like_dicom(first_bytes: bytes | bytearray | memoryview) -> bool:
    """Whether a stream starting with ``first_bytes`` opens with an A-ASSOCIATE-RQ.

    Used to recognise plain DICOM sent to a TLS port and for ``tls = "auto"``
    listeners: an association always starts with PDU type 01H, reserved 00H.
    """
    if len(first_bytes) == 0 or first_bytes[0] != PDUType.ASSOCIATE_RQ:
        return False
    return len(first_bytes) < 2 or first_bytes[1] == 0


@dataclass(frozen=True, slots=True)
class RawPDU:
    """One complete PDU as received: ``data`` includes the 6-byte header."""

    pdu_type: int
    data: bytes

    @property
    def length(self) -> int:
        """The PDU length field: bytes after the header."""
        return len(self.data) - _HEADER_LENGTH


class PDUFramer:
    """Reassemble PDUs from a byte stream, refusing oversized or foreign input.

    ``max_pdu_length`` bounds the PDU length field (the bytes after the header) of
    every PDU; it must be at least 1.
    """

    __slots__ = ("_buffer", "_error", "_max_pdu_length", "_stream_start")

    def __init__(self, max_pdu_length: int) -> None:
        if max_pdu_length < 1:
            raise ValueError(f"max_pdu_length must be at least 1, got {max_pdu_length}")
        self._max_pdu_length = max_pdu_length
        self._buffer = bytearray()
        # True until the first PDU's header has been accepted: only the very first
        # bytes of a connection can be a TLS ClientHello rather than garbage.
        self._stream_start = True
        # A framer that found an error stays failed: the stream has lost sync.
        self._error: ProtocolError | None = None

    @property
    def max_pdu_length(self) -> int:
        """The largest PDU length field accepted (bytes after the header)."""
        return self._max_pdu_length

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; raise ``ProtocolError`` as soon as they are wrong.

        The head of the buffer is checked here and not only in ``next_pdu`` so
        that a bad first byte or an oversized length is reported on the read that
        delivered it.
        """
        if self._error is not None:
            raise self._error
        self._buffer += data
        self._check_head()

    def next_pdu(self) -> RawPDU | None:
        """Return the next complete PDU, or ``None`` when more bytes are needed."""
        if self._error is not None:
            raise self._error
        total = self._check_head()
        if total is None or len(self._buffer) < total:
            return None
        buffer = self._buffer
        pdu = RawPDU(buffer[0], bytes(buffer[:total]))
        # Deleting from the front of a bytearray only moves its start pointer in
        # CPython, so consuming PDU after PDU stays linear.
        del buffer[:total]
        self._stream_start = False
        return pdu

    def buffered(self) -> int:
        """Bytes received and not yet returned as a PDU."""
        return len(self._buffer)

    def take_remaining(self) -> bytes:
        """Return and forget every byte after the last PDU returned.

        Used when the association is established and the relay takes over the
        stream: these bytes belong to it and must be forwarded first.
        """
        remaining = bytes(self._buffer)
        self._buffer.clear()
        return remaining

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self._error = error
        return error

    def _check_head(self) -> int | None:
        """Validate the PDU at the head of the buffer; return its total size if known."""
        buffer = self._buffer
        if not buffer:
            return None
        pdu_type = buffer[0]
        if not _FIRST_TYPE <= pdu_type <= _LAST_TYPE:
            if self._stream_start and pdu_type == _TLS_HANDSHAKE:
                if len(buffer) < 2:
                    return None  # one more byte decides between TLS and garbage
                if looks_like_tls(buffer[:2]):
                    raise self._fail(
                        TLSOnPlainPortError(
                            "received a TLS handshake (bytes 16 03) on a plain DICOM "
                            "connection: the peer is configured for TLS; point it at a "
                            "TLS listener or turn TLS off on the peer",
                            abort_reason=AbortReason.UNRECOGNIZED_PDU,
                            offset=0,
                        )
                    )
            raise self._fail(
                ProtocolError(
                    f"unrecognized PDU type 0x{pdu_type:02X} (offset 0); this is not "
                    "DICOM upper-layer traffic or the stream lost synchronisation",
                    abort_reason=AbortReason.UNRECOGNIZED_PDU,
                    offset=0,
                )
            )
        if len(buffer) < _HEADER_LENGTH:
            return None
        _, _, length = _HEADER.unpack_from(buffer, 0)
        if length > self._max_pdu_length:
            raise self._fail(
                ProtocolError(
                    f"{PDUType(pdu_type).name} announces a PDU length of {length} bytes, "
                    f"more than the limit of {self._max_pdu_length} (offset 2)",
                    abort_reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
                    offset=2,
                )
            )
        return _HEADER_LENGTH + length
