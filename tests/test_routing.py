"""Route selection: first match in file order, and the right reason when none matches."""

from __future__ import annotations

import ipaddress

from gateway.config import BackendConfig, RouteConfig
from gateway.routing import NoRoute, RouteRequest, select_route


def route(name: str, called: str, calling=None, listeners=None, sni=None, **kw) -> RouteConfig:
    return RouteConfig(name=name, called_ae=called, calling_ae=calling, listeners=listeners,
                       sni=sni, backend=BackendConfig(host="127.0.0.1", port=104), **kw)


ROUTES = (
    route("ct-only", "ARCHIVE", calling=("CT01",)),
    route("archive", "ARCHIVE", calling=("MR_*", "US01")),
    route("glob", "CT_*", listeners=("tls",)),
    route("sni", "SITE", sni="pacs-a.example.org"),
    route("tls-only", "SECURE", transport="tls"),
    route("lan", "LAN", source=(ipaddress.ip_network("10.0.0.0/8"),
                                ipaddress.ip_network("fd00::/8"))),
)


def pick(called: str, calling: str = "X", listener: str = "tls", sni: str | None = None):
    return select_route(ROUTES, RouteRequest(listener, called, calling, sni))


def test_first_matching_route_wins() -> None:
    assert pick("ARCHIVE", "CT01").name == "ct-only"
    assert pick("ARCHIVE", "MR_3T").name == "archive"


def test_calling_ae_not_allowed_is_reason_3_not_7() -> None:
    assert pick("ARCHIVE", "XRAY") is NoRoute.CALLING_AE_NOT_ALLOWED


def test_unknown_called_ae() -> None:
    assert pick("NOBODY") is NoRoute.CALLED_AE_UNKNOWN


def test_called_ae_glob_and_case_sensitivity() -> None:
    assert pick("CT_ROOM2").name == "glob"
    assert pick("ct_room2") is NoRoute.CALLED_AE_UNKNOWN


def test_listener_restriction() -> None:
    assert pick("CT_ROOM2", listener="plain") is NoRoute.CALLED_AE_UNKNOWN


def test_sni_match_is_case_insensitive_and_required() -> None:
    assert pick("SITE", sni="PACS-A.example.org").name == "sni"
    assert pick("SITE", sni=None) is NoRoute.CALLED_AE_UNKNOWN


def test_transport_tls_route_skips_plain_connections() -> None:
    req = RouteRequest("auto", "SECURE", "X", tls=False)
    assert select_route(ROUTES, req) is NoRoute.CALLED_AE_UNKNOWN
    assert select_route(ROUTES, RouteRequest("auto", "SECURE", "X", tls=True)).name == "tls-only"


def test_source_networks() -> None:
    def src(addr: str | None):
        ip = ipaddress.ip_address(addr) if addr else None
        return select_route(ROUTES, RouteRequest("tls", "LAN", "X", source=ip))

    assert src("10.1.2.3").name == "lan"
    assert src("fd00::5").name == "lan"
    assert src("192.168.1.1") is NoRoute.CALLED_AE_UNKNOWN
    assert src(None) is NoRoute.CALLED_AE_UNKNOWN
