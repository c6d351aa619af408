"""Bytes to PDU objects and back (PS3.8 §9.3): the sans-IO DICOM upper-layer codec.

``decode_pdu`` takes one complete PDU (header included, as the framer returns
it) and returns a frozen dataclass from ``gateway.dul.pdus``; ``encode_pdu``
does the reverse.  No I/O happens here.

Every length on the wire is checked against the bytes that are really there
before it is used, and every failure is a ``ProtocolError`` whose message names
the field and the offset (counted from the first byte of the PDU) and whose
``abort_reason`` is the A-ABORT reason of PS3.8 table 9-26 the gateway answers
with:

* 1 unrecognized PDU -- the PDU type is not 01H-07H;
* 5 unexpected PDU parameter -- a known item in the wrong PDU (a 21H
  presentation context result inside an A-ASSOCIATE-RQ, ...);
* 6 invalid PDU parameter value -- a length that disagrees with the data, a
  fixed-size field of the wrong size, a duplicated item, an AE title that is not
  ASCII.

Items and sub-items of unknown types are not errors: PS3.8 tells receivers to
skip them, and a gateway must pass them on, so they become ``UnknownItem``.

Encoding errors (a caller's mistake, not a peer's) raise ``ValueError``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from gateway.dul import constants
from gateway.dul.ae import AE_LENGTH, decode_ae, encode_ae
from gateway.dul.constants import *  # noqa: F403 -- re-exported: see __all__
from gateway.dul.constants import PDU_NAMES, AbortReason, ItemType, PDUType
from gateway.dul.pdus import (
    PDU,
    PDV,
    Abort,
    ApplicationContextItem,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsynchronousOperationsWindow,
    ImplementationClassUID,
    ImplementationVersionName,
    Item,
    MaximumLength,
    PDataTF,
    PresentationContextACItem,
    PresentationContextRQItem,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    SubItem,
    UnknownItem,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformationItem,
)
from gateway.errors import ProtocolError

# The PS3.8 enums and ``describe_*`` are re-exported, so callers need only this
# module; taking ``constants.__all__`` keeps one list of their names, not two.
__all__ = [
    "ASSOCIATE_FIXED_LENGTH",
    "PDU_HEADER",
    "PDU_HEADER_LENGTH",
    "decode_pdu",
    "encode_abort",
    "encode_pdu",
    "encode_reject",
    *constants.__all__,
]

# ------------------------------------------------------------------ wire layouts

PDU_HEADER = struct.Struct(">BBL")
"""PDU header: type (1), reserved (1), length of what follows (4, big endian)."""
PDU_HEADER_LENGTH = PDU_HEADER.size

_ITEM_HEADER = struct.Struct(">BBH")  # item type, reserved, item length
_ASSOCIATE_FIXED = struct.Struct(">HH16s16s32s")  # version, reserved, called, calling, reserved
ASSOCIATE_FIXED_LENGTH = _ASSOCIATE_FIXED.size  # 68: the least an RQ/AC body can be
_FOUR_BYTES = struct.Struct(">BBBB")  # RJ body; presentation context item fixed part
_ABORT_BODY = struct.Struct(">2sBB")  # reserved (2), source, reason
_PDV_HEADER = struct.Struct(">LBB")  # item length, context ID, message control header
_PDV_HEADER_LENGTH = _PDV_HEADER.size
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">L")
_TWO_U16 = struct.Struct(">HH")
_TWO_U8 = struct.Struct(">BB")

_MAX_ITEM_LENGTH = 0xFFFF

_SYNTAX_NAMES = {
    ItemType.ABSTRACT_SYNTAX: "abstract syntax",
    ItemType.TRANSFER_SYNTAX: "transfer syntax",
}

_UNRECOGNIZED_PDU = AbortReason.UNRECOGNIZED_PDU
_UNEXPECTED_PARAMETER = AbortReason.UNEXPECTED_PDU_PARAMETER
_INVALID_VALUE = AbortReason.INVALID_PDU_PARAMETER_VALUE



def _invalid(message: str, offset: int, reason: int = _INVALID_VALUE) -> ProtocolError:
    return ProtocolError(f"{message} (offset {offset})", abort_reason=reason, offset=offset)


def _text(mv: memoryview, start: int, end: int) -> str:
    # Latin-1 maps each byte to one code point: lossless, so round trips are exact.
    return str(mv[start:end], "latin-1")


def _iter_items(
    mv: memoryview, start: int, end: int, where: str
) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(type, reserved, data start, data end)`` for each item in ``mv[start:end]``.

    Item header: type (1), reserved (1), item length (2, big endian).
    """
    pos = start
    while pos < end:
        if end - pos < _ITEM_HEADER.size:
            raise _invalid(
                f"{where}: {end - pos} trailing byte(s) are too short for an item header",
                pos,
            )
        item_type, reserved, length = _ITEM_HEADER.unpack_from(mv, pos)
        data_start = pos + _ITEM_HEADER.size
        data_end = data_start + length
        if data_end > end:
            raise _invalid(
                f"{where}: item 0x{item_type:02X} announces {length} bytes but only "
                f"{end - data_start} remain",
                pos,
            )
        yield item_type, reserved, data_start, data_end
        pos = data_end


