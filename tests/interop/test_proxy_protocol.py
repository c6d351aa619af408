"""PROXY protocol v1/v2 on a listener (``proxy_protocol = true``): logs, route
``source`` matching and the association see the client named in the header, not
the load balancer. First with a tiny in-test forwarder that prepends exactly the
header we choose, then with HAProxy and the shipped deploy/haproxy.cfg in front
of two gateway instances."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import (
    HOST,
    MAIN,
    free_port,
    plain_listener,
    route,
    run_dcmtk,
    tls_listener,
    wait_listening,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _dst(src: str) -> str:
    return "2001:db8::100" if ":" in src else "192.0.2.1"


def header_v1(src: str, sport: int, dport: int = 2762) -> bytes:
    fam, dst = ("TCP6" if ":" in src else "TCP4"), _dst(src)
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def header_v2(src: str, sport: int, dport: int = 2762) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(_dst(src))
    body = s.packed + d.packed + struct.pack(">HH", sport, dport)
    body += b"\x01\x00\x05dicom"  # a TLV (ALPN), which the gateway must skip
    fam = 0x11 if s.version == 4 else 0x21
    return V2_SIGNATURE + struct.pack(">BBH", 0x21, fam, len(body)) + body


class Forwarder:
    """Accepts on a local port; for each connection connects to ``target``, sends
    ``header`` first, then copies bytes both ways (a load balancer in 40 lines)."""

    def __init__(self, target: int, header: bytes) -> None:
        self.target, self.header = target, header
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.target))
            upstream.sendall(self.header)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def forwarder() -> Iterator:
    made: list[Forwarder] = []

    def make(target: int, header: bytes) -> Forwarder:
        made.append(Forwarder(target, header))
        return made[-1]

    yield make
    for f in made:
        f.close()


def _echo(port: int, *tls: str) -> tuple[int, str]:
    return run_dcmtk(
        ["echoscu", "-v", *tls, "-aet", "CT01", "-aec", "ARCHIVE", HOST, port], timeout=20
    )


def _lan_only(backend_port: int) -> list[dict]:
    # Only clients from 10.1.0.0/16 or 2001:db8:1::/48 may reach ARCHIVE at all.
    return [route("lan", "ARCHIVE", backend_port, source=["10.1.0.0/16", "2001:db8:1::/48"])]


@pytest.mark.parametrize("make_header", [header_v1, header_v2], ids=["v1", "v2"])
@pytest.mark.parametrize(
    ("client", "allowed"),
    [("10.1.7.9", True), ("10.2.7.9", False), ("2001:db8:1::5", True), ("2001:db8:2::5", False)],
)
def test_route_source_matches_proxied_client(
    storescp, gateway, forwarder, make_header, client, allowed
):
    scp = storescp()
    gw = gateway([plain_listener(proxy_protocol=True)], _lan_only(scp.port))
    fwd = forwarder(gw.port("plain"), make_header(client, 40123))
    rc, out = _echo(fwd.port)
    if allowed:
        assert rc == 0, out
        [rec] = gw.wait_for_event("association.released")
    else:
        assert rc != 0 and "Called AE Title Not Recognized" in out, out
        [rec] = gw.wait_for_event("association.rejected")
        assert rec["reason"] == 7
    peer = f"[{client}]:40123" if ":" in client else f"{client}:40123"
    assert rec["peer"] == peer
    assert rec["proxied_by"].startswith("127.0.0.1:")


def test_header_precedes_tls_handshake(pki, storescp, gateway, forwarder):
    """On a TLS listener the PROXY header comes first, then the ClientHello."""
    scp = storescp()
    gw = gateway([tls_listener(pki, proxy_protocol=True)], _lan_only(scp.port))
    fwd = forwarder(gw.port("tls"), header_v2("10.1.0.1", 5555))
    rc, out = _echo(fwd.port, *pki.client.dcmtk_tls, "+cf", str(pki.gateway_ca))
    assert rc == 0, out
    [rec] = gw.wait_for_event("association.released")
    assert rec["peer"] == "10.1.0.1:5555"
    assert rec["tls_version"].startswith("TLSv1.")


def test_missing_header_is_refused_with_a_clear_reason(storescp, gateway):
    scp = storescp()
    gw = gateway([plain_listener(proxy_protocol=True)], _lan_only(scp.port))
    rc, out = _echo(gw.port("plain"))
    assert rc != 0, out
    [rec] = gw.wait_for_event("association.aborted")
    assert "PROXY protocol" in rec["reason"] and "DICOM PDU" in rec["reason"], rec
    assert rec["peer"].startswith("127.0.0.1:")


def test_local_command_keeps_socket_address(storescp, gateway, forwarder):
    """v2 LOCAL (a balancer's own connection): the socket address stays, so a route
    restricted to 10.1.0.0/16 is not reachable from 127.0.0.1."""
    scp = storescp()
    gw = gateway([plain_listener(proxy_protocol=True)], _lan_only(scp.port))
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    rc, out = _echo(forwarder(gw.port("plain"), local).port)
    assert rc != 0, out
    [rec] = gw.wait_for_event("association.rejected")
    assert rec["peer"].startswith("127.0.0.1:") and "proxied_by" not in rec


# --------------------------------------------------------------------------- HAProxy

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DEPLOY_CFG = MAIN / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_config(listen_port: int, gw_ports: list[int], tmp: Path) -> Path:
    """The shipped example with its addresses replaced by test ports.

    HAProxy connects to the gateways from 127.0.0.3 while the client is
    127.0.0.1: the gateway sees the client only if it honours PROXY v2.
    """
    text = DEPLOY_CFG.read_text()
    text = text.replace("bind :2762", f"bind {HOST}:{listen_port}")
    text = text.replace("10.0.0.11:2762", f"{HOST}:{gw_ports[0]}")
    text = text.replace("10.0.0.12:2762", f"{HOST}:{gw_ports[1]}")
    text = re.sub(r"^(\s*default-server .*)$", r"\1 source 127.0.0.3", text, flags=re.M)
    # No syslog daemon in a test: log to stderr; no chroot/user switching either.
    text = re.sub(r"^\s*(chroot|user|group|daemon|stats socket)\b.*$", "", text, flags=re.M)
    text = re.sub(r"^\s*log .*$", "    log stderr format short local0 info", text, count=1,
                  flags=re.M)
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(text)
    return cfg


@pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy not installed")
def test_haproxy_example_in_front_of_two_gateways(pki, storescp, gateway, procs, tmp_path):
    scp = storescp()
    routes = [route("lan", "ARCHIVE", scp.port, source=["127.0.0.1/32"])]
    gws = [gateway([tls_listener(pki, proxy_protocol=True)], routes) for _ in range(2)]
    port = free_port()
    cfg = haproxy_config(port, [g.port("tls") for g in gws], tmp_path)
    rc, out = run_dcmtk([HAPROXY, "-c", "-f", cfg])
    assert rc == 0, f"shipped haproxy.cfg does not validate:\n{out}"
    proc, _, err = procs.spawn([HAPROXY, "-db", "-f", cfg], "haproxy")
    assert wait_listening([port], proc, 10), err.read_text()
    time.sleep(0.5)  # let the first health checks (PROXY v2 LOCAL) pass

    tls = [*pki.client.dcmtk_tls, "+cf", str(pki.gateway_ca)]
    for _ in range(6):
        rc, out = _echo(port, *tls)
        assert rc == 0, f"{out}\n{err.read_text()}"
    per_gateway = [len(g.events("association.released")) for g in gws]
    assert per_gateway == [3, 3], per_gateway  # roundrobin
    for g in gws:
        for rec in g.events("association.released"):
            assert rec["peer"].startswith("127.0.0.1:"), rec
            assert rec["proxied_by"].startswith("127.0.0.3:"), rec
        # Health checks are PROXY v2 LOCAL + close: quiet, not "aborted" noise.
        assert not g.events("association.aborted")
