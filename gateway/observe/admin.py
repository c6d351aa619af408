"""The admin HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz`` over h11 on trio.

Deliberately tiny: GET/HEAD only, no request bodies, one request at a time per
connection (keep-alive honoured), a bounded request head (``MAX_REQUEST``) and a
timeout per request, so a scraper that stalls or a port scanner cannot pin
connections.  The pages themselves come from a callback, which keeps this
module free of any knowledge of metrics or readiness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11
import structlog
import trio

__all__ = ["MAX_REQUEST", "REQUEST_TIMEOUT", "Page", "serve_admin"]

log = structlog.get_logger("gateway")

#: Bytes of request line + headers accepted (h11's cap on an incomplete event).
MAX_REQUEST = 16 * 1024
#: Seconds a client gets to send one complete request, and to read the answer.
REQUEST_TIMEOUT = 10.0
#: Concurrent admin connections; more wait in the kernel's accept backlog.
MAX_CONNECTIONS = 32


@dataclass(frozen=True)
class Page:
    """One HTTP answer."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str, str], Page]  # (method, path) -> Page


async def serve_admin(
    host: str,
    port: int,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("admin.started", address=f"{host}:{bound}")
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        async with limit:
            try:
                await _serve_connection(stream, handler)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                pass
            except Exception:
                log.exception("admin.crashed")

    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    async with stream:
        while True:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await _next_request(stream, conn)
                if request is None:
                    return
                page = _answer(request, handler)
                await _send(stream, conn, request, page)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


async def _next_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    request: h11.Request | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _error(stream, conn, exc.error_status_hint)
            return None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_REQUEST)
            conn.receive_data(data)  # b"" is EOF; h11 turns it into ConnectionClosed
            continue
        if isinstance(event, h11.Request):
            request = event
            continue
        if isinstance(event, h11.Data):
            continue  # a body on GET: read and ignore it (bounded by the timeout)
        if isinstance(event, h11.EndOfMessage):
            return request
        return None  # ConnectionClosed or PAUSED


def _answer(request: h11.Request, handler: Handler) -> Page:
    method = request.method.decode("ascii", "replace")
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return Page(405, b"method not allowed\n")
    return handler(method, path)


async def _send(stream: trio.SocketStream, conn: h11.Connection, request: h11.Request,
                page: Page) -> None:
    headers = [("content-type", page.content_type),
               ("content-length", str(len(page.body))),
               ("cache-control", "no-store")]
    if page.status == 405:
        headers.append(("allow", "GET, HEAD"))
    out = conn.send(h11.Response(status_code=page.status, headers=headers,
                                 reason=HTTPStatus(page.status).phrase.encode()))
    if request.method != b"HEAD":
        out += conn.send(h11.Data(data=page.body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)


async def _error(stream: trio.SocketStream, conn: h11.Connection, status: int) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode()
    headers = [("content-type", "text/plain; charset=utf-8"),
               ("content-length", str(len(body))), ("connection", "close")]
    try:
        out = conn.send(h11.Response(status_code=status, reason=phrase.encode(),
                                     headers=headers))
        out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return
    await stream.send_all(out)
