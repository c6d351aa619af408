"""A trio :class:`~trio.abc.Stream` that speaks TLS through pyOpenSSL memory BIOs.

The design follows trio's ``SSLStream`` (see STYLE.md): every TLS call is
followed, with no ``await`` in between, by draining the outgoing memory BIO;
then exactly one blocking thing happens -- sending that ciphertext (under a
strict FIFO lock so records reach the wire in the order OpenSSL produced
them) or, failing that, one transport read (under a lock plus a counter, so
two tasks never both read the transport and a task that needed bytes another
task already fetched does not read again).

What differs from trio's ``SSLStream`` is throughput (DESIGN.md §9): trio
returns one TLS record (≤ 16 KiB) per ``receive_some`` and stays near
180 MB/s whatever the buffer; here one transport read of up to 256 KiB is
followed by draining *every* decrypted record into one buffer, and
``send_all`` encrypts large pieces and ships their ciphertext in one
transport send. That is what lifted a memory-BIO pump from 175 to 520 MB/s.

A full-duplex relay calls :meth:`TLSStream.receive_some` in one task and
:meth:`TLSStream.send_all` in another at the same time; that is the common
case and is supported: the two only meet on the inner locks, exactly as in
trio.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from typing import TypeVar

import trio
from OpenSSL import SSL

from gateway.errors import TLSError
from gateway.tls import _ossl

__all__ = ["DEFAULT_RECEIVE_SIZE", "TRANSPORT_READ_SIZE", "TLSStream"]

T = TypeVar("T")

#: One transport read; 256 KiB is where the memory-BIO pump reached 520 MB/s.
TRANSPORT_READ_SIZE = 256 * 1024
#: Default ``max_bytes`` of :meth:`TLSStream.receive_some`.
DEFAULT_RECEIVE_SIZE = 256 * 1024
#: Plaintext encrypted per transport send. Large enough that the per-call
#: overhead vanishes, small enough that ciphertext buffering stays bounded.
SEND_PIECE_SIZE = 1024 * 1024
#: ``SSL_read`` returns at most one record (≤ 16 KiB plaintext); asking for a
#: little more costs nothing because pyOpenSSL allocates without zeroing.
_RECV_CALL_SIZE = 64 * 1024
#: ``bio_read`` buffer: a full send piece plus record overhead in one call.
_BIO_READ_SIZE = SEND_PIECE_SIZE + 64 * 1024
#: Small alerts are flushed on failure, but never at the price of hanging.
_ALERT_FLUSH_TIMEOUT = 2.0

# DICOM PS3.8 PDU types, to recognise plain DICOM arriving where TLS is expected.
_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
_TLS_HANDSHAKE = 0x16
_TLS_ALERT = 0x15


class _Lock:
    """A trio lock that, when free, is taken without a trip through the scheduler.

    ``trio.Lock.acquire`` yields to the scheduler even when the lock is free
    (a cancel-shielded checkpoint). This stream takes a lock around every
    transport read and send, ~12 times per association, and those extra
    yields were a measurable share of association setup CPU. Every holder
    here awaits transport I/O (itself a checkpoint) or returns right away, so
    skipping that yield changes no cancellation behaviour. ``acquire_nowait``
    refuses while others wait, so a ``StrictFIFOLock`` keeps its FIFO order.
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock | trio.StrictFIFOLock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _PlainDicomError(Exception):
    """The first bytes from the peer are a DICOM PDU, not a TLS record."""


