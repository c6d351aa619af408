"""Application Entity titles as they travel in A-ASSOCIATE PDUs.

PS3.8 §9.3.2 and PS3.5 §6.2 (value representation AE):

* the field is 16 bytes, padded with spaces (20H);
* leading and trailing spaces are not significant, so ``"  CT01"`` and ``"CT01"``
  name the same entity;
* the repertoire is the default character repertoire (ASCII G0) without the
  backslash (5CH) and without control characters;
* a title made only of spaces is not a title at all.

``decode_ae`` is deliberately tolerant of what is merely unusual (leading spaces,
odd padding) and strict only about bytes that cannot be text: routing compares
titles as strings, and a title that is not ASCII cannot be routed safely.
``validate_ae`` is the strict check the configuration and the routing layer use
to explain *why* a title is unacceptable.
"""

from __future__ import annotations

from gateway.errors import ProtocolError

__all__ = ["AE_LENGTH", "decode_ae", "encode_ae", "validate_ae"]

AE_LENGTH = 16
"""Length in bytes of every AE-title field on the wire."""

_INVALID_PDU_PARAMETER_VALUE = 6  # PS3.8 table 9-26; duplicated here to avoid an import cycle


def decode_ae(raw: bytes) -> str:
    """Return the title carried in a 16-byte AE field, without surrounding spaces.

    Raises ``ProtocolError`` (A-ABORT reason 6, invalid PDU parameter value) when
    the field is not ASCII or not 16 bytes long.  Other rule violations (an
    all-space title, a backslash) are *not* decoding errors: the association layer
    answers those with an A-ASSOCIATE-RJ, which needs the decoded PDU first.
    """
    if len(raw) != AE_LENGTH:
        raise ProtocolError(
            f"AE title field must be {AE_LENGTH} bytes, got {len(raw)}",
            abort_reason=_INVALID_PDU_PARAMETER_VALUE,
        )
    try:
        text = bytes(raw).decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"AE title field {bytes(raw)!r} is not ASCII (byte {exc.start} is "
            f"0x{raw[exc.start]:02X})",
            abort_reason=_INVALID_PDU_PARAMETER_VALUE,
            offset=exc.start,
        ) from None
    # Only spaces are padding: NUL or TAB are content, and validate_ae reports them.
    return text.strip(" ")


def encode_ae(title: str) -> bytes:
    """Return the 16-byte, space-padded field for ``title``.

    Raises ``ValueError`` when the title is longer than 16 characters or is not
    ASCII.  Spaces inside the title are kept; surrounding spaces are kept too, so
    that ``encode_ae`` never silently changes what the caller asked to send.
    """
    try:
        raw = title.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"AE title {title!r} is not ASCII") from None
    if len(raw) > AE_LENGTH:
        raise ValueError(f"AE title {title!r} is longer than {AE_LENGTH} characters")
    return raw.ljust(AE_LENGTH, b" ")


def validate_ae(title: str) -> str | None:
    """Return why ``title`` is not a valid AE title, or ``None`` when it is valid."""
    if not title.strip(" "):
        return "AE title is empty or only spaces"
    if len(title) > AE_LENGTH:
        return f"AE title is longer than {AE_LENGTH} characters ({len(title)})"
    for index, char in enumerate(title):
        code = ord(char)
        if char == "\\":
            return f"AE title contains a backslash at position {index}"
        if code < 0x20 or code == 0x7F:
            return f"AE title contains control character 0x{code:02X} at position {index}"
        if code > 0x7F:
            return f"AE title contains non-ASCII character {char!r} at position {index}"
    return None
