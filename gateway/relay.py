"""The two-way byte pump of an established association.

It moves bytes in large chunks (DESIGN §9: large reads and writes are what make
a Python proxy fast) and only *watches* PDU boundaries through a zero-copy
tracker, so that when one side vanishes it knows whether an A-ABORT can still be
written cleanly to the other side, and whether the association was released.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import trio

from .dul.tracker import PDUTracker

#: Bytes asked of the source per read. 256 KiB: the measured sweet spot (§9).
CHUNK = 256 * 1024
#: Largest incomplete PDU the relay holds back (see ``_pump``). Peers negotiate
#: 16-128 KiB PDUs in practice; anything bigger is streamed through unbuffered.
HOLD_LIMIT = 4 * 1024 * 1024


class End(enum.Enum):
    """How one direction of the pump ended."""

    RUNNING = "running"
    EOF = "eof"  # the source closed its side
    SOURCE_BROKEN = "source broken"  # reset, TLS truncation, TLS error
    DESTINATION_BROKEN = "destination broken"  # writing to the other side failed
    VIOLATION = "protocol violation"  # the source sent a PDU not allowed now

#: PDU types allowed once the association is established (PS3.8 state Sta6 onwards):
#: P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT. Another A-ASSOCIATE-* is a violation.
_ESTABLISHED_TYPES = frozenset({0x04, 0x05, 0x06, 0x07})


@dataclass
class Direction:
    """One direction of the relay: its byte count, PDU tracker and end state."""

    name: str
    tracker: PDUTracker = field(default_factory=PDUTracker)
    bytes: int = 0
    end: End = End.RUNNING
    # True while a send to the destination is under way: if we are cancelled
    # then, the destination's framing is unknown and no A-ABORT may follow.
    sending: bool = False
    error: str | None = None
    #: PDU type that broke the protocol, if any (e.g. a second A-ASSOCIATE-RQ).
    violation: int | None = None
    #: True while the destination has part of a PDU (only for PDUs > HOLD_LIMIT).
    mid_pdu: bool = False
    #: Bytes of an incomplete PDU held back until the rest arrives.
    pending: bytearray | None = None

    def split_whole(self, data: bytes) -> bytes:
        """Feed ``data`` and return its part that ends on a PDU boundary; keep the rest.

        For bytes that reach the relay outside ``_pump`` (behind the RQ or the AC).
        """
        self.tracker.feed(data)
        held = self.tracker.partial
        if not held or held > HOLD_LIMIT:
            self.mid_pdu = held > HOLD_LIMIT
            return data
        self.pending = bytearray(data[len(data) - held:])
        return data[: len(data) - held]

    def __post_init__(self) -> None:
        self.tracker.on_pdu = self._check_type

    def _check_type(self, pdu_type: int, length: int) -> None:
        if pdu_type not in _ESTABLISHED_TYPES and self.violation is None:
            self.violation = pdu_type

    @property
    def destination_clean(self) -> bool:
        """Can a whole PDU still be written to this direction's destination?"""
        return not self.sending and not self.mid_pdu and self.end is not End.DESTINATION_BROKEN


@dataclass
class RelayResult:
    """What the relay saw, for the session to decide release vs abort."""

    upstream: Direction  # client → backend
    downstream: Direction  # backend → client
    idle_timeout: bool = False
    release_timeout: bool = False

    @property
    def released(self) -> bool:
        """Both halves of A-RELEASE crossed the gateway (either side may request)."""
        up, down = self.upstream.tracker, self.downstream.tracker
        return (up.seen_release_rq and down.seen_release_rp) or (
            down.seen_release_rq and up.seen_release_rp
        )

    @property
    def aborted_by(self) -> str | None:
        """'client' or 'backend' if an A-ABORT PDU crossed the gateway."""
        if self.upstream.tracker.seen_abort:
            return "client"
        if self.downstream.tracker.seen_abort:
            return "backend"
        return None


