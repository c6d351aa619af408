"""Contexts, identities, SNI selection and DICOM profiles (negotiated over real sockets)."""

from __future__ import annotations

import shutil
import ssl
import warnings
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from OpenSSL import SSL

from gateway.errors import CertificateError, TLSError
from gateway.tls.context import (
    ClientTLSSettings,
    Identity,
    ServerTLSSettings,
    build_client,
    build_server,
)
from gateway.tls.profiles import PROFILES, apply_profile, get_profile, parse_version
from gateway.tls.stream import TLSStream
from tests.tls_helpers import get_pki, key_for, key_pem, tcp_pair, trio_test

V = ssl.TLSVersion


def ident(stem: str = "server") -> Identity:
    pki = get_pki()
    return Identity(pki.dir / f"{stem}.pem", pki.dir / f"{stem}.key")


# ----------------------------------------------------------------------
# Profiles


def test_get_profile_lists_valid_names() -> None:
    assert get_profile("BCP195-RFC8996").name == "bcp195-rfc8996"
    with pytest.raises(ValueError, match="valid profiles: bcp195-rfc8996, bcp195-rfc8996-mod"):
        get_profile("tls-strong")


def test_parse_version() -> None:
    assert parse_version("TLSv1.2") == SSL.TLS1_2_VERSION
    assert parse_version("1.3") == SSL.TLS1_3_VERSION
    assert parse_version("tls 1.0") == SSL.TLS1_VERSION
    with pytest.raises(ValueError, match="unknown TLS version"):
        parse_version("SSLv3")


def test_retired_profiles_are_marked() -> None:
    assert {n for n, p in PROFILES.items() if p.retired} == {"aes", "basic"}


def test_contexts_disable_renegotiation_and_release_buffers() -> None:
    server = build_server(ServerTLSSettings(identities=(ident(),), client_cert="none"))
    ctx = server.context_for(None)
    # set_options/set_mode return the resulting masks; OR-ing 0 changes nothing.
    assert ctx.set_options(0) & SSL.OP_NO_RENEGOTIATION
    assert ctx.set_options(0) & SSL.OP_NO_COMPRESSION
    assert ctx.set_mode(0) & SSL.MODE_RELEASE_BUFFERS


def test_basic_profile_unavailable_is_explained_or_works() -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        apply_profile(ctx, get_profile("basic"))
    except ValueError as exc:
        # cryptography's OpenSSL build has no 3DES: say so, naming the suite.
        assert "DES-CBC3-SHA" in str(exc) and "OpenSSL" in str(exc)
        with pytest.raises(TLSError, match="DES-CBC3-SHA"):
            build_server(
                ServerTLSSettings(identities=(ident(),), profile="basic", client_cert="none")
            )


async def negotiate(
    profile: str,
    version: ssl.TLSVersion,
    ciphers: str = "ALL:@SECLEVEL=0",
    min_version: str | None = None,
) -> tuple[str, str] | str:
    """Handshake a stdlib client pinned to ``version``; return (version, cipher) or the error."""
    server_tls = build_server(
        ServerTLSSettings(
            identities=(ident(),), profile=profile, client_cert="none", min_version=min_version
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers)
    s_raw, c_raw = await tcp_pair()
    srv = TLSStream(s_raw, server_tls.new_connection(), server_side=True)
    cli = trio.SSLStream(c_raw, ctx, server_hostname="localhost")
    result: dict[str, object] = {}

    async def client() -> None:
        try:
            await cli.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError):
            return
        cipher = cli.cipher()
        assert cipher is not None
        result["ok"] = (cli.version(), cipher[0])

    async def server() -> None:
        try:
            await srv.do_handshake()
        except TLSError as exc:
            result["error"] = str(exc)
        await srv.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(client)
            n.start_soon(server)
    await cli.transport_stream.aclose()
    if "error" in result:
        return str(result["error"])
    return result["ok"]  # type: ignore[return-value]


