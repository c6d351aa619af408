"""Audit messages: PS3.15 A.5.1 structure, RFC 5424 framing, the never-blocking queue."""

from __future__ import annotations

import base64
import datetime as dt
import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trio

from gateway.config import AuditSettings, load_config
from gateway.errors import ConfigError
from gateway.observe import audit as A
from gateway.server import build_runtime

# --------------------------------------------------------------------------- A.5.1 checker
# A direct transcription of the RELAX NG schema of PS3.15 A.5.1 (element order,
# cardinality, required attributes and the enumerated values), used by the unit
# tests and by tests/interop/test_observability.py on what the receivers got.

_BOOL = {"true", "false", "1", "0"}


def _attrs(el: ET.Element, required: set[str], optional: set[str]) -> None:
    have = set(el.attrib)
    missing = required - have
    extra = have - required - optional
    assert not missing, f"<{el.tag}> lacks {sorted(missing)}"
    assert not extra, f"<{el.tag}> has attributes not in the schema: {sorted(extra)}"


def _sequence(el: ET.Element, pattern: str) -> None:
    tags = "".join(f"{child.tag} " for child in el)
    assert re.fullmatch(pattern, tags), f"<{el.tag}> children {tags!r} do not match {pattern!r}"


def _coded(el: ET.Element) -> None:
    _attrs(el, {"csd-code", "codeSystemName", "originalText"}, {"displayName"})
    assert len(el) == 0


