"""structlog set-up: JSON or console lines on stderr, one bound context per association.

The JSON chain is on the per-message path when DIMSE inspection logs every
command (``dimse.message``), so its steps are chosen for cost: structlog's
``TimeStamper`` formats a full ``datetime`` per line and ``JSONRenderer``
builds a new ``JSONEncoder`` per line (``json.dumps`` with keyword
arguments); here the date and time down to the second are formatted once per
second and one encoder is reused. The lines are the same: ``level``, an ISO
8601 UTC ``timestamp`` with microseconds and ``Z``, JSON objects.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _UTCTimeStamper:
    """``TimeStamper(fmt="iso", utc=True)`` at a quarter of the cost."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]
                 ) -> dict[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


def _json_default(obj: Any) -> Any:
    # What structlog's JSONRenderer does with values JSON cannot hold.
    to_structlog = getattr(obj, "__structlog__", None)
    return to_structlog() if to_structlog is not None else repr(obj)


_ENCODE = json.JSONEncoder(default=_json_default).encode


def _serialize(obj: Any, **_kw: Any) -> str:
    return _ENCODE(obj)


#: (format, stream) of the last configure_logging call; None until one was made.
_CURRENT: tuple[str, TextIO | None] | None = None


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Install the processor chain; safe to call again on reload."""
    global _CURRENT
    _CURRENT = (fmt, stream)
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_serialize)
    structlog.configure(
        processors=[
            # First, so trio tasks inherit the association's bound fields.
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _UTCTimeStamper(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # WriteLogger writes line and newline in one write(): with --workers,
        # several processes share one stderr, and print()'s separate newline
        # write let their JSON lines run together.
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        # Not cached: a reload may change the level. Hot paths bind a logger
        # once (an association's life) instead of rebuilding one per line.
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> bool:
    """Apply a reloaded ``[log] level``, keeping the format and stream in use.

    The format stays what the process started with (``--log-format`` may have
    overridden the file). Does nothing, and returns False, when logging was
    never configured here (library use, tests capturing logs).
    """
    if _CURRENT is None:
        return False
    fmt, stream = _CURRENT
    configure_logging(fmt, level, stream)
    return True


def get_logger() -> Any:
    """The gateway's logger (a structlog BoundLogger)."""
    return structlog.get_logger("gateway")