@dataclass
class _Timers:
    """The relay's two clocks: idle (pushed on every chunk) and release (armed once).

    Both run on one cancel scope whose deadline is the earlier of the two: a
    second scope would cost ~15 µs per association, a ``min`` per chunk nothing.
    """

    scope: trio.CancelScope
    idle_timeout: float
    release_timeout: float
    release_deadline: float = math.inf

    def push_idle(self) -> None:
        """Restart the idle clock (on every chunk, either direction)."""
        self.scope.deadline = min(trio.current_time() + self.idle_timeout,
                                  self.release_deadline)

    def arm_release(self) -> None:
        """Start the release clock (once: at the first A-RELEASE-RQ)."""
        self.release_deadline = trio.current_time() + self.release_timeout


async def _pump(
    src: trio.abc.ReceiveStream,
    dst: trio.abc.SendStream,
    d: Direction,
    timers: _Timers,
    done: trio.CancelScope,
) -> None:
    receive, send, feed, tracker = src.receive_some, dst.send_all, d.tracker.feed, d.tracker
    pending, d.pending = d.pending, None
    try:
        while True:
            try:
                data = await receive(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                d.end, d.error = End.SOURCE_BROKEN, str(exc.__cause__ or exc)
                return
            if not data:
                d.end = End.EOF
                return
            feed(data)
            if d.violation is not None or tracker.broken:
                # Do not pass it on: the gateway answers with A-ABORT instead.
                d.end = End.VIOLATION
                return
            if tracker.seen_release_rq and timers.release_deadline == math.inf:
                # A release that is never answered must not hold the association.
                timers.arm_release()
            # One shared deadline for both directions: a long C-STORE keeps the
            # quiet response direction alive too.
            timers.push_idle()
            # Forward whole PDUs only: an incomplete trailing PDU is held back until
            # its end arrives, so that if the source dies now the destination sits
            # on a PDU boundary and still gets a clean A-ABORT (never a truncated
            # PDU it might half-process). Only a PDU larger than HOLD_LIMIT is
            # streamed as it comes, to keep memory per connection bounded.
            held = tracker.partial
            buf = data
            if pending is not None:
                pending += data
                buf, pending = pending, None
            if held and held <= HOLD_LIMIT:
                cut = len(buf) - held
                pending = bytearray(memoryview(buf)[cut:])
                if cut == 0:
                    continue
                buf = memoryview(buf)[:cut]
            d.mid_pdu = held > HOLD_LIMIT
            d.sending = True
            try:
                await send(buf)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                d.end, d.error = End.DESTINATION_BROKEN, str(exc.__cause__ or exc)
                return
            d.sending = False
            d.bytes += len(buf)
    finally:
        # The first direction to end ends the relay; the session decides the rest.
        done.cancel()


async def relay(
    client: trio.abc.Stream,
    backend: trio.abc.Stream,
    *,
    idle_timeout: float,
    release_timeout: float = 30.0,
    upstream: Direction | None = None,
    downstream: Direction | None = None,
) -> RelayResult:
    """Pump bytes both ways until one side ends, ``idle_timeout`` passes in silence,
    or an A-RELEASE-RQ stays unanswered for ``release_timeout``."""
    result = RelayResult(
        upstream=upstream or Direction("client→backend"),
        downstream=downstream or Direction("backend→client"),
    )
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:
        timers = _Timers(scope, idle_timeout, release_timeout)
        async with trio.open_nursery() as nursery:
            done = nursery.cancel_scope
            nursery.start_soon(_pump, backend, client, result.downstream, timers, done)
            # The other direction runs in this task: one task fewer to spawn and
            # schedule per association; ``done`` cancels this body as well.
            await _pump(client, backend, result.upstream, timers, done)
    if scope.cancelled_caught:
        # Which clock ran out; the release clock when both did.
        if trio.current_time() >= timers.release_deadline:
            result.release_timeout = True
        else:
            result.idle_timeout = True
    return result
