"""One association's life, start to end — the only place that decides its fate.

accept → (TLS handshake) → read A-ASSOCIATE-RQ under ARTIM → route → policy →
connect backend (+TLS) → relay RQ and the answer → pump both ways → release or
abort → one summary log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from cryptography import x509

from .config import Config, ListenerConfig, RouteConfig
from .dul.ae import validate_ae
from .dul.codec import decode_pdu, encode_abort, encode_pdu, encode_reject
from .dul.constants import PDU_NAMES, PDUType
from .dul.dimse import DimseInspector, DimseMessage
from .dul.framer import PDUFramer, RawPDU, TLSOnPlainPortError
from .dul.pdus import AssociateAC, AssociateRQ
from .errors import ProtocolError, TLSError
from .policy import PeerIdentity, check_policy
from .proxy_protocol import read_proxy_header
from .relay import Direction, End, RelayResult, relay
from .routing import NoRoute, RouteRequest, select_route
from .streams import PrefixedStream
from .tls.certs import certificate_names
from .tls.context import ClientTLS, ServerTLS, TLSEvidence, gather_evidence
from .tls.ocsp import OCSPChecker
from .tls.stream import TLSStream
from .tls.verify import RouteVerifier

log = structlog.get_logger("gateway")

PDU_A_ASSOCIATE_RQ = PDUType.ASSOCIATE_RQ
PDU_A_ASSOCIATE_AC = PDUType.ASSOCIATE_AC
PDU_A_ASSOCIATE_RJ = PDUType.ASSOCIATE_RJ
PDU_A_ABORT = PDUType.ABORT

# DESIGN §2 rejection table: (result, source, reason).
RJ_CALLED_AE_UNKNOWN = (1, 1, 7)
RJ_CALLING_AE_REFUSED = (1, 1, 3)
RJ_PROTOCOL_VERSION = (1, 2, 2)
RJ_BACKEND_UNAVAILABLE = (2, 3, 1)
RJ_LIMIT = (2, 3, 2)

#: A-ABORT the gateway sends when one side vanishes: source 2 (service provider),
#: reason 0 (not specified) — the gateway is the provider from each peer's view.
ABORT_PROVIDER = encode_abort(2, 0)


@dataclass(frozen=True)
class Runtime:
    """One generation of the configuration with its TLS contexts, built at load time."""

    config: Config
    server_tls: dict[str, ServerTLS]
    backend_tls: dict[str, ClientTLS]
    #: (route name, listener name) → the route's trust, CRLs and pins, parsed at load.
    route_verifiers: dict[tuple[str, str], RouteVerifier] = field(default_factory=dict)
    #: OCSP answers for client certificates, cached for this configuration generation.
    ocsp: OCSPChecker = field(default_factory=OCSPChecker)


@dataclass
class Counters:
    """Live numbers the server keeps across associations.

    ``active`` counts connections (a slowloris peer holds one until ARTIM);
    ``associations`` counts only those past the A-ASSOCIATE-RQ, which is what
    ``max_associations`` limits — so half-open connections cannot starve real ones.
    """

    active: int = 0
    total: int = 0
    associations: int = 0
    per_route: dict[str, int] = field(default_factory=dict)


class _Rejected(Exception):
    """Internal: the association ends with an A-ASSOCIATE-RJ already decided."""

    def __init__(self, rj: tuple[int, int, int], why: str, **fields: Any) -> None:
        super().__init__(why)
        self.rj, self.why, self.fields = rj, why, fields


async def _read_pdu(
    receive: Callable[[int], Awaitable[bytes]], framer: PDUFramer
) -> RawPDU | None:
    """Read until ``framer`` yields one complete PDU; None on a clean EOF."""
    while True:
        pdu = framer.next_pdu()
        if pdu is not None:
            return pdu
        data = await receive(65536)
        if not data:
            return None
        framer.feed(data)


_HTTP_METHODS = {b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                 b"CONNECT", b"TRACE", b"PRI"}


async def _finish(stream: trio.abc.Stream, wait: float) -> None:
    """Close ``stream`` gracefully: give the peer up to ``wait`` s to close first.

    Closing at once after an RJ/A-ABORT risks a TCP reset that destroys the
    very PDU we just sent; PS3.8 has the peer close and ARTIM bound the wait.
    """
    if wait > 0:  # with no time to wait, the read would be cancelled at once
        with trio.move_on_after(wait):
            try:
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    if isinstance(stream, trio.SocketStream):
        # Closing a plain socket never blocks: no timeout scope (~15 µs) needed.
        await stream.aclose()
        return
    with trio.move_on_after(1):
        try:
            await stream.aclose()
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def _send_quietly(stream: trio.abc.SendStream, data: bytes, timeout: float = 2.0) -> bool:
    """Best-effort send of a final PDU; False if the peer is already gone."""
    with trio.move_on_after(timeout):
        try:
            await stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    return False


async def _connect_tcp(host: str, port: int) -> trio.SocketStream:
    """Connect to ``host``; an address literal skips ``open_tcp_stream``.

    ``open_tcp_stream`` resolves and races addresses (happy eyeballs) in a
    nursery with a task per attempt; for the usual backend, one IP address,
    a plain connect does the same work with a fraction of the Python.
    """
    try:
        family = trio.socket.AF_INET6 if ipaddress.ip_address(host).version == 6 \
            else trio.socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # sets TCP_NODELAY, as open_tcp_stream's does


def _ip_of(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = peer.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _bindable_names(leaf: x509.Certificate) -> tuple[str, ...]:
    # bind_calling_ae accepts DNS and dicom-ae: SANs, unprefixed (DESIGN §3).
    # Cached: the evidence hands out the same certificate objects for a chain
    # already seen (tls/context.py), so this parses each certificate once.
    leaf_names = certificate_names(leaf)
    return leaf_names.dns + leaf_names.ae_titles


def _peer_identity(evidence: TLSEvidence | None) -> PeerIdentity | None:
    if evidence is None:
        return None
    names: tuple[str, ...] = ()
    if evidence.peer_chain:
        names = _bindable_names(evidence.peer_chain[0])
    return PeerIdentity(
        has_certificate=evidence.sha256 is not None,
        chain_verified=evidence.chain_verified,
        verify_error=evidence.verify_error,
        common_name=evidence.common_name,
        names=names,
        chain=evidence.peer_chain,
    )


class Association:
    """State and steps of one association; ``run`` owns its whole life."""

    def __init__(
        self,
        runtime: Runtime,
        listener: ListenerConfig,
        stream: trio.abc.Stream,
        peer: str,
        counters: Counters,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.rt = runtime
        self.gw = runtime.config.gateway
        self.listener = listener
        self.client: trio.abc.Stream = stream
        self.backend: trio.abc.Stream | None = None
        self.peer = peer
        self.source_ip = _ip_of(peer)
        self.counters = counters
        self.on_event = on_event
        self.evidence: TLSEvidence | None = None
        self.route: RouteConfig | None = None
        self.rq: AssociateRQ | None = None
        self.started = trio.current_time()
        self.up = Direction("client→backend")
        self.down = Direction("backend→client")
        self.dimse_counts: dict[str, int] | None = None  # set when DIMSE is inspected
        self.assoc_id = secrets.token_hex(6)
        self._counted: str | None = None
        # One bound logger for the association's life: the module-level proxy
        # rebuilds a logger from the configuration on every call.
        self._log = log.bind()
        # The bound context as of the first DIMSE message (nothing is bound
        # after the route), so per-message events need not collect it again.
        self._relay_context: dict[str, Any] | None = None
        # "relay" once both sides are connected and associated: from then on an
        # ending that is not a release must reach both sides as an A-ABORT.
        self.phase = "setup"
        # Set once _close_both has closed both sides, so that the common ending
        # (release) does not pay for closing them a second time.
        self._closed = False

    def _emit(self, event: str, level: str = "info", **fields: Any) -> None:
        getattr(self._log, level)(event, **fields)
        if self.on_event:
            self.on_event(event, {**structlog.contextvars.get_contextvars(), **fields})

    async def run(self) -> None:
        """Serve the association; never raises for anything a peer can cause."""
        with structlog.contextvars.bound_contextvars(
            assoc_id=self.assoc_id, listener=self.listener.name, peer=self.peer
        ):
            try:
                await self._run()
            finally:
                self._count_out()
                if not self._closed:
                    with trio.CancelScope(shield=True):
                        if self.phase == "relay":
                            # Cancelled mid-association (shutdown grace expired).
                            await self._abort_both("gateway", "gateway shutting down")
                        for s in (self.client, self.backend):
                            if s is not None:
                                await trio.aclose_forcefully(s)

    async def _run(self) -> None:
        # Every step before the relay is bounded: handshake, ARTIM, connect, answer.
        if self.listener.proxy_protocol and not await self._proxy_header():
            return
        use_tls = self.listener.tls is True
        if self.listener.tls == "auto":
            # One port for both: a TLS record starts with 0x16, a PDU with 0x01..0x07.
            first = b""
            with trio.move_on_after(self.gw.artim_timeout), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError
            ):
                first = await self.client.receive_some(8)
            if not first:
                self._emit("association.aborted", "info", by="client",
                           reason="nothing received before close or ARTIM timeout")
                return
            use_tls = first[0] == 0x16
            self.client = PrefixedStream(self.client, first)
        if use_tls and not await self._handshake():
            return
        with structlog.contextvars.bound_contextvars(**self._tls_fields()):
            raw = await self._read_request()
            if raw is None:
                return
            try:
                await self._associate(raw)
            except _Rejected as rj:
                await self._reject(rj)
                return
            except _Done:
                return
            await self._relay()

    def _count_in(self, route: RouteConfig) -> None:
        """Take a slot under the global and the route's association limit, or reject."""
        c = self.counters
        if c.associations >= self.gw.max_associations:
            raise _Rejected(RJ_LIMIT, f"max_associations ({self.gw.max_associations}) reached")
        in_route = c.per_route.get(route.name, 0)
        if route.max_associations is not None and in_route >= route.max_associations:
            raise _Rejected(RJ_LIMIT, f"route max_associations ({route.max_associations}) "
                                      "reached")
        c.associations += 1
        c.per_route[route.name] = in_route + 1
        self._counted = route.name

    def _count_out(self) -> None:
        if self._counted is not None:
            self.counters.associations -= 1
            self.counters.per_route[self._counted] -= 1
            self._counted = None

    def _tls_fields(self) -> dict[str, Any]:
        ev = self.evidence
        if ev is None:
            return {}
        return {
            "tls_version": ev.version,
            "cipher": ev.cipher,
            "client_subject": ev.subject,
            **({"sni": ev.sni} if ev.sni else {}),
        }

    # -- step 0: PROXY protocol header (behind a load balancer) ----------------------

    async def _proxy_header(self) -> bool:
        """Read the PROXY v1/v2 header under ARTIM; adopt the real client address.

        Logs, route ``source`` matching and audit all read ``self.peer`` /
        ``self.source_ip``, so they see the client, not the balancer.
        """
        balancer = self.peer
        try:
            with trio.fail_after(self.gw.artim_timeout):
                header, rest = await read_proxy_header(self.client)
        except trio.TooSlowError:
            reason = f"no complete PROXY protocol header within {self.gw.artim_timeout:g} s"
        except ProtocolError as exc:
            reason = str(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"connection lost before the PROXY protocol header: {exc}"
        else:
            if rest:
                self.client = PrefixedStream(self.client, rest)
            if header.client is not None:
                self.peer = header.client
                self.source_ip = header.source[0] if header.source else None
                structlog.contextvars.bind_contextvars(peer=self.peer, proxied_by=balancer)
            elif not rest:
                # LOCAL / UNKNOWN: the balancer's own connection, usually a health
                # check that closes at once -- not worth an "aborted" line.
                with trio.move_on_after(self.gw.artim_timeout), contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    first = await self.client.receive_some(65536)
                    if not first:
                        log.debug("proxy.health_check", version=header.version)
                        return False
                    self.client = PrefixedStream(self.client, first)
            return True
        self._emit("association.aborted", "warning", by="gateway", reason=reason)
        return False

    # -- step 1: TLS ---------------------------------------------------------------

    async def _handshake(self) -> bool:
        server_tls = self.rt.server_tls[self.listener.name]
        tls = TLSStream(self.client, server_tls.new_connection(), server_side=True)
        self.client = tls
        try:
            with trio.fail_after(self.gw.handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            self._emit("tls.handshake_failed", "warning",
                       reason=f"no handshake within {self.gw.handshake_timeout:g} s")
            return False
        except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._emit("tls.handshake_failed", "warning", reason=str(exc))
            if isinstance(exc, TLSError) and str(exc).startswith("plain DICOM"):
                # The peer speaks plain DICOM: an A-ABORT in clear is something it
                # understands, instead of a bare close it would report as a network error.
                await _send_quietly(tls.transport_stream, ABORT_PROVIDER)
            return False
        self.evidence = gather_evidence(tls.connection)
        return True

    # -- step 2: A-ASSOCIATE-RQ under ARTIM ------------------------------------------

    async def _read_request(self) -> RawPDU | None:
        framer = PDUFramer(self.gw.max_pdu_length)
        self._client_framer: PDUFramer | None = framer
        first = bytearray()

        async def receive(max_bytes: int) -> bytes:
            data = await self.client.receive_some(max_bytes)
            if len(first) < 8:
                first.extend(data[:8])
            return data

        try:
            with trio.fail_after(self.gw.artim_timeout):
                raw = await _read_pdu(receive, framer)
        except trio.TooSlowError:
            self._emit("association.aborted", "warning", by="gateway",
                       reason=f"ARTIM: no complete A-ASSOCIATE-RQ within "
                              f"{self.gw.artim_timeout:g} s")
            # A peer that was this slow will not close promptly either.
            await self._abort_client(0, wait=1.0)
            return None
        except TLSOnPlainPortError:
            self._emit("association.aborted", "warning", by="gateway",
                       reason="TLS ClientHello received on a plain DICOM listener "
                              "(client configured for TLS, listener is tls = false)")
            return None
        except ProtocolError as exc:
            why = f"malformed PDU: {exc}"
            if bytes(first[:8]).split(b" ")[0] in _HTTP_METHODS:
                why = "HTTP request on a DICOM port (a browser or health check?)"
            self._emit("association.aborted", "warning", by="gateway", reason=why,
                       abort_reason=exc.abort_reason)
            await self._abort_client(exc.abort_reason)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._emit("association.aborted", "info", by="client",
                       reason=f"connection lost before A-ASSOCIATE-RQ: {exc}")
            return None
        if raw is None:
            self._emit("association.aborted", "info", by="client",
                       reason="closed before sending an A-ASSOCIATE-RQ")
            return None
        if raw.pdu_type == PDU_A_ABORT:
            self._emit("association.aborted", "info", by="client",
                       reason="A-ABORT received before association")
            return None
        if raw.pdu_type != PDU_A_ASSOCIATE_RQ:
            self._emit("association.aborted", "warning", by="gateway",
                       reason=f"unexpected PDU type 0x{raw.pdu_type:02X} before association")
            await self._abort_client(2)
            return None
        return raw

    async def _abort_client(self, reason: int, wait: float | None = None) -> None:
        if await _send_quietly(self.client, encode_abort(2, reason)):
            if wait is None:
                wait = min(self.gw.artim_timeout, self.gw.release_timeout)
            await _finish(self.client, wait)

    # -- step 3: route, policy, backend ----------------------------------------------

    async def _associate(self, raw: RawPDU) -> None:
        try:
            rq = decode_pdu(raw.data)
        except ProtocolError as exc:
            self._emit("association.aborted", "warning", by="gateway",
                       reason=f"malformed A-ASSOCIATE-RQ: {exc}", abort_reason=exc.abort_reason)
            await self._abort_client(exc.abort_reason)
            raise _Done from None
        assert isinstance(rq, AssociateRQ)
        self.rq = rq
        structlog.contextvars.bind_contextvars(calling_ae=rq.calling_ae, called_ae=rq.called_ae)
        if not rq.protocol_version & 1:
            raise _Rejected(RJ_PROTOCOL_VERSION,
                            f"unsupported protocol version 0x{rq.protocol_version:04X}")
        for title, rj, what in ((rq.called_ae, RJ_CALLED_AE_UNKNOWN, "Called"),
                                (rq.calling_ae, RJ_CALLING_AE_REFUSED, "Calling")):
            problem = validate_ae(title)
            if problem:
                raise _Rejected(rj, f"invalid {what} AE title {title!r}: {problem}")
        sni = self.evidence.sni if self.evidence else None
        found = select_route(
            self.rt.config.routes,
            RouteRequest(self.listener.name, rq.called_ae, rq.calling_ae, sni,
                         tls=self.evidence is not None, source=self.source_ip),
        )
        if isinstance(found, NoRoute):
            rj = RJ_CALLED_AE_UNKNOWN if found is NoRoute.CALLED_AE_UNKNOWN else \
                RJ_CALLING_AE_REFUSED
            raise _Rejected(rj, found.value)
        route = self.route = found
        backend_desc = f"{route.backend.host}:{route.backend.port}"
        structlog.contextvars.bind_contextvars(route=route.name, backend=backend_desc)
        self._inspect(route)
        peer = _peer_identity(self.evidence)
        verifier = self.rt.route_verifiers.get((route.name, self.listener.name))
        # Every other check first: a responder named in the AIA of a certificate
        # the route refuses anyway must never be contacted (that would let any
        # client make the gateway fetch URLs of its choosing).
        decision = check_policy(route if route.ocsp == "off" else
                                dataclasses.replace(route, ocsp="off"), self.listener, peer,
                                rq.calling_ae, verifier=verifier)
        if decision.allowed and route.ocsp != "off":
            ocsp_result = None
            if peer is not None and peer.chain:
                leaf = peer.chain[0]
                issuer = verifier.issuer_of(leaf, peer.chain[1:]) if verifier else None
                ocsp_result = await self.rt.ocsp.check(leaf, issuer, route.ocsp_responder)
                self._emit("ocsp.checked", "info" if ocsp_result.status.value == "good"
                           else "warning", status=ocsp_result.status.value,
                           detail=ocsp_result.detail, responder=ocsp_result.responder,
                           cached=ocsp_result.cached, mode=route.ocsp)
            decision = check_policy(route, self.listener, peer, rq.calling_ae,
                                    verifier=verifier, ocsp=ocsp_result)
        if not decision.allowed:
            raise _Rejected(RJ_CALLING_AE_REFUSED, decision.reason, check=decision.check)
        self._count_in(route)

        forward = raw.data
        if route.backend.called_ae or route.backend.calling_ae:
            forward = encode_pdu(dataclasses.replace(
                rq,
                called_ae=route.backend.called_ae or rq.called_ae,
                calling_ae=route.backend.calling_ae or rq.calling_ae,
            ))
        answer, rest = await self._exchange_with_backend(route, forward)
        await self._answer(answer, rest)

    async def _exchange_with_backend(self, route: RouteConfig,
                                     forward: bytes) -> tuple[RawPDU, bytes]:
        """Connect (+TLS), send the RQ, read the answer; every failure is an RJ.

        One cancel scope covers the three steps and its deadline moves between
        them (connect_timeout, handshake_timeout, backend_timeout): entering and
        leaving a scope costs ~15 µs, moving a deadline ~3, and this runs for
        every association.
        """
        gw, b = self.gw, route.backend
        t0 = trio.current_time()
        # What to report if the deadline below fires in the current step.
        why = f"backend did not accept within {gw.connect_timeout:g} s"
        fields: dict[str, Any] = {}
        with trio.CancelScope(deadline=t0 + gw.connect_timeout) as timer:
            try:
                stream: trio.abc.Stream = await _connect_tcp(b.host, b.port)
            except OSError as exc:
                raise _Rejected(RJ_BACKEND_UNAVAILABLE,
                                f"backend unreachable: {exc.strerror or exc}") from None
            self.backend = stream
            if route.backend_tls is not None:
                client_tls = self.rt.backend_tls[route.name]
                tls = TLSStream(stream, client_tls.new_connection(), server_side=False)
                self.backend = stream = tls
                why, fields = "backend TLS handshake timed out", {"tls_failure": True}
                timer.deadline = trio.current_time() + gw.handshake_timeout
                try:
                    await tls.do_handshake()
                    client_tls.check_peer(tls.connection)
                except (TLSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _Rejected(RJ_BACKEND_UNAVAILABLE, f"backend TLS failed: {exc}",
                                    tls_failure=True) from None
            self.connect_seconds = trio.current_time() - t0
            # backend_timeout from the RQ on, so a backend that does not even
            # read it cannot hold the association either.
            why, fields = (f"backend did not answer the A-ASSOCIATE-RQ within "
                           f"{gw.backend_timeout:g} s"), {}
            timer.deadline = trio.current_time() + gw.backend_timeout
            # Bytes a client sent right behind its RQ belong to the relay: the
            # tracker must see them to keep its PDU boundaries right.
            # (The framer's buffer is not needed while the relay runs: drop it.)
            framer, self._client_framer = self._client_framer, None
            assert framer is not None
            pipelined = self.up.split_whole(framer.take_remaining())
            self.up.bytes += len(pipelined)
            answers = PDUFramer(max(gw.max_pdu_length, 1 << 20))
            try:
                await stream.send_all(forward + pipelined)
                answer = await _read_pdu(stream.receive_some, answers)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Rejected(RJ_BACKEND_UNAVAILABLE,
                                f"backend connection lost: {exc}") from None
            except ProtocolError as exc:
                raise _Rejected(RJ_BACKEND_UNAVAILABLE,
                                f"backend sent a malformed answer: {exc}") from None
            if answer is None:
                raise _Rejected(RJ_BACKEND_UNAVAILABLE,
                                "backend closed the connection without answering")
            return answer, answers.take_remaining()
        # Only the deadline gets here (every other way out returns or raises).
        raise _Rejected(RJ_BACKEND_UNAVAILABLE, why, **fields)

    async def _answer(self, answer: RawPDU, rest: bytes) -> None:
        """Pass the backend's answer to the client; every way but an AC ends here.

        The framer checked only the PDU header: a malformed AC (when titles are
        rewritten) or RJ body would raise ProtocolError out of the session.
        """
        assert self.backend is not None and self.rq is not None and self.route is not None
        if answer.pdu_type == PDU_A_ASSOCIATE_AC:
            data = answer.data
            b = self.route.backend
            if b.called_ae or b.calling_ae:
                try:
                    ac = decode_pdu(data)
                except ProtocolError as exc:
                    raise _Rejected(RJ_BACKEND_UNAVAILABLE,
                                    f"backend sent a malformed A-ASSOCIATE-AC: {exc}") from None
                assert isinstance(ac, AssociateAC)
                # The client must see the titles it sent (PS3.8: AC echoes the RQ).
                data = encode_pdu(dataclasses.replace(
                    ac, called_ae=self.rq.called_ae, calling_ae=self.rq.calling_ae))
            rest = self.down.split_whole(rest)  # the AC itself is not part of the relay
            # The backend now holds an established association: from here on a
            # client that vanishes must cost the backend an A-ABORT, not a crash.
            self.phase = "relay"
            self.down.sending = True  # cancelled mid-AC: the client gets no A-ABORT
            try:
                await self.client.send_all(data + rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._abort_both("client", "client closed the connection before the "
                                                 f"A-ASSOCIATE-AC reached it ({exc})")
                raise _Done from None
            self.down.sending = False
            self.down.bytes += len(data) + len(rest)
            self._emit("association.accepted", **self._accepted_fields())
            return
        if answer.pdu_type == PDU_A_ASSOCIATE_RJ:
            try:
                rj = decode_pdu(answer.data)
            except ProtocolError as exc:
                raise _Rejected(RJ_BACKEND_UNAVAILABLE,
                                f"backend sent a malformed A-ASSOCIATE-RJ: {exc}") from None
            await _send_quietly(self.client, answer.data)
            self._emit("association.rejected", source_side="backend",
                       result=rj.result, source=rj.source, reason=rj.reason,
                       why="backend rejected the association")
            await _finish(self.client, self.gw.release_timeout)
            raise _Done
        if answer.pdu_type == PDU_A_ABORT:
            await _send_quietly(self.client, answer.data)
            self._emit("association.aborted", "warning", by="backend",
                       reason="backend answered the A-ASSOCIATE-RQ with A-ABORT")
            await _finish(self.client, self.gw.release_timeout)
            raise _Done
        raise _Rejected(RJ_BACKEND_UNAVAILABLE,
                        f"backend answered with unexpected PDU type 0x{answer.pdu_type:02X}")

    def _accepted_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.route and (self.route.backend.called_ae or self.route.backend.calling_ae):
            fields["backend_called_ae"] = self.route.backend.called_ae or self.rq.called_ae
            fields["backend_calling_ae"] = self.route.backend.calling_ae or self.rq.calling_ae
        fields["connect_ms"] = round(getattr(self, "connect_seconds", 0.0) * 1000, 1)
        return fields

    async def _reject(self, rj: _Rejected) -> None:
        result, source, reason = rj.rj
        self._emit("association.rejected", "warning", source_side="gateway",
                   result=result, source=source, reason=reason, why=rj.why, **rj.fields)
        if self.backend is not None:
            await trio.aclose_forcefully(self.backend)
            self.backend = None
        if await _send_quietly(self.client, encode_reject(result, source, reason)):
            await _finish(self.client, min(self.gw.artim_timeout, self.gw.release_timeout))

    # -- step 4: relay until release or abort ----------------------------------------

    async def _relay(self) -> None:
        assert self.backend is not None
        result = await relay(self.client, self.backend, idle_timeout=self.gw.idle_timeout,
                             release_timeout=self.gw.release_timeout,
                             upstream=self.up, downstream=self.down)
        self.phase = "ending"
        if result.released:
            self._emit("association.released", **self._summary())
            await self._close_both(())
            return
        if result.aborted_by:
            self._emit("association.aborted", "warning", by=result.aborted_by,
                       reason=f"{result.aborted_by} sent A-ABORT", **self._summary())
            await self._close_both(())
            return
        by, why = self._why_ended(result)
        # PS3.8 table 9-26 for a protocol violation: 1 unrecognized PDU (a type
        # the tracker does not know), 2 unexpected PDU (e.g. a second RQ).
        reason = 0
        for d in (self.up, self.down):
            if d.end is End.VIOLATION:
                reason = 2 if d.violation is not None else 1
                break
        await self._abort_both(by, why, reason)

    def _summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "bytes_up": self.up.bytes,
            "bytes_down": self.down.bytes,
            "duration_s": round(trio.current_time() - self.started, 3),
        }
        if self.dimse_counts is not None:
            summary["dimse"] = dict(self.dimse_counts)
        return summary

    # -- DIMSE inspection (route.inspect = "dimse") ------------------------------------

    def _inspect(self, route: RouteConfig) -> None:
        """Swap in DIMSE inspectors for the relay (before the AC is fed to ``down``)."""
        if route.inspect != "dimse" or self.dimse_counts is not None:
            return
        self.dimse_counts = {}
        self.up = Direction(self.up.name, DimseInspector(
            on_message=lambda m: self._on_dimse("up", m), on_error=self._on_dimse_error))
        self.down = Direction(self.down.name, DimseInspector(
            on_message=lambda m: self._on_dimse("down", m), on_error=self._on_dimse_error))

    def _on_dimse(self, direction: str, m: DimseMessage) -> None:
        status_class = m.status_class
        # Summary key: the command, and for responses its status class.
        key = f"{m.command} {status_class}" if status_class is not None else m.command
        counts = self.dimse_counts
        if counts is not None:
            counts[key] = counts.get(key, 0) + 1
        fields = {
            "command": m.command,
            "message_id": m.message_id if m.message_id is not None
            else m.message_id_being_responded_to,
            "sop_class": m.sop_class_name, "sop_class_uid": m.affected_sop_class_uid,
            "sop_instance": m.affected_sop_instance_uid, "status": m.status_hex,
            "status_class": status_class, "direction": direction,
        }
        # Once per message (thousands per second with small objects): what
        # _emit does, without collecting the bound context for every event.
        self._log.info("dimse.message", **fields)
        if self.on_event:
            context = self._relay_context
            if context is None:
                context = self._relay_context = structlog.contextvars.get_contextvars()
            self.on_event("dimse.message", {**context, **fields})

    def _on_dimse_error(self, reason: str) -> None:
        # Once per direction at most; the relay keeps moving bytes regardless.
        self._emit("dimse.inspection_failed", "warning", reason=reason)

    def _why_ended(self, result: RelayResult) -> tuple[str, str]:
        """Who ended an association that was neither released nor aborted, and why."""
        for d, side in ((self.up, "client"), (self.down, "backend")):
            if d.end is End.VIOLATION:
                if d.violation is None:  # a type no PDU has: the tracker stopped there
                    what = f"unrecognized PDU type 0x{d.tracker.last_type or 0:02X}"
                else:
                    what = PDU_NAMES.get(d.violation, f"PDU type 0x{d.violation:02X}")
                return "gateway", f"{side} sent {what} on an established association"
        if result.idle_timeout:
            return "gateway", f"idle for {self.gw.idle_timeout:g} s"
        if result.release_timeout:
            return "gateway", f"A-RELEASE-RQ not answered within {self.gw.release_timeout:g} s"
        if self.up.end in (End.EOF, End.SOURCE_BROKEN) or self.down.end is \
                End.DESTINATION_BROKEN:
            side, d = "client", self.up if self.up.end is not End.RUNNING else self.down
        else:
            side, d = "backend", self.down if self.down.end is not End.RUNNING else self.up
        detail = d.end.value + (f": {d.error}" if d.error else "")
        return side, f"{side} closed the connection without release ({detail})"

    async def _abort_both(self, by: str, why: str, reason: int = 0) -> None:
        """Send A-ABORT to every side still there, so no sender believes a transfer
        succeeded that the receiver did not get; then close both.

        ``reason`` is the A-ABORT reason the client gets (source 2); the backend
        always gets reason 0.
        """
        told = []
        pdu = encode_abort(2, reason) if reason else ABORT_PROVIDER
        if by != "client" and self.down.destination_clean and \
                await _send_quietly(self.client, pdu):
            told.append("client")
        if by != "backend" and self.backend is not None and self.up.destination_clean and \
                await _send_quietly(self.backend, ABORT_PROVIDER):
            told.append("backend")
        self.phase = "ending"
        self._emit("association.aborted", "warning", by=by, reason=why,
                   abort_sent_to=told, **self._summary())
        await self._close_both(told)

    async def _close_both(self, told: list[str] | tuple[str, ...]) -> None:
        # A side we just sent an A-ABORT gets a moment to read it and close first;
        # the others are closed at once (after a release nothing is in flight).
        ends = [(s, min(2.0, self.gw.release_timeout) if side in told else 0)
                for side, s in (("client", self.client), ("backend", self.backend))
                if s is not None]
        if not told:
            # The common case (release): two quick closes need no tasks.
            for s, wait in ends:
                await _finish(s, wait)
        else:
            async with trio.open_nursery() as n:
                for s, wait in ends:
                    n.start_soon(_finish, s, wait)
        # _finish closes even when it fails (forcefully); only cancellation
        # gets past it, and then run() still closes both.
        self._closed = True


class _Done(Exception):
    """Internal: the association has already been answered and closed."""
