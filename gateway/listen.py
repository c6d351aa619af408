"""Listening sockets, bound the way several worker processes can share a port.

``trio.open_tcp_listeners`` cannot set ``SO_REUSEPORT``; with ``--workers N``
every worker binds its *own* socket on the same address and the kernel spreads
incoming connections over them (Linux hashes the 4-tuple).  That needs the
option on every socket before ``bind``, and nothing else in the way: no shared
file descriptors, no accept lock, no thundering herd.
"""

from __future__ import annotations

import errno
import socket as stdsocket

import trio

#: listen() backlog.  The kernel caps it at net.core.somaxconn (4096 on current
#: kernels); a burst of association setups from many modalities, or a load
#: balancer reconnecting a pool at once, must not be dropped at SYN time.
BACKLOG = 4096


async def open_listeners(
    port: int, host: str | None = None, *, reuse_port: bool = False, backlog: int = BACKLOG
) -> list[trio.SocketListener]:
    """Bind and listen on every address ``host`` resolves to (all when None).

    Like ``trio.open_tcp_listeners`` (SO_REUSEADDR so a restart does not wait
    for TIME_WAIT; IPv6 sockets v6-only so the IPv4 wildcard can bind too), plus
    ``SO_REUSEPORT`` when ``reuse_port``: only then, because it also lets an
    accidental second instance bind the same port silently.
    """
    addresses = await trio.socket.getaddrinfo(
        host, port, type=stdsocket.SOCK_STREAM, flags=stdsocket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    unsupported: set[int] = set()
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = trio.socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    # e.g. an IPv6 wildcard on a host with IPv6 disabled.
                    unsupported.add(family)
                    continue
                raise
            try:
                sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEPORT, 1)
                if family == stdsocket.AF_INET6:
                    sock.setsockopt(stdsocket.IPPROTO_IPV6, stdsocket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no usable address family for {host}:{port}")
    return listeners
