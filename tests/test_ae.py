"""AE titles: the 16-byte field, its padding rules and validation (PS3.5 VR AE, PS3.8)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.dul.ae import decode_ae, encode_ae, validate_ae
from gateway.errors import ProtocolError

# Printable ASCII without the backslash: the AE repertoire.
AE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "\\")


@pytest.mark.parametrize(
    ("raw", "title"),
    [
        (b"CT01            ", "CT01"),  # the usual: trailing space padding
        (b"  CT01          ", "CT01"),  # leading spaces are not significant either
        (b"MY AE TITLE     ", "MY AE TITLE"),  # inner spaces are part of the title
        (b"ABCDEFGHIJKLMNOP", "ABCDEFGHIJKLMNOP"),  # full 16 characters, no padding
        (b"                ", ""),  # all spaces: decodes, validate_ae says why it is bad
        (b"CT01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", "CT01" + "\x00" * 12),
    ],
)
def test_decode_ae(raw: bytes, title: str) -> None:
    assert decode_ae(raw) == title


def test_decode_ae_rejects_non_ascii_with_reason_6_and_offset() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_ae(b"CT\xc301           ")
    assert info.value.abort_reason == 6
    assert info.value.offset == 2
    assert "not ASCII" in str(info.value)


@pytest.mark.parametrize("raw", [b"", b"CT01", b"X" * 17])
def test_decode_ae_rejects_wrong_field_size(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_ae(raw)
    assert info.value.abort_reason == 6


@pytest.mark.parametrize(
    ("title", "raw"),
    [
        ("CT01", b"CT01            "),
        ("ABCDEFGHIJKLMNOP", b"ABCDEFGHIJKLMNOP"),
        (" X", b" X              "),  # encode does not second-guess the caller
        ("", b"                "),
    ],
)
def test_encode_ae(title: str, raw: bytes) -> None:
    assert encode_ae(title) == raw


@pytest.mark.parametrize("title", ["ABCDEFGHIJKLMNOPQ", "CT\u00e901"])
def test_encode_ae_refuses_unrepresentable_titles(title: str) -> None:
    with pytest.raises(ValueError):
        encode_ae(title)


@pytest.mark.parametrize(
    "title", ["CT01", "A", "ABCDEFGHIJKLMNOP", "MY AE", "  PADDED  ", "x-y_z.1"]
)
def test_validate_ae_accepts(title: str) -> None:
    assert validate_ae(title) is None


@pytest.mark.parametrize(
    ("title", "words"),
    [
        ("", "empty"),
        ("    ", "only spaces"),
        ("ABCDEFGHIJKLMNOPQ", "longer than 16"),
        ("CT\\01", "backslash"),
        ("CT\t01", "control character 0x09"),
        ("CT01\x00", "control character 0x00"),
        ("CT\x7f", "control character 0x7F"),
        ("CT\u00e901", "non-ASCII"),
    ],
)
def test_validate_ae_explains(title: str, words: str) -> None:
    reason = validate_ae(title)
    assert reason is not None
    assert words in reason


@given(st.text(alphabet=AE_CHARS, min_size=1, max_size=16).filter(lambda t: t.strip(" ")))
def test_valid_titles_round_trip(title: str) -> None:
    assert validate_ae(title) is None
    raw = encode_ae(title)
    assert len(raw) == 16
    assert decode_ae(raw) == title.strip(" ")
