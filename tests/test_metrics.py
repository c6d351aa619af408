"""EventHub: session events -> Prometheus metrics (and never an exception)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Config
from gateway.observe.hub import EventHub
from gateway.observe.metrics import reject_reason, tls_failure_reason
from tests.tls_helpers import key_for, make_ca, pem


def samples(hub: EventHub) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(hub.metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(hub: EventHub, name: str, **labels: str) -> float:
    return samples(hub).get((name, frozenset(labels.items())), 0.0)


CTX = {"assoc_id": "a1", "listener": "tls", "peer": "10.0.0.9:5000", "calling_ae": "CT01",
       "called_ae": "ARCHIVE", "route": "archive", "backend": "10.0.0.5:104"}


def test_association_lifecycle_metrics():
    hub = EventHub(Config(path=Path("gw.toml")))
    hub.emit("association.accepted", {**CTX, "connect_ms": 12.5})
    assert value(hub, "dicom_gateway_associations_active", listener="tls") == 1
    for cmd, status, cls in (("C-STORE-RQ", None, None), ("C-STORE-RSP", "0x0000", "success"),
                             ("C-STORE-RSP", "0xA700", "failure")):
        hub.emit("dimse.message", {**CTX, "command": cmd, "status": status, "status_class": cls,
                                   "direction": "down" if status else "up",
                                   "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                                   "sop_instance": "1.2.3"})
    hub.emit("association.released", {**CTX, "bytes_up": 1000, "bytes_down": 50,
                                       "duration_s": 0.3})
    m = "dicom_gateway_"
    assert value(hub, m + "associations_active", listener="tls") == 0
    assert value(hub, m + "associations_total", listener="tls", route="archive",
                 outcome="released") == 1
    assert value(hub, m + "dimse_messages_total", route="archive", command="C-STORE-RQ",
                 status="request") == 1
    assert value(hub, m + "dimse_messages_total", route="archive", command="C-STORE-RSP",
                 status="failure") == 1
    assert value(hub, m + "bytes_total", route="archive", direction="client_to_backend") == 1000
    assert value(hub, m + "backend_connect_seconds_count", route="archive") == 1
    assert value(hub, m + "backend_connect_seconds_sum", route="archive") == 0.0125
    assert value(hub, m + "association_duration_seconds_count", route="archive") == 1
    assert hub._assocs == {}  # nothing kept after the end


def test_rejects_tls_failures_and_reloads():
    hub = EventHub(Config(path=Path("gw.toml")))
    hub.emit("association.rejected", {**CTX, "source_side": "gateway", "result": 1,
                                      "source": 1, "reason": 7})
    hub.emit("association.rejected", {**CTX, "source_side": "gateway", "result": 1,
                                      "source": 1, "reason": 3, "check": "chain"})
    hub.emit("association.rejected", {**CTX, "source_side": "backend", "result": 1,
                                      "source": 1, "reason": 7})
    hub.emit("tls.handshake_failed", {**CTX, "reason": "no handshake within 10 s"})
    hub.emit("config.reloaded", {"path": "gw.toml"})
    hub.emit("config.reload_failed", {"path": "gw.toml", "error": "bad"})
    m = "dicom_gateway_"
    for reason in ("called_ae_unknown", "policy_chain", "backend_rejected"):
        assert value(hub, m + "rejects_total", listener="tls", reason=reason) == 1, reason
    assert value(hub, m + "tls_handshake_failures_total", listener="tls", reason="timeout") == 1
    assert value(hub, m + "config_reloads_total") == 1
    assert value(hub, m + "config_reload_failures_total") == 1


def test_emit_never_raises_and_ready_flag():
    hub = EventHub(Config(path=Path("gw.toml")))
    hub.emit("association.accepted", {"connect_ms": "garbage"})
    hub.emit("association.released", {"bytes_up": "x", "duration_s": None})
    hub.emit("dimse.message", {})
    hub.emit("no.such.event", {"x": object()})
    assert hub.page("GET", "/readyz").status == 503
    hub.set_ready(True)
    assert hub.page("GET", "/readyz").status == 200
    assert hub.page("GET", "/healthz").status == 200
    assert hub.page("GET", "/x").status == 404
    assert value(hub, "dicom_gateway_ready") == 1


def test_reason_labels():
    assert reject_reason({"result": 2, "source": 3, "reason": 2}) == "limit"
    assert reject_reason({"result": 2, "source": 3, "reason": 1, "tls_failure": True}) == \
        "backend_tls"
    assert tls_failure_reason("[('SSL routines', '', 'tlsv1 alert unknown ca')]") == "unknown_ca"
    assert tls_failure_reason("something new") == "other"


def test_certificate_expiry_gauge(tmp_path):
    from gateway.observe.metrics import CertificateRef

    ca = make_ca("Metrics Test CA", key_for("ca"))
    path = tmp_path / "ca.pem"
    path.write_bytes(pem(ca))
    hub = EventHub(Config(path=Path("gw.toml")))
    problems = hub.metrics.set_certificates([CertificateRef("listener:tls", path),
                                             CertificateRef("audit", tmp_path / "missing")])
    assert len(problems) == 1 and "missing" in problems[0]
    got = [(dict(lbl), v) for (n, lbl), v in samples(hub).items()
           if n == "dicom_gateway_certificate_not_after_timestamp_seconds"]
    assert got == [({"owner": "listener:tls", "path": str(path),
                     "subject": ca.subject.rfc4514_string()},
                    ca.not_valid_after_utc.timestamp())]
