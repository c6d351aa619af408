"""``python -m gateway thumbprint FILE`` agrees with openssl."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import gateway_available, run_gateway_cli

pytestmark = [pytest.mark.interop, pytest.mark.timeout(30)]


def _openssl_fingerprint(cert, digest: str) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", f"-{digest}", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # "sha256 Fingerprint=AB:CD:..." (OpenSSL 3) / "SHA256 Fingerprint=..." (1.1)
    return out.strip().split("=", 1)[1].replace(":", "").lower()


def _flat(text: str) -> str:
    return text.replace(":", "").replace(" ", "").lower()


@pytest.mark.parametrize("which", ["gateway_server", "client", "backend_server"])
def test_thumbprint_sha256_matches_openssl(which, pki):
    if not gateway_available():
        pytest.fail("gateway package has no gateway/__main__.py or gateway/cli.py yet")
    cert = getattr(pki, which).cert
    rc, out = run_gateway_cli("thumbprint", cert)
    assert rc == 0, out
    want = _openssl_fingerprint(cert, "sha256")
    assert len(want) == 64
    assert want in _flat(out), f"openssl says {want}, gateway printed:\n{out}"


def test_thumbprint_sha1_matches_openssl(pki):
    rc, out = run_gateway_cli("thumbprint", pki.client.cert)
    assert rc == 0, out
    assert _openssl_fingerprint(pki.client.cert, "sha1") in _flat(out), out


def test_thumbprint_of_ca_file(pki):
    rc, out = run_gateway_cli("thumbprint", pki.client_ca)
    assert rc == 0, out
    assert _openssl_fingerprint(pki.client_ca, "sha256") in _flat(out), out


def test_thumbprint_missing_file(tmp_path):
    missing = tmp_path / "no-such-cert.pem"
    rc, out = run_gateway_cli("thumbprint", missing)
    assert rc != 0, out
    assert "no-such-cert.pem" in out, out