# ---------------------------------------------------------------- decoding items


def _read_bytes_u16(mv: memoryview, pos: int, end: int, field: str) -> tuple[bytes, int]:
    """Read a 2-byte length then that many bytes; return (bytes, next offset)."""
    if end - pos < 2:
        raise _invalid(f"{field} length is truncated", pos)
    (length,) = _U16.unpack_from(mv, pos)
    pos += 2
    if pos + length > end:
        raise _invalid(
            f"{field} length {length} overruns its item ({end - pos} bytes remain)", pos - 2
        )
    return bytes(mv[pos : pos + length]), pos + length


def _read_u16_prefixed(mv: memoryview, pos: int, end: int, field: str) -> tuple[str, int]:
    """As ``_read_bytes_u16``, as Latin-1 text (lossless, like ``_text``)."""
    data, pos = _read_bytes_u16(mv, pos, end, field)
    return data.decode("latin-1"), pos


def _decode_sub_item(
    mv: memoryview, item_type: int, reserved: int, start: int, end: int
) -> SubItem:
    """Decode one user-information sub-item whose data is ``mv[start:end]``."""
    size = end - start
    header = start - _ITEM_HEADER.size
    if item_type == ItemType.MAXIMUM_LENGTH:
        if size != 4:
            raise _invalid(f"maximum length sub-item must have length 4, got {size}", header)
        return MaximumLength(_U32.unpack_from(mv, start)[0], reserved=reserved)
    if item_type == ItemType.IMPLEMENTATION_CLASS_UID:
        return ImplementationClassUID(_text(mv, start, end), reserved=reserved)
    if item_type == ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW:
        if size != 4:
            raise _invalid(
                f"asynchronous operations window sub-item must have length 4, got {size}",
                header,
            )
        invoked, performed = _TWO_U16.unpack_from(mv, start)
        return AsynchronousOperationsWindow(invoked, performed, reserved=reserved)
    if item_type == ItemType.ROLE_SELECTION:
        uid, pos = _read_u16_prefixed(mv, start, end, "role selection SOP class UID")
        if end - pos != 2:
            raise _invalid(
                f"role selection sub-item must end with 2 role bytes, found {end - pos}", pos
            )
        scu, scp = _TWO_U8.unpack_from(mv, pos)
        return RoleSelection(uid, scu, scp, reserved=reserved)
    if item_type == ItemType.IMPLEMENTATION_VERSION_NAME:
        return ImplementationVersionName(_text(mv, start, end), reserved=reserved)
    if item_type == ItemType.SOP_CLASS_EXTENDED_NEGOTIATION:
        uid, pos = _read_u16_prefixed(mv, start, end, "extended negotiation SOP class UID")
        return SOPClassExtendedNegotiation(uid, bytes(mv[pos:end]), reserved=reserved)
    if item_type == ItemType.SOP_CLASS_COMMON_EXTENDED_NEGOTIATION:
        return _decode_common_extended(mv, reserved, start, end)
    if item_type == ItemType.USER_IDENTITY_RQ:
        if size < 2:
            raise _invalid(f"user identity sub-item is too short ({size} bytes)", header)
        identity_type, positive = _TWO_U8.unpack_from(mv, start)
        pos = start + 2
        primary, pos = _read_bytes_u16(mv, pos, end, "user identity primary field")
        secondary, pos = _read_bytes_u16(mv, pos, end, "user identity secondary field")
        if pos != end:
            raise _invalid(f"user identity sub-item has {end - pos} trailing byte(s)", pos)
        return UserIdentityRQ(identity_type, positive, primary, secondary, reserved=reserved)
    if item_type == ItemType.USER_IDENTITY_AC:
        response, pos = _read_bytes_u16(mv, start, end, "user identity server response")
        if pos != end:
            raise _invalid(f"user identity AC sub-item has {end - pos} trailing byte(s)", pos)
        return UserIdentityAC(response, reserved=reserved)
    return UnknownItem(item_type, bytes(mv[start:end]), reserved=reserved)


