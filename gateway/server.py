"""Listeners, connection limits and signals: the process around the associations.

SIGHUP swaps in a new Runtime (config + freshly built TLS contexts) for new
associations; live ones keep the Runtime they started with. SIGTERM/SIGINT stop
accepting, let live associations run for ``shutdown_grace`` seconds, then cancel
them (each cancelled association sends A-ABORT to both sides).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from .config import CertificateConfig, Config, ListenerConfig, load_config, read_key_password
from .errors import ConfigError, GatewayError
from .listen import open_listeners
from .observe.audit import make_sender
from .observe.hub import EventHub
from .observe.log import set_level
from .policy import effective_verify
from .session import Association, Counters, Runtime
from .tls.context import (
    ClientTLSSettings,
    Identity,
    ServerTLSSettings,
    build_client,
    build_server,
)
from .tls.ocsp import OCSPChecker
from .tls.profiles import PROFILES
from .tls.verify import RouteVerifier, build_route_verifier

log = structlog.get_logger("gateway")

# Accept errors that mean "out of resources right now", not "listener broken":
# back off and keep serving (trio's serve_listeners does the same).
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _address(lst: ListenerConfig) -> tuple[str, int]:
    return (lst.host, lst.port)


def _identity(cert: CertificateConfig) -> Identity:
    return Identity(
        cert=cert.cert,
        key=cert.key,
        sni=cert.sni,
        key_password=read_key_password(cert, os.environ.get),
        staple=cert.staple,
    )


def _verify_in_handshake(config: Config, listener: ListenerConfig) -> bool:
    """Fail unknown chains in the handshake only when every reachable route would.

    Otherwise the handshake just gathers evidence and the route decides (DESIGN §3).
    """
    if listener.client_cert != "required":
        return False
    for route in config.routes:
        if route.listeners is not None and listener.name not in route.listeners:
            continue
        # chain+thumbprint needs a chain valid against the same trust too, so an
        # unknown chain can be refused early for it as well.
        if effective_verify(route, listener) not in ("chain", "chain+thumbprint") \
                or route.trust is not None:
            return False
    return True


#: Retired profiles already warned about in this process (check, run and
#: reload all build runtimes; one warning per listener/route is enough).
_RETIRED_WARNED: set[tuple[str, str]] = set()


def _warn_retired(where: str, profile: str) -> None:
    prof = PROFILES.get(profile)
    if prof is None or not prof.retired or (where, profile) in _RETIRED_WARNED:
        return
    _RETIRED_WARNED.add((where, profile))
    log.warning("tls.retired_profile", where=where, profile=profile, annex=prof.annex,
                why=f"{prof.description}; DICOM PS3.15 has retired it — use it only for "
                    "peers that cannot do better")


def _route_verifiers(config: Config) -> dict[tuple[str, str], RouteVerifier]:
    """Parse each route's trust, CRLs and thumbprints once per TLS listener it serves."""
    verifiers: dict[tuple[str, str], RouteVerifier] = {}
    for route in config.routes:
        for lst in config.listeners:
            if not lst.may_use_tls:
                continue
            if route.listeners is not None and lst.name not in route.listeners:
                continue
            verify = effective_verify(route, lst)
            trust = route.trust or lst.trust
            if verify in ("chain", "chain+thumbprint") and trust is None:
                raise ConfigError(
                    f"route '{route.name}': verify = {verify!r} on listener '{lst.name}' "
                    "needs a trust bundle (set trust on the route or the listener)"
                )
            try:
                verifier = build_route_verifier(trust, route.crl, route.thumbprints)
                if route.trust is None and not route.crl:
                    verifier = dataclasses.replace(verifier, same_as_handshake=True)
                verifiers[(route.name, lst.name)] = verifier
            except GatewayError as exc:
                raise ConfigError(f"route '{route.name}': {exc}") from None
    return verifiers


