"""Keys and certificate tooling: encrypted PEM (password from env / file), PKCS#12,
``dicom-gateway check`` status lines, ``dicom-gateway thumbprint`` on PEM/DER/PKCS#12."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from .conftest import run_gateway_cli
from .helpers import HOST, PKI, issue_cert, route, run_dcmtk, tls_listener, to_toml

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

PASSWORD = b"correct horse battery staple"


def _key(pki: PKI):
    return serialization.load_pem_private_key(pki.gateway_server.key.read_bytes(), None)


def _encrypted_key(pki: PKI, path: Path, password: bytes = PASSWORD) -> Path:
    path.write_bytes(_key(pki).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password)))
    return path


def _p12(pki: PKI, path: Path) -> Path:
    cert = x509.load_pem_x509_certificate(pki.gateway_server.cert.read_bytes())
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"gateway", _key(pki), cert, None, serialization.BestAvailableEncryption(PASSWORD)))
    return path


def _echo_through(gw, pki: PKI) -> tuple[int, str]:
    return run_dcmtk(["echoscu", "-v", *pki.client.dcmtk_tls, "+cf", pki.gateway_ca,
                      "-aet", "CT01", "-aec", "ARCHIVE", HOST, gw.port("tls")], timeout=30)


def _listener_with(pki: PKI, **cert) -> dict:
    listener = tls_listener(pki)
    listener["certificates"] = [cert]
    return listener


def test_encrypted_key_password_from_env(pki, tmp_path, monkeypatch, pynetdicom_scp, gateway):
    key = _encrypted_key(pki, tmp_path / "enc.key")
    monkeypatch.setenv("GW_TEST_KEY_PASSWORD", PASSWORD.decode())
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_listener_with(pki, cert=str(pki.gateway_server.cert), key=str(key),
                                 key_password_env="GW_TEST_KEY_PASSWORD")],
                 [route("archive", "ARCHIVE", scp.port)])
    rc, out = _echo_through(gw, pki)
    assert rc == 0, out + gw.output()
    assert gw.wait_for_event("association.accepted") and scp.echoes == 1


def test_encrypted_key_password_from_file(pki, tmp_path, pynetdicom_scp, gateway):
    key = _encrypted_key(pki, tmp_path / "enc.key")
    pw = tmp_path / "key.pw"
    pw.write_bytes(PASSWORD + b"\n")  # a trailing newline, as editors leave it
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_listener_with(pki, cert=str(pki.gateway_server.cert), key=str(key),
                                 key_password_file=str(pw))],
                 [route("archive", "ARCHIVE", scp.port)])
    rc, out = _echo_through(gw, pki)
    assert rc == 0, out + gw.output()
    assert gw.wait_for_event("association.accepted") and scp.echoes == 1


def test_pkcs12_bundle(pki, tmp_path, pynetdicom_scp, gateway):
    bundle = _p12(pki, tmp_path / "gateway.p12")
    pw = tmp_path / "p12.pw"
    pw.write_bytes(PASSWORD)
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_listener_with(pki, cert=str(bundle), key_password_file=str(pw))],
                 [route("archive", "ARCHIVE", scp.port)])
    rc, out = _echo_through(gw, pki)
    assert rc == 0, out + gw.output()
    assert gw.wait_for_event("association.accepted") and scp.echoes == 1


def test_inline_password_is_a_config_error(pki, tmp_path):
    listener = _listener_with(pki, cert=str(pki.gateway_server.cert),
                              key=str(pki.gateway_server.key), key_password="hunter2")
    cfg = tmp_path / "inline.toml"
    cfg.write_text(to_toml({"listener": [listener], "route": [route("a", "ARCHIVE", 104)]}))
    rc, out = run_gateway_cli("check", cfg)
    assert rc != 0 and "passwords must not be written in the config" in out, out
    assert "hunter2" not in out, out


# --------------------------------------------------------------------------- check


def _broken_certificates(pki: PKI, d: Path) -> dict[str, dict]:
    """listener name -> certificate entry with one kind of problem."""
    now = datetime.datetime.now(datetime.timezone.utc)
    gw_ca = pki.cas["gateway"]
    garbage = d / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    wrong_pw = d / "wrong.pw"
    wrong_pw.write_text("not the password\n")
    future = issue_cert(gw_ca, d, "future", "localhost", dns=["localhost"],
                        not_before=now + datetime.timedelta(days=2),
                        not_after=now + datetime.timedelta(days=200))
    expired = issue_cert(gw_ca, d, "expired", "localhost", dns=["localhost"],
                         not_before=now - datetime.timedelta(days=20),
                         not_after=now - datetime.timedelta(days=1))
    soon = issue_cert(gw_ca, d, "soon", "localhost", dns=["localhost"],
                      not_after=now + datetime.timedelta(days=10, hours=12))
    weak = issue_cert(gw_ca, d, "weak", "localhost", dns=["localhost"], key_size=1024,
                      not_after=now + datetime.timedelta(days=365))
    client_only = issue_cert(gw_ca, d, "clientonly", "localhost", dns=["localhost"],
                             eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    good = issue_cert(gw_ca, d, "good", "localhost", dns=["localhost"],
                      not_after=now + datetime.timedelta(days=365))
    return {
        "notcert": {"cert": str(garbage), "key": str(good.key)},
        "wrongpw": {"cert": str(good.cert), "key": str(_encrypted_key(pki, d / "enc.key")),
                    "key_password_file": str(wrong_pw)},
        "mismatch": {"cert": str(good.cert), "key": str(pki.client.key)},
        "future": {"cert": str(future.cert), "key": str(future.key)},
        "expired": {"cert": str(expired.cert), "key": str(expired.key)},
        "soon": {"cert": str(soon.cert), "key": str(soon.key)},
        "clientonly": {"cert": str(client_only.cert), "key": str(client_only.key)},
        "ok": {"cert": str(good.cert), "key": str(good.key)},
        "weak": {"cert": str(weak.cert), "key": str(weak.key)},
    }


EXPECTED = {
    "notcert": ("ERROR", "not a certificate"),
    "wrongpw": ("ERROR", "private key unreadable (wrong password?)"),
    "mismatch": ("ERROR", "private key does not match certificate"),
    "future": ("ERROR", "certificate not yet valid"),
    "expired": ("ERROR", "certificate expired on"),
    "soon": ("WARNING", "certificate expires in 10 days"),
    "clientonly": ("ERROR", "not usable for TLS server authentication"),
    "ok": ("OK", "OK: subject CN=localhost"),
    "weak": ("ERROR", "RSA key of 1024 bits (profile needs at least 2048)"),
}


def test_check_prints_status_per_certificate_kind(pki, tmp_path):
    certs = _broken_certificates(pki, tmp_path)
    listeners = []
    for i, (name, cert) in enumerate(certs.items()):
        profile = "bcp195-rfc8996-mod" if name == "weak" else "bcp195-rfc8996"
        listener = tls_listener(pki, name, client_cert="none", listen=f"{HOST}:{12000 + i}",
                                profile=profile)
        listener["certificates"] = [cert]
        listeners.append(listener)
    routes = [route("a", "ARCHIVE", 104, verify="none", crl=[], thumbprints=[]),
              route("b", "PACS", 104, listeners=["ok"], verify="chain+thumbprint",
                    trust=str(pki.client_ca), bind_calling_ae=True, ocsp="soft",
                    thumbprints=["ab" * 32])]
    cfg = tmp_path / "check.toml"
    cfg.write_text(to_toml({"listener": listeners, "route": routes}))
    rc, out = run_gateway_cli("check", cfg)
    assert rc != 0, out
    for name, (level, text) in EXPECTED.items():
        lines = [ln for ln in out.splitlines() if f"listener '{name}' certificates[0]" in ln]
        assert lines, f"no line for {name}:\n{out}"
        assert lines[0].split()[0] == level and text in lines[0], f"{name}: {lines}\n{out}"
    # The route table names the policy of each route.
    assert "verify chain+thumbprint against client-ca.pem (route trust) on ok" in out, out
    assert "1 pinned thumbprint(s)" in out and "OCSP soft" in out, out
    assert "Calling AE must be the certificate's CN" in out, out


@pytest.mark.parametrize(
    ("case", "expected"),
    [("nocert", "a TLS listener needs at least one entry in certificates"),
     ("missing", "cert: file not found")],
)
def test_check_no_certificate_and_missing_file(case, expected, pki, tmp_path):
    listener = tls_listener(pki, client_cert="none", listen=f"{HOST}:12100")
    listener["certificates"] = (
        [] if case == "nocert" else [{"cert": str(tmp_path / "gone.pem"), "key": "gone.key"}])
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml({"listener": [listener], "route": [route("a", "X", 104)]}))
    rc, out = run_gateway_cli("check", cfg)
    assert rc != 0 and expected in out, out


# --------------------------------------------------------------------------- thumbprint


def _openssl_sha256(pem: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
                          str(pem)], capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1].upper()


def test_thumbprint_der_and_pkcs12(pki, tmp_path, monkeypatch):
    want = _openssl_sha256(pki.gateway_server.cert)
    der = tmp_path / "server.cer"
    der.write_bytes(x509.load_pem_x509_certificate(pki.gateway_server.cert.read_bytes())
                    .public_bytes(serialization.Encoding.DER))
    rc, out = run_gateway_cli("thumbprint", der)
    assert rc == 0 and f"sha256:{want}" in out, out
    bundle = _p12(pki, tmp_path / "server.p12")
    rc, out = run_gateway_cli("thumbprint", bundle)
    assert rc != 0 and "--password-env" in out, out
    monkeypatch.setenv("GW_TEST_P12", PASSWORD.decode())
    rc, out = run_gateway_cli("thumbprint", bundle, "--password-env", "GW_TEST_P12")
    assert rc == 0 and f"sha256:{want}" in out, out
