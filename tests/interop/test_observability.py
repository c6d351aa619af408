"""Operator visibility end to end: DCMTK traffic through the gateway process, then
/metrics, the JSON logs and the DICOM audit messages a syslog receiver got."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from tests.test_audit import details, parse_syslog, validate_audit_message

from .helpers import (
    HOST,
    KB,
    count_store_successes,
    dcmtk_tls_client,
    free_port,
    route,
    run_dcmtk,
    scu_args,
    tls_listener,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# --------------------------------------------------------------------------- helpers


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Scrape:
    """One /metrics scrape: sample values by name and labels."""

    def __init__(self, port: int):
        status, text = http_get(port, "/metrics")
        assert status == 200, text
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def matching(self, name: str, **labels: str) -> list[tuple[dict, float]]:
        want = set(labels.items())
        return [(dict(lbl), v) for (n, lbl), v in self.samples.items()
                if n == name and want <= set(lbl)]


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


class UDPReceiver:
    """RFC 5426 receiver: one syslog record per datagram."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.records: list[bytes] = []

    def poll(self) -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                self.records.append(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()


class TLSReceiver:
    """RFC 5425 receiver: TLS, octet-counting framing, in a thread."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.records: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                buf = b""
                while not self.stop.is_set():
                    data = tls.recv(65536)
                    if not data:
                        return
                    buf += data
                    while b" " in buf:
                        n, _, rest = buf.partition(b" ")
                        if len(rest) < int(n):
                            break
                        self.records.append(rest[: int(n)])
                        buf = rest[int(n):]
        except (OSError, ssl.SSLError):
            return

    def poll(self) -> None:
        pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def audit_messages(rx, want, timeout: float = 10.0) -> list[ET.Element]:
    """Poll the receiver until ``want(messages)`` holds; every message must be valid."""
    deadline = time.monotonic() + timeout
    while True:
        rx.poll()
        msgs = []
        for record in list(rx.records):
            header, root = parse_syslog(record)
            assert header["msgid"] == "IHE+RFC-3881"
            validate_audit_message(root)
            msgs.append(root)
        if want(msgs) or time.monotonic() > deadline:
            return msgs
        time.sleep(0.1)


def event_id(root: ET.Element) -> str:
    return root.find("EventIdentification/EventID").get("csd-code")


def type_codes(root: ET.Element) -> list[str]:
    return [t.get("csd-code") for t in root.findall("EventIdentification/EventTypeCode")]


def subject_of(cert: Path) -> str:
    return x509.load_pem_x509_certificate(cert.read_bytes()).subject.rfc4514_string()


# --------------------------------------------------------------------------- tests


def test_metrics_logs_and_udp_audit_after_dcmtk_traffic(pki, storescp, gateway, small_files):
    scp = storescp()
    rx = UDPReceiver()
    admin = free_port()
    gw = gateway(
        [tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)],
        sections={"admin": {"listen": f"{HOST}:{admin}"},
                  "audit": {"transport": "udp", "address": f"{HOST}:{rx.port}",
                            "source_id": "gw-interop"}},
    )
    try:
        assert http_get(admin, "/healthz")[0] == 200
        assert http_get(admin, "/readyz") == (200, "ready\n")
        assert http_get(admin, "/nope")[0] == 404
        assert http_get(admin, "/metrics", method="POST")[0] == 405
        before = Scrape(admin)

        tls = ["-v", *dcmtk_tls_client(pki)]
        rc, out = run_dcmtk(scu_args("echoscu", gw.port("tls"), *tls, calling="CT01"), timeout=30)
        assert rc == 0, out + gw.output()
        rc, out = run_dcmtk(scu_args("storescu", gw.port("tls"), *tls, calling="CT01",
                                     files=small_files), timeout=30)
        assert rc == 0, out + gw.output()
        assert count_store_successes(out) == len(small_files)
        deadline = time.monotonic() + 5
        while len(gw.events("association.released")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = Scrape(admin)

        # --- metrics: exact deltas
        m = "dicom_gateway_"
        assert delta(before, after, m + "associations_total", listener="tls", route="archive",
                     outcome="released") == 2
        for command, status, n in (("C-ECHO-RQ", "request", 1), ("C-ECHO-RSP", "success", 1),
                                   ("C-STORE-RQ", "request", 3),
                                   ("C-STORE-RSP", "success", 3)):
            assert delta(before, after, m + "dimse_messages_total", route="archive",
                         command=command, status=status) == n, (command, status)
        # Files carry a preamble and file meta (~330 bytes) that are not sent; the
        # wire adds PDU/PDV headers, the A-ASSOCIATE-RQ and the command sets.
        sent = sum(p.stat().st_size for p in small_files) - 3 * 400
        up = delta(before, after, m + "bytes_total", route="archive",
                   direction="client_to_backend")
        down = delta(before, after, m + "bytes_total", route="archive",
                     direction="backend_to_client")
        assert sent < up < sent + 20 * KB and 0 < down < 10 * KB
        assert delta(before, after, m + "backend_connect_seconds_count", route="archive") == 2
        assert delta(before, after, m + "association_duration_seconds_count",
                     route="archive") == 2
        assert after.get(m + "associations_active", listener="tls") == 0
        assert after.get(m + "ready") == 1
        certs = after.matching(m + "certificate_not_after_timestamp_seconds",
                               owner="listener:tls")
        leaf = x509.load_pem_x509_certificate(pki.gateway_server.cert.read_bytes())
        assert [v for _, v in certs] == [leaf.not_valid_after_utc.timestamp()]

        # --- logs: one line per DIMSE message, a summary on the final event
        uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in small_files}
        msgs = gw.events("dimse.message")
        rqs = [r for r in msgs if r["command"] == "C-STORE-RQ"]
        rsps = [r for r in msgs if r["command"] == "C-STORE-RSP"]
        assert {r["sop_instance"] for r in rqs} == uids
        assert all(r["sop_class"] == "CT Image Storage" and r["level"] == "info" for r in rqs)
        assert [r["status"] for r in rsps] == ["0x0000"] * 3
        assert sorted(r["message_id"] for r in rqs) == sorted(r["message_id"] for r in rsps)
        store_end = [r for r in gw.events("association.released") if "C-STORE-RQ" in
                     r.get("dimse", {})]
        assert store_end[0]["dimse"] == {"C-STORE-RQ": 3, "C-STORE-RSP success": 3}
        subject = gw.events("association.accepted")[0]["client_subject"]
        assert subject == subject_of(pki.client.cert)

        # --- audit: start, the store (Instances Transferred), the echo (node auth)
        def complete(ms):
            return {event_id(r) for r in ms} >= {"110100", "110104", "110113"}

        audits = audit_messages(rx, complete)
        assert complete(audits), [ET.tostring(r)[:300] for r in audits]
        start = next(r for r in audits if event_id(r) == "110100")
        assert type_codes(start) == ["110120"]
        assert start.find("AuditSourceIdentification").get("AuditSourceID") == "gw-interop"
        xfer = next(r for r in audits if event_id(r) == "110104")
        assert xfer.find("EventIdentification").get("EventOutcomeIndicator") == "0"
        client, backend = xfer.findall("ActiveParticipant")[:2]
        assert client.get("UserID") == "CT01" and client.get("UserIsRequestor") == "true"
        assert client.get("UserName") == subject
        assert client.get("NetworkAccessPointID") == HOST
        assert client.find("RoleIDCode").get("csd-code") == "110153"
        assert backend.get("UserID") == "ARCHIVE"
        assert backend.get("NetworkAccessPointID") == HOST
        assert backend.find("RoleIDCode").get("csd-code") == "110152"
        (obj,) = xfer.findall("ParticipantObjectIdentification")
        assert obj.get("ParticipantObjectID") == CT_IMAGE_STORAGE
        assert obj.find("ParticipantObjectName").text == "CT Image Storage"
        assert details(obj)["route"] == "archive" and details(obj)["listener"] == "tls"
        sop = obj.find("ParticipantObjectDescription/SOPClass")
        assert sop.get("NumberOfInstances") == "3"
        assert {i.get("UID") for i in sop.findall("Instance")} == uids
        echo = next(r for r in audits if event_id(r) == "110113")
        assert type_codes(echo) == ["110126"]
        assert echo.find("EventIdentification").get("EventOutcomeIndicator") == "0"
        assert details(echo.find("ParticipantObjectIdentification"))["called_ae"] == "ARCHIVE"
        assert delta(before, Scrape(admin), m + "audit_messages_sent_total") >= 2
        assert not gw.events("observe.event_failed")
    finally:
        rx.close()


def test_failed_client_certificate_raises_security_alerts_over_tls(pki, storescp, gateway):
    """Untrusted client certificate: rejected by route policy (optional listener, RJ 1,1,3)
    and refused in the handshake (required listener); both are Security Alerts."""
    scp = storescp()
    rx = TLSReceiver(pki.backend_server.cert, pki.backend_server.key)
    admin = free_port()
    gw = gateway(
        [tls_listener(pki, "opt", client_cert="optional"),
         tls_listener(pki, "req", client_cert="required")],
        [route("archive", "ARCHIVE", scp.port, verify="chain")],
        sections={"admin": {"listen": f"{HOST}:{admin}"},
                  "audit": {"transport": "tls", "address": f"{HOST}:{rx.port}",
                            "ca": str(pki.backend_ca), "server_name": "localhost"}},
    )
    try:
        before = Scrape(admin)
        evil = subject_of(pki.evil_client.cert)
        evil_tls = ["-v", *dcmtk_tls_client(pki, "evil_client")]
        rc, out = run_dcmtk(scu_args("echoscu", gw.port("opt"), *evil_tls, calling="CT01"),
                            timeout=30)
        assert rc != 0 and "Rejected" in out, out
        rc, out = run_dcmtk(scu_args("echoscu", gw.port("req"), *evil_tls, calling="CT01"),
                            timeout=30)
        assert rc != 0, out
        gw.wait_for_event("tls.handshake_failed")
        after = Scrape(admin)
        m = "dicom_gateway_"
        assert delta(before, after, m + "rejects_total", listener="opt",
                     reason="policy_chain") == 1
        assert sum(v for _, v in after.matching(m + "tls_handshake_failures_total",
                                                listener="req")) == 1
        assert delta(before, after, m + "associations_total", listener="opt",
                     route="archive", outcome="rejected") == 1

        def alerts(ms):
            return [r for r in ms if event_id(r) == "110113"]

        audits = audit_messages(rx, lambda ms: len(alerts(ms)) >= 2)
        found = alerts(audits)
        assert len(found) == 2, [ET.tostring(r)[:400] for r in audits]
        for alert in found:
            assert type_codes(alert) == ["110126"]
            assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
            obj = alert.find("ParticipantObjectIdentification")
            assert obj.get("ParticipantObjectID") == HOST
            peers = [ap for ap in alert.findall("ActiveParticipant")
                     if ap.get("UserIsRequestor") == "true"]
            assert peers and peers[0].get("NetworkAccessPointID") == HOST
        policy = next(a for a in found if "route policy" in
                      details(a.find("ParticipantObjectIdentification"))["Alert Description"])
        d = details(policy.find("ParticipantObjectIdentification"))
        assert d["listener"] == "opt" and d["route"] == "archive"
        assert d["client_subject"] == evil
        requester = next(ap for ap in policy.findall("ActiveParticipant")
                         if ap.get("UserIsRequestor") == "true")
        assert requester.get("UserID") == "CT01" and requester.get("UserName") == evil
        handshake = next(a for a in found if a is not policy)
        hd = details(handshake.find("ParticipantObjectIdentification"))
        assert hd["listener"] == "req"
        assert hd["Alert Description"].startswith("TLS handshake failed")
    finally:
        rx.close()


def test_dead_audit_repository_does_not_hold_up_stores(pki, storescp, gateway, dicom_files):
    files = dicom_files("observe20", [10 * KB] * 20)
    scp = storescp()
    admin = free_port()
    dead = free_port()  # nothing listens there
    gw = gateway(
        [tls_listener(pki)], [route("archive", "ARCHIVE", scp.port)],
        sections={"admin": {"listen": f"{HOST}:{admin}"},
                  "audit": {"transport": "tls", "address": f"{HOST}:{dead}",
                            "ca": str(pki.backend_ca), "queue_size": 2}},
    )
    t0 = time.monotonic()
    rc, out = run_dcmtk(scu_args("storescu", gw.port("tls"), "-v", *dcmtk_tls_client(pki),
                                 calling="CT01", files=files), timeout=30)
    elapsed = time.monotonic() - t0
    assert rc == 0, out + gw.output()
    assert count_store_successes(out) == len(files)
    # 20 small files over TLS take well under a second here; the audit sender's
    # reconnect back-off (0.5 s, 1 s, ...) must not show up in the transfer.
    assert elapsed < 5, f"storescu took {elapsed:.1f} s with a dead audit repository"
    for _ in range(4):  # more audit records than the queue holds
        rc, out = run_dcmtk(scu_args("echoscu", gw.port("tls"), *dcmtk_tls_client(pki),
                                     calling="CT01"), timeout=30)
        assert rc == 0, out
    deadline = time.monotonic() + 5
    while True:
        scrape = Scrape(admin)
        dropped = scrape.get("dicom_gateway_audit_messages_dropped_total", reason="queue_full")
        if dropped or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert dropped >= 1
    assert scrape.get("dicom_gateway_audit_messages_sent_total") == 0
    assert gw.events("audit.dropped") and gw.events("audit.send_failed")
