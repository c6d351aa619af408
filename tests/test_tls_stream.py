"""TLSStream over real sockets on 127.0.0.1, against stdlib ssl and openssl peers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
import trio.testing

from gateway.errors import TLSError
from gateway.tls.context import (
    ClientTLSSettings,
    Identity,
    ServerTLSSettings,
    build_client,
    build_server,
    gather_evidence,
)
from gateway.tls.stream import TLSStream
from tests.tls_helpers import PKI, get_pki, listen, stdlib_client_context, tcp_pair, trio_test

MB = 1024 * 1024
_T = TypeVar("_T")


def server_settings(pki: PKI, **kw: object) -> ServerTLSSettings:
    kw.setdefault("trust", pki.ca)
    return ServerTLSSettings(identities=(Identity(pki.server, pki.server_key),), **kw)  # type: ignore[arg-type]


async def server_stream(settings: ServerTLSSettings) -> tuple[TLSStream, trio.SocketStream]:
    """Our server ``TLSStream`` on a new TCP pair (no handshake yet), and the raw client end."""
    server_tls = build_server(settings)
    s_raw, c_raw = await tcp_pair()
    return TLSStream(s_raw, server_tls.new_connection(), server_side=True), c_raw


def stdlib_client(
    c_raw: trio.SocketStream, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> trio.SSLStream[trio.SocketStream]:
    return trio.SSLStream(c_raw, client_ctx, server_hostname=hostname)


async def handshake_all(*streams: TLSStream | trio.SSLStream[trio.SocketStream]) -> None:
    """Both ends' handshakes at once: each needs the other's records to finish."""
    async with trio.open_nursery() as n:
        for stream in streams:
            n.start_soon(stream.do_handshake)


async def handshake_pair(
    settings: ServerTLSSettings, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[TLSStream, trio.SSLStream[trio.SocketStream]]:
    srv, c_raw = await server_stream(settings)
    cli = stdlib_client(c_raw, client_ctx, hostname)
    await handshake_all(srv, cli)
    return srv, cli


async def server_refuses(
    srv: TLSStream, cli: trio.SSLStream[trio.SocketStream], match: str
) -> None:
    """Run the stdlib client's handshake while ours must fail with ``TLSError(match)``."""

    async def client() -> None:
        # TLS 1.3: the client's handshake ends before the server decides, so
        # the refusal only shows on the client's first read.
        with contextlib.suppress(trio.BrokenResourceError):
            await cli.do_handshake()
            await cli.receive_some()

    async with trio.open_nursery() as n:
        n.start_soon(client)
        with pytest.raises(TLSError, match=match):
            await srv.do_handshake()


async def recv_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(max(n - len(buf), 1))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


# ----------------------------------------------------------------------
# Server side


@trio_test
async def test_server_handshake_mutual_tls_and_evidence() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))
        ev = gather_evidence(srv.connection)
        assert ev.version in ("TLSv1.3", "TLSv1.2")
        assert ev.common_name == "CT01"
        assert "URI:dicom-ae:CT01" in ev.sans
        assert ev.chain_verified is True
        assert ev.verify_error is None
        assert ev.sni == "localhost"
        assert ev.peer_chain[0] == pki.client_cert
        assert len(ev.sha256 or "") == 95
        await cli.send_all(b"hello")
        assert await srv.receive_some() == b"hello"
        await srv.send_all(b"world")
        assert await recv_exactly(cli, 5) == b"world"
        await srv.aclose()
        await cli.aclose()