def validate_audit_message(root: ET.Element) -> None:
    """Raise AssertionError unless ``root`` follows the PS3.15 A.5.1 schema."""
    assert root.tag == "AuditMessage", root.tag
    _attrs(root, set(), set())
    _sequence(root, r"EventIdentification (ActiveParticipant )+AuditSourceIdentification "
                    r"(ParticipantObjectIdentification )*")
    ev = root.find("EventIdentification")
    _attrs(ev, {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"})
    assert ev.get("EventActionCode", "C") in {"C", "R", "U", "D", "E"}
    assert ev.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    dt.datetime.fromisoformat(ev.get("EventDateTime").replace("Z", "+00:00"))
    _sequence(ev, r"EventID (EventTypeCode )*(EventOutcomeDescription )?")
    for child in ev:
        if child.tag != "EventOutcomeDescription":
            _coded(child)
    for ap in root.findall("ActiveParticipant"):
        _attrs(ap, {"UserID", "UserIsRequestor"}, {"AlternativeUserID", "UserName",
                                                  "NetworkAccessPointID",
                                                  "NetworkAccessPointTypeCode"})
        assert ap.get("UserIsRequestor") in _BOOL
        assert ap.get("NetworkAccessPointTypeCode", "1") in {"1", "2", "3", "4", "5"}
        _sequence(ap, r"(RoleIDCode )*(MediaIdentifier )?")
        for role in ap.findall("RoleIDCode"):
            _coded(role)
    src = root.find("AuditSourceIdentification")
    _attrs(src, {"AuditSourceID"}, {"AuditEnterpriseSiteID"})
    _sequence(src, r"(AuditSourceTypeCode )*")
    for code in src:
        _attrs(code, {"csd-code"}, {"codeSystemName", "displayName", "originalText"})
        if "codeSystemName" not in code.attrib:
            assert code.get("csd-code") in {str(i) for i in range(1, 10)}
    for obj in root.findall("ParticipantObjectIdentification"):
        _attrs(obj, {"ParticipantObjectID"}, {"ParticipantObjectTypeCode",
                                              "ParticipantObjectTypeCodeRole",
                                              "ParticipantObjectDataLifeCycle",
                                              "ParticipantObjectSensitivity"})
        assert obj.get("ParticipantObjectTypeCode", "1") in {"1", "2", "3", "4"}
        assert obj.get("ParticipantObjectTypeCodeRole", "1") in {str(i) for i in range(1, 27)}
        assert obj.get("ParticipantObjectDataLifeCycle", "1") in {str(i) for i in range(1, 16)}
        _sequence(obj, r"ParticipantObjectIDTypeCode (ParticipantObjectName |"
                       r"ParticipantObjectQuery )(ParticipantObjectDetail )*"
                       r"(ParticipantObjectDescription )*")
        _coded(obj.find("ParticipantObjectIDTypeCode"))
        for detail in obj.findall("ParticipantObjectDetail"):
            _attrs(detail, {"type", "value"}, set())
            base64.b64decode(detail.get("value"), validate=True)
        for desc in obj.findall("ParticipantObjectDescription"):
            _sequence(desc, r"(MPPS )*(Accession )*(SOPClass )*"
                            r"(ParticipantObjectContainsStudy )?(Encrypted )?(Anonymized )?")
            for sop in desc.findall("SOPClass"):
                _attrs(sop, {"NumberOfInstances"}, {"UID"})
                int(sop.get("NumberOfInstances"))
                _sequence(sop, r"(Instance )*")
                for inst in sop:
                    _attrs(inst, {"UID"}, set())


def details(obj: ET.Element) -> dict[str, str]:
    """ParticipantObjectDetail pairs of one participant object, decoded."""
    return {d.get("type"): base64.b64decode(d.get("value")).decode()
            for d in obj.findall("ParticipantObjectDetail")}


_SYSLOG = re.compile(rb"<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)", re.S)


def parse_syslog(record: bytes) -> tuple[dict, ET.Element]:
    """Parse an RFC 5424 record carrying an audit message: (header fields, XML root)."""
    m = _SYSLOG.fullmatch(record)
    assert m, record[:200]
    pri, ts, host, app, procid, msgid, sd, msg = m.groups()
    assert msg.startswith(A.BOM), "MSG must be UTF-8 with BOM"
    root = ET.fromstring(msg[len(A.BOM):])
    return ({"pri": int(pri), "timestamp": ts.decode(), "hostname": host.decode(),
             "app_name": app.decode(), "procid": procid.decode(), "msgid": msgid.decode(),
             "sd": sd.decode()}, root)


# --------------------------------------------------------------------------- builders

SRC = A.AuditSource("gw-test", "SITE1")


def test_application_activity_is_valid():
    root = A.application_activity(SRC, start=True, app_name="gw-test")
    validate_audit_message(root)
    assert root.find("EventIdentification/EventID").get("csd-code") == "110100"
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    assert root.find("EventIdentification").get("EventActionCode") == "E"
    assert root.find("ActiveParticipant/RoleIDCode").get("csd-code") == "110150"
    src = root.find("AuditSourceIdentification")
    assert src.get("AuditSourceID") == "gw-test" and src.get("AuditEnterpriseSiteID") == "SITE1"
    stop = A.application_activity(SRC, start=False, app_name="gw-test")
    assert stop.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"


def test_security_alert_is_valid():
    client = A.ae_participant("CT01", requestor=True, address="10.1.2.3", role=None,
                              user_name="CN=CT01,O=Evil")
    root = A.security_alert(SRC, alert_types=(A.TYPE_NODE_AUTHENTICATION,),
                            outcome=A.OUTCOME_MINOR, reporter="gw-test", subject_id="10.1.2.3",
                            description="route policy (chain) refused: unknown CA",
                            details={"route": "archive", "empty": ""}, others=[client])
    validate_audit_message(root)
    ev = root.find("EventIdentification")
    assert ev.find("EventID").get("csd-code") == "110113"
    assert ev.find("EventTypeCode").get("csd-code") == "110126"
    assert ev.get("EventOutcomeIndicator") == "4"
    obj = root.find("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectID") == "10.1.2.3"
    assert details(obj) == {"Alert Description": "route policy (chain) refused: unknown CA",
                            "route": "archive"}
    ap = root.findall("ActiveParticipant")[1]
    assert ap.get("AlternativeUserID") == "AETITLES=CT01"
    assert ap.get("NetworkAccessPointTypeCode") == "2"


def test_instances_transferred_is_valid():
    parts = [A.ae_participant("CT01", requestor=True, address="127.0.0.1",
                              role=A.ROLE_SOURCE),
             A.ae_participant("ARCHIVE", requestor=False, address="pacs.local",
                              role=A.ROLE_DESTINATION)]
    root = A.instances_transferred(
        SRC, participants=parts, outcome=A.OUTCOME_SUCCESS,
        classes={"1.2.840.10008.5.1.4.1.1.2": (3, ["1.2.3", "1.2.4"])},
        sop_class_names=lambda uid: "CT Image Storage")
    validate_audit_message(root)
    assert root.find("EventIdentification/EventID").get("csd-code") == "110104"
    roles = [ap.find("RoleIDCode").get("csd-code") for ap in root.findall("ActiveParticipant")]
    assert roles == ["110153", "110152"]
    assert root.findall("ActiveParticipant")[1].get("NetworkAccessPointTypeCode") == "1"
    sop = root.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert sop.get("NumberOfInstances") == "3"
    assert [i.get("UID") for i in sop] == ["1.2.3", "1.2.4"]


def test_syslog_framing():
    xml = A.to_xml(A.application_activity(SRC, start=True, app_name="gw test"))
    record = A.syslog_message(xml, app_name="gw test", hostname="host one")
    header, root = parse_syslog(record)
    assert header["pri"] == 10 * 8 + 5
    assert header["app_name"] == "gwtest" and header["hostname"] == "hostone"
    assert header["msgid"] == "IHE+RFC-3881" and header["sd"] == "-"
    assert header["timestamp"].endswith("Z")
    validate_audit_message(root)
    framed = A.octet_count(record)
    n, _, rest = framed.partition(b" ")
    assert int(n) == len(rest) == len(record)


def test_host_of():
    assert A.host_of("10.0.0.5:40000") == "10.0.0.5"
    assert A.host_of("[::1]:104") == "::1"
    assert A.host_of("pacs.local:104") == "pacs.local"
    assert A.host_of(None) is None


# --------------------------------------------------------------------------- the trail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_udp_trail_delivers():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    sent = []

    async def main():
        trail = A.AuditTrail(AuditSettings(transport="udp", host="127.0.0.1", port=port),
                             on_sent=lambda: sent.append(1))
        async with trio.open_nursery() as n:
            n.start_soon(trail.run)
            trail.submit(A.application_activity(trail.source, start=True, app_name="x"))
            await trail.flush(5)
            n.cancel_scope.cancel()

    trio.run(main)
    _, root = parse_syslog(rx.recv(65536))
    rx.close()
    validate_audit_message(root)
    assert sent == [1]


def test_dead_tls_repository_drops_without_blocking(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("")  # never loaded for real: the connection is refused first
    dropped: list[str] = []

    async def main():
        settings = AuditSettings(transport="tls", host="127.0.0.1", port=_free_port(),
                                 queue_size=2)
        trail = A.AuditTrail(settings, on_dropped=dropped.append)
        trail.BACKOFF = (0.01, 0.02)
        async with trio.open_nursery() as n:
            n.start_soon(trail.run)
            t0 = trio.current_time()
            for _ in range(20):
                trail.submit(A.application_activity(trail.source, start=True, app_name="x"))
            # submit() never waits, whatever the repository does.
            assert trio.current_time() - t0 < 0.5
            await trio.sleep(0.5)
            n.cancel_scope.cancel()
        return trail

    trail = trio.run(main)
    assert dropped.count("queue_full") >= 17
    assert "send_failed" in dropped
    assert trail.sent == 0


def test_file_trail(tmp_path: Path):
    path = tmp_path / "audit.log"

    async def main():
        trail = A.AuditTrail(AuditSettings(transport="file", path=path))
        async with trio.open_nursery() as n:
            n.start_soon(trail.run)
            for start in (True, False):
                trail.submit(A.application_activity(trail.source, start=start, app_name="x"))
            await trail.flush(5)
            n.cancel_scope.cancel()

    trio.run(main)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    for line in lines:
        validate_audit_message(parse_syslog(line)[1])


def test_bad_audit_ca_refuses_the_config_not_the_running_gateway(tmp_path: Path) -> None:
    # The audit TLS context used to be built first in the sender task, after the
    # gateway was listening: a bad CA there ended the process with a traceback
    # (and `check` said OK). build_runtime now refuses it like any other file.
    (tmp_path / "ca.pem").write_text("not a pem\n")
    (tmp_path / "gw.toml").write_text(
        '[audit]\ntransport = "tls"\naddress = "127.0.0.1:6514"\nca = "ca.pem"\n'
        '[[listener]]\nname = "plain"\nlisten = "127.0.0.1:11112"\n'
        '[[route]]\nname = "r"\ncalled_ae = "ARCHIVE"\n'
        'backend = { host = "127.0.0.1", port = 104 }\n')
    with pytest.raises(ConfigError, match=r"\[audit\]: ca .*ca\.pem"):
        build_runtime(load_config(tmp_path / "gw.toml"))
