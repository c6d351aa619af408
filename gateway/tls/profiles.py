"""DICOM PS3.15 Annex B secure transport connection profiles, by name.

Cipher lists use OpenSSL names (TLS ≤ 1.2); TLS 1.3 suites are set apart
because OpenSSL configures them with a different call. The suite lists follow
DCMTK's implementation of the same profiles (``dcmtls/libsrc/tlsciphr.cc`` and
its ``ciphers.txt``), since DCMTK is the peer most sites test against:

* ``bcp195-rfc8996`` (B.12, default): TLS 1.2 and 1.3; TLS 1.2 suites
  TLS_ECDHE_{RSA,ECDSA}_WITH_AES_{128_GCM_SHA256,256_GCM_SHA384}.
* ``bcp195-rfc8996-mod`` (B.13): TLS 1.2 and 1.3, AEAD only, adds the
  DHE-RSA GCM and ECDHE ChaCha20-Poly1305 suites; ``@SECLEVEL=2`` makes
  OpenSSL refuse RSA < 2048, ECC < 224 and SHA-1 certificate signatures.
* ``bcp195-nd`` (B.10): TLS ≥ 1.2, TLS_{EC,}DHE_RSA_WITH_AES_{128,256}_GCM —
  exactly what DCMTK 3.6.7 ``+py`` offers.
* ``bcp195-ex`` (B.11): TLS 1.2 only, the four B.10 suites plus
  TLS_ECDHE_ECDSA_WITH_AES_{128,256}_GCM.
* ``bcp195`` (B.9): TLS ≥ 1.0 (1.2 preferred), the B.10 suites plus
  TLS_RSA_WITH_AES_128_CBC_SHA and, where still built, 3DES.
* ``aes`` (B.3, retired): TLS_RSA_WITH_AES_128_CBC_SHA (3DES fallback), TLS 1.0-1.2.
* ``basic`` (B.1, retired): TLS_RSA_WITH_3DES_EDE_CBC_SHA, TLS 1.0-1.2.

OpenSSL 3+ refuses TLS 1.0/1.1 and SHA-1 signatures at its default security
level 1/2, so the old profiles add ``@SECLEVEL=0``. OpenSSL builds without
3DES (cryptography's OpenSSL 4 wheels among them) cannot offer ``basic`` at
all: :func:`apply_profile` then fails with a message saying so.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

from OpenSSL import SSL

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "VERSIONS",
    "Profile",
    "apply_profile",
    "get_profile",
    "parse_version",
]

DEFAULT_PROFILE = "bcp195-rfc8996"

#: Version names accepted in configuration ("TLSv1.2", "1.2", "tls1.2" ...).
VERSIONS: dict[str, int] = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}

_TLS13_ALL = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
_TLS13_AES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"

# Strongest first: servers pick by their own order (BCP 195 asks for it).
_ECDHE_GCM = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
)
_ND_SUITES = (
    "ECDHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256"
)
_EX_SUITES = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256"
)
_MOD_SUITES = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "DHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256"
)

# RFC 7919 ffdhe2048, produced by `openssl genpkey -genparam -algorithm DH
# -pkeyopt group:ffdhe2048`. pyOpenSSL cannot turn on SSL_CTX_set_dh_auto, and
# without DH parameters an OpenSSL server silently never selects DHE suites
# (which bcp195-nd peers may insist on).
_FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class Profile:
    """One named TLS profile: versions and suites."""

    name: str
    min_version: int
    max_version: int
    cipher_list: str
    tls13_ciphersuites: str
    retired: bool
    description: str
    annex: str = ""


_RSA_CBC = "AES128-SHA:DES-CBC3-SHA"  # TLS_RSA_WITH_AES_128_CBC_SHA, then 3DES

# One row per profile, in the order ``get_profile`` lists them in its errors:
# name, PS3.15 annex, lowest and highest version, TLS <= 1.2 cipher list,
# TLS 1.3 suites, retired, description.
# fmt: off
_TABLE = (
    ("bcp195-rfc8996", "B.12", "1.2", "1.3", _ECDHE_GCM, _TLS13_ALL, False,
     "BCP 195 RFC 8996 TLS profile: TLS 1.2/1.3, ECDHE with AES-GCM"),
    ("bcp195-rfc8996-mod", "B.13", "1.2", "1.3", f"{_MOD_SUITES}:@SECLEVEL=2", _TLS13_ALL, False,
     "Modified BCP 195 RFC 8996 TLS profile: TLS 1.2/1.3, AEAD only, "
     "RSA >= 2048 / ECC >= 256 / SHA-256+ certificates"),
    ("bcp195-nd", "B.10", "1.2", "1.3", _ND_SUITES, _TLS13_ALL, False,
     "Non-downgrading BCP 195 TLS profile: TLS >= 1.2, (EC)DHE-RSA AES-GCM"),
    ("bcp195-ex", "B.11", "1.2", "1.2", _EX_SUITES, _TLS13_AES, False,
     "Extended BCP 195 TLS profile: TLS 1.2 only, (EC)DHE AES-GCM"),
    ("bcp195", "B.9", "1.0", "1.3", f"{_ND_SUITES}:{_RSA_CBC}:@SECLEVEL=0", _TLS13_ALL, False,
     "BCP 195 TLS profile: TLS >= 1.0 (1.2 preferred), (EC)DHE-RSA AES-GCM, "
     "AES128-SHA for old peers"),
    ("aes", "B.3", "1.0", "1.2", f"{_RSA_CBC}:@SECLEVEL=0", "", True,
     "AES TLS profile (retired): TLS_RSA_WITH_AES_128_CBC_SHA"),
    ("basic", "B.1", "1.0", "1.2", "DES-CBC3-SHA:@SECLEVEL=0", "", True,
     "Basic TLS profile (retired): TLS_RSA_WITH_3DES_EDE_CBC_SHA"),
)
# fmt: on

PROFILES: dict[str, Profile] = {
    name: Profile(
        name=name,
        min_version=VERSIONS[low],
        max_version=VERSIONS[high],
        cipher_list=cipher_list,
        tls13_ciphersuites=tls13,
        retired=retired,
        description=description,
        annex=annex,
    )
    for name, annex, low, high, cipher_list, tls13, retired, description in _TABLE
}


def get_profile(name: str) -> Profile:
    """Return the profile called ``name``.

    Raises ``ValueError`` listing the valid names, fit to be wrapped in a
    ``ConfigError`` with the key path.
    """
    key = name.strip().lower()
    try:
        return PROFILES[key]
    except KeyError:
        valid = ", ".join(PROFILES)
        raise ValueError(f"unknown TLS profile {name!r}; valid profiles: {valid}") from None


def parse_version(text: str) -> int:
    """Turn "1.2", "TLSv1.2", "tls1.2" or "TLS 1.3" into an OpenSSL version constant."""
    key = text.strip().lower().replace(" ", "").replace("_", ".")
    for prefix in ("tlsv", "tls"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    try:
        return VERSIONS[key]
    except KeyError:
        raise ValueError(
            f'unknown TLS version {text!r}; use one of 1.0, 1.1, 1.2, 1.3 (e.g. "TLSv1.2")'
        ) from None


_VERSION_NAMES = {v: f"TLSv{k}" for k, v in VERSIONS.items()}


def _load_ffdhe(ctx: SSL.Context) -> None:
    # load_tmp_dh only reads a file: write the constant, load it, remove it.
    fd, path = tempfile.mkstemp(prefix="gateway-ffdhe2048-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_FFDHE2048_PEM)
        ctx.load_tmp_dh(path.encode())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def apply_profile(
    ctx: SSL.Context,
    profile: Profile,
    min_version: str | None = None,
    ciphers: str | None = None,
) -> None:
    """Configure versions and suites of ``ctx`` for ``profile``.

    ``min_version`` (e.g. "1.3") raises the floor, ``ciphers`` replaces the
    TLS ≤ 1.2 cipher list. Raises ``ValueError`` when OpenSSL here cannot
    provide what the profile needs (e.g. 3DES for ``basic``).
    """
    low = profile.min_version
    high = profile.max_version
    if min_version is not None:
        low = parse_version(min_version)
        if low > high:
            raise ValueError(
                f"min_version {min_version} is above what profile {profile.name!r} allows "
                f"({_VERSION_NAMES.get(high, high)})"
            )
    ctx.set_min_proto_version(low)
    ctx.set_max_proto_version(high)
    cipher_list = ciphers if ciphers is not None else profile.cipher_list
    if low < SSL.TLS1_2_VERSION and "@SECLEVEL" not in cipher_list:
        # OpenSSL 3+ signs TLS < 1.2 handshakes with SHA-1/MD5, which security
        # level 1 refuses: without level 0 the old versions never negotiate.
        cipher_list += ":@SECLEVEL=0"
    try:
        ctx.set_cipher_list(cipher_list.encode("ascii"))
    except SSL.Error:
        suites = ", ".join(s for s in cipher_list.split(":") if s and not s.startswith("@"))
        raise ValueError(
            f"TLS profile {profile.name!r}: none of the cipher suites {suites} is available "
            f"in the OpenSSL library here ({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()})"
        ) from None
    if high >= SSL.TLS1_3_VERSION and profile.tls13_ciphersuites:
        ctx.set_tls13_ciphersuites(profile.tls13_ciphersuites.encode("ascii"))
    if "DHE-" in cipher_list.replace("ECDHE-", ""):
        with contextlib.suppress(SSL.Error, OSError):
            _load_ffdhe(ctx)
