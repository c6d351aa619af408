"""Prometheus metrics, in a registry of the gateway's own (never the global one).

A private ``CollectorRegistry`` keeps tests and embedders (several gateways in
one process, the demo) from sharing counters, and keeps the exposition free of
the client library's default process collectors unless we add them.

Everything is fed from association events (``observe.hub``); nothing here is
called from the relay's hot loop.  Byte counters therefore move when an
association ends, not while it runs.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "CertificateRef", "Metrics", "reject_reason",
           "tls_failure_reason"]

_NS = "dicom_gateway"

# DESIGN §2 rejection table, (result, source, reason) -> a label an operator reads.
_REJECT_REASONS = {
    (1, 1, 7): "called_ae_unknown",
    (1, 1, 3): "calling_ae_refused",
    (1, 2, 2): "protocol_version",
    (2, 3, 1): "backend_unavailable",
    (2, 3, 2): "limit",
}


def reject_reason(fields: dict) -> str:
    """Label for an ``association.rejected`` event: policy checks get their own."""
    if fields.get("source_side") == "backend":
        return "backend_rejected"
    if fields.get("check"):
        return f"policy_{str(fields['check']).replace('-', '_')}"
    triple = (fields.get("result"), fields.get("source"), fields.get("reason"))
    if fields.get("tls_failure"):
        return "backend_tls"
    return _REJECT_REASONS.get(triple, "other")  # type: ignore[arg-type]


# Substrings of OpenSSL / gateway messages, most specific first.
_TLS_REASONS = (
    ("no handshake within", "timeout"),
    ("peer did not return a certificate", "no_client_certificate"),
    ("certificate required", "no_client_certificate"),
    ("unknown ca", "unknown_ca"),
    ("certificate verify failed", "certificate_verify_failed"),
    ("certificate expired", "certificate_expired"),
    ("bad certificate", "bad_certificate"),
    ("no shared cipher", "no_shared_cipher"),
    ("unsupported protocol", "protocol_version"),
    ("protocol version", "protocol_version"),
    ("wrong version number", "not_tls"),
    ("http request", "not_tls"),
    ("plain dicom", "not_tls"),
    ("unexpected eof", "connection_closed"),
    ("closed", "connection_closed"),
    ("reset", "connection_closed"),
)


def tls_failure_reason(message: str) -> str:
    """A small, bounded label set for TLS handshake failures (label cardinality)."""
    low = message.lower()
    for needle, label in _TLS_REASONS:
        if needle in low:
            return label
    return "other"


@dataclass(frozen=True)
class CertificateRef:
    """A certificate the config names: who uses it and where it is."""

    owner: str  # "listener:tls", "route:ct/backend_tls", "audit"
    path: Path


class Metrics:
    """All gateway metrics; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.associations = Counter(
            f"{_NS}_associations", "Associations by how they ended "
            "(released, aborted, rejected).", ["listener", "route", "outcome"], registry=r)
        self.active = Gauge(f"{_NS}_associations_active",
                            "Associations accepted and not yet ended.", ["listener"], registry=r)
        self.rejects = Counter(f"{_NS}_rejects", "A-ASSOCIATE-RJ sent or passed on, by reason.",
                               ["listener", "reason"], registry=r)
        self.tls_failures = Counter(f"{_NS}_tls_handshake_failures",
                                    "Client TLS handshakes that failed, by reason.",
                                    ["listener", "reason"], registry=r)
        self.bytes = Counter(f"{_NS}_bytes", "Bytes relayed (counted when an association ends).",
                             ["route", "direction"], registry=r)
        self.dimse = Counter(f"{_NS}_dimse_messages", "DIMSE messages seen by inspection; "
                             "status is the status class of responses, 'request' for requests.",
                             ["route", "command", "status"], registry=r)
        self.dimse_errors = Counter(f"{_NS}_dimse_inspection_errors",
                                    "Associations whose DIMSE stream could not be inspected.",
                                    ["route"], registry=r)
        self.connect_seconds = Histogram(
            f"{_NS}_backend_connect_seconds", "Time to connect the backend (TCP + TLS).",
            ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.duration = Histogram(
            f"{_NS}_association_duration_seconds", "Association lifetime, accept to end.",
            ["route"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600))
        self.cert_not_after = Gauge(
            f"{_NS}_certificate_not_after_timestamp_seconds",
            "Expiry (notAfter, Unix time) of every configured certificate.",
            ["owner", "path", "subject"], registry=r)
        self.reloads = Counter(f"{_NS}_config_reloads", "Successful configuration reloads.",
                               registry=r)
        self.reload_failures = Counter(f"{_NS}_config_reload_failures",
                                       "Configuration reloads refused (old config kept).",
                                       registry=r)
        self.audit_sent = Counter(f"{_NS}_audit_messages_sent",
                                  "Audit messages delivered to the audit repository.",
                                  registry=r)
        self.audit_dropped = Counter(f"{_NS}_audit_messages_dropped",
                                     "Audit messages dropped (queue full or undeliverable).",
                                     ["reason"], registry=r)
        self.audit_queue = Gauge(f"{_NS}_audit_queue_length", "Audit messages waiting to be sent.",
                                 registry=r)
        self.ready = Gauge(f"{_NS}_ready", "1 while listeners are bound and not draining.",
                           registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def set_certificates(self, certs: Iterable[CertificateRef]) -> list[str]:
        """Replace the certificate expiry gauges; returns problems reading files."""
        self.cert_not_after.clear()
        problems = []
        for ref in certs:
            try:
                cert = _load_first_certificate(ref.path)
            except (OSError, ValueError) as exc:
                problems.append(f"{ref.owner} {ref.path}: {exc}")
                continue
            not_after = cert.not_valid_after_utc
            self.cert_not_after.labels(ref.owner, str(ref.path),
                                       cert.subject.rfc4514_string()).set(
                not_after.replace(tzinfo=_dt.timezone.utc).timestamp())
        return problems


def _load_first_certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)[0]
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        from cryptography.hazmat.primitives.serialization import pkcs12

        # PKCS#12 without a password is all we can read here; encrypted ones are
        # reported as a problem rather than guessed at.
        bundle = pkcs12.load_pkcs12(data, None)
        if bundle.cert is None:
            raise ValueError("PKCS#12 without a certificate") from None
        return bundle.cert.certificate