def build_runtime(config: Config) -> Runtime:
    """Build every TLS context the config needs; raises GatewayError on any bad file."""
    server_tls = {}
    for lst in config.listeners:
        if not lst.tls:
            continue
        _warn_retired(f"listener '{lst.name}'", lst.profile)
        try:
            server_tls[lst.name] = build_server(ServerTLSSettings(
                identities=tuple(_identity(c) for c in lst.certificates),
                profile=lst.profile,
                client_cert=lst.client_cert,
                trust=lst.trust,
                min_version=lst.min_version,
                ciphers=lst.ciphers,
                verify_in_handshake=_verify_in_handshake(config, lst),
            ))
        except GatewayError as exc:
            # e.g. "min_version ... is above what profile 'aes' allows": say where.
            raise ConfigError(f"listener '{lst.name}': {exc}") from None
    backend_tls = {}
    for route in config.routes:
        bt = route.backend_tls
        if bt is None:
            continue
        _warn_retired(f"route '{route.name}' backend_tls", bt.profile)
        try:
            backend_tls[route.name] = build_client(ClientTLSSettings(
                profile=bt.profile,
                verify=bt.verify,
                ca=bt.ca,
                server_name=bt.server_name,
                thumbprints=bt.thumbprints,
                identity=_identity(bt.certificate) if bt.certificate else None,
            ))
        except GatewayError as exc:
            raise ConfigError(f"route '{route.name}': backend_tls: {exc}") from None
    # The audit sender is built (and dropped) now only to check its files: the
    # hub's sender task builds its own, and there a bad CA would end the process.
    make_sender(config.audit)
    return Runtime(config=config, server_tls=server_tls, backend_tls=backend_tls,
                   route_verifiers=_route_verifiers(config),
                   ocsp=OCSPChecker(timeout=config.gateway.connect_timeout))


def load_runtime(path: str | Path) -> Runtime:
    """Load, validate and build: everything that can fail before anything listens."""
    return build_runtime(load_config(path))