def _decode_common_extended(
    mv: memoryview, version: int, start: int, end: int
) -> SOPClassCommonExtendedNegotiation:
    sop_class, pos = _read_u16_prefixed(mv, start, end, "common extended negotiation SOP class")
    service_class, pos = _read_u16_prefixed(
        mv, pos, end, "common extended negotiation service class"
    )
    if end - pos < 2:
        raise _invalid("related general SOP class identification length is missing", pos)
    (related_length,) = _U16.unpack_from(mv, pos)
    pos += 2
    if pos + related_length != end:
        raise _invalid(
            f"related general SOP class identification length {related_length} does not "
            f"match the {end - pos} bytes left in the sub-item",
            pos - 2,
        )
    related: list[str] = []
    while pos < end:
        uid, pos = _read_u16_prefixed(mv, pos, end, "related general SOP class UID")
        related.append(uid)
    return SOPClassCommonExtendedNegotiation(
        sop_class, service_class, tuple(related), version=version
    )


def _decode_user_information(
    mv: memoryview, reserved: int, start: int, end: int
) -> UserInformationItem:
    subs = [
        _decode_sub_item(mv, sub_type, sub_reserved, s, e)
        for sub_type, sub_reserved, s, e in _iter_items(mv, start, end, "user information item")
    ]
    return UserInformationItem(tuple(subs), reserved=reserved)


def _pc_context_id(mv: memoryview, start: int, end: int) -> int:
    """The context ID of a presentation context item, once its 4 fixed bytes are there."""
    if end - start < 4:
        raise _invalid(
            f"presentation context item is {end - start} bytes, at least 4 needed",
            start - _ITEM_HEADER.size,
        )
    return mv[start]


def _decode_pc_sub_items(
    mv: memoryview, start: int, end: int, where: str, syntaxes: tuple[int, ...], unique: int
) -> tuple[list[tuple[int, str]], tuple[UnknownItem, ...], tuple[tuple[int, int], ...]]:
    """Sort the sub-items of a presentation context item (RQ 20H or AC 21H).

    ``mv[start:end]`` is the item data: the 4 fixed bytes (checked by
    ``_pc_context_id``), then sub-items.  Returns ``(syntaxes, extra, layout)``: the
    ``(type, UID)`` of each sub-item whose type is in ``syntaxes``, the other
    sub-items as ``UnknownItem`` and the wire order of all of them.  A second
    sub-item of type ``unique`` is refused.
    """
    found: list[tuple[int, str]] = []
    extra: list[UnknownItem] = []
    layout: list[tuple[int, int]] = []
    for sub_type, sub_reserved, s, e in _iter_items(mv, start + 4, end, where):
        layout.append((sub_type, sub_reserved))
        if sub_type in syntaxes:
            if sub_type == unique and any(t == unique for t, _ in found):
                # Two abstract syntaxes (or two accepted transfer syntaxes) would
                # let the backend and the gateway disagree about what the context
                # means: refuse.
                raise _invalid(f"{where} has more than one {_SYNTAX_NAMES[sub_type]}", s - 4)
            found.append((sub_type, _text(mv, s, e)))
        else:
            extra.append(UnknownItem(sub_type, bytes(mv[s:e]), reserved=sub_reserved))
    return found, tuple(extra), tuple(layout)