class TLSStream(trio.abc.Stream):
    """TLS over any trio stream, using an ``OpenSSL.SSL.Connection`` on memory BIOs.

    ``conn`` must have been made with ``Connection(ctx, None)`` and put in
    accept or connect state already (``ServerTLS.new_connection`` and
    ``ClientTLS.new_connection`` do both). The handshake happens on the first
    :meth:`do_handshake`, :meth:`receive_some` or :meth:`send_all`.

    Errors: :meth:`do_handshake` raises :class:`~gateway.errors.TLSError` with
    a reason an operator can act on. After the handshake any TLS or transport
    failure marks the stream broken and raises :class:`trio.BrokenResourceError`
    (the OpenSSL error chained). A peer that closes TCP without close_notify is
    a broken stream, not an end of file: truncation must be visible.
    """

    def __init__(
        self, transport: trio.abc.Stream, conn: SSL.Connection, *, server_side: bool
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._server_side = server_side
        self._state = _State.OK

        self._handshake_lock = _Lock(trio.Lock())
        self._handshake_done = False
        self._handshake_error: TLSError | None = None

        # Caller-facing: several tasks may queue sends (FIFO keeps their
        # order); two concurrent receivers are a bug in the caller.
        self._outer_send_lock = _Lock(trio.StrictFIFOLock())
        self._receiving = False
        # Internal: who may touch the transport. The send lock must be strict
        # FIFO because ciphertext must leave in the order it was drained.
        self._inner_send_lock = _Lock(trio.StrictFIFOLock())
        self._inner_recv_lock = _Lock(trio.Lock())
        self._inner_recv_count = 0

        self._transport_eof = False
        self._bytes_received = 0
        # A record boundary may coincide with close_notify or a fatal error;
        # the data before it is returned first and the ending reported on the
        # next call.
        self._close_notify_received = False
        self._deferred_error: SSL.Error | None = None

    # ------------------------------------------------------------------
    # Properties

    @property
    def connection(self) -> SSL.Connection:
        """The pyOpenSSL ``Connection`` (peer certificate, cipher, SNI...)."""
        return self._conn

    @property
    def transport_stream(self) -> trio.abc.Stream:
        """The stream carrying the ciphertext."""
        return self._transport

    @property
    def server_side(self) -> bool:
        """True when this end accepted the connection."""
        return self._server_side

    @property
    def handshake_done(self) -> bool:
        """True once the TLS handshake has completed successfully."""
        return self._handshake_done

    # ------------------------------------------------------------------
    # Internals

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("TLS stream is broken")
        raise trio.ClosedResourceError("TLS stream is closed")

    def _drain_outgoing(self) -> bytes:
        """Take every byte OpenSSL queued for the wire (no await: order matters)."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._conn.bio_read(_BIO_READ_SIZE)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def _send_ciphertext(self, data: bytes) -> None:
        # NOTE: must be entered with no await since _drain_outgoing(): the
        # strict FIFO lock then preserves record order between tasks.
        try:
            async with self._inner_send_lock:
                await self._transport.send_all(data)
        except BaseException:
            # An unknown part of a record reached the wire (or a drained
            # record never will): the TLS stream cannot continue.
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise

    async def _flush_after_failure(self) -> None:
        """Best effort: let the peer see the alert OpenSSL wrote before failing."""
        data = self._drain_outgoing()
        if not data or self._transport_eof:
            # Failing at the peer's EOF: it stopped sending, nearly always by
            # closing without close_notify, which is how most clients end an
            # association. The alert would cost a timeout scope and a send,
            # and mostly earn a reset from a socket nobody reads any more.
            return
        with trio.move_on_after(_ALERT_FLUSH_TIMEOUT):
            try:
                async with self._inner_send_lock:
                    await self._transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _check_first_bytes(self, data: bytes) -> None:
        if self._bytes_received or self._handshake_done:
            return
        first = data[0]
        if first in (_TLS_HANDSHAKE, _TLS_ALERT):
            return
        name = _PDU_NAMES.get(first)
        if name is not None:
            raise _PlainDicomError(name)

    async def _refill(self) -> None:
        """Read the transport once into the incoming BIO, unless another task just did."""
        seen = self._inner_recv_count
        async with self._inner_recv_lock:
            if seen != self._inner_recv_count:
                # Someone else fed the BIO while we waited; retry the TLS call first.
                return
            if self._transport_eof:
                # OpenSSL still wants bytes after EOF was fed: that is truncation.
                raise SSL.SysCallError(-1, "Unexpected EOF")
            data = await self._transport.receive_some(TRANSPORT_READ_SIZE)
            if not data:
                self._transport_eof = True
                self._conn.bio_shutdown()
            else:
                self._check_first_bytes(data)
                self._bytes_received += len(data)
                self._conn.bio_write(data)
            self._inner_recv_count += 1

    async def _retry(self, fn: Callable[..., T], *args: object) -> T:
        """Run a TLS call until it completes, moving bytes in between.

        Mirrors trio's ``SSLStream._retry``: call, drain, then either send what
        was drained or (only if nothing was) read once, and loop. Sending takes
        priority because another task may meanwhile read what we need.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        while True:
            want_read = False
            finished = False
            result: T | None = None
            try:
                result = fn(*args)
                finished = True
            except SSL.WantReadError:
                want_read = True
            except SSL.ZeroReturnError:
                to_send = self._drain_outgoing()
                if to_send:
                    await self._send_ciphertext(to_send)
                raise
            except SSL.Error:
                self._state = _State.BROKEN
                await self._flush_after_failure()
                raise
            to_send = self._drain_outgoing()
            if to_send:
                yielded = True
                await self._send_ciphertext(to_send)
            elif want_read:
                yielded = True
                await self._refill()
            if finished:
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return result  # type: ignore[return-value]

    def _describe_failure(self, exc: BaseException) -> str:
        """Turn an OpenSSL handshake error into a reason an operator can act on."""
        reasons = _ossl.error_reasons(exc)
        texts = [r.lower() for r in reasons]
        # The transport ended before the handshake did (SysCallError is how
        # pyOpenSSL reports an EOF fed through bio_shutdown()).
        if isinstance(exc, SSL.SysCallError) or (
            self._transport_eof and any("eof" in t for t in texts)
        ):
            return "peer closed during handshake"
        for text in texts:
            if "peer did not return a certificate" in text:
                return "peer sent no certificate"
            if "certificate verify failed" in text:
                code = _ossl.verify_result(self._conn)
                if code:
                    return f"certificate verify failed: {_ossl.verify_error_string(code)}"
                return "certificate verify failed"
            if "no shared cipher" in text:
                return "no shared cipher"
            if "unsupported protocol" in text or "no protocols available" in text:
                return "no shared TLS version (peer offers only versions this profile refuses)"
            if "http request" in text:
                return "HTTP request received on a TLS port"
            if "wrong version number" in text:
                return "peer does not speak TLS here (wrong version number)"
            if "alert" in text:
                alert = text.split("alert", 1)[1].strip()
                if alert == "certificate required":
                    return "peer requires a client certificate and none was sent"
                return f"peer refused the handshake with TLS alert '{alert}'"
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
        return f"TLS handshake failed ({type(exc).__name__})"

    async def _ensure_handshake(self) -> None:
        """Implicit handshake from send/receive: failures follow the Stream contract."""
        if self._handshake_done:
            return
        try:
            await self.do_handshake()
        except TLSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    # ------------------------------------------------------------------
    # Public API

    async def do_handshake(self) -> None:
        """Complete the TLS handshake (once; later calls return at once).

        Raises :class:`~gateway.errors.TLSError` with the reason: no client
        certificate, verification failure with OpenSSL's reason, no shared
        cipher or version, an alert from the peer, the peer closing, or plain
        DICOM where TLS was expected. Cancellation leaves the stream broken.
        """
        if self._handshake_done:
            self._check_status()
            await trio.lowlevel.checkpoint()
            return
        if self._handshake_error is not None:
            await trio.lowlevel.checkpoint()
            raise TLSError(str(self._handshake_error))
        self._check_status()
        async with self._handshake_lock:
            if self._handshake_done:
                return
            if self._handshake_error is not None:
                raise TLSError(str(self._handshake_error))
            error: TLSError
            try:
                await self._retry(self._conn.do_handshake)
            except SSL.Error as exc:
                error = TLSError(self._describe_failure(exc))
                cause: BaseException = exc
            except _PlainDicomError as exc:
                if self._server_side:
                    error = TLSError(f"plain DICOM ({exc}) received on a TLS port")
                else:
                    error = TLSError(
                        f"peer answered with plain DICOM ({exc}) instead of TLS: "
                        "it does not speak TLS on this port"
                    )
                cause = exc
            except (trio.BrokenResourceError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                error = TLSError(f"connection lost during TLS handshake: {reason}")
                cause = exc
            except BaseException:
                # Cancelled half way: the TLS state machine cannot be resumed.
                if self._state is _State.OK:
                    self._state = _State.BROKEN
                raise
            else:
                self._handshake_done = True
                return
            if self._state is _State.OK:
                self._state = _State.BROKEN
            self._handshake_error = error
            raise error from cause

    def _read_available(self, max_bytes: int) -> bytes:
        """Decrypt every record already in the incoming BIO, up to ``max_bytes``."""
        chunks: list[bytes] = []
        total = 0
        while total < max_bytes:
            try:
                chunk = self._conn.recv(min(max_bytes - total, _RECV_CALL_SIZE))
            except SSL.WantReadError:
                if chunks:
                    break
                raise
            except SSL.ZeroReturnError:
                if chunks:
                    self._close_notify_received = True
                    break
                raise
            except SSL.Error as exc:
                if chunks:
                    self._deferred_error = exc
                    break
                raise
            chunks.append(chunk)
            total += len(chunk)
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return decrypted bytes: everything available after one transport read.

        One transport read of up to 256 KiB, then every complete record in the
        BIO is decrypted into one buffer (up to ``max_bytes``, default 256 KiB).
        Returns ``b""`` once the peer sent close_notify. A peer that closes the
        connection without close_notify raises :class:`trio.BrokenResourceError`.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this TLS stream")
        self._receiving = True
        try:
            self._check_status()
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE_SIZE
            max_bytes = int(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            await self._ensure_handshake()
            if self._close_notify_received:
                await trio.lowlevel.checkpoint()
                return b""
            if self._deferred_error is not None:
                exc, self._deferred_error = self._deferred_error, None
                self._state = _State.BROKEN
                await trio.lowlevel.checkpoint()
                raise trio.BrokenResourceError(_truncation_message(exc)) from exc
            try:
                return await self._retry(self._read_available, max_bytes)
            except SSL.ZeroReturnError:
                self._close_notify_received = True
                return b""
            except SSL.Error as exc:
                self._state = _State.BROKEN
                raise trio.BrokenResourceError(_truncation_message(exc)) from exc
            except trio.ClosedResourceError:
                if self._state is _State.CLOSED:
                    raise
                self._state = _State.BROKEN
                raise trio.BrokenResourceError("transport closed under the TLS stream") from None
            except (trio.BrokenResourceError, OSError) as exc:
                self._state = _State.BROKEN
                if isinstance(exc, trio.BrokenResourceError):
                    raise
                raise trio.BrokenResourceError(str(exc)) from exc
        finally:
            self._receiving = False

    def _encrypt(self, view: memoryview, start: int, end: int) -> int:
        """Encrypt ``view[start:end]`` into the outgoing BIO; return the new position.

        If OpenSSL needs to read first (``WantReadError``) after some progress,
        return that progress: the caller ships it and retries with the same
        remaining bytes, as OpenSSL demands for a retried ``SSL_write``.
        """
        pos = start
        while pos < end:
            try:
                pos += self._conn.send(view[pos:end])
            except SSL.WantReadError:
                if pos > start:
                    return pos
                raise
        return pos

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``.

        Data is encrypted in pieces of up to 1 MiB, each shipped in a single
        transport send. Concurrent callers are served in FIFO order. If this is
        cancelled the stream is broken (an unknown part reached the peer).
        """
        async with self._outer_send_lock:
            self._check_status()
            await self._ensure_handshake()
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            pos = 0
            end = 0
            try:
                while pos < len(view):
                    if pos >= end:
                        end = min(pos + SEND_PIECE_SIZE, len(view))
                    pos = await self._retry(self._encrypt, view, pos, end)
            except SSL.Error as exc:
                self._state = _State.BROKEN
                raise trio.BrokenResourceError(f"TLS error while sending: {exc!r}") from exc
            except trio.ClosedResourceError:
                if self._state is _State.CLOSED:
                    raise
                self._state = _State.BROKEN
                raise trio.BrokenResourceError("transport closed under the TLS stream") from None
            except OSError as exc:
                self._state = _State.BROKEN
                raise trio.BrokenResourceError(str(exc)) from exc
            except BaseException:
                if self._state is _State.OK:
                    self._state = _State.BROKEN
                raise

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport can take more ciphertext."""
        async with self._outer_send_lock:
            self._check_status()
            # The inner lock because a receiving task may be sending a TLS
            # reply on the transport right now; two writers are not allowed.
            async with self._inner_send_lock:
                await self._transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify once (without waiting for the peer's) and close the transport.

        A broken stream, or one whose handshake never completed, just closes
        the transport. Cancelling this closes the transport forcefully.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        polite = self._state is _State.OK and self._handshake_done
        self._state = _State.CLOSED
        if not polite:
            # Not aclose_forcefully: its cancelled scope costs two scheduler
            # trips per close, and closing a socket transport never blocks.
            await self._transport.aclose()
            return
        try:
            with contextlib.suppress(SSL.Error):
                self._conn.shutdown()
            data = self._drain_outgoing()
            if data:
                async with self._inner_send_lock:
                    await self._transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except BaseException:
            await trio.aclose_forcefully(self._transport)
            raise
        await self._transport.aclose()


def _truncation_message(exc: BaseException) -> str:
    if isinstance(exc, SSL.SysCallError) or any(
        "eof" in r.lower() for r in _ossl.error_reasons(exc)
    ):
        return "peer closed the connection without TLS close_notify (truncated)"
    reasons = _ossl.error_reasons(exc)
    return "TLS error: " + ("; ".join(reasons) if reasons else type(exc).__name__)
