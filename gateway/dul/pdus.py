"""The seven PDUs of the DICOM upper layer and the items inside them (PS3.8 §9.3).

Every class is a frozen, slotted dataclass: a decoded PDU is a value that can be
shared between tasks, logged and compared, and changed only with
``dataclasses.replace``.

Byte-exact round trips
----------------------
``encode_pdu(decode_pdu(x)) == x`` holds for every PDU the codec accepts, even
when a peer sets reserved bytes, pads an AE title oddly or pads a UID with NUL.
The information needed for that is kept in keyword-only fields that are left
out of ``==`` and ``repr`` (the standard says reserved fields are "not tested"):

* ``reserved*`` fields hold reserved bytes exactly as received;
* ``called_ae_raw`` / ``calling_ae_raw`` hold the 16-byte AE fields.  They are a
  *hint*: the encoder uses the raw field only while it still decodes to
  ``called_ae`` / ``calling_ae``, so ``dataclasses.replace(rq, called_ae="NEW")``
  puts ``NEW`` on the wire without anyone having to clear the raw field;
* ``layout`` of a presentation context item records the wire order of its
  sub-items, used the same way (only while it still fits the fields).

UID values are kept as received (a trailing NUL pad included); the ``uid``-style
properties give the value with the padding stripped, for comparisons.
Strings that are not AE titles are decoded as Latin-1, which maps every byte to
one character and back, so nothing a peer sends is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from gateway.dul.constants import ItemType, PDUType

__all__ = [
    "PDU",
    "PDV",
    "Abort",
    "ApplicationContextItem",
    "AssociateAC",
    "AssociateRJ",
    "AssociateRQ",
    "AsynchronousOperationsWindow",
    "ImplementationClassUID",
    "ImplementationVersionName",
    "Item",
    "MaximumLength",
    "PDataTF",
    "PresentationContextACItem",
    "PresentationContextRQItem",
    "ReleaseRP",
    "ReleaseRQ",
    "RoleSelection",
    "SOPClassCommonExtendedNegotiation",
    "SOPClassExtendedNegotiation",
    "SubItem",
    "UnknownItem",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserInformationItem",
    "strip_uid",
]


def strip_uid(value: str) -> str:
    """Return a UID without the trailing NUL/space padding some peers add."""
    return value.rstrip("\x00 ")


def _hint(default: Any) -> Any:
    """A keyword-only field kept for byte-exact re-encoding, ignored by ``==``/``repr``."""
    return field(default=default, kw_only=True, compare=False, repr=False)


_T = TypeVar("_T")

# --------------------------------------------------------------------------- items


@dataclass(frozen=True, slots=True)
class UnknownItem:
    """An item or sub-item of a type this codec does not interpret, carried as is.

    ======  =====================================
    offset  field
    ======  =====================================
    0       item type (``item_type``)
    1       reserved (``reserved``)
    2-3     item length (big endian)
    4-      item data (``data``)
    ======  =====================================
    """

    item_type: int
    data: bytes
    reserved: int = _hint(0)


@dataclass(frozen=True, slots=True)
class ApplicationContextItem:
    """Application context item, type 10H (PS3.8 table 9-12).

    ======  =============================================
    offset  field
    ======  =============================================
    0       10H
    1       reserved
    2-3     item length
    4-      application context name (a UID, usually
            ``1.2.840.10008.3.1.1.1``)
    ======  =============================================
    """

    item_type: ClassVar[int] = ItemType.APPLICATION_CONTEXT
    name: str
    reserved: int = _hint(0)

    @property
    def uid(self) -> str:
        return strip_uid(self.name)


@dataclass(frozen=True, slots=True)
class PresentationContextRQItem:
    """Presentation context item of the A-ASSOCIATE-RQ, type 20H (PS3.8 table 9-13).

    ======  =====================================================
    offset  field
    ======  =====================================================
    0       20H
    1       reserved (``reserved``)
    2-3     item length
    4       presentation context ID (odd, 1-255)
    5-7     reserved (``reserved_body``)
    8-      one abstract syntax sub-item (30H), then one or more
            transfer syntax sub-items (40H); each sub-item is
            type (1), reserved (1), length (2), UID
    ======  =====================================================

    Sub-items of other types are kept in ``extra_items``.
    """

    item_type: ClassVar[int] = ItemType.PRESENTATION_CONTEXT_RQ
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    extra_items: tuple[UnknownItem, ...] = field(default=(), kw_only=True)
    reserved: int = _hint(0)
    reserved_body: bytes = _hint(b"\x00\x00\x00")
    layout: tuple[tuple[int, int], ...] | None = _hint(None)
    """Wire order of the sub-items as ``(item type, reserved byte)``."""

    @property
    def abstract_syntax_uid(self) -> str:
        return strip_uid(self.abstract_syntax)

    @property
    def transfer_syntax_uids(self) -> tuple[str, ...]:
        return tuple(strip_uid(ts) for ts in self.transfer_syntaxes)


@dataclass(frozen=True, slots=True)
class PresentationContextACItem:
    """Presentation context item of the A-ASSOCIATE-AC, type 21H (PS3.8 table 9-18).

    ======  =====================================================
    offset  field
    ======  =====================================================
    0       21H
    1       reserved (``reserved``)
    2-3     item length
    4       presentation context ID
    5       reserved (``reserved_body[0]``)
    6       result/reason: 0 acceptance, 1 user-rejection,
            2 no-reason, 3 abstract-syntax-not-supported,
            4 transfer-syntaxes-not-supported
    7       reserved (``reserved_body[1]``)
    8-      one transfer syntax sub-item (40H); not significant
            unless the result is acceptance, and may be absent
    ======  =====================================================
    """

    item_type: ClassVar[int] = ItemType.PRESENTATION_CONTEXT_AC
    context_id: int
    result: int
    transfer_syntax: str | None
    extra_items: tuple[UnknownItem, ...] = field(default=(), kw_only=True)
    reserved: int = _hint(0)
    reserved_body: bytes = _hint(b"\x00\x00")
    layout: tuple[tuple[int, int], ...] | None = _hint(None)
    """Wire order of the sub-items as ``(item type, reserved byte)``."""

    @property
    def accepted(self) -> bool:
        return self.result == 0

    @property
    def transfer_syntax_uid(self) -> str | None:
        return None if self.transfer_syntax is None else strip_uid(self.transfer_syntax)


@dataclass(frozen=True, slots=True)
class MaximumLength:
    """Maximum length sub-item, type 51H (PS3.8 annex D.1).

    ======  ==============================================
    offset  field
    ======  ==============================================
    0       51H
    1       reserved
    2-3     item length, always 4
    4-7     maximum length of P-DATA-TF PDUs the sender
            can receive; 0 means unlimited
    ======  ==============================================
    """

    item_type: ClassVar[int] = ItemType.MAXIMUM_LENGTH
    maximum_length: int
    reserved: int = _hint(0)


@dataclass(frozen=True, slots=True)
class ImplementationClassUID:
    """Implementation class UID sub-item, type 52H (PS3.7 annex D.3.3.2).

    ======  =============================
    offset  field
    ======  =============================
    0       52H
    1       reserved
    2-3     item length
    4-      implementation class UID
    ======  =============================
    """

    item_type: ClassVar[int] = ItemType.IMPLEMENTATION_CLASS_UID
    value: str
    reserved: int = _hint(0)

    @property
    def uid(self) -> str:
        return strip_uid(self.value)


@dataclass(frozen=True, slots=True)
class AsynchronousOperationsWindow:
    """Asynchronous operations window sub-item, type 53H (PS3.7 annex D.3.3.3).

    ======  ===========================================
    offset  field
    ======  ===========================================
    0       53H
    1       reserved
    2-3     item length, always 4
    4-5     maximum number of operations invoked
    6-7     maximum number of operations performed
    ======  ===========================================
    """

    item_type: ClassVar[int] = ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW
    maximum_invoked: int
    maximum_performed: int
    reserved: int = _hint(0)


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """SCP/SCU role selection sub-item, type 54H (PS3.7 annex D.3.3.4).

    ======  =============================
    offset  field
    ======  =============================
    0       54H
    1       reserved
    2-3     item length
    4-5     UID length (n)
    6-      SOP class UID (n bytes)
    6+n     SCU role (0 or 1)
    7+n     SCP role (0 or 1)
    ======  =============================
    """

    item_type: ClassVar[int] = ItemType.ROLE_SELECTION
    sop_class: str
    scu_role: int
    scp_role: int
    reserved: int = _hint(0)

    @property
    def uid(self) -> str:
        return strip_uid(self.sop_class)


@dataclass(frozen=True, slots=True)
class ImplementationVersionName:
    """Implementation version name sub-item, type 55H (PS3.7 annex D.3.3.2).

    ======  ==========================================
    offset  field
    ======  ==========================================
    0       55H
    1       reserved
    2-3     item length (1-16)
    4-      implementation version name
    ======  ==========================================
    """

    item_type: ClassVar[int] = ItemType.IMPLEMENTATION_VERSION_NAME
    value: str
    reserved: int = _hint(0)

    @property
    def name(self) -> str:
        return self.value.strip("\x00 ")


@dataclass(frozen=True, slots=True)
class SOPClassExtendedNegotiation:
    """SOP class extended negotiation sub-item, type 56H (PS3.7 annex D.3.3.5).

    ======  ==========================================
    offset  field
    ======  ==========================================
    0       56H
    1       reserved
    2-3     item length
    4-5     SOP class UID length (n)
    6-      SOP class UID (n bytes)
    6+n-    service class application information
    ======  ==========================================
    """

    item_type: ClassVar[int] = ItemType.SOP_CLASS_EXTENDED_NEGOTIATION
    sop_class: str
    application_information: bytes
    reserved: int = _hint(0)

    @property
    def uid(self) -> str:
        return strip_uid(self.sop_class)


@dataclass(frozen=True, slots=True)
class SOPClassCommonExtendedNegotiation:
    """SOP class common extended negotiation sub-item, type 57H (PS3.7 annex D.3.3.6).

    ======  =====================================================
    offset  field
    ======  =====================================================
    0       57H
    1       sub-item version (``version``; 0) -- not reserved
    2-3     item length
    4-5     SOP class UID length (n)
    6-      SOP class UID
    6+n     service class UID length (m), 2 bytes
    8+n-    service class UID
    8+n+m   related general SOP class identification length
            (k), 2 bytes
    10+n+m- k bytes of sub-items, each: UID length (2), UID
    ======  =====================================================
    """

    item_type: ClassVar[int] = ItemType.SOP_CLASS_COMMON_EXTENDED_NEGOTIATION
    sop_class: str
    service_class: str
    related_general_sop_classes: tuple[str, ...] = ()
    version: int = field(default=0, kw_only=True)

    @property
    def uid(self) -> str:
        return strip_uid(self.sop_class)


@dataclass(frozen=True, slots=True)
class UserIdentityRQ:
    """User identity negotiation sub-item of the RQ, type 58H (PS3.7 annex D.3.3.7).

    ======  ===================================================
    offset  field
    ======  ===================================================
    0       58H
    1       reserved
    2-3     item length
    4       user identity type: 1 username, 2 username and
            passcode, 3 Kerberos, 4 SAML, 5 JWT
    5       positive response requested (0 or 1)
    6-7     primary field length (n)
    8-      primary field
    8+n     secondary field length (m), 2 bytes
    10+n-   secondary field (passcode for type 2)
    ======  ===================================================
    """

    item_type: ClassVar[int] = ItemType.USER_IDENTITY_RQ
    identity_type: int
    positive_response_requested: int
    primary_field: bytes
    secondary_field: bytes = b""
    reserved: int = _hint(0)

    def __repr__(self) -> str:
        # The fields are credentials: never let a log line carry them.
        return (
            f"UserIdentityRQ(identity_type={self.identity_type}, "
            f"positive_response_requested={self.positive_response_requested}, "
            f"primary_field=<{len(self.primary_field)} bytes>, "
            f"secondary_field=<{len(self.secondary_field)} bytes>)"
        )


@dataclass(frozen=True, slots=True)
class UserIdentityAC:
    """User identity negotiation sub-item of the AC, type 59H (PS3.7 annex D.3.3.7).

    ======  =====================================
    offset  field
    ======  =====================================
    0       59H
    1       reserved
    2-3     item length
    4-5     server response length (n)
    6-      server response
    ======  =====================================
    """

    item_type: ClassVar[int] = ItemType.USER_IDENTITY_AC
    server_response: bytes
    reserved: int = _hint(0)

    def __repr__(self) -> str:
        return f"UserIdentityAC(server_response=<{len(self.server_response)} bytes>)"


SubItem = (
    MaximumLength
    | ImplementationClassUID
    | AsynchronousOperationsWindow
    | RoleSelection
    | ImplementationVersionName
    | SOPClassExtendedNegotiation
    | SOPClassCommonExtendedNegotiation
    | UserIdentityRQ
    | UserIdentityAC
    | UnknownItem
)


@dataclass(frozen=True, slots=True)
class UserInformationItem:
    """User information item, type 50H (PS3.8 table 9-16).

    ======  ============================================
    offset  field
    ======  ============================================
    0       50H
    1       reserved
    2-3     item length
    4-      user data sub-items (51H-59H, and any other
            type, kept as ``UnknownItem``), in wire order
    ======  ============================================
    """

    item_type: ClassVar[int] = ItemType.USER_INFORMATION
    sub_items: tuple[SubItem, ...]
    reserved: int = _hint(0)

    def find(self, kind: type[_T]) -> _T | None:
        """Return the first sub-item of class ``kind``, or ``None``."""
        for sub in self.sub_items:
            if isinstance(sub, kind):
                return sub
        return None

    def find_all(self, kind: type[_T]) -> tuple[_T, ...]:
        """Return every sub-item of class ``kind``, in wire order."""
        return tuple(sub for sub in self.sub_items if isinstance(sub, kind))

    @property
    def maximum_length(self) -> int | None:
        item = self.find(MaximumLength)
        return None if item is None else item.maximum_length


Item = (
    ApplicationContextItem
    | PresentationContextRQItem
    | PresentationContextACItem
    | UserInformationItem
    | UnknownItem
)

# ---------------------------------------------------------------------------- PDUs


@dataclass(frozen=True, slots=True)
class _Associate:
    """Fields and read-only conveniences shared by A-ASSOCIATE-RQ and -AC.

    The two PDUs have the same wire layout (see ``AssociateRQ``); only the
    presentation context items inside them differ.  The subclasses stay separate
    dataclasses, so an RQ never compares equal to an AC with the same fields.
    """

    protocol_version: int
    called_ae: str
    calling_ae: str
    items: tuple[Item, ...] = ()
    header_reserved: int = _hint(0)
    reserved_8_9: int = _hint(0)
    reserved_42_73: bytes = _hint(bytes(32))
    called_ae_raw: bytes | None = _hint(None)
    calling_ae_raw: bytes | None = _hint(None)

    @property
    def application_context_name(self) -> str | None:
        for item in self.items:
            if isinstance(item, ApplicationContextItem):
                return item.uid
        return None

    @property
    def user_information(self) -> UserInformationItem | None:
        for item in self.items:
            if isinstance(item, UserInformationItem):
                return item
        return None

    @property
    def max_pdu_length(self) -> int | None:
        """The sender's maximum receive length (0 = unlimited), ``None`` if absent."""
        info = self.user_information
        return None if info is None else info.maximum_length

    @property
    def implementation_class_uid(self) -> str | None:
        info = self.user_information
        item = None if info is None else info.find(ImplementationClassUID)
        return None if item is None else item.uid

    @property
    def implementation_version_name(self) -> str | None:
        info = self.user_information
        item = None if info is None else info.find(ImplementationVersionName)
        return None if item is None else item.name