def _decode_pc_rq(mv: memoryview, reserved: int, start: int, end: int) -> PresentationContextRQItem:
    context_id = _pc_context_id(mv, start, end)
    where = f"presentation context {context_id}"
    syntaxes = (ItemType.ABSTRACT_SYNTAX, ItemType.TRANSFER_SYNTAX)
    found, extra, layout = _decode_pc_sub_items(
        mv, start, end, where, syntaxes, unique=ItemType.ABSTRACT_SYNTAX
    )
    abstract = next((uid for t, uid in found if t == ItemType.ABSTRACT_SYNTAX), None)
    if abstract is None:
        raise _invalid(f"{where} has no abstract syntax sub-item", start - _ITEM_HEADER.size)
    return PresentationContextRQItem(
        context_id,
        abstract,
        tuple(uid for t, uid in found if t == ItemType.TRANSFER_SYNTAX),
        extra_items=extra,
        reserved=reserved,
        reserved_body=bytes(mv[start + 1 : start + 4]),
        layout=layout,
    )


def _decode_pc_ac(mv: memoryview, reserved: int, start: int, end: int) -> PresentationContextACItem:
    context_id = _pc_context_id(mv, start, end)
    where = f"presentation context {context_id} result"
    found, extra, layout = _decode_pc_sub_items(
        mv, start, end, where, (ItemType.TRANSFER_SYNTAX,), unique=ItemType.TRANSFER_SYNTAX
    )
    _, reserved_5, result, reserved_7 = _FOUR_BYTES.unpack_from(mv, start)
    return PresentationContextACItem(
        context_id,
        result,
        found[0][1] if found else None,
        extra_items=extra,
        reserved=reserved,
        reserved_body=bytes((reserved_5, reserved_7)),
        layout=layout,
    )


def _decode_items(mv: memoryview, pdu_type: int, start: int, end: int) -> tuple[Item, ...]:
    """Decode the variable items of an A-ASSOCIATE-RQ (01H) or -AC (02H)."""
    is_rq = pdu_type == PDUType.ASSOCIATE_RQ
    name = PDU_NAMES[PDUType(pdu_type)]
    items: list[Item] = []
    seen_context = seen_user = False
    for item_type, reserved, s, e in _iter_items(mv, start, end, name):
        header = s - _ITEM_HEADER.size
        if item_type == ItemType.APPLICATION_CONTEXT:
            if seen_context:
                raise _invalid(f"{name} has more than one application context item", header)
            seen_context = True
            items.append(ApplicationContextItem(_text(mv, s, e), reserved=reserved))
        elif item_type == ItemType.USER_INFORMATION:
            if seen_user:
                raise _invalid(f"{name} has more than one user information item", header)
            seen_user = True
            items.append(_decode_user_information(mv, reserved, s, e))
        elif item_type == ItemType.PRESENTATION_CONTEXT_RQ and is_rq:
            items.append(_decode_pc_rq(mv, reserved, s, e))
        elif item_type == ItemType.PRESENTATION_CONTEXT_AC and not is_rq:
            items.append(_decode_pc_ac(mv, reserved, s, e))
        elif item_type in (ItemType.PRESENTATION_CONTEXT_RQ, ItemType.PRESENTATION_CONTEXT_AC):
            raise _invalid(
                f"{name} contains a presentation context item of type 0x{item_type:02X}, "
                f"which belongs in the {'A-ASSOCIATE-AC' if is_rq else 'A-ASSOCIATE-RQ'}",
                header,
                _UNEXPECTED_PARAMETER,
            )
        else:
            items.append(UnknownItem(item_type, bytes(mv[s:e]), reserved=reserved))
    return tuple(items)


# ----------------------------------------------------------------- decoding PDUs


