"""GatewayServer.reload: what a SIGHUP applies besides routes and listeners."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import structlog

from gateway.errors import ConfigError
from gateway.observe import log as gwlog
from gateway.server import GatewayServer, load_runtime

CONFIG = """
[log]
level = "{level}"

[[listener]]
name = "plain"
listen = "127.0.0.1:11112"

[[route]]
name = "r"
called_ae = "ARCHIVE"
backend = {{ host = "127.0.0.1", port = 104 }}
"""


async def test_reload_applies_log_level(tmp_path: Path) -> None:
    # [log] level used to be read on reload and then ignored.
    path = tmp_path / "gw.toml"
    path.write_text(CONFIG.format(level="info"))
    out = io.StringIO()
    server = GatewayServer(load_runtime(path))
    try:
        gwlog.configure_logging("json", "info", stream=out)
        structlog.get_logger("gateway").debug("before.reload")
        path.write_text(CONFIG.format(level="debug"))
        assert await server.reload()
        structlog.get_logger("gateway").debug("after.reload")
    finally:
        gwlog._CURRENT = None
        structlog.reset_defaults()
    assert "before.reload" not in out.getvalue()
    assert "after.reload" in out.getvalue()


def test_set_level_without_configured_logging_does_nothing() -> None:
    gwlog._CURRENT = None
    assert gwlog.set_level("debug") is False


def test_tls_context_errors_name_the_listener(tmp_path: Path) -> None:
    # build_server's errors named neither the listener nor the key; with several
    # listeners an operator could not tell which one "min_version" meant.
    (tmp_path / "c.pem").write_text("x")
    path = tmp_path / "gw.toml"
    path.write_text(
        '[[listener]]\nname = "old-tls"\nlisten = "127.0.0.1:2762"\ntls = true\n'
        'profile = "aes"\nmin_version = "TLSv1.3"\nclient_cert = "none"\n'
        'certificates = [{ cert = "c.pem" }]\n'
        '[[route]]\nname = "r"\ncalled_ae = "ARCHIVE"\n'
        'backend = { host = "127.0.0.1", port = 104 }\n')
    with pytest.raises(ConfigError, match=r"^listener 'old-tls': min_version TLSv1\.3"):
        load_runtime(path)