@dataclass(frozen=True, slots=True)
class AssociateRQ(_Associate):
    """A-ASSOCIATE-RQ PDU, type 01H (PS3.8 table 9-11).

    ======  ===========================================================
    offset  field
    ======  ===========================================================
    0       01H
    1       reserved (``header_reserved``)
    2-5     PDU length: bytes that follow (at least 68)
    6-7     protocol version, bit 0 set (0001H)
    8-9     reserved (``reserved_8_9``)
    10-25   Called AE title, 16 bytes space padded
    26-41   Calling AE title, 16 bytes space padded
    42-73   reserved (``reserved_42_73``), 32 bytes
    74-     variable items: application context (10H), presentation
            contexts (20H), user information (50H)
    ======  ===========================================================

    (Offsets here count from 0; PS3.8 counts bytes from 1.)
    """

    pdu_type: ClassVar[int] = PDUType.ASSOCIATE_RQ

    @property
    def presentation_contexts(self) -> tuple[PresentationContextRQItem, ...]:
        return tuple(i for i in self.items if isinstance(i, PresentationContextRQItem))


@dataclass(frozen=True, slots=True)
class AssociateAC(_Associate):
    """A-ASSOCIATE-AC PDU, type 02H (PS3.8 table 9-17).

    The layout is the A-ASSOCIATE-RQ's.  The AE title fields (offsets 10-41) and
    the 32 reserved bytes are formally "reserved" here: they are sent with the
    values received in the RQ and not tested, so they are decoded leniently.
    The variable items are application context (10H), presentation context
    results (21H) and user information (50H).
    """

    pdu_type: ClassVar[int] = PDUType.ASSOCIATE_AC

    @property
    def presentation_contexts(self) -> tuple[PresentationContextACItem, ...]:
        return tuple(i for i in self.items if isinstance(i, PresentationContextACItem))