def _lenient_ae(raw: bytes) -> str:
    # The AC's AE fields are "reserved, not tested" (PS3.8 table 9-17): never fail on them.
    return raw.decode("latin-1").strip(" ")


def _decode_associate(mv: memoryview, pdu_type: int, header_reserved: int) -> PDU:
    name = PDU_NAMES[PDUType(pdu_type)]
    body = len(mv) - PDU_HEADER_LENGTH
    if body < ASSOCIATE_FIXED_LENGTH:
        raise _invalid(
            f"{name} body is {body} bytes; at least {ASSOCIATE_FIXED_LENGTH} are needed for "
            "protocol version, Called AE, Calling AE and reserved fields",
            PDU_HEADER_LENGTH,
        )
    version, reserved_8_9, called_raw, calling_raw, reserved_tail = _ASSOCIATE_FIXED.unpack_from(
        mv, PDU_HEADER_LENGTH
    )
    items = _decode_items(mv, pdu_type, PDU_HEADER_LENGTH + ASSOCIATE_FIXED_LENGTH, len(mv))
    if pdu_type == PDUType.ASSOCIATE_RQ:
        cls: type[AssociateRQ | AssociateAC] = AssociateRQ
        called = _strict_ae(called_raw, "Called AE title", 10)
        calling = _strict_ae(calling_raw, "Calling AE title", 26)
    else:
        cls = AssociateAC
        called, calling = _lenient_ae(called_raw), _lenient_ae(calling_raw)
    return cls(
        version,
        called,
        calling,
        items,
        header_reserved=header_reserved,
        reserved_8_9=reserved_8_9,
        reserved_42_73=reserved_tail,
        called_ae_raw=called_raw,
        calling_ae_raw=calling_raw,
    )


def _strict_ae(raw: bytes, field: str, offset: int) -> str:
    try:
        return decode_ae(raw)
    except ProtocolError as exc:
        where = offset + (exc.offset or 0)
        raise _invalid(f"{field}: {exc}", where) from None


def _decode_fixed_four(mv: memoryview, name: str) -> None:
    body = len(mv) - PDU_HEADER_LENGTH
    if body != 4:
        raise _invalid(f"{name} PDU length must be 4, got {body}", 2)


def _decode_p_data(mv: memoryview, header_reserved: int) -> PDataTF:
    pdvs: list[PDV] = []
    pos = PDU_HEADER_LENGTH
    end = len(mv)
    while pos < end:
        if end - pos < 4:
            raise _invalid(
                f"P-DATA-TF: {end - pos} trailing byte(s) are too short for a PDV item length",
                pos,
            )
        (length,) = _U32.unpack_from(mv, pos)
        if length < 2:
            raise _invalid(
                f"P-DATA-TF: PDV item length {length} is less than 2 (context ID and "
                "message control header)",
                pos,
            )
        data_end = pos + 4 + length
        if data_end > end:
            raise _invalid(
                f"P-DATA-TF: PDV item length {length} overruns the PDU "
                f"({end - pos - 4} bytes remain)",
                pos,
            )
        context_id, control = mv[pos + 4], mv[pos + 5]
        pdvs.append(PDV(context_id, control, bytes(mv[pos + _PDV_HEADER_LENGTH : data_end])))
        pos = data_end
    return PDataTF(tuple(pdvs), header_reserved=header_reserved)


