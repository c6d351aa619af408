"""Config validation: every error names the key path and nothing half-valid loads."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

BASE = """
[[listener]]
name = "plain"
listen = "127.0.0.1:11112"

[[route]]
name = "ct"
called_ae = "ARCHIVE"
backend = { host = "127.0.0.1", port = 104 }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(textwrap.dedent(text))
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    return p


def errors_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    return str(exc.value)


def test_shipped_example_loads() -> None:
    cfg = load_config(REPO / "rules" / "example.toml")
    assert [lst.name for lst in cfg.listeners] == ["dicom-tls", "dicom-plain"]
    tls = cfg.listener("dicom-tls")
    assert tls.tls and tls.port == 2762 and tls.client_cert == "required"
    assert tls.certificates[1].sni == ("pacs-a.example.org",)
    # Paths are resolved relative to the config file, not the working directory.
    assert tls.trust == (REPO / "certs-example" / "ca.pem").resolve()
    remote = cfg.routes[1]
    assert remote.backend.called_ae == "PACS" and remote.backend_tls is not None


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.gateway.artim_timeout == 30 and cfg.gateway.max_pdu_length == 1048576
    assert cfg.routes[0].listeners is None and cfg.routes[0].calling_ae is None


def test_backend_port_zero_names_route_and_key(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("port = 104", "port = 0"))
    assert "route 'ct': backend.port must be 1..65535, got 0" in msg


def test_listen_port_out_of_range(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace(":11112", ":70000"))
    assert "listener 'plain': listen port must be 1..65535, got 70000" in msg


def test_unknown_listener_named(tmp_path: Path) -> None:
    text = BASE.replace('called_ae = "ARCHIVE"', 'called_ae = "ARCHIVE"\nlisteners = ["nope"]')
    msg = errors_of(tmp_path, text)
    assert "route 'ct': listeners: unknown listener 'nope' (known: plain)" in msg


def test_missing_certificate_file_named(tmp_path: Path) -> None:
    text = BASE.replace(
        'listen = "127.0.0.1:11112"',
        'listen = "127.0.0.1:2762"\ntls = true\nclient_cert = "none"\n'
        'certificates = [{ cert = "missing.pem", key = "k.pem" }]',
    )
    msg = errors_of(tmp_path, text)
    assert "listener 'plain': certificates[0]: cert: file not found:" in msg
    assert "missing.pem" in msg


def test_tls_listener_without_certificate(tmp_path: Path) -> None:
    text = BASE.replace('listen = "127.0.0.1:11112"',
                        'listen = "127.0.0.1:2762"\ntls = true\nclient_cert = "none"')
    assert "needs at least one entry in certificates" in errors_of(tmp_path, text)


def test_required_client_cert_needs_trust(tmp_path: Path) -> None:
    text = BASE.replace('listen = "127.0.0.1:11112"',
                        'listen = "127.0.0.1:2762"\ntls = true\n'
                        'certificates = [{ cert = "c.pem", key = "k.pem" }]')
    assert "client_cert = 'required' needs trust" in errors_of(tmp_path, text)


def test_inline_password_refused(tmp_path: Path) -> None:
    text = BASE.replace(
        'listen = "127.0.0.1:11112"',
        'listen = "127.0.0.1:2762"\ntls = true\nclient_cert = "none"\n'
        'certificates = [{ cert = "c.pem", key = "k.pem", key_password = "secret" }]',
    )
    msg = errors_of(tmp_path, text)
    assert "key_password: passwords must not be written in the config" in msg


def test_typo_key_is_reported(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace("backend =", "backedn = 1\nbackend ="))
    assert "route 'ct': unknown key 'backedn'" in msg


def test_invalid_ae_title(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE.replace('"ARCHIVE"', '"THIS_TITLE_IS_TOO_LONG"'))
    assert "route 'ct': called_ae 'THIS_TITLE_IS_TOO_LONG' is not a valid AE title" in msg


def test_wrong_type_named(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, "[gateway]\nartim_timeout = \"soon\"\n" + BASE)
    assert "[gateway]: artim_timeout must be a number, got 'soon'" in msg


def test_all_errors_reported_together(tmp_path: Path) -> None:
    text = BASE.replace("port = 104", "port = 0").replace(":11112", ":0")
    msg = errors_of(tmp_path, text)
    assert "backend.port" in msg and "listen port" in msg


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, "[gateway\n")
    assert "gw.toml: not valid TOML" in msg and "line 1" in msg


def test_backend_tls_chain_needs_ca(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, BASE + "\n[route.backend_tls]\nverify = \"chain\"\n")
    assert "route 'ct': backend_tls: verify = 'chain' needs ca" in msg


def test_unreadable_key_password_file_is_a_config_error(tmp_path: Path) -> None:
    # Validated to exist at load time; reading it later (run, SIGHUP reload) used
    # to raise a bare OSError, which ends the process instead of refusing a reload.
    from gateway.config import CertificateConfig, read_key_password

    missing = tmp_path / "gone.txt"
    cert = CertificateConfig(cert=tmp_path / "c.pem", key_password_file=missing)
    with pytest.raises(ConfigError, match=r"key_password_file .*gone\.txt"):
        read_key_password(cert, {}.get)


def test_malformed_thumbprints_name_their_key(tmp_path: Path) -> None:
    # A bad backend_tls thumbprint used to escape as a ValueError traceback from
    # build_client (check, run, and a SIGHUP reload, which it ended).
    msg = errors_of(tmp_path, BASE + '''
thumbprints = ["sha256:12"]
[route.backend_tls]
verify = "thumbprint"
thumbprints = ["zz"]
''')
    assert "route 'ct': thumbprints: thumbprint 'sha256:12'" in msg
    assert "route 'ct': backend_tls: thumbprints: thumbprint 'zz' contains 'z'" in msg