@dataclass(frozen=True, slots=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ PDU, type 03H (PS3.8 table 9-21).

    ======  ==============================================
    offset  field
    ======  ==============================================
    0       03H
    1       reserved
    2-5     PDU length, always 4
    6       reserved (``reserved``)
    7       result: 1 rejected-permanent, 2 transient
    8       source: 1 service-user, 2 service-provider
            (ACSE), 3 service-provider (presentation)
    9       reason/diagnostic, meaning depends on source
    ======  ==============================================
    """

    pdu_type: ClassVar[int] = PDUType.ASSOCIATE_RJ
    result: int
    source: int
    reason: int
    header_reserved: int = _hint(0)
    reserved: int = _hint(0)


@dataclass(frozen=True, slots=True)
class PDV:
    """Presentation data value item inside a P-DATA-TF (PS3.8 table 9-23, annex E.2).

    ======  ================================================
    offset  field
    ======  ================================================
    0-3     item length: bytes that follow (at least 2)
    4       presentation context ID
    5       message control header: bit 0 set = command,
            clear = data set; bit 1 set = last fragment
    6-      fragment of the command or data set
    ======  ================================================
    """

    context_id: int
    message_control: int
    data: bytes

    @property
    def is_command(self) -> bool:
        return bool(self.message_control & 0x01)

    @property
    def is_last(self) -> bool:
        return bool(self.message_control & 0x02)


@dataclass(frozen=True, slots=True)
class PDataTF:
    """P-DATA-TF PDU, type 04H (PS3.8 table 9-22).

    ======  ==================================
    offset  field
    ======  ==================================
    0       04H
    1       reserved
    2-5     PDU length
    6-      one or more PDV items
    ======  ==================================
    """

    pdu_type: ClassVar[int] = PDUType.P_DATA_TF
    pdvs: tuple[PDV, ...]
    header_reserved: int = _hint(0)


@dataclass(frozen=True, slots=True)
class ReleaseRQ:
    """A-RELEASE-RQ PDU, type 05H (PS3.8 table 9-24).

    ======  ==============================
    offset  field
    ======  ==============================
    0       05H
    1       reserved
    2-5     PDU length, always 4
    6-9     reserved (``reserved``)
    ======  ==============================
    """

    pdu_type: ClassVar[int] = PDUType.RELEASE_RQ
    header_reserved: int = _hint(0)
    reserved: bytes = _hint(bytes(4))


@dataclass(frozen=True, slots=True)
class ReleaseRP:
    """A-RELEASE-RP PDU, type 06H (PS3.8 table 9-25); layout as A-RELEASE-RQ."""

    pdu_type: ClassVar[int] = PDUType.RELEASE_RP
    header_reserved: int = _hint(0)
    reserved: bytes = _hint(bytes(4))


@dataclass(frozen=True, slots=True)
class Abort:
    """A-ABORT PDU, type 07H (PS3.8 table 9-26).

    ======  ====================================================
    offset  field
    ======  ====================================================
    0       07H
    1       reserved
    2-5     PDU length, always 4
    6-7     reserved (``reserved``)
    8       source: 0 service-user, 2 service-provider
    9       reason (service-provider only): 0 not specified,
            1 unrecognized PDU, 2 unexpected PDU, 4 unrecognized
            PDU parameter, 5 unexpected PDU parameter, 6 invalid
            PDU parameter value
    ======  ====================================================
    """

    pdu_type: ClassVar[int] = PDUType.ABORT
    source: int
    reason: int
    header_reserved: int = _hint(0)
    reserved: bytes = _hint(b"\x00\x00")


PDU = AssociateRQ | AssociateAC | AssociateRJ | PDataTF | ReleaseRQ | ReleaseRP | Abort
