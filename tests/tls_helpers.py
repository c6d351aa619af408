"""Shared helpers for the TLS tests: a throw-away PKI and small trio plumbing."""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.certgen import make_certs

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def key_for(role: str) -> rsa.RSAPrivateKey:
    """A distinct cached RSA-2048 key per role name."""
    if role not in _KEYS:
        _KEYS[role] = make_certs.new_key()
    return _KEYS[role]


def make_ca(cn: str, key: rsa.RSAPrivateKey) -> x509.Certificate:
    """Self-signed CA (``CN=cn`` only, no key usage extension)."""
    return make_certs.build_ca(
        key,
        make_certs.make_name(cn, org=None),
        NOW - dt.timedelta(days=1),
        NOW + dt.timedelta(days=3650),
        path_length=None,
        key_usage=False,
    )


def make_leaf(
    ca_key: rsa.RSAPrivateKey,
    ca: x509.Certificate,
    cn: str,
    key: rsa.RSAPrivateKey,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    eku: tuple[x509.ObjectIdentifier, ...] | None = make_certs.SERVER_AND_CLIENT,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """Leaf certificate signed by ``ca`` (no key usage; no EKU when ``eku`` is None)."""
    return make_certs.build_leaf(
        ca_key,
        ca.subject,
        key,
        make_certs.make_name(cn, org=None),
        not_before or NOW - dt.timedelta(days=1),
        not_after or NOW + dt.timedelta(days=365),
        sans=make_certs.general_names(dns, ips, uris),
        eku=eku,
        key_usage=False,
    )


# Re-exported: the tests write PEM files themselves.
pem = make_certs.cert_pem
key_pem = make_certs.key_pem


@dataclass(frozen=True)
class PKI:
    """Files of the test PKI."""

    dir: Path
    ca: Path  # CA of servers and clients
    ca_cert: x509.Certificate
    server: Path  # localhost, 127.0.0.1, default identity
    server_key: Path
    server_cert: x509.Certificate
    a: Path  # a.example
    a_key: Path
    a_cert: x509.Certificate
    wild: Path  # *.wild.example
    wild_key: Path
    wild_cert: x509.Certificate
    client: Path  # CN CT01, dicom-ae:CT01, clientAuth only
    client_key: Path
    client_cert: x509.Certificate
    rogue_ca: Path  # an unrelated CA
    rogue_client: Path
    rogue_client_key: Path
    rogue_client_cert: x509.Certificate


@cache
def get_pki() -> PKI:
    """Build the test PKI once per process in a temporary directory."""
    d = Path(tempfile.mkdtemp(prefix="gw-tls-test-"))
    atexit.register(shutil.rmtree, d, True)
    ca_key = key_for("ca")
    ca = make_ca("Test CA", ca_key)
    rogue_key = key_for("rogue-ca")
    rogue = make_ca("Rogue CA", rogue_key)

    def write(stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
        return make_certs.write_pair(d, stem, key, cert)

    (d / "ca.pem").write_bytes(pem(ca))
    (d / "rogue-ca.pem").write_bytes(pem(rogue))
    server_cert = make_leaf(
        ca_key, ca, "localhost", key_for("server"), dns=("localhost",), ips=("127.0.0.1",)
    )
    s, sk = write("server", server_cert, key_for("server"))
    a_cert = make_leaf(ca_key, ca, "a.example", key_for("a"), dns=("a.example",))
    a, ak = write("a", a_cert, key_for("a"))
    w_cert = make_leaf(ca_key, ca, "wild", key_for("wild"), dns=("*.wild.example",))
    w, wk = write("wild", w_cert, key_for("wild"))
    c_cert = make_leaf(
        ca_key,
        ca,
        "CT01",
        key_for("client"),
        uris=("dicom-ae:CT01",),
        eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
    )
    c, ck = write("client", c_cert, key_for("client"))
    r_cert = make_leaf(rogue_key, rogue, "ROGUE", key_for("rogue"))
    r, rk = write("rogue-client", r_cert, key_for("rogue"))
    return PKI(
        dir=d,
        ca=d / "ca.pem",
        ca_cert=ca,
        server=s,
        server_key=sk,
        server_cert=server_cert,
        a=a,
        a_key=ak,
        a_cert=a_cert,
        wild=w,
        wild_key=wk,
        wild_cert=w_cert,
        client=c,
        client_key=ck,
        client_cert=c_cert,
        rogue_ca=d / "rogue-ca.pem",
        rogue_client=r,
        rogue_client_key=rk,
        rogue_client_cert=r_cert,
    )


def stdlib_client_context(
    pki: PKI, *, client_cert: bool = True, rogue: bool = False
) -> ssl.SSLContext:
    """A stdlib client context trusting the test CA (optionally presenting a client cert)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if rogue:
        ctx.load_cert_chain(str(pki.rogue_client), str(pki.rogue_client_key))
    elif client_cert:
        ctx.load_cert_chain(str(pki.client), str(pki.client_key))
    return ctx


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test function under ``trio.run`` (no pytest-trio needed)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected (server, client) pair of real TCP sockets on 127.0.0.1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    try:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    finally:
        await listener.aclose()
    return server, client


async def listen() -> tuple[trio.SocketListener, int]:
    """A listener on 127.0.0.1 with an ephemeral port."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    return listener, int(listener.socket.getsockname()[1])
