"""The relay: whole PDUs only, violations stopped, release/abort/idle told apart."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

from gateway import relay as relay_mod
from gateway.relay import End, relay


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


PDATA = pdu(0x04, struct.pack(">LBB", 1002, 1, 0) + bytes(1000))
RELEASE_RQ = pdu(0x05, bytes(4))
RELEASE_RP = pdu(0x06, bytes(4))


async def received(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


async def run(client_sends: list[bytes], backend_sends: list[bytes] = (), *,
              idle: float = 5.0, close_client: bool = True):
    """Drive a relay over in-memory streams; return (result, backend got, client got)."""
    client_peer, client_gw = trio.testing.memory_stream_pair()
    backend_gw, backend_peer = trio.testing.memory_stream_pair()
    got: dict[str, bytes] = {}
    result = None

    async def gateway() -> None:
        nonlocal result
        result = await relay(client_gw, backend_gw, idle_timeout=idle, release_timeout=1)
        await client_gw.aclose()
        await backend_gw.aclose()

    async def client() -> None:
        for data in client_sends:
            await client_peer.send_all(data)
            await trio.sleep(0.01)
        if close_client:
            await trio.sleep(0.1)  # like a requester: close after the answer came
            await client_peer.send_eof()

    async def backend() -> None:
        for data in backend_sends:
            await backend_peer.send_all(data)
            await trio.sleep(0.01)

    async def collect(name: str, stream: trio.abc.ReceiveStream) -> None:
        try:
            got[name] = await received(stream)
        except trio.ClosedResourceError:
            got[name] = b""

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(gateway)
            n.start_soon(client)
            n.start_soon(backend)
            n.start_soon(collect, "backend", backend_peer)
            if close_client:
                n.start_soon(collect, "client", client_peer)
    return result, got.get("backend", b""), got.get("client", b"")


async def test_incomplete_pdu_is_held_back_so_an_abort_can_follow() -> None:
    result, at_backend, _ = await run([PDATA + PDATA[:300], PDATA[300:400]])
    assert at_backend == PDATA  # never a fragment of the cut PDU
    assert result.upstream.end is End.EOF
    assert result.upstream.destination_clean


async def test_pdu_split_over_reads_arrives_whole() -> None:
    pieces = [PDATA[:3], PDATA[3:500], PDATA[500:] + PDATA[:10], PDATA[10:]]
    _, at_backend, _ = await run(pieces)
    assert at_backend == PDATA + PDATA


async def test_giant_pdu_is_streamed_and_marks_destination_mid_pdu(monkeypatch) -> None:
    monkeypatch.setattr(relay_mod, "HOLD_LIMIT", 100)
    result, at_backend, _ = await run([PDATA[:600]])
    assert at_backend == PDATA[:600]
    assert not result.upstream.destination_clean


async def test_second_associate_rq_is_a_violation_and_not_forwarded() -> None:
    rq = pdu(0x01, bytes(68))
    result, at_backend, _ = await run([PDATA, rq])
    assert at_backend == PDATA
    assert result.upstream.end is End.VIOLATION and result.upstream.violation == 0x01


async def test_release_is_recognised() -> None:
    result, at_backend, at_client = await run([RELEASE_RQ], [RELEASE_RP])
    assert at_backend == RELEASE_RQ and at_client == RELEASE_RP
    assert result.released


async def test_abort_is_attributed() -> None:
    result, _, _ = await run([pdu(0x07, bytes(4))])
    assert result.aborted_by == "client"


@pytest.mark.parametrize("idle", [0.2])
async def test_idle_timeout(idle: float) -> None:
    result, _, _ = await run([PDATA], idle=idle, close_client=False)
    assert result.idle_timeout