# (profile, client version, client cipher list, expected version or None for refused)
NEGOTIATIONS = [
    ("bcp195-rfc8996", V.TLSv1_3, "ALL", ("TLSv1.3", None)),
    ("bcp195-rfc8996", V.TLSv1_2, "ALL", ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384")),
    ("bcp195-rfc8996", V.TLSv1_1, "ALL:@SECLEVEL=0", None),
    ("bcp195-rfc8996", V.TLSv1, "ALL:@SECLEVEL=0", None),
    ("bcp195-rfc8996", V.TLSv1_2, "AES128-SHA", None),  # CBC is not in the profile
    ("bcp195-rfc8996-mod", V.TLSv1_3, "ALL", ("TLSv1.3", None)),
    ("bcp195-rfc8996-mod", V.TLSv1_2, "ECDHE-RSA-CHACHA20-POLY1305", ("TLSv1.2", None)),
    ("bcp195-rfc8996-mod", V.TLSv1_1, "ALL:@SECLEVEL=0", None),
    ("bcp195-nd", V.TLSv1_2, "DHE-RSA-AES128-GCM-SHA256", ("TLSv1.2", "DHE-RSA-AES128-GCM-SHA256")),
    ("bcp195-nd", V.TLSv1_3, "ALL", ("TLSv1.3", None)),
    ("bcp195-nd", V.TLSv1_1, "ALL:@SECLEVEL=0", None),
    ("bcp195-ex", V.TLSv1_2, "ALL", ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384")),
    ("bcp195-ex", V.TLSv1_3, "ALL", None),  # TLS 1.2 only
    ("bcp195", V.TLSv1_3, "ALL", ("TLSv1.3", None)),
    ("bcp195", V.TLSv1_2, "AES128-SHA:@SECLEVEL=0", ("TLSv1.2", "AES128-SHA")),
    ("aes", V.TLSv1_2, "ALL:@SECLEVEL=0", ("TLSv1.2", "AES128-SHA")),
    ("aes", V.TLSv1_3, "ALL", None),
]


@pytest.mark.parametrize(("profile", "version", "ciphers", "expected"), NEGOTIATIONS)
@trio_test
async def test_profile_negotiation(
    profile: str,
    version: ssl.TLSVersion,
    ciphers: str,
    expected: tuple[str, str | None] | None,
) -> None:
    got = await negotiate(profile, version, ciphers)
    if expected is None:
        assert isinstance(got, str), got
        assert "TLS version" in got or "cipher" in got, got
    else:
        assert isinstance(got, tuple), got
        assert got[0] == expected[0]
        if expected[1] is not None:
            assert got[1] == expected[1]


@pytest.mark.parametrize("profile", ["bcp195", "aes"])
@pytest.mark.parametrize("version", [V.TLSv1, V.TLSv1_1])
@trio_test
async def test_retired_versions_where_this_openssl_allows(
    profile: str, version: ssl.TLSVersion
) -> None:
    """TLS 1.0/1.1 with AES128-SHA works when both ends drop to @SECLEVEL=0."""
    got = await negotiate(profile, version, "AES128-SHA:@SECLEVEL=0")
    if isinstance(got, str):
        pytest.skip(f"this OpenSSL cannot negotiate {version.name}: {got}")
    assert got[1] == "AES128-SHA"


@trio_test
async def test_min_version_override_refuses_tls12() -> None:
    got = await negotiate("bcp195-rfc8996", V.TLSv1_2, "ALL", min_version="1.3")
    assert isinstance(got, str) and "TLS version" in got
    got = await negotiate("bcp195-rfc8996", V.TLSv1_3, "ALL", min_version="TLSv1.3")
    assert isinstance(got, tuple) and got[0] == "TLSv1.3"


def test_min_version_above_profile_max() -> None:
    with pytest.raises(TLSError, match="above what profile 'bcp195-ex' allows"):
        build_server(
            ServerTLSSettings(
                identities=(ident(),), profile="bcp195-ex", min_version="1.3", client_cert="none"
            )
        )


@trio_test
async def test_client_profile_bcp195_ex_gets_tls12() -> None:
    pki = get_pki()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki.server), str(pki.server_key))
    client_tls = build_client(
        ClientTLSSettings(profile="bcp195-ex", ca=pki.ca, server_name="localhost")
    )
    with trio.fail_after(10):
        s_raw, c_raw = await tcp_pair()
        srv = trio.SSLStream(s_raw, server_ctx, server_side=True)
        cli = TLSStream(c_raw, client_tls.new_connection(), server_side=False)
        async with trio.open_nursery() as n:
            n.start_soon(srv.do_handshake)
            n.start_soon(cli.do_handshake)
        client_tls.check_peer(cli.connection)
        assert cli.connection.get_protocol_version_name() == "TLSv1.2"
        await cli.aclose()


# ----------------------------------------------------------------------
# Identities and loading errors


def test_missing_certificate_file_named() -> None:
    with pytest.raises(CertificateError, match=r"/nope/gw\.pem: certificate file not found"):
        build_server(
            ServerTLSSettings(identities=(Identity(Path("/nope/gw.pem"), Path("/nope/gw.key")),))
        )