def decode_pdu(data: bytes | bytearray | memoryview) -> PDU:
    """Decode one complete PDU, header included.

    Raises ``ProtocolError`` (with ``abort_reason`` and ``offset``) when the bytes
    are not a valid PDU; nothing else escapes for any input.
    """
    mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    size = len(mv)
    if size == 0:
        raise _invalid("empty PDU", 0)
    pdu_type = mv[0]
    if pdu_type not in PDU_NAMES:
        raise ProtocolError(
            f"unrecognized PDU type 0x{pdu_type:02X} (offset 0)",
            abort_reason=_UNRECOGNIZED_PDU,
            offset=0,
        )
    name = PDU_NAMES[PDUType(pdu_type)]
    if size < PDU_HEADER_LENGTH:
        raise _invalid(f"{name}: {size} bytes are too short for the 6-byte PDU header", 0)
    _, header_reserved, length = PDU_HEADER.unpack_from(mv, 0)
    if length != size - PDU_HEADER_LENGTH:
        raise _invalid(
            f"{name}: PDU length field says {length} bytes but {size - PDU_HEADER_LENGTH} follow "
            "the header",
            2,
        )
    if pdu_type in (PDUType.ASSOCIATE_RQ, PDUType.ASSOCIATE_AC):
        return _decode_associate(mv, pdu_type, header_reserved)
    if pdu_type == PDUType.P_DATA_TF:
        return _decode_p_data(mv, header_reserved)
    _decode_fixed_four(mv, name)
    if pdu_type == PDUType.ASSOCIATE_RJ:
        reserved, result, source, reason = _FOUR_BYTES.unpack_from(mv, PDU_HEADER_LENGTH)
        return AssociateRJ(
            result, source, reason, header_reserved=header_reserved, reserved=reserved
        )
    if pdu_type == PDUType.ABORT:
        reserved_2, source, reason = _ABORT_BODY.unpack_from(mv, PDU_HEADER_LENGTH)
        return Abort(source, reason, header_reserved=header_reserved, reserved=reserved_2)
    tail = bytes(mv[PDU_HEADER_LENGTH:])
    if pdu_type == PDUType.RELEASE_RQ:
        return ReleaseRQ(header_reserved=header_reserved, reserved=tail)
    return ReleaseRP(header_reserved=header_reserved, reserved=tail)


# ---------------------------------------------------------------- encoding items


def _item(item_type: int, reserved: int, data: bytes) -> bytes:
    if len(data) > _MAX_ITEM_LENGTH:
        raise ValueError(f"item 0x{item_type:02X} is {len(data)} bytes; items hold at most 65535")
    return b"".join((_ITEM_HEADER.pack(item_type, reserved, len(data)), data))


def _latin1(text: str) -> bytes:
    return text.encode("latin-1")


def _u16_prefixed(data: bytes) -> bytes:
    if len(data) > _MAX_ITEM_LENGTH:
        raise ValueError(f"field of {len(data)} bytes does not fit a 2-byte length")
    return b"".join((_U16.pack(len(data)), data))


def _encode_sub_item(sub: SubItem) -> bytes:
    if isinstance(sub, MaximumLength):
        return _item(sub.item_type, sub.reserved, _U32.pack(sub.maximum_length))
    if isinstance(sub, (ImplementationClassUID, ImplementationVersionName)):
        return _item(sub.item_type, sub.reserved, _latin1(sub.value))
    if isinstance(sub, AsynchronousOperationsWindow):
        data = _TWO_U16.pack(sub.maximum_invoked, sub.maximum_performed)
        return _item(sub.item_type, sub.reserved, data)
    if isinstance(sub, RoleSelection):
        data = b"".join(
            (_u16_prefixed(_latin1(sub.sop_class)), _TWO_U8.pack(sub.scu_role, sub.scp_role))
        )
        return _item(sub.item_type, sub.reserved, data)
    if isinstance(sub, SOPClassExtendedNegotiation):
        data = b"".join((_u16_prefixed(_latin1(sub.sop_class)), sub.application_information))
        return _item(sub.item_type, sub.reserved, data)
    if isinstance(sub, SOPClassCommonExtendedNegotiation):
        related = b"".join(_u16_prefixed(_latin1(uid)) for uid in sub.related_general_sop_classes)
        data = b"".join(
            (
                _u16_prefixed(_latin1(sub.sop_class)),
                _u16_prefixed(_latin1(sub.service_class)),
                _u16_prefixed(related),
            )
        )
        # Byte 1 is the sub-item version here, not a reserved byte.
        return _item(sub.item_type, sub.version, data)
    if isinstance(sub, UserIdentityRQ):
        data = b"".join(
            (
                _TWO_U8.pack(sub.identity_type, sub.positive_response_requested),
                _u16_prefixed(sub.primary_field),
                _u16_prefixed(sub.secondary_field),
            )
        )
        return _item(sub.item_type, sub.reserved, data)
    if isinstance(sub, UserIdentityAC):
        return _item(sub.item_type, sub.reserved, _u16_prefixed(sub.server_response))
    if isinstance(sub, UnknownItem):
        return _item(sub.item_type, sub.reserved, sub.data)
    raise TypeError(f"not a user information sub-item: {sub!r}")


