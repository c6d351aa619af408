"""Admin HTTP endpoint (h11 on trio): routing, methods, keep-alive, bounds."""

from __future__ import annotations

import contextlib

import trio

from gateway.observe import admin
from gateway.observe.admin import Page, serve_admin


def handler(method: str, path: str) -> Page:
    if path == "/metrics":
        return Page(200, b"metric 1\n", "text/plain; version=0.0.4")
    return Page(404, b"not found\n")


async def _exchange(port: int, payload: bytes, *, read_until_close: bool = True) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        try:
            await stream.send_all(payload)
        except trio.BrokenResourceError:
            return out  # the server answered and closed while we were still sending
        with trio.move_on_after(3), contextlib.suppress(trio.BrokenResourceError):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                out += data
                if not read_until_close and out.count(b"\r\n\r\n") >= 1 and \
                        out.endswith(b"\n"):
                    break
    return out


def run_with_server(test) -> None:
    async def main():
        async with trio.open_nursery() as n:
            port = await n.start(serve_admin, "127.0.0.1", 0, handler)
            await test(port)
            n.cancel_scope.cancel()

    trio.run(main)


def test_get_404_head_and_keep_alive():
    async def test(port):
        out = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /other?x=1 HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")
        responses = out.split(b"HTTP/1.1 ")[1:]
        assert [r[:3] for r in responses] == [b"200", b"200", b"404"]
        assert responses[0].endswith(b"metric 1\n")
        assert b"content-length: 9" in responses[1].lower()
        assert not responses[1].endswith(b"metric 1\n")  # HEAD: no body
        assert b"version=0.0.4" in responses[0]

    run_with_server(test)


def test_other_methods_are_refused():
    async def test(port):
        out = await _exchange(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 2\r\nConnection: close\r\n\r\nab")
        assert out.startswith(b"HTTP/1.1 405") and b"allow: get, head" in out.lower()

    run_with_server(test)


def test_garbage_and_oversized_requests():
    async def test(port):
        out = await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400")
        huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (3 * admin.MAX_REQUEST)
        out = await _exchange(port, huge + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431") or out == b""

    run_with_server(test)


def test_silent_client_is_dropped(monkeypatch):
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT", 0.2)

    async def test(port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # never finished
            with trio.fail_after(2):
                assert await stream.receive_some(100) == b""

    run_with_server(test)
