"""TLS profiles (PS3.15 Annex B) as real peers see them.

One gateway serves one listener per profile. ``openssl s_client`` probes which
versions and suites each listener negotiates and which it refuses; DCMTK
3.6.7's matching profile option (+py / +px / +pz / +pa) then completes a
C-ECHO through each, and the gateway's log shows what was negotiated.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest

from .conftest import run_gateway_cli
from .helpers import HOST, PKI, issue_cert, route, run_dcmtk, tls_listener, to_toml

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

PROFILES = ("bcp195-rfc8996", "bcp195-rfc8996-mod", "bcp195-nd", "bcp195-ex", "bcp195", "aes")

# (profile, s_client version flag, TLS ≤ 1.2 cipher or None, expected to negotiate)
MATRIX = [
    ("bcp195-rfc8996", "-tls1_3", None, True),
    ("bcp195-rfc8996", "-tls1_2", "ECDHE-RSA-AES256-GCM-SHA384", True),
    ("bcp195-rfc8996", "-tls1_2", "DHE-RSA-AES256-GCM-SHA384", False),
    ("bcp195-rfc8996", "-tls1_2", "ECDHE-RSA-AES128-SHA256", False),
    ("bcp195-rfc8996", "-tls1_1", "ECDHE-RSA-AES128-SHA", False),
    ("bcp195-rfc8996-mod", "-tls1_3", None, True),
    ("bcp195-rfc8996-mod", "-tls1_2", "ECDHE-RSA-CHACHA20-POLY1305", True),
    ("bcp195-rfc8996-mod", "-tls1_2", "DHE-RSA-AES128-GCM-SHA256", True),
    ("bcp195-rfc8996-mod", "-tls1_2", "ECDHE-RSA-AES128-SHA256", False),
    ("bcp195-rfc8996-mod", "-tls1_2", "AES128-GCM-SHA256", False),
    ("bcp195-nd", "-tls1_3", None, True),
    ("bcp195-nd", "-tls1_2", "DHE-RSA-AES128-GCM-SHA256", True),
    ("bcp195-nd", "-tls1_2", "ECDHE-RSA-AES256-GCM-SHA384", True),
    ("bcp195-nd", "-tls1_2", "ECDHE-RSA-CHACHA20-POLY1305", False),
    ("bcp195-nd", "-tls1_2", "AES128-SHA", False),
    ("bcp195-ex", "-tls1_3", None, False),
    ("bcp195-ex", "-tls1_2", "ECDHE-RSA-AES128-GCM-SHA256", True),
    ("bcp195-ex", "-tls1_2", "ECDHE-RSA-AES128-SHA256", False),
    ("bcp195", "-tls1_3", None, True),
    ("bcp195", "-tls1_2", "AES128-SHA", True),
    ("bcp195", "-tls1_2", "ECDHE-RSA-CHACHA20-POLY1305", False),
    ("aes", "-tls1_2", "AES128-SHA", True),
    ("aes", "-tls1_2", "ECDHE-RSA-AES128-GCM-SHA256", False),
    ("aes", "-tls1_3", None, False),
]

# DCMTK 3.6.7 option -> the gateway profile that matches it
DCMTK_OPTIONS = [
    (None, "bcp195-rfc8996"),  # DCMTK's default (+py) against the gateway's default
    ("+py", "bcp195-nd"),
    ("+px", "bcp195"),
    ("+pz", "bcp195-ex"),
    ("+pa", "aes"),
]


def _name(profile: str) -> str:
    return profile.replace("-", "_")


@pytest.fixture(scope="module")
def profile_gateway(pki: PKI, tmp_path_factory):
    """One gateway, one listener per profile (no client certificates asked)."""
    # Module-scoped: the function-scoped `gateway` fixture cannot be used here,
    # so start it through the same factory machinery by hand.
    from .conftest import (
        GatewayProcess,
        ProcessTracker,
        PynetdicomSCP,
        gateway_command,
        gateway_env,
    )
    from .helpers import MAIN, free_port, wait_listening

    scp = PynetdicomSCP("ECHO", free_port()).start()

    d = tmp_path_factory.mktemp("profiles")
    tracker = ProcessTracker(d)
    listeners = []
    ports = {}
    for p in PROFILES:
        port = free_port()
        ports[_name(p)] = port
        listeners.append(tls_listener(pki, _name(p), client_cert="none", profile=p,
                                      listen=f"{HOST}:{port}"))
    config = {"gateway": {"artim_timeout": 5, "handshake_timeout": 5, "connect_timeout": 3},
              "log": {"format": "json", "level": "info"},
              "listener": listeners, "route": [route("echo", "ECHO", scp.port)]}
    cfg = d / "profiles.toml"
    cfg.write_text(to_toml(config))
    proc, out, err = tracker.spawn(gateway_command("run", cfg), "gateway", env=gateway_env(),
                                   cwd=MAIN)
    gw = GatewayProcess(proc, cfg, ports, out, err, config)
    try:
        if not wait_listening(ports.values(), proc, 10):
            pytest.fail("profile gateway did not start\n" + gw.output())
        gw.scp = scp  # type: ignore[attr-defined]
        yield gw
    finally:
        tracker.close()
        scp.stop()


def _s_client(port: int, version: str, cipher: str | None, ca: Path) -> tuple[bool, str]:
    args = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-CAfile", str(ca),
            "-servername", "localhost", "-brief", version]
    if cipher:
        # SECLEVEL 0 on our side so only the gateway's policy decides.
        args += ["-cipher", f"{cipher}:@SECLEVEL=0"]
    cp = subprocess.run(args, input=b"", capture_output=True, timeout=15, check=False)
    text = (cp.stdout + cp.stderr).decode(errors="replace")
    ok = "Ciphersuite:" in text or ("Cipher is" in text and "(NONE)" not in text)
    return ok, text


@pytest.mark.parametrize(("profile", "version", "cipher", "expected"), MATRIX)
def test_profile_negotiates_only_its_suites(profile, version, cipher, expected, pki,
                                            profile_gateway):
    ok, text = _s_client(profile_gateway.port(_name(profile)), version, cipher, pki.gateway_ca)
    assert ok == expected, f"{profile} {version} {cipher}: expected {expected}\n{text}"
    if ok and cipher:
        assert f"Ciphersuite: {cipher}" in text, text
    if not expected:
        # Refused by the TLS layer (an alert or no common suite), not unreachable.
        assert "Connection refused" not in text, text
        assert any(w in text.lower() for w in ("alert", "no cipher", "no protocols",
                                                "handshake failure", "unsupported")), text


@pytest.mark.parametrize(("option", "profile"), DCMTK_OPTIONS)
def test_dcmtk_profile_option_interoperates(option, profile, pki, profile_gateway):
    listener = _name(profile)
    args = ["echoscu", "-v", *pki.client.dcmtk_tls, "+cf", pki.gateway_ca, "-aec", "ECHO"]
    if option:
        args.append(option)
    rc, out = run_dcmtk([*args, HOST, profile_gateway.port(listener)], timeout=30)
    assert rc == 0, out + profile_gateway.output()[-3000:]
    profile_gateway.wait_for_event("association.released")
    recs = [r for r in profile_gateway.events("association.accepted")
            if r.get("listener") == listener]
    assert recs, profile_gateway.output()[-3000:]
    assert recs[-1].get("tls_version") in ("TLSv1.2", "TLSv1.3"), recs[-1]


def test_retired_profile_warns_at_startup(profile_gateway):
    warned = profile_gateway.wait_for_event("tls.retired_profile")
    assert [w["profile"] for w in warned] == ["aes"], warned
    assert warned[0]["where"] == "listener 'aes'" and warned[0]["annex"] == "B.3", warned


def test_basic_profile_fails_with_clear_error(pki, tmp_path):
    config = {"listener": [tls_listener(pki, client_cert="none", profile="basic",
                                        listen=f"{HOST}:11999")],
              "route": [route("echo", "ECHO", 104)]}
    cfg = tmp_path / "basic.toml"
    cfg.write_text(to_toml(config))
    rc, out = run_gateway_cli("check", cfg)
    assert rc != 0, out
    assert "TLS profile 'basic'" in out and "DES-CBC3-SHA" in out, out
    assert "not available in the OpenSSL library here" in out or "none of the cipher" in out


def test_rfc8996_mod_refuses_weak_own_certificate(pki, tmp_path):
    weak = issue_cert(pki.cas["gateway"], tmp_path, "weak", "localhost", dns=["localhost"],
                      key_size=1024,
                      not_after=datetime.datetime.now(datetime.timezone.utc)
                      + datetime.timedelta(days=60))
    listener = tls_listener(pki, client_cert="none", profile="bcp195-rfc8996-mod",
                            listen=f"{HOST}:11998")
    listener["certificates"] = [{"cert": str(weak.cert), "key": str(weak.key)}]
    cfg = tmp_path / "mod.toml"
    cfg.write_text(to_toml({"listener": [listener], "route": [route("e", "ECHO", 104)]}))
    rc, out = run_gateway_cli("check", cfg)
    assert rc != 0, out
    assert str(weak.cert) in out and "RSA key of 1024 bits" in out, out
