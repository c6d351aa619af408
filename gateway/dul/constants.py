"""Numbers of the DICOM upper layer (PS3.8 §9.3), as enums.

They are ``IntEnum`` so that they compare equal to the bare integers found in
decoded PDUs and can be logged by name.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "PDU_NAMES",
    "AbortReason",
    "AbortSource",
    "ItemType",
    "PDUType",
    "PresentationContextResult",
    "RejectReason",
    "RejectReasonACSE",
    "RejectReasonPresentation",
    "RejectReasonUser",
    "RejectResult",
    "RejectSource",
    "describe_abort",
    "describe_reject",
]


class PDUType(IntEnum):
    """First byte of every PDU (PS3.8 table 9-1 ff.)."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


#: PS3.8 names of the PDU types, for log lines and error messages.
PDU_NAMES: dict[int, str] = {
    PDUType.ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    PDUType.ASSOCIATE_AC: "A-ASSOCIATE-AC",
    PDUType.ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    PDUType.P_DATA_TF: "P-DATA-TF",
    PDUType.RELEASE_RQ: "A-RELEASE-RQ",
    PDUType.RELEASE_RP: "A-RELEASE-RP",
    PDUType.ABORT: "A-ABORT",
}


class ItemType(IntEnum):
    """Item and sub-item types of A-ASSOCIATE-RQ/AC (PS3.8 §9.3.2, §9.3.3, annex D)."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNCHRONOUS_OPERATIONS_WINDOW = 0x53
    ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED_NEGOTIATION = 0x56
    SOP_CLASS_COMMON_EXTENDED_NEGOTIATION = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


class PresentationContextResult(IntEnum):
    """Result/Reason byte of a presentation context item in the AC (PS3.8 table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result (PS3.8 table 9-21)."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ source (PS3.8 table 9-21)."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


# The reason byte means different things for each source, so one IntEnum cannot
# hold them all: value 2 is "application context not supported" for the user,
# "protocol version not supported" for ACSE and "local limit exceeded" for the
# presentation layer.  An IntEnum with duplicate values would alias them and log
# the wrong name, hence one enum per source.


class RejectReasonUser(IntEnum):
    """Reasons when the source is the service user (1)."""

    NO_REASON_GIVEN = 1
    APPLICATION_CONTEXT_NAME_NOT_SUPPORTED = 2
    CALLING_AE_TITLE_NOT_RECOGNIZED = 3
    CALLED_AE_TITLE_NOT_RECOGNIZED = 7


class RejectReasonACSE(IntEnum):
    """Reasons when the source is the service provider, ACSE related (2)."""

    NO_REASON_GIVEN = 1
    PROTOCOL_VERSION_NOT_SUPPORTED = 2


class RejectReasonPresentation(IntEnum):
    """Reasons when the source is the service provider, presentation related (3)."""

    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


class RejectReason:
    """The reject reasons by name, each the member of the enum of its source.

    ``RejectReason.TEMPORARY_CONGESTION.name`` is ``"TEMPORARY_CONGESTION"`` even
    though its value (1) is also "no reason given" for other sources.
    """

    NO_REASON_GIVEN = RejectReasonUser.NO_REASON_GIVEN
    APPLICATION_CONTEXT_NAME_NOT_SUPPORTED = RejectReasonUser.APPLICATION_CONTEXT_NAME_NOT_SUPPORTED
    CALLING_AE_TITLE_NOT_RECOGNIZED = RejectReasonUser.CALLING_AE_TITLE_NOT_RECOGNIZED
    CALLED_AE_TITLE_NOT_RECOGNIZED = RejectReasonUser.CALLED_AE_TITLE_NOT_RECOGNIZED
    PROTOCOL_VERSION_NOT_SUPPORTED = RejectReasonACSE.PROTOCOL_VERSION_NOT_SUPPORTED
    TEMPORARY_CONGESTION = RejectReasonPresentation.TEMPORARY_CONGESTION
    LOCAL_LIMIT_EXCEEDED = RejectReasonPresentation.LOCAL_LIMIT_EXCEEDED


class AbortSource(IntEnum):
    """A-ABORT source (PS3.8 table 9-26)."""

    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """A-ABORT reason when the source is the service provider (PS3.8 table 9-26)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    RESERVED = 3
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


_REJECT_REASON_ENUMS: dict[int, type[IntEnum]] = {
    RejectSource.SERVICE_USER: RejectReasonUser,
    RejectSource.SERVICE_PROVIDER_ACSE: RejectReasonACSE,
    RejectSource.SERVICE_PROVIDER_PRESENTATION: RejectReasonPresentation,
}


def _name(enum: type[IntEnum], value: int) -> str:
    try:
        return enum(value).name.replace("_", " ").lower()
    except ValueError:
        return f"unknown ({value})"


def describe_reject(result: int, source: int, reason: int) -> str:
    """Words for an A-ASSOCIATE-RJ, for log lines: ``"rejected permanent by ..."``."""
    reason_enum = _REJECT_REASON_ENUMS.get(source)
    reason_text = _name(reason_enum, reason) if reason_enum else f"unknown ({reason})"
    return (
        f"rejected {_name(RejectResult, result)}, source {_name(RejectSource, source)}, "
        f"reason {reason_text}"
    )


def describe_abort(source: int, reason: int) -> str:
    """Words for an A-ABORT, for log lines."""
    return f"aborted by {_name(AbortSource, source)}, reason {_name(AbortReason, reason)}"
