"""The PDU codec: item by item, real captures, exact round trips, malformed input.

Wire bytes are written out with the decoded meaning beside them, in the style of
pynetdicom's own tests.  Offsets in comments count from 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dul.codec import (
    AbortReason,
    AbortSource,
    PDUType,
    RejectReason,
    RejectReasonPresentation,
    RejectReasonUser,
    RejectResult,
    RejectSource,
    decode_pdu,
    describe_abort,
    describe_reject,
    encode_abort,
    encode_pdu,
    encode_reject,
)
from gateway.dul.pdus import (
    PDV,
    Abort,
    ApplicationContextItem,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsynchronousOperationsWindow,
    ImplementationClassUID,
    ImplementationVersionName,
    MaximumLength,
    PDataTF,
    PresentationContextACItem,
    PresentationContextRQItem,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UnknownItem,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformationItem,
)
from gateway.errors import ProtocolError

H = bytes.fromhex

# ------------------------------------------------------------------ real captures

# A-ASSOCIATE-RQ sent by DCMTK 3.6.7 `echoscu -aet CT01 -aec ARCHIVE`, captured
# from the socket.  Note DCMTK's 0xFF in the presentation context's reserved
# byte 6 (the AC's result position): it must survive a round trip.
DCMTK_ECHOSCU_RQ = b"".join(
    [
        H("01 00 000000cd"),  # A-ASSOCIATE-RQ, reserved, PDU length 205
        H("0001 0000"),  # protocol version 1, reserved
        b"ARCHIVE         ",  # Called AE (offset 10)
        b"CT01            ",  # Calling AE (offset 26)
        bytes(32),  # reserved (offset 42)
        H("10 00 0015"),  # application context item, length 21
        b"1.2.840.10008.3.1.1.1",  # DICOM application context name
        H("20 00 002e"),  # presentation context item (RQ), length 46
        H("01 00 ff 00"),  # context ID 1, reserved, reserved (0xFF!), reserved
        H("30 00 0011"),  # abstract syntax sub-item, length 17
        b"1.2.840.10008.1.1",  # Verification SOP class
        H("40 00 0011"),  # transfer syntax sub-item, length 17
        b"1.2.840.10008.1.2",  # Implicit VR Little Endian
        H("50 00 003a"),  # user information item, length 58
        H("51 00 0004 00004000"),  # maximum length 16384
        H("52 00 001b"),  # implementation class UID, length 27
        b"1.2.276.0.7230010.3.0.3.6.7",
        H("55 00 000f"),  # implementation version name, length 15
        b"OFFIS_DCMTK_367",
    ]
)

# A-ASSOCIATE-RQ sent by pynetdicom 3.0.4 (AE "PYN_SCU" → "ARCHIVE") with five
# presentation contexts (1 Verification, 3 CT storage, 5 MR storage with JPEG
# baseline only, 7 and 9 Q/R), and user information carrying maximum length
# 16382, implementation class UID and version name, role selection (CT storage,
# SCP role), asynchronous operations window 5/3, user identity (username and
# passcode "alice"/"s3cret", positive response requested), SOP class extended
# negotiation and SOP class common extended negotiation.
PYNETDICOM_RQ = H(
    "010000000364000100004152434849564520202020202020202050594e5f534355202020202020202020"
    "000000000000000000000000000000000000000000000000000000000000000010000015312e322e3834"
    "302e31303030382e332e312e312e31200000760100000030000011312e322e3834302e31303030382e31"
    "2e3140000011312e322e3834302e31303030382e312e3240000013312e322e3834302e31303030382e31"
    "2e322e3140000016312e322e3834302e31303030382e312e322e312e393940000013312e322e3834302e"
    "31303030382e312e322e322000004d0300000030000019312e322e3834302e31303030382e352e312e34"
    "2e312e312e3240000013312e322e3834302e31303030382e312e322e3140000011312e322e3834302e31"
    "303030382e312e322000003b0500000030000019312e322e3834302e31303030382e352e312e342e312e"
    "312e3440000016312e322e3834302e31303030382e312e322e342e353020000080070000003000001b31"
    "2e322e3834302e31303030382e352e312e342e312e322e322e3340000011312e322e3834302e31303030"
    "382e312e3240000013312e322e3834302e31303030382e312e322e3140000016312e322e3834302e3130"
    "3030382e312e322e312e393940000013312e322e3834302e31303030382e312e322e3220000080090000"
    "003000001b312e322e3834302e31303030382e352e312e342e312e322e322e3140000011312e322e3834"
    "302e31303030382e312e3240000013312e322e3834302e31303030382e312e322e3140000016312e322e"
    "3834302e31303030382e312e322e312e393940000013312e322e3834302e31303030382e312e322e3250"
    "0000f15100000400003ffe52000020312e322e3832362e302e312e333638303034332e392e333831312e"
    "332e302e345500000e50594e45544449434f4d5f3330345400001d0019312e322e3834302e3130303038"
    "2e352e312e342e312e312e32000153000004000500035800001102010005616c69636500067333637265"
    "7456000020001b312e322e3834302e31303030382e352e312e342e312e322e322e310101015700004d00"
    "19312e322e3834302e31303030382e352e312e342e312e312e340011312e322e3834302e31303030382e"
    "342e32001d001b312e322e3834302e31303030382e352e312e342e312e312e342e31"
)

# The A-ASSOCIATE-AC a pynetdicom 3.0.4 SCP ("ARCHIVE") answered PYNETDICOM_RQ
# with: contexts 1 and 3 accepted, 5 rejected (4, transfer syntaxes not
# supported), 7 and 9 rejected (3, abstract syntax not supported); user
# information echoes the role selection (SCU 0, SCP 1).
PYNETDICOM_AC = H(
    "020000000156000100004152434849564520202020202020202050594e5f5343552020202020202020"
    "2000000000000000000000000000000000000000000000000000000000000000001000001531"
    "2e322e3834302e31303030382e332e312e312e31210000190100000040000011312e322e3834"
    "302e31303030382e312e32210000190300000040000011312e322e3834302e31303030382e31"
    "2e322100001e0500040040000016312e322e3834302e31303030382e312e322e342e35302100"
    "00190700030040000011312e322e3834302e31303030382e312e322100001909000300400000"
    "11312e322e3834302e31303030382e312e325000005f5100000400003ffe5200002031"
    "2e322e3832362e302e312e333638303034332e392e333831312e332e302e345500000e50594e"
    "45544449434f4d5f3330345400001d0019312e322e3834302e31303030382e352e312e342e31"
    "2e312e320001"
)

# The A-ASSOCIATE-RJ a pynetdicom SCP with require_called_aet sent back:
# permanent (1), service user (1), called AE title not recognized (7).
PYNETDICOM_RJ = H("03 00 00000004 00 01 01 07")

RELEASE_RQ = H("05 00 00000004 00000000")  # A-RELEASE-RQ, 4 reserved bytes
RELEASE_RP = H("06 00 00000004 00000000")  # A-RELEASE-RP, as captured from pynetdicom

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"


def round_trip(raw: bytes):  # type: ignore[no-untyped-def]
    pdu = decode_pdu(raw)
    assert encode_pdu(pdu) == raw
    return pdu


# ------------------------------------------------------------------------ items


def associate_rq_with(*items: bytes) -> bytes:
    """An A-ASSOCIATE-RQ ("CALLED" ← "CALLING") whose variable items are ``items``."""
    body = b"".join([H("0001 0000"), b"CALLED          ", b"CALLING         ", bytes(32), *items])
    return b"".join([struct.pack(">BBL", 1, 0, len(body)), body])


def associate_ac_with(*items: bytes) -> bytes:
    raw = bytearray(associate_rq_with(*items))
    raw[0] = 2
    return bytes(raw)


def user_info(*subs: bytes) -> bytes:
    data = b"".join(subs)
    return b"".join([struct.pack(">BBH", 0x50, 0, len(data)), data])


def only_item(raw: bytes):  # type: ignore[no-untyped-def]
    pdu = round_trip(raw)
    assert len(pdu.items) == 1
    return pdu.items[0]


def only_sub_item(raw: bytes):  # type: ignore[no-untyped-def]
    info = only_item(associate_rq_with(user_info(raw)))
    assert isinstance(info, UserInformationItem)
    assert len(info.sub_items) == 1
    return info.sub_items[0]


def test_application_context_item() -> None:
    item = only_item(
        associate_rq_with(
            H("10 00 0015"),  # type 10H, reserved, length 21
            b"1.2.840.10008.3.1.1.1",
        )
    )
    assert item == ApplicationContextItem(APP_CONTEXT)
    assert item.uid == APP_CONTEXT


def test_application_context_item_with_nul_padding_keeps_the_raw_value() -> None:
    item = only_item(associate_rq_with(H("10 00 0016"), b"1.2.840.10008.3.1.1.1\x00"))
    assert item.name == APP_CONTEXT + "\x00"
    assert item.uid == APP_CONTEXT


def test_presentation_context_rq_item() -> None:
    item = only_item(
        associate_rq_with(
            H("20 00 0038"),  # presentation context RQ, length 56
            H("03 00 00 00"),  # context ID 3, three reserved bytes
            H("30 00 0019"),  # abstract syntax, length 25
            b"1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            H("40 00 0013"),  # transfer syntax, length 19
            b"1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        )
    )
    assert item == PresentationContextRQItem(3, CT_STORAGE, (EXPLICIT_LE,))
    assert item.abstract_syntax_uid == CT_STORAGE
    assert item.transfer_syntax_uids == (EXPLICIT_LE,)


def test_presentation_context_rq_item_keeps_unknown_sub_items_in_place() -> None:
    raw = associate_rq_with(
        H("20 07 0035"),  # presentation context RQ, reserved 07, length 53
        H("01 01 02 03"),  # context ID 1, reserved bytes 01 02 03
        H("40 09 0011"),  # transfer syntax first (reserved 09), length 17
        b"1.2.840.10008.1.2",
        H("77 05 0003 414243"),  # unknown sub-item 77H, reserved 05: "ABC"
        H("30 00 0011"),  # abstract syntax last
        b"1.2.840.10008.1.1",
    )
    item = only_item(raw)
    assert item == PresentationContextRQItem(
        1, VERIFICATION, (IMPLICIT_LE,), extra_items=(UnknownItem(0x77, b"ABC"),)
    )
    assert item.extra_items[0].reserved == 5
    # Changing the fields falls back to the canonical order, with the new values.
    changed = dataclasses.replace(item, transfer_syntaxes=(EXPLICIT_LE, IMPLICIT_LE))
    rq = dataclasses.replace(decode_pdu(raw), items=(changed,))
    again = decode_pdu(encode_pdu(rq)).items[0]
    assert again == changed


def test_presentation_context_ac_item() -> None:
    item = only_item(
        associate_ac_with(
            H("21 00 0019"),  # presentation context AC, length 25
            H("01 00 00 00"),  # context ID 1, reserved, result 0 (acceptance), reserved
            H("40 00 0011"),  # transfer syntax, length 17
            b"1.2.840.10008.1.2",
        )
    )
    assert item == PresentationContextACItem(1, 0, IMPLICIT_LE)
    assert item.accepted
    assert item.transfer_syntax_uid == IMPLICIT_LE


def test_presentation_context_ac_item_rejected_without_transfer_syntax() -> None:
    item = only_item(associate_ac_with(H("21 00 0004 05 00 03 00")))  # ID 5, result 3
    assert item == PresentationContextACItem(5, 3, None)
    assert not item.accepted
    assert item.transfer_syntax_uid is None


def test_maximum_length_sub_item() -> None:
    sub = only_sub_item(H("51 00 0004 00010000"))  # 51H, length 4, 65536
    assert sub == MaximumLength(65536)


def test_implementation_class_uid_sub_item() -> None:
    sub = only_sub_item(H("52 00 0008") + b"1.2.3.4\x00")  # NUL padded to even length
    assert sub == ImplementationClassUID("1.2.3.4\x00")
    assert sub.uid == "1.2.3.4"


def test_asynchronous_operations_window_sub_item() -> None:
    sub = only_sub_item(H("53 00 0004 0005 0003"))  # invoked 5, performed 3
    assert sub == AsynchronousOperationsWindow(5, 3)


def test_role_selection_sub_item() -> None:
    sub = only_sub_item(
        H("54 00 001d")  # role selection, length 29
        + H("0019")  # UID length 25
        + b"1.2.840.10008.5.1.4.1.1.2"
        + H("00 01")  # SCU role 0, SCP role 1
    )
    assert sub == RoleSelection(CT_STORAGE, 0, 1)
    assert sub.uid == CT_STORAGE


def test_implementation_version_name_sub_item() -> None:
    sub = only_sub_item(H("55 00 000f") + b"OFFIS_DCMTK_367")
    assert sub == ImplementationVersionName("OFFIS_DCMTK_367")
    assert sub.name == "OFFIS_DCMTK_367"


def test_sop_class_extended_negotiation_sub_item() -> None:
    sub = only_sub_item(
        H("56 00 000c")  # length 12
        + H("0007")  # SOP class UID length 7
        + b"1.2.3.4"
        + H("010101")  # service class application information
    )
    assert sub == SOPClassExtendedNegotiation("1.2.3.4", b"\x01\x01\x01")


def test_sop_class_common_extended_negotiation_sub_item() -> None:
    sub = only_sub_item(
        H("57 00 001b")  # 57H, sub-item version 0, length 27
        + H("0005")
        + b"1.2.3"  # SOP class UID
        + H("0005")
        + b"4.5.6"  # service class UID
        + H("000b")  # related general SOP class identification: 11 bytes
        + H("0003")
        + b"7.8"
        + H("0004")
        + b"9.10"
    )
    assert sub == SOPClassCommonExtendedNegotiation("1.2.3", "4.5.6", ("7.8", "9.10"))


def test_user_identity_rq_sub_item() -> None:
    sub = only_sub_item(
        H("58 00 0011")  # length 17
        + H("02 01")  # type 2 (username and passcode), positive response requested
        + H("0005")
        + b"alice"
        + H("0006")
        + b"s3cret"
    )
    assert sub == UserIdentityRQ(2, 1, b"alice", b"s3cret")
    assert "alice" not in repr(sub)
    assert "s3cret" not in repr(sub)


def test_user_identity_ac_sub_item() -> None:
    info = only_item(associate_ac_with(user_info(H("59 00 000a 0008") + b"token-ok")))
    assert info.sub_items == (UserIdentityAC(b"token-ok"),)


def test_unknown_sub_item_and_unknown_item_are_carried() -> None:
    sub = only_sub_item(H("5f 03 0002 beef"))
    assert sub == UnknownItem(0x5F, b"\xbe\xef")
    assert sub.reserved == 3
    item = only_item(associate_rq_with(H("60 00 0001 aa")))
    assert item == UnknownItem(0x60, b"\xaa")


# ----------------------------------------------------------------- captured PDUs


def test_dcmtk_echoscu_rq() -> None:
    rq = round_trip(DCMTK_ECHOSCU_RQ)
    assert isinstance(rq, AssociateRQ)
    assert rq.protocol_version == 1
    assert (rq.called_ae, rq.calling_ae) == ("ARCHIVE", "CT01")
    assert rq.application_context_name == APP_CONTEXT
    assert rq.presentation_contexts == (PresentationContextRQItem(1, VERIFICATION, (IMPLICIT_LE,)),)
    assert rq.presentation_contexts[0].reserved_body == b"\x00\xff\x00"
    assert rq.max_pdu_length == 16384
    assert rq.implementation_class_uid == "1.2.276.0.7230010.3.0.3.6.7"
    assert rq.implementation_version_name == "OFFIS_DCMTK_367"


def test_pynetdicom_rq() -> None:
    rq = round_trip(PYNETDICOM_RQ)
    assert isinstance(rq, AssociateRQ)
    assert (rq.called_ae, rq.calling_ae) == ("ARCHIVE", "PYN_SCU")
    assert [pc.context_id for pc in rq.presentation_contexts] == [1, 3, 5, 7, 9]
    assert rq.presentation_contexts[1] == PresentationContextRQItem(
        3, CT_STORAGE, (EXPLICIT_LE, IMPLICIT_LE)
    )
    info = rq.user_information
    assert info is not None
    assert rq.max_pdu_length == 16382
    assert rq.implementation_version_name == "PYNETDICOM_304"
    assert info.find(RoleSelection) == RoleSelection(CT_STORAGE, 0, 1)
    assert info.find(AsynchronousOperationsWindow) == AsynchronousOperationsWindow(5, 3)
    assert info.find(UserIdentityRQ) == UserIdentityRQ(2, 1, b"alice", b"s3cret")
    assert info.find(SOPClassExtendedNegotiation) == SOPClassExtendedNegotiation(
        "1.2.840.10008.5.1.4.1.2.2.1", b"\x01\x01\x01"
    )
    assert info.find(SOPClassCommonExtendedNegotiation) == SOPClassCommonExtendedNegotiation(
        "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.4.2", ("1.2.840.10008.5.1.4.1.1.4.1",)
    )


def test_pynetdicom_ac_with_rejected_contexts_and_role_selection() -> None:
    ac = round_trip(PYNETDICOM_AC)
    assert isinstance(ac, AssociateAC)
    assert (ac.called_ae, ac.calling_ae) == ("ARCHIVE", "PYN_SCU")
    results = [(pc.context_id, pc.result) for pc in ac.presentation_contexts]
    assert results == [(1, 0), (3, 0), (5, 4), (7, 3), (9, 3)]
    assert ac.user_information is not None
    assert ac.user_information.find(RoleSelection) == RoleSelection(CT_STORAGE, 0, 1)
    assert ac.max_pdu_length == 16382


def test_ac_with_user_identity_response_round_trips() -> None:
    ac = dataclasses.replace(
        decode_pdu(PYNETDICOM_AC),
        items=(
            ApplicationContextItem(APP_CONTEXT),
            PresentationContextACItem(1, 0, IMPLICIT_LE),
            PresentationContextACItem(3, 1, None),  # user rejection, no transfer syntax
            UserInformationItem(
                (
                    MaximumLength(0),  # 0: unlimited
                    ImplementationClassUID("1.2.3"),
                    RoleSelection(CT_STORAGE, 1, 1),
                    UserIdentityAC(b"kerberos-ticket"),
                )
            ),
        ),
    )
    raw = encode_pdu(ac)
    assert round_trip(raw) == ac
    assert raw.endswith(H("59 00 0011 000f") + b"kerberos-ticket")


def test_reject() -> None:
    rj = round_trip(PYNETDICOM_RJ)
    assert rj == AssociateRJ(1, 1, 7)


def test_release_and_abort() -> None:
    assert round_trip(RELEASE_RQ) == ReleaseRQ()
    assert round_trip(RELEASE_RP) == ReleaseRP()
    abort = round_trip(H("07 00 00000004 00 00 02 06"))  # provider, invalid parameter value
    assert abort == Abort(2, 6)


def test_p_data_with_several_pdvs() -> None:
    raw = b"".join(
        [
            H("04 00 00000024"),  # P-DATA-TF, length 36
            H("0000000a 01 03"),  # PDV length 10, context 1, command + last
            b"COMMAND!",
            H("00000006 01 00"),  # PDV length 6, context 1, data set, not last
            b"DATA",
            H("00000008 03 02"),  # PDV length 8, context 3, data set, last
            b"DATA-2",
        ]
    )
    pdu = round_trip(raw)
    assert pdu == PDataTF((PDV(1, 3, b"COMMAND!"), PDV(1, 0, b"DATA"), PDV(3, 2, b"DATA-2")))
    assert [(p.is_command, p.is_last) for p in pdu.pdvs] == [
        (True, True),
        (False, False),
        (False, True),
    ]


def test_empty_pdv_data_is_allowed() -> None:
    assert round_trip(H("04 00 00000006 00000002 01 02")) == PDataTF((PDV(1, 2, b""),))


# -------------------------------------------------------------- exact round trips


def test_non_zero_reserved_bytes_everywhere_survive() -> None:
    raw = bytearray(DCMTK_ECHOSCU_RQ)
    raw[1] = 0xAA  # PDU header reserved
    raw[8:10] = b"\xbb\xcc"  # reserved after the protocol version
    raw[42:74] = bytes(range(32))  # the 32 reserved bytes
    raw[75] = 0x11  # application context item's reserved byte
    round_trip(bytes(raw))
    for pdu in (
        H("03 ee 00000004 dd 02 03 02"),
        H("05 01 00000004 01020304"),
        H("06 01 00000004 ffffffff"),
        H("07 09 00000004 0102 00 00"),
        H("04 7f 00000007 00000003 05 00 ff"),
    ):
        round_trip(pdu)


def test_odd_ae_padding_survives_and_replace_changes_the_wire() -> None:
    raw = bytearray(DCMTK_ECHOSCU_RQ)
    raw[10:26] = b"   ARCHIVE      "  # leading spaces
    rq = round_trip(bytes(raw))
    assert rq.called_ae == "ARCHIVE"
    renamed = dataclasses.replace(rq, called_ae="NEW")
    wire = encode_pdu(renamed)
    assert wire[10:26] == b"NEW             "
    assert wire[26:42] == b"CT01            "  # untouched field keeps its bytes
    assert wire[26:] == bytes(raw[26:])
    assert decode_pdu(wire).called_ae == "NEW"


def test_ac_echo_fields_are_not_tested() -> None:
    # PS3.8: the AC's AE fields are reserved and not tested: even non-ASCII passes.
    raw = bytearray(PYNETDICOM_AC)
    raw[10:26] = b"\xff" * 16
    round_trip(bytes(raw))


def test_rq_built_from_strings() -> None:
    rq = AssociateRQ(
        protocol_version=1,
        called_ae="ARCHIVE",
        calling_ae="CT01",
        items=(
            ApplicationContextItem(APP_CONTEXT),
            PresentationContextRQItem(1, VERIFICATION, (IMPLICIT_LE,)),
            UserInformationItem(
                (
                    MaximumLength(16384),
                    ImplementationClassUID("1.2.276.0.7230010.3.0.3.6.7"),
                    ImplementationVersionName("OFFIS_DCMTK_367"),
                )
            ),
        ),
    )
    assert rq.presentation_contexts[0].reserved_body == b"\x00\x00\x00"
    expected = bytearray(DCMTK_ECHOSCU_RQ)
    expected[105] = 0  # we send the reserved byte DCMTK sets to 0xFF as 0
    assert encode_pdu(rq) == bytes(expected)


def test_hot_path_encoders() -> None:
    assert encode_reject(1, 1, 7) == H("03 00 00000004 00 01 01 07")
    assert encode_reject(
        RejectResult.TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectReason.TEMPORARY_CONGESTION,
    ) == H("03 00 00000004 00 02 03 01")
    assert encode_abort(AbortSource.SERVICE_PROVIDER, AbortReason.UNRECOGNIZED_PDU) == H(
        "07 00 00000004 00 00 02 01"
    )
    assert encode_pdu(AssociateRJ(2, 3, 2)) == encode_reject(2, 3, 2)


def test_enums_name_the_design_table() -> None:
    assert PDUType(4) is PDUType.P_DATA_TF
    # Reasons with the same number keep their own names.
    assert RejectReason.TEMPORARY_CONGESTION.name == "TEMPORARY_CONGESTION"
    assert RejectReason.TEMPORARY_CONGESTION == 1
    assert RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED is RejectReasonUser(7)
    assert RejectReason.LOCAL_LIMIT_EXCEEDED is RejectReasonPresentation(2)
    assert RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED == 2
    assert describe_reject(2, 3, 1) == (
        "rejected transient, source service provider presentation, reason temporary congestion"
    )
    assert describe_reject(1, 1, 7).endswith("called ae title not recognized")
    assert describe_abort(2, 6) == (
        "aborted by service provider, reason invalid pdu parameter value"
    )


# --------------------------------------------------------------- malformed input


def expect_error(raw: bytes, reason: int, offset: int | None, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_pdu(raw)
    assert info.value.abort_reason == reason, str(info.value)
    if offset is not None:
        assert info.value.offset == offset, str(info.value)
    assert words in str(info.value)


def with_length(raw: bytes) -> bytes:
    """Fix the PDU length field after a test edited the body."""
    return raw[:2] + struct.pack(">L", len(raw) - 6) + raw[6:]


def test_unknown_pdu_type_is_unrecognized_pdu() -> None:
    expect_error(H("08 00 00000004 00000000"), 1, 0, "unrecognized PDU type 0x08")
    expect_error(H("16 03 01 02 00"), 1, 0, "0x16")


def test_length_field_must_match_the_body() -> None:
    expect_error(RELEASE_RQ + b"\x00", 6, 2, "says 4 bytes but 5 follow")
    expect_error(DCMTK_ECHOSCU_RQ[:-1], 6, 2, "PDU length field")
    expect_error(b"", 6, 0, "empty")
    expect_error(H("05 00 0000"), 6, 0, "too short for the 6-byte PDU header")


def test_associate_rq_needs_68_bytes() -> None:
    expect_error(with_length(DCMTK_ECHOSCU_RQ[:73]), 6, 6, "at least 68")
    rq = round_trip(with_length(DCMTK_ECHOSCU_RQ[:74]))  # fixed part only: decodes
    assert rq.items == ()


def test_fixed_size_pdus_must_be_four_bytes() -> None:
    for pdu_type in (3, 5, 6, 7):
        expect_error(bytes([pdu_type, 0]) + H("00000005 0000000000"), 6, 2, "must be 4")


def test_item_overrunning_the_pdu() -> None:
    raw = bytearray(DCMTK_ECHOSCU_RQ)
    raw[76:78] = b"\x00\xff"  # application context item claims 255 bytes
    expect_error(bytes(raw), 6, 74, "item 0x10 announces 255 bytes")


def test_truncated_item_header() -> None:
    expect_error(with_length(DCMTK_ECHOSCU_RQ + b"\x10\x00"), 6, 205 + 6, "too short")


def test_sub_item_overrunning_its_item() -> None:
    raw = bytearray(DCMTK_ECHOSCU_RQ)
    raw[130:132] = b"\x00\x40"  # transfer syntax sub-item claims 64 bytes
    expect_error(bytes(raw), 6, 128, "presentation context 1: item 0x40 announces 64")


def test_presentation_context_needs_one_abstract_syntax() -> None:
    expect_error(associate_rq_with(H("20 00 0004 01 00 00 00")), 6, 74, "no abstract syntax")
    two = H("30 00 0001 31")
    expect_error(associate_rq_with(H("20 00 000e 01 00 00 00"), two, two), 6, 87, "more than one")


def test_misplaced_presentation_context_is_unexpected_parameter() -> None:
    expect_error(associate_rq_with(H("21 00 0004 01 00 00 00")), 5, 74, "belongs in the")
    expect_error(associate_ac_with(H("20 00 0004 01 00 00 00")), 5, 74, "belongs in the")


def test_duplicate_user_information_is_invalid() -> None:
    ui = user_info(H("51 00 0004 00004000"))
    expect_error(associate_rq_with(ui, ui), 6, 74 + len(ui), "more than one user information")


def test_bad_sub_item_lengths() -> None:
    cases = [
        (H("51 00 0003 000040"), "maximum length sub-item must have length 4"),
        (H("53 00 0002 0001"), "must have length 4"),
        (H("54 00 0004 0001 31 00"), "2 role bytes"),
        (H("54 00 0003 0009 31"), "overruns"),
        (H("58 00 0004 01 00 0001"), "overruns"),
        (H("58 00 0008 01 00 0001 41 0000 ff"), "trailing"),
        (H("59 00 0001 00"), "truncated"),
        (H("57 00 0008 0001 31 0001 32 0001"), "does not match"),
    ]
    for sub, words in cases:
        expect_error(associate_rq_with(user_info(sub)), 6, None, words)


def test_pdv_lengths() -> None:
    expect_error(H("04 00 00000005 00000001 01"), 6, 6, "less than 2")
    expect_error(H("04 00 00000006 00000003 01 00"), 6, 6, "overruns")
    expect_error(
        H("04 00 00000009 00000002 01 00 000000"), 6, 12, "too short for a PDV item length"
    )


def test_non_ascii_called_ae_in_rq() -> None:
    raw = bytearray(DCMTK_ECHOSCU_RQ)
    raw[13] = 0xC8
    expect_error(bytes(raw), 6, 13, "Called AE title")


# ----------------------------------------------------------- pynetdicom agrees


def pynetdicom_fields(raw: bytes) -> dict[str, object]:
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
    from pynetdicom.pdu_items import (
        ImplementationClassUIDSubItem,
        ImplementationVersionNameSubItem,
        MaximumLengthSubItem,
        PresentationContextItemAC,
        PresentationContextItemRQ,
        SCP_SCU_RoleSelectionSubItem,
        UserIdentitySubItemRQ,
    )

    pdu = A_ASSOCIATE_RQ() if raw[0] == 1 else A_ASSOCIATE_AC()
    pdu.decode(raw)
    contexts = []
    for item in pdu.variable_items:
        if isinstance(item, PresentationContextItemRQ):
            contexts.append(
                (item.context_id, str(item.abstract_syntax), tuple(map(str, item.transfer_syntax)))
            )
        elif isinstance(item, PresentationContextItemAC):
            contexts.append((item.context_id, item.result, str(item.transfer_syntax)))
    fields: dict[str, object] = {
        "version": pdu.protocol_version,
        "called": pdu.called_ae_title if raw[0] == 1 else pdu.reserved_aet,
        "calling": pdu.calling_ae_title if raw[0] == 1 else pdu.reserved_aec,
        "context": str(pdu.application_context_name),
        "contexts": contexts,
    }
    for sub in pdu.user_information.user_data:
        if isinstance(sub, MaximumLengthSubItem):
            fields["max"] = sub.maximum_length_received
        elif isinstance(sub, ImplementationClassUIDSubItem):
            fields["class_uid"] = str(sub.implementation_class_uid)
        elif isinstance(sub, ImplementationVersionNameSubItem):
            fields["version_name"] = sub.implementation_version_name
        elif isinstance(sub, SCP_SCU_RoleSelectionSubItem):
            fields["role"] = (str(sub.sop_class_uid), sub.scu_role, sub.scp_role)
        elif isinstance(sub, UserIdentitySubItemRQ):
            fields["identity"] = (sub.user_identity_type, sub.primary_field, sub.secondary_field)
    return fields


def our_fields(raw: bytes) -> dict[str, object]:
    pdu = decode_pdu(raw)
    assert isinstance(pdu, AssociateRQ | AssociateAC)
    contexts: list[object] = []
    for pc in pdu.presentation_contexts:
        if isinstance(pc, PresentationContextRQItem):
            contexts.append((pc.context_id, pc.abstract_syntax_uid, pc.transfer_syntax_uids))
        else:
            contexts.append((pc.context_id, pc.result, pc.transfer_syntax_uid))
    fields: dict[str, object] = {
        "version": pdu.protocol_version,
        "called": pdu.called_ae,
        "calling": pdu.calling_ae,
        "context": pdu.application_context_name,
        "contexts": contexts,
        "max": pdu.max_pdu_length,
        "class_uid": pdu.implementation_class_uid,
        "version_name": pdu.implementation_version_name,
    }
    info = pdu.user_information
    assert info is not None
    role = info.find(RoleSelection)
    if role is not None:
        fields["role"] = (role.uid, role.scu_role, role.scp_role)
    identity = info.find(UserIdentityRQ)
    if identity is not None:
        fields["identity"] = (
            identity.identity_type,
            identity.primary_field,
            identity.secondary_field,
        )
    return fields


@pytest.mark.parametrize("raw", [DCMTK_ECHOSCU_RQ, PYNETDICOM_RQ, PYNETDICOM_AC])
def test_pynetdicom_decodes_the_same(raw: bytes) -> None:
    assert our_fields(raw) == pynetdicom_fields(raw)


def test_pynetdicom_re_encodes_what_we_encode() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    rq = dataclasses.replace(decode_pdu(PYNETDICOM_RQ), called_ae="OTHER", calling_ae="ME")
    ours = encode_pdu(rq)
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(ours)
    assert theirs.encode() == ours
    assert our_fields(ours) == pynetdicom_fields(ours)


# ---------------------------------------------------------------- property tests

reserved = st.integers(0, 255)
uids = st.builds(
    lambda body, pad: body + pad,
    st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,5}){0,6}", fullmatch=True),
    st.sampled_from(["", "\x00", " "]),
)
latin1 = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=20)
small_bytes = st.binary(max_size=24)
known_sub_types = set(range(0x51, 0x5A))
unknown_sub_items = st.builds(
    lambda t, data, r: UnknownItem(t, data, reserved=r),
    st.integers(0, 255).filter(lambda t: t not in known_sub_types),
    small_bytes,
    reserved,
)
sub_items = st.one_of(
    st.builds(lambda n, r: MaximumLength(n, reserved=r), st.integers(0, 2**32 - 1), reserved),
    st.builds(lambda v, r: ImplementationClassUID(v, reserved=r), uids, reserved),
    st.builds(
        lambda a, b, r: AsynchronousOperationsWindow(a, b, reserved=r),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        reserved,
    ),
    st.builds(
        lambda u, a, b, r: RoleSelection(u, a, b, reserved=r), uids, reserved, reserved, reserved
    ),
    st.builds(lambda v, r: ImplementationVersionName(v, reserved=r), latin1, reserved),
    st.builds(
        lambda u, info, r: SOPClassExtendedNegotiation(u, info, reserved=r),
        uids,
        small_bytes,
        reserved,
    ),
    st.builds(
        lambda a, b, rel, v: SOPClassCommonExtendedNegotiation(a, b, tuple(rel), version=v),
        uids,
        uids,
        st.lists(uids, max_size=3),
        reserved,
    ),
    st.builds(
        lambda t, p, a, b, r: UserIdentityRQ(t, p, a, b, reserved=r),
        reserved,
        reserved,
        small_bytes,
        small_bytes,
        reserved,
    ),
    st.builds(lambda b, r: UserIdentityAC(b, reserved=r), small_bytes, reserved),
    unknown_sub_items,
)
unknown_pc_sub_items = st.builds(
    lambda t, data, r: UnknownItem(t, data, reserved=r),
    st.integers(0, 255).filter(lambda t: t not in (0x30, 0x40)),
    small_bytes,
    reserved,
)


@st.composite
def pc_rq_items(draw: st.DrawFn) -> PresentationContextRQItem:
    # Draw the sub-items in wire order, then derive the fields and the layout.
    wire: list[tuple[str, object, int]] = [("a", draw(uids), draw(reserved))]
    wire += [("t", ts, draw(reserved)) for ts in draw(st.lists(uids, max_size=3))]
    wire += [("u", u, 0) for u in draw(st.lists(unknown_pc_sub_items, max_size=2))]
    wire = draw(st.permutations(wire))
    layout = []
    for kind, value, r in wire:
        if kind == "u":
            assert isinstance(value, UnknownItem)
            layout.append((value.item_type, value.reserved))
        else:
            layout.append((0x30 if kind == "a" else 0x40, r))
    return PresentationContextRQItem(
        draw(reserved),
        next(str(v) for k, v, _ in wire if k == "a"),
        tuple(str(v) for k, v, _ in wire if k == "t"),
        extra_items=tuple(v for k, v, _ in wire if k == "u"),  # type: ignore[misc]
        reserved=draw(reserved),
        reserved_body=draw(st.binary(min_size=3, max_size=3)),
        layout=tuple(layout),
    )


@st.composite
def pc_ac_items(draw: st.DrawFn) -> PresentationContextACItem:
    transfer = draw(st.none() | uids)
    extra = draw(st.lists(unknown_pc_sub_items, max_size=2))
    layout = [(u.item_type, u.reserved) for u in extra]
    if transfer is not None:
        layout.insert(draw(st.integers(0, len(layout))), (0x40, draw(reserved)))
    return PresentationContextACItem(
        draw(reserved),
        draw(reserved),
        transfer,
        extra_items=tuple(extra),
        reserved=draw(reserved),
        reserved_body=draw(st.binary(min_size=2, max_size=2)),
        layout=tuple(layout),
    )


unknown_items = st.builds(
    lambda t, data, r: UnknownItem(t, data, reserved=r),
    st.integers(0, 255).filter(lambda t: t not in (0x10, 0x20, 0x21, 0x50)),
    small_bytes,
    reserved,
)
AE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))


@st.composite
def ae_fields(draw: st.DrawFn) -> bytes:
    title = draw(st.text(AE_CHARS, max_size=16))
    inner = draw(st.integers(0, len(title)))  # a space inside the title sometimes
    if 0 < inner < len(title):
        title = title[:inner] + " " + title[inner + 1 :]
    lead = draw(st.integers(0, 16 - len(title)))
    return (" " * lead + title).ljust(16).encode("ascii")


@st.composite
def associates(draw: st.DrawFn) -> AssociateRQ | AssociateAC:
    is_rq = draw(st.booleans())
    items: list[object] = draw(st.lists(pc_rq_items() if is_rq else pc_ac_items(), max_size=3))
    items += draw(st.lists(unknown_items, max_size=2))
    if draw(st.booleans()):
        items.append(ApplicationContextItem(draw(uids), reserved=draw(reserved)))
    if draw(st.booleans()):
        subs = tuple(draw(st.lists(sub_items, max_size=5)))
        items.append(UserInformationItem(subs, reserved=draw(reserved)))
    items = draw(st.permutations(items))
    called, calling = draw(ae_fields()), draw(ae_fields())
    cls = AssociateRQ if is_rq else AssociateAC
    return cls(
        draw(st.integers(0, 0xFFFF)),
        called.decode().strip(" "),
        calling.decode().strip(" "),
        tuple(items),  # type: ignore[arg-type]
        header_reserved=draw(reserved),
        reserved_8_9=draw(st.integers(0, 0xFFFF)),
        reserved_42_73=draw(st.binary(min_size=32, max_size=32)),
        called_ae_raw=called,
        calling_ae_raw=calling,
    )


pdvs = st.builds(PDV, reserved, reserved, st.binary(max_size=40))
pdus = st.one_of(
    associates(),
    st.builds(
        lambda a, b, c, h, r: AssociateRJ(a, b, c, header_reserved=h, reserved=r),
        reserved,
        reserved,
        reserved,
        reserved,
        reserved,
    ),
    st.builds(
        lambda p, h: PDataTF(tuple(p), header_reserved=h), st.lists(pdvs, max_size=4), reserved
    ),
    st.builds(
        lambda h, r: ReleaseRQ(header_reserved=h, reserved=r),
        reserved,
        st.binary(min_size=4, max_size=4),
    ),
    st.builds(
        lambda h, r: ReleaseRP(header_reserved=h, reserved=r),
        reserved,
        st.binary(min_size=4, max_size=4),
    ),
    st.builds(
        lambda s, r, h, res: Abort(s, r, header_reserved=h, reserved=res),
        reserved,
        reserved,
        reserved,
        st.binary(min_size=2, max_size=2),
    ),
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(pdus)
def test_property_encode_decode_encode(pdu: object) -> None:
    raw = encode_pdu(pdu)  # type: ignore[arg-type]
    decoded = decode_pdu(raw)
    assert decoded == pdu
    assert encode_pdu(decoded) == raw


@FAST
@given(pdus, st.data())
def test_property_corrupted_pdus_raise_only_protocol_error(
    pdu: object, data: st.DataObject
) -> None:
    raw = bytearray(encode_pdu(pdu))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(reserved)
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (
        bytes(raw),
        bytes(raw[:cut]),
        with_length(bytes(raw[:cut])) if cut >= 6 else b"",
    ):
        try:
            decoded = decode_pdu(candidate)
        except ProtocolError as exc:
            assert 1 <= exc.abort_reason <= 6
        else:
            assert encode_pdu(decoded) == candidate


@FAST
@given(st.binary(max_size=300))
def test_property_garbage_raises_only_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_pdu(raw)


@FAST
@given(st.integers(1, 7), st.binary(max_size=300))
def test_property_garbage_bodies_raise_only_protocol_error(pdu_type: int, body: bytes) -> None:
    raw = struct.pack(">BBL", pdu_type, 0, len(body)) + body
    try:
        decoded = decode_pdu(raw)
    except ProtocolError:
        pass
    else:
        assert encode_pdu(decoded) == raw


def test_memoryview_input() -> None:
    assert decode_pdu(memoryview(DCMTK_ECHOSCU_RQ)) == decode_pdu(DCMTK_ECHOSCU_RQ)
    assert decode_pdu(bytearray(RELEASE_RQ)) == ReleaseRQ()