def _layout_order(
    layout: tuple[tuple[int, int], ...] | None,
    abstract: str | None,
    transfer: tuple[str, ...],
    extra: tuple[UnknownItem, ...],
) -> list[tuple[int, int, bytes]] | None:
    """Sub-items as ``(type, reserved, data)`` in the recorded wire order.

    Returns ``None`` when the layout no longer fits the fields (they were changed
    with ``dataclasses.replace``): it must name the abstract syntax exactly once
    if there is one, as many transfer syntaxes as there are (taken in order) and
    the extra items in their order.
    """
    if layout is None:
        return None
    expected = (abstract is not None) + len(transfer) + len(extra)
    if len(layout) != expected:
        return None
    out: list[tuple[int, int, bytes]] = []
    abstract_done = False
    next_transfer = next_extra = 0
    for item_type, reserved in layout:
        if item_type == ItemType.ABSTRACT_SYNTAX:
            if abstract is None or abstract_done:
                return None
            abstract_done = True
            out.append((item_type, reserved, _latin1(abstract)))
        elif item_type == ItemType.TRANSFER_SYNTAX:
            if next_transfer >= len(transfer):
                return None
            out.append((item_type, reserved, _latin1(transfer[next_transfer])))
            next_transfer += 1
        else:
            if next_extra >= len(extra) or extra[next_extra].item_type != item_type:
                return None
            unknown = extra[next_extra]
            out.append((unknown.item_type, unknown.reserved, unknown.data))
            next_extra += 1
    return out


def _encode_sub_items(
    layout: tuple[tuple[int, int], ...] | None,
    abstract: str | None,
    transfer: tuple[str, ...],
    extra: tuple[UnknownItem, ...],
) -> bytes:
    ordered = _layout_order(layout, abstract, transfer, extra)
    if ordered is None:
        # Canonical order (PS3.8 table 9-13): abstract syntax, transfer syntaxes.
        ordered = []
        if abstract is not None:
            ordered.append((ItemType.ABSTRACT_SYNTAX, 0, _latin1(abstract)))
        ordered.extend((ItemType.TRANSFER_SYNTAX, 0, _latin1(ts)) for ts in transfer)
        ordered.extend((u.item_type, u.reserved, u.data) for u in extra)
    return b"".join(_item(t, r, data) for t, r, data in ordered)


def _encode_item(item: Item) -> bytes:
    if isinstance(item, ApplicationContextItem):
        return _item(item.item_type, item.reserved, _latin1(item.name))
    if isinstance(item, PresentationContextRQItem):
        fixed = _fixed_bytes(item.reserved_body, 3, "reserved_body")
        data = b"".join(
            (
                bytes((item.context_id,)),
                fixed,
                _encode_sub_items(
                    item.layout, item.abstract_syntax, item.transfer_syntaxes, item.extra_items
                ),
            )
        )
        return _item(item.item_type, item.reserved, data)
    if isinstance(item, PresentationContextACItem):
        transfer = () if item.transfer_syntax is None else (item.transfer_syntax,)
        r5, r7 = _fixed_bytes(item.reserved_body, 2, "reserved_body")
        data = b"".join(
            (
                _FOUR_BYTES.pack(item.context_id, r5, item.result, r7),
                _encode_sub_items(item.layout, None, transfer, item.extra_items),
            )
        )
        return _item(item.item_type, item.reserved, data)
    if isinstance(item, UserInformationItem):
        data = b"".join(_encode_sub_item(sub) for sub in item.sub_items)
        return _item(item.item_type, item.reserved, data)
    if isinstance(item, UnknownItem):
        return _item(item.item_type, item.reserved, item.data)
    raise TypeError(f"not an A-ASSOCIATE item: {item!r}")


