"""Small bridges to OpenSSL facts that pyOpenSSL does not expose publicly.

pyOpenSSL has no public accessor for ``SSL_get_verify_result`` nor for the
text of an X.509 verification error code, yet an operator needs "unable to
get local issuer certificate" rather than "certificate verify failed". The
private ``_lib`` binding is stable in practice; every use here degrades to a
plain "error N" if it ever disappears.
"""

from __future__ import annotations

from OpenSSL import SSL

try:  # pragma: no cover - depends on the installed binding
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover
    _ffi = None
    _lib = None

X509_V_OK = 0


def verify_error_string(code: int) -> str:
    """Return OpenSSL's text for an X.509 verification error code."""
    if _lib is not None and _ffi is not None:
        try:
            text = _lib.X509_verify_cert_error_string(code)
            if text != _ffi.NULL:
                return _ffi.string(text).decode("ascii", "replace")
        except (AttributeError, TypeError):
            pass
    return f"X.509 verification error {code}"


def verify_result(conn: SSL.Connection) -> int | None:
    """Return the connection's X.509 verification result code, if available."""
    ssl = getattr(conn, "_ssl", None)
    if _lib is None or ssl is None:
        return None
    try:
        return int(_lib.SSL_get_verify_result(ssl))
    except (AttributeError, TypeError):
        return None


def error_reasons(exc: BaseException) -> list[str]:
    """Return the OpenSSL reason strings carried by a pyOpenSSL error."""
    reasons: list[str] = []
    if isinstance(exc, SSL.SysCallError):
        return [str(exc.args[1]) if len(exc.args) > 1 else str(exc)]
    for arg in exc.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    reasons.append(str(item[-1]))
                else:
                    reasons.append(str(item))
        elif arg:
            reasons.append(str(arg))
    return reasons
