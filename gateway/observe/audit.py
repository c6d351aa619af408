"""DICOM audit trail: PS3.15 A.5 audit messages, RFC 5424 syslog, UDP / TLS / file.

Three layers, top to bottom:

* builders (pure): ``application_activity``, ``security_alert``,
  ``instances_transferred`` return an ``xml.etree`` ``AuditMessage`` element
  shaped by the PS3.15 A.5.1 schema (coded values carry ``csd-code``,
  ``codeSystemName`` and ``originalText``);
* framing (pure): ``syslog_message`` wraps the XML in an RFC 5424 record
  (facility 10 security/authorization, severity 5 notice, MSGID
  ``IHE+RFC-3881``, UTF-8 BOM -- as IHE ATNA specifies), and
  ``octet_count`` adds RFC 5425/6587 octet-counting framing for TLS;
* ``AuditTrail``: a bounded trio memory channel and one sender task.  ``submit``
  never blocks and never raises: when the repository is gone and the queue is
  full, messages are dropped, counted and logged -- DICOM traffic is never held
  up by auditing.

What the gateway can and cannot say: it decodes only DIMSE command sets, so
"DICOM Instances Transferred" lists SOP classes and instance UIDs but not the
Study Instance UID or the patient, which live in the data sets it does not
parse.  The participant objects are therefore one per SOP class (ID type
(110181, DCM, "SOP Class UID")) carrying the instances, not the standard's
Study and Patient objects.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import ipaddress
import os
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from ..config import AuditSettings, read_key_password
from ..errors import ConfigError

__all__ = ["AuditSource", "AuditTrail", "Code", "Participant", "application_activity",
           "instances_transferred", "octet_count", "security_alert", "syslog_message", "to_xml"]

log = structlog.get_logger("gateway")


@dataclass(frozen=True)
class Code:
    """A coded value (PS3.15 A.5.1 CodedValueType)."""

    code: str
    system: str
    meaning: str

    def element(self, tag: str) -> ET.Element:
        """The XML element ``tag`` carrying this code."""
        return ET.Element(tag, {"csd-code": self.code, "codeSystemName": self.system,
                                "originalText": self.meaning})


# PS3.16 CID 400-403 / PS3.15 A.5.3 codes.
EV_APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
EV_INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
EV_SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
TYPE_APPLICATION_START = Code("110120", "DCM", "Application Start")
TYPE_APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
TYPE_NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
TYPE_NETWORK_CONFIGURATION = Code("110128", "DCM", "Network Configuration")
TYPE_SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
ID_SOP_CLASS = Code("110181", "DCM", "SOP Class UID")
ID_NODE = Code("110182", "DCM", "Node ID")

OUTCOME_SUCCESS, OUTCOME_MINOR, OUTCOME_SERIOUS, OUTCOME_MAJOR = "0", "4", "8", "12"

#: Instances listed in one message, so a UDP datagram stays deliverable.
MAX_INSTANCES = 200


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who reports (``[audit] source_id``, site)."""

    source_id: str
    enterprise_site_id: str | None = None


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant."""

    user_id: str
    requestor: bool
    alternative_user_id: str | None = None
    user_name: str | None = None
    address: str | None = None  # IP address or host name
    roles: tuple[Code, ...] = ()

    def element(self) -> ET.Element:
        """The ActiveParticipant element."""
        attrs = {"UserID": self.user_id, "UserIsRequestor": "true" if self.requestor else "false"}
        if self.alternative_user_id:
            attrs["AlternativeUserID"] = self.alternative_user_id
        if self.user_name:
            attrs["UserName"] = self.user_name
        if self.address:
            attrs["NetworkAccessPointID"] = self.address
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(self.address) else "1"
        el = ET.Element("ActiveParticipant", attrs)
        for role in self.roles:
            el.append(role.element("RoleIDCode"))
        return el


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_of(peer: str | None) -> str | None:
    """``"10.0.0.5:40000"`` / ``"[::1]:104"`` -> the address part."""
    if not peer:
        return None
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or peer.startswith("[") else peer
    return host.strip("[]")


def ae_participant(ae: str | None, *, requestor: bool, address: str | None,
                   role: Code | None, user_name: str | None = None) -> Participant:
    """A DICOM application entity as a participant (AE title as PS3.15 A.5.2.2 spells it)."""
    ae = ae or "unknown"
    return Participant(user_id=ae, requestor=requestor, alternative_user_id=f"AETITLES={ae}",
                       user_name=user_name, address=address,
                       roles=(role,) if role else ())


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _message(event: Code, action: str, outcome: str, participants: Sequence[Participant],
             source: AuditSource, *, types: Sequence[Code] = (),
             description: str | None = None, when: str | None = None) -> ET.Element:
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": when or _now(),
        "EventOutcomeIndicator": outcome})
    ev.append(event.element("EventID"))
    for t in types:
        ev.append(t.element("EventTypeCode"))
    if description:
        ET.SubElement(ev, "EventOutcomeDescription").text = description
    for p in participants:
        root.append(p.element())
    src_attrs = {"AuditSourceID": source.source_id}
    if source.enterprise_site_id:
        src_attrs["AuditEnterpriseSiteID"] = source.enterprise_site_id
    src = ET.SubElement(root, "AuditSourceIdentification", src_attrs)
    # 4: application server process (the gateway is a network application).
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})
    return root


def _detail(parent: ET.Element, kind: str, value: str) -> None:
    # ValuePair values are base64 (A.5.1): details may hold anything a peer sent.
    ET.SubElement(parent, "ParticipantObjectDetail",
                  {"type": kind, "value": base64.b64encode(value.encode()).decode("ascii")})


def application_activity(source: AuditSource, *, start: bool, app_name: str,
                         outcome: str = OUTCOME_SUCCESS, when: str | None = None
                         ) -> ET.Element:
    """A.5.3.1 Application Activity: the gateway started or stopped."""
    app = Participant(user_id=app_name, requestor=False, alternative_user_id=f"PID={os.getpid()}",
                      address=socket.gethostname(), roles=(ROLE_APPLICATION,))
    return _message(EV_APPLICATION_ACTIVITY, "E", outcome, [app], source,
                    types=[TYPE_APPLICATION_START if start else TYPE_APPLICATION_STOP],
                    when=when)


def security_alert(source: AuditSource, *, alert_types: Sequence[Code], outcome: str,
                   reporter: str,
                   subject_id: str, description: str, details: dict[str, str] | None = None,
                   others: Sequence[Participant] = (), when: str | None = None) -> ET.Element:
    """A.5.3.11 Security Alert: node authentication, network/security configuration.

    ``subject_id`` names the alert subject (a node or the configuration file);
    ``description`` goes into EventOutcomeDescription and the
    "Alert Description" detail; ``details`` are more type/value pairs.
    """
    me = Participant(user_id=reporter, requestor=False, address=socket.gethostname(),
                     roles=(ROLE_APPLICATION,))
    root = _message(EV_SECURITY_ALERT, "E", outcome, [me, *others], source,
                    types=alert_types, description=description, when=when)
    obj = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": subject_id, "ParticipantObjectTypeCode": "2"})
    obj.append(ID_NODE.element("ParticipantObjectIDTypeCode"))
    ET.SubElement(obj, "ParticipantObjectName").text = subject_id
    _detail(obj, "Alert Description", description)
    for k, v in (details or {}).items():
        if v:
            _detail(obj, k, v)
    return root


def instances_transferred(source: AuditSource, *, participants: Sequence[Participant],
                          classes: dict[str, tuple[int, Sequence[str]]], outcome: str,
                          description: str | None = None, details: dict[str, str] | None = None,
                          sop_class_names: Callable[[str], str | None] | None = None,
                          when: str | None = None) -> ET.Element:
    """A.5.3.7 DICOM Instances Transferred (reported by the relaying gateway).

    ``classes`` maps each SOP class UID to (number of instances, the instance
    UIDs to list); the caller bounds the lists (``MAX_INSTANCES`` in total keeps
    a UDP datagram deliverable) while NumberOfInstances counts them all.
    Action "R": the gateway neither creates nor updates the instances, it
    relays them, which is what a sending node reports.
    """
    root = _message(EV_INSTANCES_TRANSFERRED, "R", outcome, participants, source,
                    description=description, when=when)
    for sop_class, (count, uids) in classes.items():
        obj = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": sop_class, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        obj.append(ID_SOP_CLASS.element("ParticipantObjectIDTypeCode"))
        name = sop_class_names(sop_class) if sop_class_names else None
        ET.SubElement(obj, "ParticipantObjectName").text = name or sop_class
        for k, v in (details or {}).items():
            if v:
                _detail(obj, k, v)
        desc = ET.SubElement(obj, "ParticipantObjectDescription")
        sop = ET.SubElement(desc, "SOPClass", {"UID": sop_class,
                                                "NumberOfInstances": str(count)})
        for iuid in uids:
            ET.SubElement(sop, "Instance", {"UID": iuid})
    return root


def to_xml(message: ET.Element) -> bytes:
    """Serialise an AuditMessage (UTF-8, with XML declaration, one line)."""
    return ET.tostring(message, encoding="utf-8", xml_declaration=True).replace(b"\n", b"")


# --------------------------------------------------------------------------- syslog

_FACILITY_AUTHPRIV = 10  # RFC 5424 "security/authorization messages"
_SEVERITY_NOTICE = 5
_SEVERITY_WARNING = 4
BOM = b"\xef\xbb\xbf"


def syslog_message(xml: bytes, *, app_name: str, hostname: str | None = None,
                   warning: bool = False, when: _dt.datetime | None = None) -> bytes:
    """An RFC 5424 record carrying ``xml`` as its UTF-8 MSG (with BOM)."""
    pri = _FACILITY_AUTHPRIV * 8 + (_SEVERITY_WARNING if warning else _SEVERITY_NOTICE)
    ts = (when or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="milliseconds")
    ts = ts.replace("+00:00", "Z")
    host = _field(hostname or socket.gethostname(), 255)
    header = f"<{pri}>1 {ts} {host} {_field(app_name, 48)} {os.getpid()} IHE+RFC-3881 - "
    return header.encode("ascii") + BOM + xml


def _field(text: str, limit: int) -> str:
    # RFC 5424 header fields are PRINTUSASCII without spaces; "-" is NILVALUE.
    cleaned = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def octet_count(record: bytes) -> bytes:
    """RFC 5425 §4.3 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(record)).encode("ascii") + b" " + record