class GatewayServer:
    """Serves every listener of the current Runtime until told to stop."""

    #: Bind with SO_REUSEPORT: set in each worker of ``--workers N`` (gateway/workers.py).
    reuse_port: bool = False

    def __init__(
        self,
        runtime: Runtime,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        hub: EventHub | None = None,
    ) -> None:
        self.runtime = runtime
        self.counters = Counters()
        # Metrics and audit see the same events as the logs (observe/hub.py).
        self.hub = hub
        self.on_event = on_event or (hub.emit if hub is not None else None)
        self.draining = False
        self.bound: dict[str, list[tuple[str, int]]] = {}
        self._stop = trio.Event()
        self._listener_scopes: dict[str, trio.CancelScope] = {}
        self._accept: trio.Nursery | None = None
        self._conns: trio.Nursery | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    def _event(self, event: str, level: str = "info", **fields: Any) -> None:
        """Log a process-level event and hand it to ``on_event`` (metrics, audit)."""
        getattr(log, level)(event, **fields)
        if self.on_event is not None:
            self.on_event(event, fields)

    async def reload(self) -> bool:
        """Re-read the config file and certificates (SIGHUP).

        New associations use the new routes and contexts; live ones keep the
        Runtime they started with. Listeners are added, removed or re-bound to
        match. Anything invalid — config, certificate, a port that cannot be
        bound — refuses the whole reload and keeps the old state. The one
        exception: an address that moves from a retired listener to a new one can
        only be bound after the old socket closed; if that fails, the rest of the
        reload stands, ``config.reloaded`` lists it under ``bind_failed`` and the
        method returns False.
        """
        path = self.runtime.config.path
        try:
            new = load_runtime(path)
        except GatewayError as exc:
            self._event("config.reload_failed", "error", path=str(path), error=str(exc))
            return False
        old_log = self.runtime.config.log
        old = {lst.name: lst for lst in self.runtime.config.listeners}
        wanted = {lst.name: lst for lst in new.config.listeners}
        rebind = [lst for name, lst in wanted.items()
                  if name not in old or _address(old[name]) != _address(lst)]
        retire = [name for name, lst in old.items()
                  if name not in wanted or _address(wanted[name]) != _address(lst)]
        # Bind every new socket before touching anything, so a busy port refuses the
        # reload as a whole instead of leaving a half-applied configuration.
        opened: dict[str, list[trio.SocketListener]] = {}
        try:
            for lst in rebind:
                if any(_address(old[n]) == _address(lst) for n in retire if n in old):
                    continue  # same address moves to a new name: reuse after retiring
                opened[lst.name] = await self._bind(lst)
        except OSError as exc:
            for socks in opened.values():
                for sl in socks:
                    await sl.aclose()
            self._event("config.reload_failed", "error", path=str(path),
                        error=f"cannot listen: {exc.strerror or exc}")
            return False
        for name in retire:
            scope = self._listener_scopes.pop(name, None)
            if scope is not None:
                scope.cancel()
            self.bound.pop(name, None)
            log.info("listener.stopped", listener=name)
        self.runtime = new
        await trio.sleep(0)  # let retired accept loops close their sockets
        added, failed = [], []
        for lst in rebind:
            socks = opened.get(lst.name)
            if socks is None:
                try:
                    socks = await self._bind(lst)
                except OSError as exc:
                    log.error("listener.bind_failed", listener=lst.name,
                              address=f"{lst.host}:{lst.port}", error=exc.strerror or str(exc))
                    failed.append(lst.name)
                    continue
            self._start_listener(lst, socks)
            added.append(lst.name)
        if new.config.log.level != old_log.level:
            # Bound loggers of live associations keep the level they started with.
            set_level(new.config.log.level)
        if new.config.log.format != old_log.format:
            log.warning("log.format_unchanged", reason="[log] format changed; restart to apply it")
        if self.hub is not None:
            self.hub.reconfigure(new.config)
        self._event("config.reloaded", path=str(path), routes=len(new.config.routes),
                    listeners=sorted(wanted), added=added, removed=retire,
                    **({"bind_failed": failed} if failed else {}))
        return not failed

    async def _bind(self, lst: ListenerConfig) -> list[trio.SocketListener]:
        host = None if lst.host in ("*", "0.0.0.0", "::") else lst.host
        return await open_listeners(lst.port, host, reuse_port=self.reuse_port)

    def _start_listener(self, lst: ListenerConfig, socks: list[trio.SocketListener]) -> None:
        assert self._accept is not None and self._conns is not None
        scope = trio.CancelScope()
        self._listener_scopes[lst.name] = scope
        self.bound[lst.name] = [tuple(sl.socket.getsockname()[:2]) for sl in socks]
        for sl in socks:
            self._accept.start_soon(self._accept_loop, lst.name, sl, self._conns, scope)
        log.info("listener.started", listener=lst.name, address=f"{lst.host}:{lst.port}",
                 tls=lst.tls, profile=lst.profile if lst.tls else None)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Bind all listeners, then serve until ``stop()``; drains before returning."""
        async with trio.open_nursery() as conns:
            async with trio.open_nursery() as accept:
                self._conns, self._accept = conns, accept
                # Bind everything first: a port in use fails the start as a whole.
                bound = [(lst, await self._bind(lst)) for lst in self.runtime.config.listeners]
                for lst, socks in bound:
                    self._start_listener(lst, socks)
                self._event("gateway.started", listeners=len(self.bound),
                            routes=len(self.runtime.config.routes), pid=os.getpid())
                if self.hub is not None:
                    self.hub.set_ready(True)
                task_status.started()
                await self._stop.wait()
                self.draining = True
                if self.hub is not None:
                    self.hub.set_ready(False)  # /readyz: take us out of rotation
                accept.cancel_scope.cancel()
            gw = self.runtime.config.gateway
            log.info("gateway.draining", active=self.counters.active,
                     grace_s=gw.shutdown_grace)
            with trio.move_on_after(gw.shutdown_grace):
                while self.counters.active:
                    await trio.sleep(0.05)
            if self.counters.active:
                log.warning("gateway.drain_timeout", aborting=self.counters.active)
            conns.cancel_scope.cancel()
        self._event("gateway.stopped", associations=self.counters.total)

    async def _accept_loop(self, name: str, listener: trio.SocketListener,
                           conns: trio.Nursery, scope: trio.CancelScope) -> None:
        with scope:
            async with listener:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        if exc.errno in _ACCEPT_RETRY:
                            log.error("listener.accept_failed", listener=name, error=str(exc))
                            await trio.sleep(0.1)
                            continue
                        raise
                    conns.start_soon(self._handle, name, stream)

    async def _handle(self, name: str, stream: trio.SocketStream) -> None:
        runtime = self.runtime  # an association keeps the config it started with
        try:
            listener = runtime.config.listener(name)
        except KeyError:
            await trio.aclose_forcefully(stream)
            return
        try:
            addr = stream.socket.getpeername()
            peer = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        except OSError:
            peer = "unknown"
        self.counters.active += 1
        self.counters.total += 1
        try:
            await Association(runtime, listener, stream, peer, self.counters,
                              self.on_event).run()
        except Exception:
            # A bug must cost one association, never the gateway.
            log.exception("association.crashed", listener=name, peer=peer)
        finally:
            self.counters.active -= 1


async def run_gateway(config_path: str | Path, *,
                      on_ready: Callable[[GatewayServer], None] | None = None,
                      reuse_port: bool = False) -> None:
    """Run the gateway with signal handling until SIGTERM/SIGINT (CLI ``run``).

    ``reuse_port``: this process is one of several workers sharing the listeners.
    """
    runtime = load_runtime(config_path)
    hub = EventHub(runtime.config)
    server = GatewayServer(runtime, hub=hub)
    server.reuse_port = reuse_port
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as observe:
            # Admin endpoint and audit sender first: they report the start itself.
            await observe.start(hub.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                if on_ready:
                    on_ready(server)

                async def watch() -> None:
                    async for sig in signals:
                        if sig == signal.SIGHUP:
                            await server.reload()
                        else:
                            log.info("gateway.signal", signal=signal.Signals(sig).name)
                            server.stop()
                            return

                nursery.start_soon(watch)
            # Drained and stopped: let the Application Stop audit message out.
            await hub.aclose()
