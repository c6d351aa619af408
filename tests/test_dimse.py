"""DimseInspector: PDV walking across arbitrary chunk boundaries, command-set decoding."""

from __future__ import annotations

import random
import struct
from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from gateway.dul.dimse import (
    DimseInspector,
    DimseMessage,
    decode_command_set,
    sop_class_name,
    status_class,
)
from gateway.dul.tracker import PDUTracker

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
FIND = "1.2.840.10008.5.1.4.1.2.1.1"


def command(**elements) -> bytes:
    """A command set as SCUs put it on the wire: group 0000, implicit VR LE, with
    CommandGroupLength first."""
    ds = Dataset()
    for k, v in elements.items():
        setattr(ds, k, v)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    raw = body.getvalue()
    return struct.pack("<HHLL", 0, 0, 4, len(raw)) + raw


def store_rq(msg_id: int = 1, iuid: str = "1.2.3.4.5") -> bytes:
    return command(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=msg_id, Priority=0,
                   CommandDataSetType=0x0000, AffectedSOPInstanceUID=iuid)


def store_rsp(msg_id: int = 1, iuid: str = "1.2.3.4.5", status: int = 0) -> bytes:
    return command(AffectedSOPClassUID=CT, CommandField=0x8001,
                   MessageIDBeingRespondedTo=msg_id, CommandDataSetType=0x0101, Status=status,
                   AffectedSOPInstanceUID=iuid)


def pdv(ctx: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, ctx, control) + fragment


def pdata(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBL", 4, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBL", 5, 0, 4) + b"\0" * 4


def store_stream(n: int = 3, data_size: int = 40_000, max_fragment: int = 16_000) -> bytes:
    """n C-STOREs: command in one PDV, data split into PDVs of <= max_fragment, one per PDU."""
    out = []
    for i in range(1, n + 1):
        out.append(pdata(pdv(1, 0b11, store_rq(i, f"1.2.3.{i}"))))
        data = bytes([i % 256]) * data_size
        frags = [data[j : j + max_fragment] for j in range(0, len(data), max_fragment)]
        for k, f in enumerate(frags):
            out.append(pdata(pdv(1, 0b10 if k == len(frags) - 1 else 0b00, f)))
    out.append(RELEASE_RQ)
    return b"".join(out)


def run(stream: bytes, splits) -> tuple[DimseInspector, list[DimseMessage], list[str]]:
    msgs: list[DimseMessage] = []
    errors: list[str] = []
    ins = DimseInspector(on_message=msgs.append, on_error=errors.append)
    pos = 0
    for cut in [*splits, len(stream)]:
        ins.feed(stream[pos:cut])
        pos = cut
    return ins, msgs, errors


