"""Route selection: a pure function over the validated configuration.

First route in file order whose listener, SNI, transport, client network,
Called AE *and* Calling AE all match wins. When no route matches, the reason
distinguishes "nobody serves this Called AE here" (reject reason 7) from
"this AE is served, but not for this Calling AE" (reason 3), so a modality's
operator sees which title is wrong.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .config import RouteConfig


class NoRoute(enum.Enum):
    """Why no route was selected."""

    CALLED_AE_UNKNOWN = "no route for this Called AE on this listener"
    CALLING_AE_NOT_ALLOWED = "Calling AE not in the route's allow-list"


@dataclass(frozen=True)
class RouteRequest:
    """What routing may look at: known once the A-ASSOCIATE-RQ has been read."""

    listener: str
    called_ae: str
    calling_ae: str
    sni: str | None = None
    tls: bool = False
    #: The client's address (from PROXY protocol when the listener uses it).
    source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


def select_route(routes: Sequence[RouteConfig], req: RouteRequest) -> RouteConfig | NoRoute:
    """Return the first route matching ``req``, or why none does."""
    called_matched = False
    for route in routes:
        if route.listeners is not None and req.listener not in route.listeners:
            continue
        if route.sni is not None and (req.sni or "").lower() != route.sni.lower():
            continue
        if route.transport == "tls" and not req.tls:
            continue
        if route.source is not None and (
            req.source is None or not any(req.source in net for net in route.source)
        ):
            continue
        if not route.matches_called(req.called_ae):
            continue
        called_matched = True
        if route.allows_calling(req.calling_ae):
            return route
    return NoRoute.CALLING_AE_NOT_ALLOWED if called_matched else NoRoute.CALLED_AE_UNKNOWN