def test_missing_trust_file_named(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"ca-missing\.pem: certificate file not found"):
        build_server(ServerTLSSettings(identities=(ident(),), trust=tmp_path / "ca-missing.pem"))


def test_trust_required_when_verifying_in_handshake() -> None:
    with pytest.raises(CertificateError, match="no trust file"):
        build_server(ServerTLSSettings(identities=(ident(),), client_cert="required"))
    # Evidence-first mode may run without a listener trust store.
    build_server(
        ServerTLSSettings(identities=(ident(),), client_cert="optional", verify_in_handshake=False)
    )


def test_mismatched_key_named() -> None:
    pki = get_pki()
    with pytest.raises(CertificateError, match=r"a\.key: private key does not match certificate"):
        build_server(
            ServerTLSSettings(identities=(Identity(pki.server, pki.a_key),), client_cert="none")
        )


def test_encrypted_key_and_wrong_password(tmp_path: Path) -> None:
    pki = get_pki()
    key = tmp_path / "enc.key"
    key.write_bytes(key_pem(key_for("server"), b"s3cret"))
    good = Identity(pki.server, key, key_password=b"s3cret")
    build_server(ServerTLSSettings(identities=(good,), client_cert="none"))
    expected = r"enc\.key: private key unreadable \(wrong password"
    with pytest.raises(CertificateError, match=expected):
        build_server(
            ServerTLSSettings(
                identities=(Identity(pki.server, key, key_password=b"nope"),), client_cert="none"
            )
        )
    with pytest.raises(CertificateError, match="encrypted and no password"):
        build_server(ServerTLSSettings(identities=(Identity(pki.server, key),), client_cert="none"))
    assert "s3cret" not in repr(good)


def test_pkcs12_identity_and_combined_pem(tmp_path: Path) -> None:
    pki = get_pki()
    p12 = tmp_path / "server.crt"  # misleading extension on purpose
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"gw",
            key_for("server"),
            pki.server_cert,
            [pki.ca_cert],
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    server = build_server(
        ServerTLSSettings(identities=(Identity(p12, None, key_password=b"pw"),), client_cert="none")
    )
    assert server.certificates[0] == pki.server_cert
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pki.server.read_bytes() + pki.server_key.read_bytes())
    server = build_server(
        ServerTLSSettings(identities=(Identity(combined, None),), client_cert="none")
    )
    assert server.certificates[0] == pki.server_cert
    with pytest.raises(CertificateError, match="no private key configured"):
        build_server(
            ServerTLSSettings(identities=(Identity(pki.server, None),), client_cert="none")
        )


def test_sni_selection_rules() -> None:
    pki = get_pki()
    server = build_server(
        ServerTLSSettings(
            identities=(
                ident("server"),
                ident("a"),
                ident("wild"),
                Identity(pki.server, pki.server_key, sni=("listed.example",)),
            ),
            client_cert="none",
        )
    )
    assert server.certificate_for("a.example") == pki.a_cert
    assert server.certificate_for("A.EXAMPLE.") == pki.a_cert
    assert server.certificate_for("x.wild.example") == pki.wild_cert
    # A wildcard covers exactly one label.
    assert server.certificate_for("y.x.wild.example") == pki.server_cert
    assert server.certificate_for("wild.example") == pki.server_cert
    assert server.certificate_for(None) == pki.server_cert
    assert server.context_for("listed.example") is not server.context_for(None)


def test_client_settings_validation() -> None:
    with pytest.raises(TLSError, match="no thumbprints"):
        build_client(ClientTLSSettings(verify="thumbprint"))
    with pytest.raises(ValueError, match="hex digit"):
        build_client(ClientTLSSettings(verify="thumbprint", thumbprints=("sha256:zz",)))
    with pytest.raises(TLSError, match="unknown TLS profile"):
        build_client(ClientTLSSettings(profile="nope"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_server_context_used_twice_is_fine() -> None:
    # pyOpenSSL 26 forbids changing a Context after it made a Connection; making
    # several connections (and switching them by SNI) must not trip that.
    server = build_server(
        ServerTLSSettings(identities=(ident("server"), ident("a")), client_cert="none")
    )
    for _ in range(3):
        server.new_connection()


@trio_test
async def test_no_shared_cipher_reason() -> None:
    got = await negotiate("bcp195-rfc8996", V.TLSv1_2, "AES128-SHA")
    assert got == "no shared cipher"