def _fixed_bytes(value: bytes, size: int, field: str) -> bytes:
    if len(value) != size:
        raise ValueError(f"{field} must be {size} bytes, got {len(value)}")
    return value


# ----------------------------------------------------------------- encoding PDUs


def _frame(pdu_type: int, header_reserved: int, body: bytes) -> bytes:
    return b"".join((PDU_HEADER.pack(pdu_type, header_reserved, len(body)), body))


def _ae_field(title: str, raw: bytes | None, strict: bool) -> bytes:
    # The raw field is only a hint: it wins while it still says the same title,
    # so dataclasses.replace(pdu, called_ae=...) changes the wire as expected.
    if raw is not None and len(raw) == AE_LENGTH:
        try:
            same = (decode_ae(raw) if strict else _lenient_ae(raw)) == title
        except ProtocolError:
            same = False
        if same:
            return raw
    return encode_ae(title)


def _encode_associate(pdu: AssociateRQ | AssociateAC) -> bytes:
    strict = isinstance(pdu, AssociateRQ)
    fixed = _ASSOCIATE_FIXED.pack(
        pdu.protocol_version,
        pdu.reserved_8_9,
        _ae_field(pdu.called_ae, pdu.called_ae_raw, strict),
        _ae_field(pdu.calling_ae, pdu.calling_ae_raw, strict),
        _fixed_bytes(pdu.reserved_42_73, 32, "reserved_42_73"),
    )
    body = b"".join((fixed, *(_encode_item(item) for item in pdu.items)))
    return _frame(pdu.pdu_type, pdu.header_reserved, body)


def _encode_p_data(pdu: PDataTF) -> bytes:
    parts: list[bytes] = []
    for pdv in pdu.pdvs:
        parts.append(_PDV_HEADER.pack(len(pdv.data) + 2, pdv.context_id, pdv.message_control))
        parts.append(pdv.data)
    return _frame(pdu.pdu_type, pdu.header_reserved, b"".join(parts))


def _encode_rj(pdu: AssociateRJ) -> bytes:
    body = _FOUR_BYTES.pack(pdu.reserved, pdu.result, pdu.source, pdu.reason)
    return _frame(pdu.pdu_type, pdu.header_reserved, body)


def _encode_release(pdu: ReleaseRQ | ReleaseRP) -> bytes:
    return _frame(pdu.pdu_type, pdu.header_reserved, _fixed_bytes(pdu.reserved, 4, "reserved"))


def _encode_abort(pdu: Abort) -> bytes:
    body = _ABORT_BODY.pack(_fixed_bytes(pdu.reserved, 2, "reserved"), pdu.source, pdu.reason)
    return _frame(pdu.pdu_type, pdu.header_reserved, body)


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    AssociateRQ: _encode_associate,
    AssociateAC: _encode_associate,
    AssociateRJ: _encode_rj,
    PDataTF: _encode_p_data,
    ReleaseRQ: _encode_release,
    ReleaseRP: _encode_release,
    Abort: _encode_abort,
}


def encode_pdu(pdu: PDU) -> bytes:
    """Return the wire bytes of ``pdu``, header included.

    Raises ``ValueError`` when a field cannot be represented (an AE title longer
    than 16 characters, an item over 65535 bytes, a number out of range).
    """
    encoder = _ENCODERS.get(type(pdu))
    if encoder is None:
        raise TypeError(f"not a PDU: {pdu!r}")
    try:
        return encoder(pdu)
    except struct.error as exc:
        raise ValueError(f"cannot encode {type(pdu).__name__}: {exc}") from None


@lru_cache(maxsize=64)
def encode_reject(result: int, source: int, reason: int) -> bytes:
    """The 10 bytes of an A-ASSOCIATE-RJ (cached: the gateway sends a handful of kinds)."""
    return _encode_rj(AssociateRJ(result, source, reason))


@lru_cache(maxsize=64)
def encode_abort(source: int, reason: int) -> bytes:
    """The 10 bytes of an A-ABORT (cached: there are only a few kinds)."""
    return _encode_abort(Abort(source, reason))