def chunkings(stream: bytes):
    yield "whole", []
    yield "bytewise", list(range(1, len(stream)))
    rnd = random.Random(5)
    yield "random", sorted(rnd.sample(range(1, len(stream)), min(200, len(stream) // 2)))


@pytest.mark.parametrize("name", ["whole", "bytewise", "random"])
def test_store_messages_across_chunkings(name):
    stream = store_stream(3, data_size=5_000, max_fragment=2_000)
    splits = dict(chunkings(stream))[name]
    ins, msgs, errors = run(stream, splits)
    assert errors == []
    assert [m.command for m in msgs] == ["C-STORE-RQ"] * 3
    assert [m.message_id for m in msgs] == [1, 2, 3]
    assert msgs[0].affected_sop_instance_uid == "1.2.3.1"
    assert msgs[0].sop_class_name == "CT Image Storage"
    assert msgs[0].has_data_set and msgs[0].context_id == 1
    assert ins.seen_release_rq and ins.at_boundary and ins.messages == 3


def test_response_status_and_class():
    stream = pdata(pdv(3, 0b11, store_rsp(7, "1.2.9", 0xB000)))
    _, msgs, _ = run(stream, [])
    (m,) = msgs
    assert m.command == "C-STORE-RSP" and m.is_response
    assert m.message_id_being_responded_to == 7
    assert m.status == 0xB000 and m.status_hex == "0xB000" and m.status_class == "warning"
    assert not m.has_data_set and m.context_id == 3


def test_command_split_over_fragments_and_pdus():
    cmd = store_rq(9)
    a, b, c = cmd[:10], cmd[10:50], cmd[50:]
    stream = pdata(pdv(1, 0b01, a), pdv(1, 0b01, b)) + pdata(pdv(1, 0b11, c)) + \
        pdata(pdv(1, 0b10, b"x" * 100))
    for name, splits in chunkings(stream):
        _, msgs, errors = run(stream, splits)
        assert errors == [], name
        assert [m.message_id for m in msgs] == [9], name


def test_empty_last_command_fragment_completes():
    cmd = store_rq(4)
    stream = pdata(pdv(1, 0b01, cmd), pdv(1, 0b11, b""))
    _, msgs, _ = run(stream, [])
    assert [m.message_id for m in msgs] == [4]


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        ({"AffectedSOPClassUID": VERIFICATION, "CommandField": 0x0030, "MessageID": 1,
          "CommandDataSetType": 0x0101}, ("C-ECHO-RQ", "Verification SOP Class", None)),
        ({"AffectedSOPClassUID": FIND, "CommandField": 0x8020, "MessageIDBeingRespondedTo": 5,
          "CommandDataSetType": 0x0000, "Status": 0xFF00},
         ("C-FIND-RSP", "Patient Root Query/Retrieve Information Model - FIND", 0xFF00)),
        ({"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.1.2", "CommandField": 0x0021,
          "MessageID": 2, "MoveDestination": "MODALITY", "Priority": 0,
          "CommandDataSetType": 0x0000},
         ("C-MOVE-RQ", "Patient Root Query/Retrieve Information Model - MOVE", None)),
        ({"RequestedSOPClassUID": "1.2.840.10008.1.20.1", "CommandField": 0x0130,
          "MessageID": 3, "RequestedSOPInstanceUID": "1.2.840.10008.1.20.1.1",
          "ActionTypeID": 1, "CommandDataSetType": 0x0000},
         ("N-ACTION-RQ", "Storage Commitment Push Model SOP Class", None)),
    ],
)
def test_decode_matches_pydicom(elements, expected):
    raw = command(**elements)
    m = decode_command_set(raw, context_id=1)
    ref = read_dataset(BytesIO(raw), True, True)
    assert (m.command, m.sop_class_name, m.status) == expected
    assert m.command_field == ref.CommandField
    assert m.message_id == ref.get("MessageID")
    assert m.message_id_being_responded_to == ref.get("MessageIDBeingRespondedTo")
    assert m.affected_sop_class_uid == (ref.get("AffectedSOPClassUID")
                                        or ref.get("RequestedSOPClassUID"))
    assert m.affected_sop_instance_uid == (ref.get("AffectedSOPInstanceUID")
                                           or ref.get("RequestedSOPInstanceUID"))
    if "MoveDestination" in elements:
        assert m.move_destination == ref.MoveDestination.strip()


def test_status_classes():
    assert [status_class(s) for s in (0, 0xFF00, 0xFF01, 0xFE00, 0x0107, 0xB007, 0xA700,
                                      0xC000, 0x0122, None)] == [
        "success", "pending", "pending", "cancel", "warning", "warning", "failure",
        "failure", "failure", None]
    assert sop_class_name("1.2.3.999") == "1.2.3.999"
    assert sop_class_name(None) is None


def test_malformed_pdv_length_disables_dimse_but_keeps_tracking():
    bad = struct.pack(">BBL", 4, 0, 10) + struct.pack(">LBB", 500, 1, 3) + b"abcd"
    stream = bad + pdata(pdv(1, 0b11, store_rq(2))) + RELEASE_RQ
    for name, splits in chunkings(stream):
        ins, msgs, errors = run(stream, splits)
        assert msgs == [], name
        assert len(errors) == 1 and "does not fit" in errors[0], name
        assert ins.seen_release_rq and ins.at_boundary and not ins.broken, name
        assert ins.pdus == 3


def test_undecodable_command_set_reported_once():
    junk = struct.pack("<HHL", 8, 0x10, 2) + b"ab"  # group 0008 in a command set
    stream = pdata(pdv(1, 0b11, junk)) + pdata(pdv(1, 0b11, junk)) + RELEASE_RQ
    ins, msgs, errors = run(stream, [])
    assert msgs == [] and len(errors) == 1 and "group 0000" in errors[0]
    assert ins.seen_release_rq


def test_oversized_command_set_is_refused():
    big = b"\0" * 70_000
    stream = pdata(pdv(1, 0b01, big)) + RELEASE_RQ
    ins, msgs, errors = run(stream, [1000, 50_000])
    assert msgs == [] and errors and "larger" in errors[0]
    assert ins.seen_release_rq


def test_command_split_across_two_contexts_disables_dimse_but_keeps_tracking():
    # Used to raise TypeError out of feed() (and so out of the relay).
    cmd = store_rq()
    stream = pdata(pdv(1, 0b01, cmd[:10])) + pdata(pdv(3, 0b11, cmd[10:])) + RELEASE_RQ
    for name, splits in chunkings(stream):
        ins, msgs, errors = run(stream, splits)
        assert msgs == [], name
        assert len(errors) == 1 and "two presentation contexts" in errors[0], name
        assert ins.seen_release_rq and ins.at_boundary and not ins.broken, name
        assert ins.pdus == 3


def test_unknown_pdu_type_breaks_like_tracker():
    ins, msgs, _ = run(pdata(pdv(1, 0b11, store_rq())) + b"\x09\x00\x00\x00\x00\x01x", [])
    assert ins.broken and len(msgs) == 1


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_same_pdu_view_as_tracker(data):
    n = data.draw(st.integers(1, 4))
    stream = store_stream(n, data_size=data.draw(st.integers(0, 3000)),
                          max_fragment=data.draw(st.integers(1, 1500)))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=30))))
    ins, msgs, errors = run(stream, cuts)
    ref = PDUTracker()
    pos = 0
    for cut in [*cuts, len(stream)]:
        ref.feed(memoryview(stream)[pos:cut])
        pos = cut
    assert errors == []
    assert len(msgs) == n
    for attr in ("at_boundary", "pdus", "last_type", "seen_release_rq", "seen_release_rp",
                 "seen_abort", "broken", "remaining"):
        assert getattr(ins, attr) == getattr(ref, attr), attr
