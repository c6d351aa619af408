"""Invalid configurations: ``check`` and ``run`` exit non-zero naming the key, and
nothing listens (DESIGN §4: validated completely before anything listens)."""

from __future__ import annotations

import subprocess
import time

import pytest

from .conftest import (
    GATEWAY_SETTINGS,
    ProcessTracker,
    gateway_available,
    gateway_command,
    gateway_env,
    run_gateway_cli,
)
from .helpers import (
    HOST,
    MAIN,
    free_port,
    is_listening,
    plain_listener,
    route,
    sha256_thumbprint,
    tls_listener,
    to_toml,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]


@pytest.fixture(autouse=True)
def _needs_gateway():
    if not gateway_available():
        pytest.fail("gateway package has no gateway/__main__.py or gateway/cli.py yet")


def _config(pki, tmp_path, mutate=None) -> tuple:
    tls_port, plain_port = free_port(), free_port()
    cfg = {
        "gateway": dict(GATEWAY_SETTINGS),
        "log": {"format": "json", "level": "info"},
        "listener": [
            tls_listener(pki, listen=f"{HOST}:{tls_port}"),
            plain_listener(listen=f"{HOST}:{plain_port}"),
        ],
        "route": [route("archive", "ARCHIVE", 11112, listeners=["tls", "plain"])],
    }
    if mutate:
        mutate(cfg, tmp_path)
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(cfg))
    return path, [tls_port, plain_port]


def _backend_port_zero(cfg, _):
    cfg["route"][0]["backend"]["port"] = 0


def _listener_port_zero(cfg, _):
    cfg["listener"][1]["listen"] = f"{HOST}:0"


def _missing_cert(cfg, tmp_path):
    cfg["listener"][0]["certificates"][0]["cert"] = str(tmp_path / "no-such-gateway-cert.pem")


def _missing_key(cfg, tmp_path):
    cfg["listener"][0]["certificates"][0]["key"] = str(tmp_path / "no-such-gateway-key.key")


def _unknown_listener(cfg, _):
    cfg["route"][0]["listeners"] = ["tls", "no-such-listener"]


def _missing_trust(cfg, tmp_path):
    cfg["listener"][0]["trust"] = str(tmp_path / "no-such-client-ca.pem")


# (mutation, words that must all appear in the message (lower-cased))
CASES = {
    "backend-port-0": (_backend_port_zero, ["port", "archive"]),
    "listener-port-0": (_listener_port_zero, ["port", "plain"]),
    "missing-cert": (_missing_cert, ["no-such-gateway-cert.pem"]),
    "missing-key": (_missing_key, ["no-such-gateway-key.key"]),
    "missing-trust": (_missing_trust, ["no-such-client-ca.pem"]),
    "unknown-listener": (_unknown_listener, ["no-such-listener"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_rejects_bad_config(case, pki, tmp_path):
    mutate, words = CASES[case]
    cfg, _ = _config(pki, tmp_path, mutate)
    rc, out = run_gateway_cli("check", cfg)
    assert rc != 0, f"check accepted a bad config ({case}):\n{out}"
    missing = [w for w in words if w not in out.lower()]
    assert not missing, f"message does not name {missing}:\n{out}"


@pytest.mark.parametrize("case", list(CASES))
def test_run_refuses_bad_config_and_listens_nowhere(case, pki, tmp_path):
    mutate, words = CASES[case]
    cfg, ports = _config(pki, tmp_path, mutate)
    out_path = tmp_path / "run.out"
    with open(out_path, "wb") as fh:
        proc = subprocess.Popen(
            gateway_command("run", cfg), cwd=MAIN, env=gateway_env(), stdout=fh, stderr=fh
        )
    try:
        listened = []
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            listened += [p for p in ports if is_listening(p)]
            time.sleep(0.02)
        rc = proc.poll()
        out = out_path.read_text(errors="replace")
        assert rc is not None, f"gateway still running after 15 s with a bad config:\n{out}"
        assert rc != 0, out
        assert not listened, f"listened on {set(listened)} before refusing the config\n{out}"
        missing = [w for w in words if w not in out.lower()]
        assert not missing, f"message does not name {missing}:\n{out}"
    finally:
        ProcessTracker.stop(proc)


def test_check_accepts_good_config_and_reports_certificate(pki, tmp_path):
    cfg, _ = _config(pki, tmp_path)
    rc, out = run_gateway_cli("check", cfg)
    assert rc == 0, out
    # DESIGN §5: one status line per certificate, including its thumbprint
    flat = out.replace(":", "").replace(" ", "").lower()
    assert sha256_thumbprint(pki.gateway_server.cert) in flat, out


def test_syntax_error_in_toml(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[gateway]\nartim_timeout = = 3\n")
    rc, out = run_gateway_cli("check", cfg)
    assert rc != 0, out
    assert "broken.toml" in out or "line 2" in out.lower(), out