# --------------------------------------------------------------------------- senders


class _Sender:
    async def send(self, record: bytes) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release the connection or file, if any."""


class _UDPSender(_Sender):
    """RFC 5426: one record per datagram; loss is accepted by the transport's design."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: trio.socket.SocketType | None = None

    async def send(self, record: bytes) -> None:
        if self.sock is None:
            infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            family, _, _, _, addr = infos[0]
            self.sock = trio.socket.socket(family, socket.SOCK_DGRAM)
            await self.sock.connect(addr)
        await self.sock.send(record)

    async def aclose(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _TLSSender(_Sender):
    """RFC 5425: syslog over TLS with octet counting, its own trust settings."""

    def __init__(self, settings: AuditSettings, connect_timeout: float = 5.0) -> None:
        assert settings.host is not None and settings.port is not None
        self.host, self.port = settings.host, settings.port
        # Built when the config is loaded (server.build_runtime), so a bad file is
        # a ConfigError naming the key there, not a crash of the running sender.
        try:
            ctx = ssl.create_default_context(cafile=str(settings.ca) if settings.ca else None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"[audit]: ca {settings.ca}: cannot use it as a CA bundle "
                              f"({exc})") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.certificate is not None:
            c = settings.certificate
            try:
                ctx.load_cert_chain(str(c.cert), str(c.key) if c.key else None,
                                    password=read_key_password(c, os.environ.get))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"[audit]: cert {c.cert}: cannot load the certificate "
                                  f"and key ({exc})") from None
        self.server_name = settings.server_name or settings.host
        self.context = ctx
        self.timeout = connect_timeout
        self.stream: trio.SSLStream | None = None

    async def _connect(self) -> trio.SSLStream:
        with trio.fail_after(self.timeout):
            tcp = await trio.open_tcp_stream(self.host, self.port)
            stream = trio.SSLStream(tcp, self.context, server_hostname=self.server_name)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream

    async def send(self, record: bytes) -> None:
        if self.stream is None:
            self.stream = await self._connect()
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(octet_count(record))
        except BaseException:
            stream, self.stream = self.stream, None
            await trio.aclose_forcefully(stream)
            raise

    async def aclose(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await trio.aclose_forcefully(stream)


class _FileSender(_Sender):
    """One RFC 5424 record per line, appended (for a local collector to pick up)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, record: bytes) -> None:
        line = record.replace(b"\n", b" ") + b"\n"

        def write() -> None:
            with open(self.path, "ab") as fh:
                fh.write(line)

        await trio.to_thread.run_sync(write)


def make_sender(settings: AuditSettings) -> _Sender | None:
    """The sender for ``[audit] transport`` (None when auditing is off)."""
    if settings.transport == "udp":
        assert settings.host is not None and settings.port is not None
        return _UDPSender(settings.host, settings.port)
    if settings.transport == "tls":
        return _TLSSender(settings)
    if settings.transport == "file":
        assert settings.path is not None
        return _FileSender(settings.path)
    return None


class AuditTrail:
    """Bounded queue + one sender task.  ``submit`` never blocks, never raises."""

    #: Reconnect backoff (s): first retry, cap.
    BACKOFF = (0.5, 30.0)
    #: Attempts per message before it is dropped (the queue must keep moving
    #: even if one record is undeliverable, e.g. too large for a datagram).
    ATTEMPTS = 3

    def __init__(self, settings: AuditSettings, *,
                 on_sent: Callable[[], None] | None = None,
                 on_dropped: Callable[[str], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.source = AuditSource(settings.source_id, settings.enterprise_site_id)
        self.enabled = settings.transport != "off"
        self._send_ch, self._recv_ch = trio.open_memory_channel[tuple[bytes, bool]](
            settings.queue_size)
        self.on_sent = on_sent or (lambda: None)
        self.on_dropped = on_dropped or (lambda reason: None)
        self.on_queue = on_queue or (lambda n: None)
        self.dropped = 0
        self.sent = 0

    def submit(self, message: ET.Element, *, warning: bool = False) -> None:
        """Queue one audit message; drop (counted, logged) when the queue is full."""
        if not self.enabled:
            return
        try:
            record = syslog_message(to_xml(message), app_name=self.source.source_id,
                                    warning=warning)
            self._send_ch.send_nowait((record, warning))
        except trio.WouldBlock:
            self._drop("queue_full")
            return
        except Exception:
            log.exception("audit.build_failed")
            return
        self.on_queue(self._send_ch.statistics().current_buffer_used)

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self.on_dropped(reason)
        # Log the first drop and then every 100th: a dead repository must not
        # turn into a log flood either.
        if self.dropped == 1 or self.dropped % 100 == 0:
            log.warning("audit.dropped", reason=reason, dropped_total=self.dropped,
                        transport=self.settings.transport, queue_size=self.settings.queue_size)

    async def run(self) -> None:
        """Send queued records until cancelled, reconnecting with backoff."""
        sender = make_sender(self.settings)
        if sender is None:
            return
        delay = self.BACKOFF[0]
        try:
            async for record, _warning in self._recv_ch:
                self.on_queue(self._recv_ch.statistics().current_buffer_used)
                for attempt in range(1, self.ATTEMPTS + 1):
                    try:
                        await sender.send(record)
                    except (OSError, trio.TooSlowError, trio.BrokenResourceError,
                            trio.ClosedResourceError, ssl.SSLError) as exc:
                        if attempt == 1 or delay >= self.BACKOFF[1]:
                            log.warning("audit.send_failed", transport=self.settings.transport,
                                        error=str(exc) or type(exc).__name__,
                                        retry_in_s=delay)
                        if attempt == self.ATTEMPTS:
                            self._drop("send_failed")
                            break
                        await trio.sleep(delay)
                        delay = min(delay * 2, self.BACKOFF[1])
                        continue
                    delay = self.BACKOFF[0]
                    self.sent += 1
                    self.on_sent()
                    break
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await sender.aclose()

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the queue to empty (on shutdown)."""
        with trio.move_on_after(timeout):
            while self._send_ch.statistics().current_buffer_used:
                await trio.sleep(0.02)
            await trio.sleep(0.05)  # the record in flight


def describe(fields: dict[str, Any], *keys: str) -> dict[str, str]:
    """Pick ``keys`` from an event's fields as strings (for participant-object details)."""
    return {k: str(fields[k]) for k in keys if fields.get(k) not in (None, "")}
