"""The gateway's exception hierarchy.

Every message is meant to be shown to an operator as it is: it names the file,
key or field that is wrong and what was expected.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration file is invalid; the message names the key path."""


class CertificateError(GatewayError):
    """A certificate, key or trust file cannot be used; the message names the file."""


class ProtocolError(GatewayError):
    """A peer sent bytes that break the DICOM upper-layer protocol.

    ``abort_reason`` is the A-ABORT reason (PS3.8 table 9-26) the gateway answers with:
    0 not specified, 1 unrecognized PDU, 2 unexpected PDU, 4 unrecognized PDU
    parameter, 5 unexpected PDU parameter, 6 invalid PDU parameter value.
    ``offset`` is the byte offset inside the PDU where the problem was found.
    """

    def __init__(self, message: str, *, abort_reason: int = 0, offset: int | None = None):
        super().__init__(message)
        self.abort_reason = abort_reason
        self.offset = offset


class TLSError(GatewayError):
    """A TLS handshake or record-layer failure, in words fit for a log line."""