@trio_test
async def test_full_duplex_20mb_each_way_byte_exact() -> None:
    pki = get_pki()
    up = os.urandom(20 * MB)
    down = os.urandom(20 * MB)
    got: dict[str, str] = {}
    with trio.fail_after(30):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))

        async def pump_in(stream: trio.abc.ReceiveStream, key: str, n: int) -> None:
            h = hashlib.sha256()
            total = 0
            while total < n:
                chunk = await stream.receive_some(256 * 1024)
                assert chunk
                h.update(chunk)
                total += len(chunk)
            assert total == n
            got[key] = h.hexdigest()

        async def pump_out(stream: trio.abc.SendStream, data: bytes, piece: int) -> None:
            view = memoryview(data)
            for i in range(0, len(data), piece):
                await stream.send_all(view[i : i + piece])

        async with trio.open_nursery() as n:
            # The gateway's relay: receive in one task, send in another, at once.
            n.start_soon(pump_in, srv, "up", len(up))
            n.start_soon(pump_out, srv, down, 3 * MB + 17)
            n.start_soon(pump_in, cli, "down", len(down))
            n.start_soon(pump_out, cli, up, 256 * 1024)
    assert got["up"] == hashlib.sha256(up).hexdigest()
    assert got["down"] == hashlib.sha256(down).hexdigest()


@trio_test
async def test_receive_drains_all_records_of_one_read() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))
        payload = os.urandom(96 * 1024)
        await cli.send_all(payload)  # trio's SSLStream writes 16 KiB records
        await trio.sleep(0.2)  # let every record reach the kernel buffer
        first = await srv.receive_some()
        # One TLS record holds at most 16 KiB: more means several were drained.
        assert len(first) > 16 * 1024
        rest = await recv_exactly(srv, len(payload) - len(first))
        assert first + rest == payload


@trio_test
async def test_close_notify_gives_eof() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))
        await cli.send_all(b"last words")
        await cli.aclose()  # sends close_notify
        data = b""
        while True:
            chunk = await srv.receive_some()
            if not chunk:
                break
            data += chunk
        assert data == b"last words"
        assert await srv.receive_some() == b""  # EOF is sticky
        await srv.aclose()


@trio_test
async def test_truncation_raises_broken_resource() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))
        await cli.send_all(b"partial")
        # TCP FIN without close_notify. shutdown() rather than close(): closing
        # a socket with unread bytes (a TLS 1.3 ticket) would send RST instead.
        cli.transport_stream.socket.shutdown(socket.SHUT_WR)
        assert await recv_exactly(srv, 7) == b"partial"
        with pytest.raises(trio.BrokenResourceError) as info:
            await srv.receive_some()
        assert "without TLS close_notify" in str(info.value)
        with pytest.raises(trio.BrokenResourceError):
            await srv.send_all(b"x")
        await srv.aclose()
        await cli.transport_stream.aclose()


@trio_test
async def test_reset_raises_broken_resource() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))
        cli.transport_stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await cli.transport_stream.aclose()  # RST
        with pytest.raises(trio.BrokenResourceError):
            await srv.receive_some()
        await srv.aclose()


@trio_test
async def test_aclose_sends_close_notify_to_stdlib_peer() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))
        await srv.send_all(b"bye")
        await srv.aclose()
        assert await recv_exactly(cli, 3) == b"bye"
        assert await cli.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await srv.receive_some()


@trio_test
async def test_required_client_cert_missing() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, c_raw = await server_stream(server_settings(pki, client_cert="required"))
        cli = stdlib_client(c_raw, stdlib_client_context(pki, client_cert=False))
        await server_refuses(srv, cli, "peer sent no certificate")
        # Idempotent: a second call reports the same failure.
        with pytest.raises(TLSError, match="peer sent no certificate"):
            await srv.do_handshake()
        with pytest.raises(trio.BrokenResourceError):
            await srv.receive_some()
        await srv.aclose()


@trio_test
async def test_optional_client_cert_accepts_none() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, _cli = await handshake_pair(
            server_settings(pki, client_cert="optional"),
            stdlib_client_context(pki, client_cert=False),
        )
        ev = gather_evidence(srv.connection)
        assert ev.sha256 is None and ev.chain_verified is None
        await srv.aclose()


