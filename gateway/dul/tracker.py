"""Passive PDU boundary tracking for the relay, without copying payloads.

Once an association is established the relay moves bytes in large chunks and
must not parse or copy them, yet it needs to know where PDUs start and end: to
notice A-RELEASE-RQ/RP and A-ABORT (the end of the association), to stop a
drain only at a PDU boundary, and to inject an A-ABORT without cutting a PDU in
half.  ``PDUTracker`` walks the 6-byte PDU headers (type, reserved, 4-byte
length; PS3.8 §9.3.1) and *skips* the bodies arithmetically: for a 256 KiB chunk
in the middle of a 1 MiB P-DATA-TF it does one subtraction.  At most the five
bytes of a header split across chunks are ever copied.

It never raises on bad input: it is an observer, and the relay decides what to
do.  An unknown PDU type means the stream cannot be followed any further, so the
tracker marks itself ``broken`` and stops interpreting.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from gateway.dul.constants import PDUType

__all__ = ["PDUTracker"]

_HEADER = struct.Struct(">BBL")
_HEADER_LENGTH = _HEADER.size
_FIRST_TYPE = min(PDUType)
_LAST_TYPE = max(PDUType)


class PDUTracker:
    """Follow PDU boundaries in one direction of an established association.

    Attributes (read them, do not set them):

    ``at_boundary``
        the bytes fed so far end exactly where a PDU ends (True before any byte);
    ``pdus``
        number of PDUs whose header has been seen (the last one may be incomplete);
    ``last_type``
        type of the most recent PDU whose header was seen, or ``None`` (once
        ``broken``: the unknown type that broke it);
    ``seen_release_rq`` / ``seen_release_rp`` / ``seen_abort``
        a header of that type has been seen;
    ``broken``
        an unknown PDU type was seen; nothing after it is interpreted.

    ``on_pdu(pdu_type, length)`` is called for each header as soon as it is seen.
    """

    __slots__ = (
        "_header",
        "_length",
        "_remaining",
        "at_boundary",
        "broken",
        "last_type",
        "on_pdu",
        "pdus",
        "seen_abort",
        "seen_release_rp",
        "seen_release_rq",
    )

    def __init__(self, on_pdu: Callable[[int, int], None] | None = None) -> None:
        self.on_pdu = on_pdu
        self.at_boundary = True
        self.pdus = 0
        self.last_type: int | None = None
        self.seen_release_rq = False
        self.seen_release_rp = False
        self.seen_abort = False
        self.broken = False
        self._remaining = 0  # body bytes of the current PDU not yet seen
        self._length = 0  # body length of the current PDU
        self._header = bytearray()  # a header split across chunks (< 6 bytes)

    @property
    def remaining(self) -> int:
        """Body bytes of the current PDU still to come (0 at a boundary)."""
        return self._remaining

    @property
    def partial(self) -> int:
        """Bytes of the current, still incomplete PDU fed so far (0 at a boundary).

        The relay holds these back so that what it has forwarded always ends on
        a PDU boundary, where an A-ABORT can still follow if the source dies.
        """
        if self._header:
            return len(self._header)
        if self._remaining:
            return _HEADER_LENGTH + self._length - self._remaining
        return 0

    @property
    def completed(self) -> int:
        """Number of PDUs fed completely."""
        return self.pdus - 1 if self._remaining else self.pdus

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Account for ``chunk``, the next bytes of the stream."""
        if self.broken:
            return
        if isinstance(chunk, memoryview) and chunk.format != "B":
            chunk = chunk.cast("B")  # O(1); makes len() and slicing count bytes
        size = len(chunk)
        pos = 0
        remaining = self._remaining
        header = self._header
        while pos < size:
            if remaining:
                # Inside a body: skip it without looking at it.
                if size - pos <= remaining:
                    remaining -= size - pos
                    pos = size
                    break
                pos += remaining
                remaining = 0
                continue
            if not header and size - pos >= _HEADER_LENGTH:
                pdu_type, _, length = _HEADER.unpack_from(chunk, pos)
                pos += _HEADER_LENGTH
            else:
                take = min(_HEADER_LENGTH - len(header), size - pos)
                header += chunk[pos : pos + take]
                pos += take
                if len(header) < _HEADER_LENGTH:
                    break
                pdu_type, _, length = _HEADER.unpack(header)
                header.clear()
            if not _FIRST_TYPE <= pdu_type <= _LAST_TYPE:
                self.last_type = pdu_type  # so the relay can name what broke it
                self.broken = True
                self.at_boundary = False
                self._remaining = 0
                return
            self.pdus += 1
            self.last_type = pdu_type
            if pdu_type == PDUType.RELEASE_RQ:
                self.seen_release_rq = True
            elif pdu_type == PDUType.RELEASE_RP:
                self.seen_release_rp = True
            elif pdu_type == PDUType.ABORT:
                self.seen_abort = True
            remaining = self._length = length
            if self.on_pdu is not None:
                self.on_pdu(pdu_type, length)
        self._remaining = remaining
        self.at_boundary = remaining == 0 and not header
