"""EventHub: association events in, metrics and audit messages out.

The session and the server report what happened through one callback,
``emit(event, fields)`` (DESIGN §6: logs, metrics and audit are fed from the
same events).  ``emit`` is synchronous, cheap, never blocks and never raises:
it is called from the association's own task, sometimes from inside the
relay, and an observability bug must never cost a DICOM transfer.

``run()`` hosts the two background services: the admin HTTP server and the
audit sender.  ``reconfigure()`` applies a reloaded config (audit transport,
certificate expiry gauges); a changed ``[admin] listen`` needs a restart, like
listener addresses.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ..config import Config
from ..dul.dimse import sop_class_name
from . import audit as A
from .admin import Page, serve_admin
from .metrics import (
    CONTENT_TYPE_LATEST,
    CertificateRef,
    Metrics,
    reject_reason,
    tls_failure_reason,
)

__all__ = ["EventHub", "configured_certificates"]

log = structlog.get_logger("gateway")

# Statuses after which the receiver holds the instance (PS3.4 B.2.3: warnings store too).
_STORED = frozenset({"success", "warning"})


def configured_certificates(config: Config) -> Iterator[CertificateRef]:
    """Every certificate file the config names, with who uses it."""
    for lst in config.listeners:
        for cert in lst.certificates:
            yield CertificateRef(f"listener:{lst.name}", cert.cert)
    for route in config.routes:
        bt = route.backend_tls
        if bt is not None and bt.certificate is not None:
            yield CertificateRef(f"route:{route.name}/backend_tls", bt.certificate.cert)
    if config.audit.certificate is not None:
        yield CertificateRef("audit", config.audit.certificate.cert)


@dataclass
class _Assoc:
    """What the hub remembers about a live association (for its audit record)."""

    listener: str
    accepted: bool = False
    # SOP class -> [count, listed instance UIDs]; "up": data went client→backend.
    stored: dict[str, dict[str, list]] = field(default_factory=lambda: {"up": {}, "down": {}})
    listed: int = 0


class EventHub:
    """Maps gateway events to Prometheus metrics and DICOM audit messages."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.ready = False
        self.admin_port: int | None = None
        self._assocs: dict[str, _Assoc] = {}
        self._dimse_children: dict[tuple[str, str, str], Any] = {}
        self._failed_once = False
        self._audit_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.audit = self._new_trail(config)
        self._set_certificates(config)

    # -- lifecycle -------------------------------------------------------------------

    def _new_trail(self, config: Config) -> A.AuditTrail:
        m = self.metrics
        return A.AuditTrail(
            config.audit,
            on_sent=m.audit_sent.inc,
            on_dropped=lambda reason: m.audit_dropped.labels(reason).inc(),
            on_queue=m.audit_queue.set,
        )

    def _set_certificates(self, config: Config) -> None:
        for problem in self.metrics.set_certificates(configured_certificates(config)):
            log.warning("metrics.certificate_unreadable", problem=problem)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve /metrics and send audit messages until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            admin = self.config.admin
            if admin.port is not None:
                try:
                    self.admin_port = await nursery.start(
                        serve_admin, admin.host or "127.0.0.1", admin.port, self.page)
                except OSError as exc:
                    # Observability must not keep DICOM down (e.g. the port is taken
                    # by a sibling worker under --workers): run without it, loudly.
                    log.error("admin.bind_failed", address=f"{admin.host}:{admin.port}",
                              error=exc.strerror or str(exc))
            self._start_audit()
            task_status.started()
            await trio.sleep_forever()

    def _start_audit(self) -> None:
        if self._nursery is None or not self.audit.enabled:
            return
        trail = self.audit

        async def run_trail() -> None:
            with trio.CancelScope() as scope:
                self._audit_scope = scope
                await trail.run()

        self._nursery.start_soon(run_trail)

    async def aclose(self, flush_timeout: float = 2.0) -> None:
        """Give queued audit messages up to ``flush_timeout`` s, then stop everything."""
        await self.audit.flush(flush_timeout)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: audit destination and certificate gauges."""
        old = self.config
        self.config = config
        self._set_certificates(config)
        if config.admin != old.admin:
            log.warning("admin.listen_unchanged", reason="[admin] changed; restart to apply it")
        if config.audit != old.audit:
            if self._audit_scope is not None:
                self._audit_scope.cancel()
                self._audit_scope = None
            self.audit = self._new_trail(config)
            self._start_audit()

    def set_ready(self, ready: bool) -> None:
        """Listeners bound and accepting (True) / starting or draining (False)."""
        self.ready = ready
        self.metrics.ready.set(1 if ready else 0)

    # -- admin pages -----------------------------------------------------------------

    def page(self, method: str, path: str) -> Page:
        """Answer one admin HTTP request."""
        if path == "/metrics":
            return Page(200, self.metrics.render(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return Page(200, b"ok\n")
        if path == "/readyz":
            if self.ready:
                return Page(200, b"ready\n")
            return Page(503, b"not ready\n")
        return Page(404, b"not found\n")

    # -- events ----------------------------------------------------------------------

    def emit(self, event: str, fields: dict[str, Any]) -> None:
        """Account for one event.  Never raises, never blocks."""
        try:
            handler = self._handlers.get(event)
            if handler is not None:
                handler(self, fields)
        except Exception:
            # Once: a systematic bug here would otherwise log on every association.
            if not self._failed_once:
                self._failed_once = True
                log.exception("observe.event_failed", observed_event=event)

    def _assoc(self, fields: dict[str, Any]) -> _Assoc:
        key = str(fields.get("assoc_id", ""))
        a = self._assocs.get(key)
        if a is None:
            a = self._assocs[key] = _Assoc(listener=str(fields.get("listener", "")))
        return a

    def _on_started(self, fields: dict[str, Any]) -> None:
        self.audit.submit(A.application_activity(self.audit.source, start=True,
                                                 app_name=self.audit.source.source_id))

    def _on_stopped(self, fields: dict[str, Any]) -> None:
        self.set_ready(False)
        self.audit.submit(A.application_activity(self.audit.source, start=False,
                                                 app_name=self.audit.source.source_id))

    def _on_reloaded(self, fields: dict[str, Any]) -> None:
        self.metrics.reloads.inc()
        path = str(fields.get("path", ""))
        self.audit.submit(A.security_alert(
            self.audit.source, outcome=A.OUTCOME_SUCCESS, reporter=self.audit.source.source_id,
            alert_types=(A.TYPE_NETWORK_CONFIGURATION, A.TYPE_SECURITY_CONFIGURATION),
            subject_id=path or "configuration",
            description="configuration and certificates reloaded",
            details=A.describe(fields, "routes")))

    def _on_reload_failed(self, fields: dict[str, Any]) -> None:
        self.metrics.reload_failures.inc()
        self.audit.submit(A.security_alert(
            self.audit.source, outcome=A.OUTCOME_MINOR, reporter=self.audit.source.source_id,
            alert_types=(A.TYPE_NETWORK_CONFIGURATION, A.TYPE_SECURITY_CONFIGURATION),
            subject_id=str(fields.get("path") or "configuration"),
            description=f"configuration reload refused, previous configuration kept: "
                        f"{fields.get('error', '')}"), warning=True)

    def _on_accepted(self, fields: dict[str, Any]) -> None:
        a = self._assoc(fields)
        a.accepted = True
        route = str(fields.get("route", ""))
        self.metrics.active.labels(a.listener).inc()
        connect_ms = fields.get("connect_ms")
        if isinstance(connect_ms, int | float):
            self.metrics.connect_seconds.labels(route).observe(connect_ms / 1000)

    def _on_dimse(self, fields: dict[str, Any]) -> None:
        route = str(fields.get("route", ""))
        command = str(fields.get("command", ""))
        status = fields.get("status_class") or "request"
        # Per message, so skip prometheus' label lookup (a few µs) after the first.
        key = (route, command, status)
        child = self._dimse_children.get(key)
        if child is None:
            child = self._dimse_children[key] = self.metrics.dimse.labels(*key)
        child.inc()
        # The stored instances only feed the audit record: nothing to keep with audit off.
        if command == "C-STORE-RSP" and status in _STORED and self.audit.enabled:
            a = self._assoc(fields)
            # The response travels against the data: a RSP going down (to the
            # client) answers a C-STORE the client sent up.
            way = "up" if fields.get("direction") == "down" else "down"
            sop_class = str(fields.get("sop_class_uid") or "unknown")
            entry = a.stored[way].setdefault(sop_class, [0, []])
            entry[0] += 1
            if a.listed < A.MAX_INSTANCES and fields.get("sop_instance"):
                entry[1].append(str(fields["sop_instance"]))
                a.listed += 1

    def _on_dimse_error(self, fields: dict[str, Any]) -> None:
        self.metrics.dimse_errors.labels(str(fields.get("route", ""))).inc()

    def _on_tls_failed(self, fields: dict[str, Any]) -> None:
        listener = str(fields.get("listener", ""))
        reason = str(fields.get("reason", ""))
        self.metrics.tls_failures.labels(listener, tls_failure_reason(reason)).inc()
        self.metrics.associations.labels(listener, "", "tls_failed").inc()
        self._assocs.pop(str(fields.get("assoc_id", "")), None)
        self._node_alert(fields, f"TLS handshake failed: {reason}")

    def _on_final(self, event: str, fields: dict[str, Any]) -> None:
        a = self._assocs.pop(str(fields.get("assoc_id", "")), None)
        listener = str(fields.get("listener", ""))
        route = str(fields.get("route", ""))
        outcome = event.rsplit(".", 1)[1]
        m = self.metrics
        m.associations.labels(listener, route, outcome).inc()
        if event == "association.rejected":
            m.rejects.labels(listener, reject_reason(fields)).inc()
            if fields.get("check") or fields.get("tls_failure"):
                what = "backend TLS" if fields.get("tls_failure") else \
                    f"route policy ({fields.get('check')})"
                self._node_alert(fields, f"{what} refused the association: "
                                         f"{fields.get('why', '')}")
        if a is None or not a.accepted:
            return
        m.active.labels(a.listener).dec()
        for direction, key in (("client_to_backend", "bytes_up"),
                               ("backend_to_client", "bytes_down")):
            value = fields.get(key)
            if isinstance(value, int) and value > 0:
                m.bytes.labels(route, direction).inc(value)
        duration = fields.get("duration_s")
        if isinstance(duration, int | float):
            m.duration.labels(route).observe(duration)
        self._association_record(event, fields, a)

    # -- audit records ---------------------------------------------------------------

    def _client(self, fields: dict[str, Any], role: A.Code | None) -> A.Participant:
        return A.ae_participant(fields.get("calling_ae"), requestor=True,
                                address=A.host_of(fields.get("peer")), role=role,
                                user_name=fields.get("client_subject"))

    def _backend(self, fields: dict[str, Any], role: A.Code | None) -> A.Participant:
        backend = str(fields.get("backend", ""))
        return A.ae_participant(fields.get("backend_called_ae") or fields.get("called_ae"),
                                requestor=False, address=A.host_of(backend) or None,
                                role=role)

    def _details(self, fields: dict[str, Any]) -> dict[str, str]:
        return A.describe(fields, "route", "listener", "called_ae", "backend", "client_subject",
                          "tls_version", "cipher", "sni", "assoc_id")

    def _node_alert(self, fields: dict[str, Any], description: str) -> None:
        if not self.audit.enabled:
            return  # building the message is most of the cost; submit would drop it
        peer = A.host_of(fields.get("peer")) or "unknown"
        self.audit.submit(A.security_alert(
            self.audit.source, outcome=A.OUTCOME_MINOR, reporter=self.audit.source.source_id,
            alert_types=(A.TYPE_NODE_AUTHENTICATION,), subject_id=peer,
            description=description, details=self._details(fields) | A.describe(fields, "peer"),
            others=[self._client(fields, None)]), warning=True)

    def _association_record(self, event: str, fields: dict[str, Any], a: _Assoc) -> None:
        if not self.audit.enabled:
            return  # building the messages is most of the cost; submit would drop them
        released = event == "association.released"
        description = None if released else \
            f"association aborted by {fields.get('by', '?')}: {fields.get('reason', '')}"
        any_stored = False
        for way, classes in a.stored.items():
            if not classes:
                continue
            any_stored = True
            up = way == "up"
            participants = [self._client(fields, A.ROLE_SOURCE if up else A.ROLE_DESTINATION),
                            self._backend(fields, A.ROLE_DESTINATION if up else A.ROLE_SOURCE),
                            self._gateway()]
            self.audit.submit(A.instances_transferred(
                self.audit.source, participants=participants,
                classes={k: (v[0], v[1]) for k, v in classes.items()},
                outcome=A.OUTCOME_SUCCESS if released else A.OUTCOME_MINOR,
                description=description, details=self._details(fields),
                sop_class_names=sop_class_name))
        if not any_stored:
            # No instance moved (echo, query, or inspection off): still record who
            # reached which AE through which route -- a Node Authentication alert
            # with a success outcome, which PS3.15 A.5.3.11 allows for successes.
            self.audit.submit(A.security_alert(
                self.audit.source,
                outcome=A.OUTCOME_SUCCESS if released else A.OUTCOME_MINOR,
                reporter=self.audit.source.source_id,
                alert_types=(A.TYPE_NODE_AUTHENTICATION,),
                subject_id=A.host_of(fields.get("peer")) or "unknown",
                description=description or "association released",
                details=self._details(fields) | A.describe(fields, "peer"),
                others=[self._client(fields, None), self._backend(fields, None)]))

    def _gateway(self) -> A.Participant:
        return A.Participant(user_id=self.audit.source.source_id, requestor=False,
                             address=socket.gethostname(), roles=(A.ROLE_APPLICATION,))

    _handlers: dict[str, Any] = {
        "gateway.started": _on_started,
        "gateway.stopped": _on_stopped,
        "config.reloaded": _on_reloaded,
        "config.reload_failed": _on_reload_failed,
        "association.accepted": _on_accepted,
        "dimse.message": _on_dimse,
        "dimse.inspection_failed": _on_dimse_error,
        "tls.handshake_failed": _on_tls_failed,
        "association.released": lambda self, f: self._on_final("association.released", f),
        "association.aborted": lambda self, f: self._on_final("association.aborted", f),
        "association.rejected": lambda self, f: self._on_final("association.rejected", f),
    }