@trio_test
async def test_untrusted_client_cert_refused_in_handshake() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, c_raw = await server_stream(server_settings(pki))
        cli = stdlib_client(c_raw, stdlib_client_context(pki, rogue=True))
        await server_refuses(
            srv, cli, "certificate verify failed: unable to get local issuer certificate"
        )


@trio_test
async def test_evidence_first_records_chain_error() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, _cli = await handshake_pair(
            server_settings(pki, verify_in_handshake=False),
            stdlib_client_context(pki, rogue=True),
        )
        ev = gather_evidence(srv.connection)
        assert ev.common_name == "ROGUE"
        assert ev.chain_verified is False
        assert ev.verify_error is not None
        assert "unable to get local issuer certificate" in ev.verify_error
        await srv.aclose()


@trio_test
async def test_plain_dicom_on_tls_port() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, c_raw = await server_stream(server_settings(pki))
        # Start of an A-ASSOCIATE-RQ: type 0x01, reserved, length, version 1.
        await c_raw.send_all(b"\x01\x00\x00\x00\x00\xcd\x00\x01\x00\x00" + b"STORESCP".ljust(16))
        expected = r"plain DICOM \(A-ASSOCIATE-RQ\) received on a TLS port"
        with pytest.raises(TLSError, match=expected):
            await srv.do_handshake()
        await srv.aclose()
        await c_raw.aclose()


@trio_test
async def test_peer_closed_during_handshake() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, c_raw = await server_stream(server_settings(pki))
        await c_raw.aclose()
        with pytest.raises(TLSError, match="peer closed during handshake"):
            await srv.do_handshake()


