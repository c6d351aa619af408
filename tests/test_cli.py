"""The command line as an operator uses it: demo, check, thumbprint, run on a bad config."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "rules" / "example.toml"


def gateway(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, **kw)


def test_demo_sends_echo_and_store_through_tls() -> None:
    proc = gateway("demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "association.accepted: route=archive" in out
    assert "tls_version=TLSv1.3" in out and "client_subject=CN=CT01" in out
    assert "C-ECHO       status 0x0000" in out
    assert "C-STORE      status 0x0000; the SCP stored 1 instance(s)" in out


def test_check_example_is_ok() -> None:
    proc = gateway("check", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert "OK      listener 'dicom-tls' certificates[0]" in proc.stdout
    assert "archive: CT01,MR_*,DEMO_SCU → ARCHIVE on dicom-tls" in proc.stdout


def test_thumbprint_matches_openssl() -> None:
    pem = REPO / "certs-example" / "gateway.pem"
    proc = gateway("thumbprint", str(pem))
    assert proc.returncode == 0, proc.stderr
    ossl = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-fingerprint",
                           "-sha256"], capture_output=True, text=True, check=True).stdout
    expected = ossl.strip().split("=", 1)[1].upper()
    assert f"sha256:{expected}" in proc.stdout
    assert "sha1:" in proc.stdout


def test_run_refuses_bad_config_and_listens_nowhere(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"""
[[listener]]
name = "plain"
listen = "127.0.0.1:{port}"

[[route]]
name = "ct"
called_ae = "ARCHIVE"
listeners = ["nope"]
backend = {{ host = "127.0.0.1", port = 0 }}
""")
    for cmd in ("check", "run"):
        proc = gateway(cmd, str(cfg), timeout=20)
        assert proc.returncode != 0
        assert "route 'ct': backend.port must be 1..65535, got 0" in proc.stderr
        assert "route 'ct': listeners: unknown listener 'nope'" in proc.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
