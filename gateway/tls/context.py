"""Building pyOpenSSL contexts for listeners and backends, and reading what a handshake learned.

Contexts are built completely when the configuration is loaded: pyOpenSSL ≥ 26.2
forbids changing a ``Context`` once it has made a ``Connection``, so a reload
builds new ones (:func:`build_server`, :func:`build_client`) and swaps the
objects; connections in flight keep the old contexts.

Verification is evidence first (DESIGN.md §3). The verify callback records
every chain error per connection; :func:`gather_evidence` turns that into a
:class:`TLSEvidence` after the handshake, and the route's policy decides.
With ``verify_in_handshake=True`` the handshake itself refuses a bad chain
(fail early, as stunnel does) — only safe when every route of the listener
verifies by chain against the listener's trust.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hmac
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import service_identity
import service_identity.cryptography as si_crypto
from cryptography import x509
from OpenSSL import SSL, crypto

from gateway.errors import CertificateError, TLSError
from gateway.tls import _ossl
from gateway.tls.certs import (
    certificate_names,
    fingerprint_bytes,
    is_ip_address,
    load_certificates,
    load_identity,
    parse_thumbprint,
    thumbprint,
)
from gateway.tls.ocsp import load_staple, staple_callback
from gateway.tls.profiles import DEFAULT_PROFILE, Profile, apply_profile, get_profile
from gateway.tls.verify import STRICT_KEY_PROFILES, key_strength_problem

__all__ = [
    "ClientTLS",
    "ClientTLSSettings",
    "Identity",
    "ServerTLS",
    "ServerTLSSettings",
    "TLSEvidence",
    "build_client",
    "build_server",
    "gather_evidence",
]

ClientCertMode = Literal["required", "optional", "none"]
BackendVerify = Literal["chain", "thumbprint", "none"]


# ----------------------------------------------------------------------
# Settings (handed over by the configuration layer)


@dataclass(frozen=True)
class Identity:
    """A certificate and its key.

    ``key`` None means the key is inside ``cert`` (a PKCS#12 bundle, or a PEM
    holding both). ``sni`` overrides the names this identity answers to; by
    default they are the certificate's DNS SANs.
    """

    cert: Path
    key: Path | None = None
    sni: tuple[str, ...] = ()
    key_password: bytes | None = field(default=None, repr=False)
    #: DER OCSP response for this certificate, stapled for clients that ask.
    staple: Path | None = None


@dataclass(frozen=True)
class ServerTLSSettings:
    """TLS settings of one listener."""

    identities: tuple[Identity, ...]
    profile: str = DEFAULT_PROFILE
    client_cert: ClientCertMode = "required"
    trust: Path | None = None
    min_version: str | None = None
    ciphers: str | None = None
    verify_in_handshake: bool = True


@dataclass(frozen=True)
class ClientTLSSettings:
    """TLS settings towards one backend."""

    profile: str = DEFAULT_PROFILE
    verify: BackendVerify = "chain"
    ca: Path | None = None
    server_name: str | None = None
    thumbprints: tuple[str, ...] = ()
    identity: Identity | None = None


@dataclass(frozen=True)
class TLSEvidence:
    """What one handshake established about the peer (input to the route's policy)."""

    version: str | None
    cipher: str | None
    sni: str | None
    subject: str | None
    issuer: str | None
    sans: tuple[str, ...]
    common_name: str | None
    sha256: str | None
    sha1: str | None
    not_before: _dt.datetime | None
    not_after: _dt.datetime | None
    chain_verified: bool | None
    verify_error: str | None
    peer_chain: tuple[x509.Certificate, ...] = field(default=(), repr=False)

    @property
    def has_certificate(self) -> bool:
        """True when the peer presented a certificate."""
        return self.sha256 is not None


# ----------------------------------------------------------------------
# Per-connection verification record

# Connection -> [(error code, depth), ...]. Weak keys: the record dies with
# the connection, and the verify callback (called from inside OpenSSL) needs
# no reference to any gateway object.
_VERIFY_ERRORS: weakref.WeakKeyDictionary[SSL.Connection, list[tuple[int, int]]] = (
    weakref.WeakKeyDictionary()
)


def _record(conn: SSL.Connection, errnum: int, depth: int) -> None:
    errors = _VERIFY_ERRORS.get(conn)
    if errors is None:
        errors = []
        _VERIFY_ERRORS[conn] = errors
    if errnum:
        errors.append((errnum, depth))


def _strict_verify(
    conn: SSL.Connection, _cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    _record(conn, errnum, depth)
    return bool(ok)


def _lenient_verify(
    conn: SSL.Connection, _cert: crypto.X509, errnum: int, depth: int, _ok: int
) -> bool:
    # Evidence first: accept any chain, remember what was wrong with it.
    _record(conn, errnum, depth)
    return True


# ----------------------------------------------------------------------
# Common context setup


def _base_context(profile: Profile, min_version: str | None, ciphers: str | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    # Renegotiation is an attack surface DICOM never needs; compression is CRIME.
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    # DESIGN.md §9: idle connections fell from 76 to 55 KiB each.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        apply_profile(ctx, profile, min_version=min_version, ciphers=ciphers)
    except ValueError as exc:
        raise TLSError(str(exc)) from None
    return ctx


def _load_trust(ctx: SSL.Context, trust: Path, *, client_ca_list: bool) -> None:
    if trust.is_dir():
        try:
            ctx.load_verify_locations(None, str(trust))
        except SSL.Error as exc:
            raise CertificateError(f"{trust}: cannot use trust directory ({exc})") from exc
        return
    certs = load_certificates(trust)
    if not certs:
        raise CertificateError(f"{trust}: trust file holds no certificate")
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always has one
        raise CertificateError(f"{trust}: OpenSSL context has no certificate store")
    for cert in certs:
        store.add_cert(crypto.X509.from_cryptography(cert))
        if client_ca_list:
            # Sent in CertificateRequest so clients (DCMTK among them) pick
            # a certificate from the right CA.
            ctx.add_client_ca(cert)


def _use_identity(
    ctx: SSL.Context, ident: Identity, profile: Profile | None = None
) -> x509.Certificate:
    key, leaf, chain = load_identity(ident.cert, ident.key, ident.key_password)
    if profile is not None and profile.name in STRICT_KEY_PROFILES:
        # B.13 states its certificate minimums; say which file misses them
        # rather than let OpenSSL's "ee key too small" speak for us.
        for cert in (leaf, *chain):
            problem = key_strength_problem(cert)
            if problem:
                raise CertificateError(
                    f"{ident.cert}: certificate {cert.subject.rfc4514_string()}: {problem}; "
                    f"profile {profile.name} refuses it"
                )
    try:
        ctx.use_certificate(leaf)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        for extra in chain:
            ctx.add_extra_chain_cert(extra)
        ctx.check_privatekey()
    except SSL.Error as exc:
        reasons = "; ".join(_ossl.error_reasons(exc)) or str(exc)
        raise CertificateError(
            f"{ident.cert}: OpenSSL refuses this certificate/key ({reasons}); "
            "the profile may require a stronger key or signature"
        ) from exc
    return leaf


# ----------------------------------------------------------------------
# Server side


def _sni_names(ident: Identity, leaf: x509.Certificate) -> tuple[str, ...]:
    if ident.sni:
        return tuple(n.strip().lower().rstrip(".") for n in ident.sni if n.strip())
    return tuple(n.lower().rstrip(".") for n in certificate_names(leaf).dns)


class ServerTLS:
    """Contexts of one listener, built once; makes server-side connections."""

    def __init__(
        self,
        settings: ServerTLSSettings,
        entries: Sequence[tuple[tuple[str, ...], SSL.Context, x509.Certificate]],
    ) -> None:
        self._settings = settings
        self._entries = tuple(entries)
        self._default = self._entries[0][1]
        self._exact: dict[str, SSL.Context] = {}
        self._wildcard: dict[str, SSL.Context] = {}
        for names, ctx, _leaf in self._entries:
            for name in names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], ctx)
                else:
                    self._exact.setdefault(name, ctx)
        for _names, ctx, _leaf in self._entries:
            ctx.set_tlsext_servername_callback(self._on_servername)

    @property
    def settings(self) -> ServerTLSSettings:
        """The settings these contexts were built from."""
        return self._settings

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        """The leaf certificate of each identity, in configuration order."""
        return tuple(leaf for _n, _c, leaf in self._entries)

    def context_for(self, server_name: str | None) -> SSL.Context:
        """The context whose identity answers ``server_name`` (default: the first)."""
        if not server_name:
            return self._default
        name = server_name.lower().rstrip(".")
        ctx = self._exact.get(name)
        if ctx is not None:
            return ctx
        _first, dot, parent = name.partition(".")
        if dot:
            ctx = self._wildcard.get(parent)
            if ctx is not None:
                return ctx
        return self._default

    def certificate_for(self, server_name: str | None) -> x509.Certificate:
        """The leaf certificate that :meth:`context_for` would present."""
        ctx = self.context_for(server_name)
        for _n, c, leaf in self._entries:
            if c is ctx:
                return leaf
        return self._entries[0][2]  # pragma: no cover

    def _on_servername(self, conn: SSL.Connection) -> None:
        # Exceptions here would surface from do_handshake; never raise.
        try:
            raw = conn.get_servername()
            name = raw.decode("ascii") if raw else None
        except UnicodeError:
            return
        ctx = self.context_for(name)
        if ctx is not conn.get_context():
            conn.set_context(ctx)

    def new_connection(self) -> SSL.Connection:
        """A fresh server-side ``Connection`` on memory BIOs, in accept state."""
        conn = SSL.Connection(self._default, None)
        conn.set_accept_state()
        return conn


def build_server(settings: ServerTLSSettings) -> ServerTLS:
    """Build every context of a listener now.

    Raises CertificateError or TLSError naming the file or setting at fault.
    """
    if not settings.identities:
        raise CertificateError("listener has TLS enabled but no certificate configured")
    if settings.client_cert not in ("required", "optional", "none"):
        raise TLSError(
            f"client_cert must be 'required', 'optional' or 'none', not {settings.client_cert!r}"
        )
    try:
        profile = get_profile(settings.profile)
    except ValueError as exc:
        raise TLSError(str(exc)) from None
    asks = settings.client_cert != "none"
    entries: list[tuple[tuple[str, ...], SSL.Context, x509.Certificate]] = []
    for ident in settings.identities:
        ctx = _base_context(profile, settings.min_version, settings.ciphers)
        # The server picks the strongest suite the client offers (BCP 195).
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
        leaf = _use_identity(ctx, ident, profile)
        if ident.staple is not None:
            staple = load_staple(ident.staple, leaf)
            ctx.set_ocsp_server_callback(staple_callback(staple))
        if settings.trust is not None:
            _load_trust(ctx, settings.trust, client_ca_list=asks)
        if asks:
            mode = SSL.VERIFY_PEER
            if settings.client_cert == "required":
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(
                mode, _strict_verify if settings.verify_in_handshake else _lenient_verify
            )
            # A resumed session skips the verify callback, leaving no evidence;
            # full handshakes only when client certificates matter.
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            ctx.set_options(SSL.OP_NO_TICKET)
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        ctx.set_session_id(b"dicom-tls-gateway")
        entries.append((_sni_names(ident, leaf), ctx, leaf))
    if asks and settings.verify_in_handshake and settings.trust is None:
        # Every client chain would fail "unable to get local issuer certificate".
        raise CertificateError(
            "listener verifies client certificates in the handshake but has no trust file "
            '(set trust, or client_cert = "none", or verify after the handshake)'
        )
    return ServerTLS(settings, entries)


# ----------------------------------------------------------------------
# Client side


class ClientTLS:
    """Context towards one backend; makes client connections and checks the peer."""

    def __init__(
        self,
        settings: ClientTLSSettings,
        ctx: SSL.Context,
        pins: tuple[tuple[str, bytes], ...],
    ) -> None:
        self._settings = settings
        self._ctx = ctx
        self._pins = pins

    @property
    def settings(self) -> ClientTLSSettings:
        """The settings this context was built from."""
        return self._settings

    def new_connection(self) -> SSL.Connection:
        """A fresh client ``Connection`` on memory BIOs, in connect state, with SNI set."""
        conn = SSL.Connection(self._ctx, None)
        name = self._settings.server_name
        if name and not is_ip_address(name):
            # RFC 6066: SNI carries host names only, never address literals.
            conn.set_tlsext_host_name(name.rstrip(".").encode("idna"))
        conn.set_connect_state()
        return conn

    def check_peer(self, conn: SSL.Connection) -> None:
        """After the handshake: check ``server_name`` and thumbprint pins; raise TLSError."""
        s = self._settings
        if s.verify == "none":
            return
        cert = conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            raise TLSError("backend presented no certificate")
        if s.verify == "thumbprint":
            for algo, digest in self._pins:
                if hmac.compare_digest(fingerprint_bytes(cert, algo), digest):
                    return
            raise TLSError(
                f"backend certificate sha256 {thumbprint(cert)} matches none of the "
                f"{len(self._pins)} configured thumbprint(s) ({_short_describe(cert)})"
            )
        if s.server_name:
            name = s.server_name.strip("[]").rstrip(".")
            try:
                if is_ip_address(name):
                    si_crypto.verify_certificate_ip_address(cert, name)
                else:
                    si_crypto.verify_certificate_hostname(cert, name)
            except (service_identity.VerificationError, service_identity.CertificateError):
                names = certificate_names(cert)
                listed = ", ".join(names.all_sans()) or f"CN={names.common_name}"
                raise TLSError(
                    f"backend certificate does not match server_name {s.server_name!r} "
                    f"(certificate names: {listed})"
                ) from None


def _short_describe(cert: x509.Certificate) -> str:
    return f"subject {cert.subject.rfc4514_string()}, issuer {cert.issuer.rfc4514_string()}"


def build_client(settings: ClientTLSSettings) -> ClientTLS:
    """Build the backend context now.

    Raises CertificateError or TLSError naming the file or setting at fault, and
    ValueError for a malformed thumbprint.
    """
    if settings.verify not in ("chain", "thumbprint", "none"):
        raise TLSError(
            f"backend verify must be 'chain', 'thumbprint' or 'none', not {settings.verify!r}"
        )
    try:
        profile = get_profile(settings.profile)
    except ValueError as exc:
        raise TLSError(str(exc)) from None
    pins = tuple(parse_thumbprint(t) for t in settings.thumbprints)
    if settings.verify == "thumbprint" and not pins:
        raise TLSError("backend verify = 'thumbprint' but no thumbprints are configured")
    ctx = _base_context(profile, None, None)
    if settings.ca is not None:
        _load_trust(ctx, settings.ca, client_ca_list=False)
    elif settings.verify == "chain":
        ctx.set_default_verify_paths()
    ctx.set_verify(
        SSL.VERIFY_PEER, _strict_verify if settings.verify == "chain" else _lenient_verify
    )
    if settings.identity is not None:
        _use_identity(ctx, settings.identity, profile)
    return ClientTLS(settings, ctx, pins)


# ----------------------------------------------------------------------
# Evidence


@dataclass(frozen=True)
class _ChainFacts:
    """What evidence needs from a peer chain: parsed once per distinct chain."""

    chain: tuple[x509.Certificate, ...]
    subject: str
    issuer: str
    sans: tuple[str, ...]
    common_name: str | None
    sha256: str
    sha1: str
    not_before: _dt.datetime
    not_after: _dt.datetime


@functools.lru_cache(maxsize=256)
def _chain_facts(ders: tuple[bytes, ...]) -> _ChainFacts:
    # Keyed by the DER bytes, which determine everything derived here. Clients
    # present the same certificate association after association: parsing it,
    # converting it to ``cryptography`` and hashing it twice once per chain
    # instead of once per association saved ~0.3 ms of CPU each (and idle
    # associations share one copy of the certificates).
    chain = tuple(x509.load_der_x509_certificate(der) for der in ders)
    leaf = chain[0]
    names = certificate_names(leaf)
    return _ChainFacts(
        chain=chain,
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        sans=names.all_sans(),
        common_name=names.common_name,
        sha256=thumbprint(leaf, "sha256"),
        sha1=thumbprint(leaf, "sha1"),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def _der(cert: crypto.X509) -> bytes:
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


def gather_evidence(conn: SSL.Connection) -> TLSEvidence:
    """Collect what the finished handshake on ``conn`` established about the peer."""
    leaf = conn.get_peer_certificate()
    raw_sni = conn.get_servername()
    # SNI carries A-labels (ASCII); keep them as sent, lower-cased.
    sni = raw_sni.decode("ascii", "replace").lower() if raw_sni else None
    version = conn.get_protocol_version_name() or None
    cipher = conn.get_cipher_name()
    if leaf is None:
        return TLSEvidence(
            version=version,
            cipher=cipher,
            sni=sni,
            subject=None,
            issuer=None,
            sans=(),
            common_name=None,
            sha256=None,
            sha1=None,
            not_before=None,
            not_after=None,
            chain_verified=None,
            verify_error=None,
            peer_chain=(),
        )
    leaf_der = _der(leaf)
    ders = [_der(c) for c in conn.get_peer_cert_chain() or ()]
    # On the server side OpenSSL's peer chain omits the leaf; make it uniform.
    if not ders or ders[0] != leaf_der:
        ders.insert(0, leaf_der)
    facts = _chain_facts(tuple(ders))
    errors = _VERIFY_ERRORS.get(conn)
    chain_verified: bool | None
    verify_error: str | None = None
    if errors is None:
        chain_verified = None  # verification never ran (e.g. VERIFY_NONE)
    elif errors:
        chain_verified = False
        code, depth = errors[0]
        verify_error = f"{_ossl.verify_error_string(code)} (depth {depth})"
    else:
        chain_verified = True
    return TLSEvidence(
        version=version,
        cipher=cipher,
        sni=sni,
        subject=facts.subject,
        issuer=facts.issuer,
        sans=facts.sans,
        common_name=facts.common_name,
        sha256=facts.sha256,
        sha1=facts.sha1,
        not_before=facts.not_before,
        not_after=facts.not_after,
        chain_verified=chain_verified,
        verify_error=verify_error,
        peer_chain=facts.chain,
    )