@trio_test
async def test_concurrent_receivers_conflict() -> None:
    pki = get_pki()
    with trio.fail_after(10):
        srv, cli = await handshake_pair(server_settings(pki), stdlib_client_context(pki))
        async with trio.open_nursery() as n:
            n.start_soon(srv.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await srv.receive_some()
            await cli.send_all(b"x")
        await srv.aclose()


@trio_test
async def test_sni_selects_identity_with_stdlib_client() -> None:
    pki = get_pki()
    settings = ServerTLSSettings(
        identities=(
            Identity(pki.server, pki.server_key),
            Identity(pki.a, pki.a_key),
            Identity(pki.wild, pki.wild_key),
        ),
        client_cert="none",
    )
    ctx = stdlib_client_context(pki, client_cert=False)
    ctx.check_hostname = False
    with trio.fail_after(10):
        for hostname, expected in (
            ("a.example", pki.a_cert),
            ("A.Example", pki.a_cert),
            ("x.wild.example", pki.wild_cert),
            ("unknown.example", pki.server_cert),
        ):
            srv, cli = await handshake_pair(settings, ctx, hostname)
            der = cli.getpeercert(binary_form=True)
            from cryptography import x509

            assert x509.load_der_x509_certificate(der) == expected, hostname
            assert gather_evidence(srv.connection).sni == hostname.lower()
            await srv.aclose()
            await cli.aclose()


# ----------------------------------------------------------------------
# openssl s_client as the peer

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


async def serve_one(
    settings: ServerTLSSettings,
    serve: Callable[[TLSStream], Awaitable[None]],
    run_peer: Callable[[int], Awaitable[_T]],
) -> _T:
    """Accept one connection into ``serve`` while ``run_peer(port)`` (a real peer) runs."""
    server_tls = build_server(settings)
    listener, port = await listen()

    async def accept() -> None:
        raw = await listener.accept()
        await serve(TLSStream(raw, server_tls.new_connection(), server_side=True))

    async with trio.open_nursery() as n:
        n.start_soon(accept)
        result = await run_peer(port)
    await listener.aclose()
    return result


async def _run_s_client(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@pytest.mark.skipif(not os.path.exists(OPENSSL), reason="openssl CLI not installed")
@trio_test
async def test_sni_with_openssl_s_client() -> None:
    pki = get_pki()
    settings = ServerTLSSettings(
        identities=(Identity(pki.server, pki.server_key), Identity(pki.a, pki.a_key)),
        client_cert="none",
    )
    outcome: dict[str, str | None] = {}

    async def serve(srv: TLSStream) -> None:
        await srv.do_handshake()
        outcome["sni"] = gather_evidence(srv.connection).sni
        await srv.aclose()

    with trio.fail_after(15):
        proc = await serve_one(
            settings,
            serve,
            lambda port: _run_s_client(port, "-servername", "a.example", "-CAfile", str(pki.ca)),
        )
    out = proc.stdout.decode(errors="replace")
    assert "CN = a.example" in out or "CN=a.example" in out, out
    assert "Verify return code: 0 (ok)" in out
    assert outcome["sni"] == "a.example"


@pytest.mark.skipif(not os.path.exists(OPENSSL), reason="openssl CLI not installed")
@trio_test
async def test_tls11_refused_by_default_profile() -> None:
    pki = get_pki()
    errors: list[str] = []

    async def serve(srv: TLSStream) -> None:
        try:
            await srv.do_handshake()
        except TLSError as exc:
            errors.append(str(exc))
        await srv.aclose()

    with trio.fail_after(15):
        proc = await serve_one(
            server_settings(pki, client_cert="none"),
            serve,
            lambda port: _run_s_client(port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"),
        )
    assert proc.returncode != 0
    assert errors and "TLS version" in errors[0], errors


@pytest.mark.skipif(shutil.which("echoscu") is None, reason="DCMTK not installed")
@trio_test
async def test_echoscu_tls_handshake_interop() -> None:
    """DCMTK 3.6.7 echoscu +tls completes a mutual-TLS handshake; its first PDU is readable."""
    pki = get_pki()
    seen: dict[str, object] = {}

    async def serve(srv: TLSStream) -> None:
        await srv.do_handshake()
        seen["cn"] = gather_evidence(srv.connection).common_name
        seen["first"] = (await srv.receive_some())[:1]
        await srv.aclose()  # no DICOM answer: echoscu fails after the handshake

    async def echoscu(port: int) -> None:
        await trio.run_process(
            [
                "echoscu",
                "-to",
                "5",
                "+tls",
                str(pki.client_key),
                str(pki.client),
                "+cf",
                str(pki.ca),
                "127.0.0.1",
                str(port),
            ],
            env=dict(os.environ, TCP_NODELAY="1"),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    with trio.fail_after(20):
        await serve_one(server_settings(pki), serve, echoscu)
    assert seen["cn"] == "CT01"
    assert seen["first"] == b"\x01"  # A-ASSOCIATE-RQ, decrypted


# ----------------------------------------------------------------------
# Client side, against a stdlib ssl server


def stdlib_server_context(pki: PKI, *, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.server), str(pki.server_key))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
    return ctx


async def client_pair(
    settings: ClientTLSSettings, server_ctx: ssl.SSLContext
) -> tuple[TLSStream, trio.SSLStream[trio.SocketStream], object]:
    client_tls = build_client(settings)
    s_raw, c_raw = await tcp_pair()
    srv = trio.SSLStream(s_raw, server_ctx, server_side=True)
    cli = TLSStream(c_raw, client_tls.new_connection(), server_side=False)
    return cli, srv, client_tls


@trio_test
async def test_client_side_roundtrip_and_mutual_tls() -> None:
    pki = get_pki()
    settings = ClientTLSSettings(
        ca=pki.ca, server_name="localhost", identity=Identity(pki.client, pki.client_key)
    )
    with trio.fail_after(20):
        cli, srv, client_tls = await client_pair(
            settings, stdlib_server_context(pki, require_client=True)
        )
        await handshake_all(cli, srv)
        client_tls.check_peer(cli.connection)  # type: ignore[attr-defined]
        ev = gather_evidence(cli.connection)
        assert ev.chain_verified is True and ev.common_name == "localhost"
        payload = os.urandom(5 * MB)

        async def echo() -> None:
            data = await recv_exactly(srv, len(payload))
            await srv.send_all(data)

        async with trio.open_nursery() as n:
            n.start_soon(echo)
            await cli.send_all(payload)
            assert await recv_exactly(cli, len(payload)) == payload
        await srv.aclose()
        assert await cli.receive_some() == b""
        await cli.aclose()


@trio_test
async def test_client_server_name_mismatch() -> None:
    pki = get_pki()
    settings = ClientTLSSettings(ca=pki.ca, server_name="pacs.other.example")
    with trio.fail_after(10):
        cli, srv, client_tls = await client_pair(settings, stdlib_server_context(pki))
        await handshake_all(cli, srv)
        with pytest.raises(TLSError, match=r"does not match server_name 'pacs\.other\.example'"):
            client_tls.check_peer(cli.connection)  # type: ignore[attr-defined]
        await cli.aclose()


@trio_test
async def test_client_ip_server_name_matches_ip_san() -> None:
    pki = get_pki()
    settings = ClientTLSSettings(ca=pki.ca, server_name="127.0.0.1")
    with trio.fail_after(10):
        cli, srv, client_tls = await client_pair(settings, stdlib_server_context(pki))
        await handshake_all(cli, srv)
        client_tls.check_peer(cli.connection)  # type: ignore[attr-defined]
        assert cli.connection.get_servername() is None  # no SNI for an address
        await cli.aclose()


@trio_test
async def test_client_untrusted_server_fails_handshake() -> None:
    pki = get_pki()
    settings = ClientTLSSettings(ca=pki.rogue_ca, server_name="localhost")
    with trio.fail_after(10):
        cli, srv, _ = await client_pair(settings, stdlib_server_context(pki))

        async def server() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await srv.do_handshake()

        async with trio.open_nursery() as n:
            n.start_soon(server)
            expected = r"certificate verify failed: (self-signed|unable to get local)"
            with pytest.raises(TLSError, match=expected):
                await cli.do_handshake()


@trio_test
async def test_client_thumbprint_pinning() -> None:
    pki = get_pki()
    from gateway.tls.certs import thumbprint

    good = "sha256:" + thumbprint(pki.server_cert)
    bad = "00" * 32
    with trio.fail_after(10):
        for pins, ok in (((bad, good), True), ((bad,), False)):
            # Pinning needs no CA: the rogue CA proves the chain is not consulted.
            settings = ClientTLSSettings(verify="thumbprint", ca=pki.rogue_ca, thumbprints=pins)
            cli, srv, client_tls = await client_pair(settings, stdlib_server_context(pki))
            await handshake_all(cli, srv)
            assert gather_evidence(cli.connection).chain_verified is False
            if ok:
                client_tls.check_peer(cli.connection)  # type: ignore[attr-defined]
            else:
                with pytest.raises(TLSError, match="matches none of the"):
                    client_tls.check_peer(cli.connection)  # type: ignore[attr-defined]
            await cli.aclose()
            await srv.aclose()


@trio_test
async def test_client_against_plain_dicom_server() -> None:
    settings = ClientTLSSettings(verify="none")
    client_tls = build_client(settings)
    with trio.fail_after(10):
        s_raw, c_raw = await tcp_pair()
        cli = TLSStream(c_raw, client_tls.new_connection(), server_side=False)

        async def plain_server() -> None:
            await s_raw.receive_some()
            await s_raw.send_all(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")  # A-ABORT

        async with trio.open_nursery() as n:
            n.start_soon(plain_server)
            with pytest.raises(TLSError, match=r"plain DICOM \(A-ABORT\)"):
                await cli.do_handshake()


def test_sockets_are_local_only() -> None:
    # Guard for the suite's promise: everything above binds 127.0.0.1.
    assert socket.gethostbyname("127.0.0.1") == "127.0.0.1"
