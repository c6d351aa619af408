"""TOML configuration → immutable dataclasses, validated completely before anything listens.

Every problem is reported with the key path that holds it, e.g.
``route 'ct-archive': backend.port must be 1..65535, got 0``. All problems of a
file are collected and reported together, so an operator fixes them in one pass.
Paths in the file are relative to the file itself.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .dul.ae import validate_ae
from .errors import ConfigError
from .tls.certs import parse_thumbprint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

ClientCertMode = Literal["required", "optional", "none"]
RouteVerify = Literal["chain", "thumbprint", "chain+thumbprint", "none"]
BackendVerify = Literal["chain", "thumbprint", "none"]

PROFILE_NAMES = (
    "bcp195-rfc8996",
    "bcp195-rfc8996-mod",
    "bcp195-nd",
    "bcp195-ex",
    "bcp195",
    "aes",
    "basic",
)


@dataclass(frozen=True)
class GatewaySettings:
    """Process-wide timeouts and limits (``[gateway]``)."""

    artim_timeout: float = 30.0
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    backend_timeout: float = 30.0
    idle_timeout: float = 900.0
    release_timeout: float = 30.0
    shutdown_grace: float = 30.0
    max_associations: int = 1000
    max_pdu_length: int = 1048576


@dataclass(frozen=True)
class LogSettings:
    """Log output (``[log]``)."""

    format: Literal["json", "console"] = "json"
    level: str = "info"


@dataclass(frozen=True)
class AdminSettings:
    """Admin HTTP endpoint (``[admin]``); ``None`` port means disabled."""

    host: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class AuditSettings:
    """DICOM audit trail (``[audit]``): RFC 5424 syslog over UDP/TLS, or a file."""

    transport: Literal["off", "udp", "tls", "file"] = "off"
    host: str | None = None
    port: int | None = None
    path: Path | None = None
    ca: Path | None = None
    server_name: str | None = None
    certificate: CertificateConfig | None = None
    queue_size: int = 1000
    source_id: str = "dicom-gateway"
    enterprise_site_id: str | None = None


@dataclass(frozen=True)
class CertificateConfig:
    """One certificate (and key) a listener or backend presents.

    ``key`` None means the key is in ``cert`` (PEM with key, or PKCS#12).
    ``staple`` is a DER OCSP response served to clients that ask (OCSP stapling).
    """

    cert: Path
    key: Path | None = None
    sni: tuple[str, ...] = ()
    key_password_env: str | None = None
    key_password_file: Path | None = None
    staple: Path | None = None


@dataclass(frozen=True)
class ListenerConfig:
    """A ``[[listener]]``: where the gateway accepts associations."""

    name: str
    host: str
    port: int
    #: True, False, or "auto" (TLS and plain DICOM on one port, by the first byte).
    tls: bool | Literal["auto"]
    profile: str = "bcp195-rfc8996"
    client_cert: ClientCertMode = "required"
    trust: Path | None = None
    certificates: tuple[CertificateConfig, ...] = ()
    min_version: str | None = None
    ciphers: str | None = None
    proxy_protocol: bool = False

    @property
    def may_use_tls(self) -> bool:
        """True if connections on this listener can be TLS (``tls`` true or auto)."""
        return self.tls is True or self.tls == "auto"


@dataclass(frozen=True)
class BackendTLSConfig:
    """``[route.backend_tls]``: re-encrypt towards the backend."""

    verify: BackendVerify = "chain"
    ca: Path | None = None
    server_name: str | None = None
    thumbprints: tuple[str, ...] = ()
    certificate: CertificateConfig | None = None
    profile: str = "bcp195-rfc8996"


@dataclass(frozen=True)
class BackendConfig:
    """Where a route's associations go, and optional AE title rewrites."""

    host: str
    port: int
    called_ae: str | None = None
    calling_ae: str | None = None


@dataclass(frozen=True)
class RouteConfig:
    """A ``[[route]]``: which associations go where, under which policy."""

    name: str
    called_ae: str
    backend: BackendConfig
    calling_ae: tuple[str, ...] | None = None
    listeners: tuple[str, ...] | None = None
    sni: str | None = None
    verify: RouteVerify | None = None
    trust: Path | None = None
    bind_calling_ae: bool = False
    backend_tls: BackendTLSConfig | None = None
    #: "tls": only connections that arrived over TLS may use this route.
    transport: Literal["any", "tls"] = "any"
    #: Client networks allowed (CIDR); None = any. Uses the PROXY-protocol address.
    source: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    thumbprints: tuple[str, ...] = ()
    crl: tuple[Path, ...] = ()
    ocsp: Literal["off", "soft", "hard"] = "off"
    ocsp_responder: str | None = None
    inspect: Literal["dimse", "association"] = "dimse"
    max_associations: int | None = None

    def matches_called(self, called_ae: str) -> bool:
        """True if ``called_ae`` matches this route's exact title or glob."""
        return _ae_glob(self.called_ae, called_ae)

    def allows_calling(self, calling_ae: str) -> bool:
        """True if the allow-list is absent or ``calling_ae`` matches an entry."""
        if self.calling_ae is None:
            return True
        return any(_ae_glob(p, calling_ae) for p in self.calling_ae)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    log: LogSettings = field(default_factory=LogSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    workers: int = 1
    listeners: tuple[ListenerConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    def listener(self, name: str) -> ListenerConfig:
        """The listener called ``name`` (KeyError if none)."""
        for lst in self.listeners:
            if lst.name == name:
                return lst
        raise KeyError(name)


def _ae_glob(pattern: str, title: str) -> bool:
    # AE titles are case-sensitive in DICOM; fnmatchcase keeps them so.
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(title, pattern)
    return pattern == title


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate ``path``; raise ConfigError listing every problem found."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.resolve().parent, path=path)


def parse_config(data: dict[str, Any], *, base_dir: Path, path: Path) -> Config:
    """Validate an already-parsed TOML document."""
    v = _Validator(base_dir)
    v.unknown_keys("", data, {"gateway", "log", "admin", "audit", "listener", "route"})
    gateway = v.gateway(data.get("gateway", {}))
    workers = v.integer("[gateway]", v.table("[gateway]", data.get("gateway", {})), "workers",
                        1, 1, 64)
    log = v.log(data.get("log", {}))
    admin = v.admin(data.get("admin", {}))
    audit = v.audit(data.get("audit", {}))
    listeners = tuple(v.listeners(data.get("listener", [])))
    routes = tuple(v.routes(data.get("route", []), {lst.name for lst in listeners}))
    if not listeners:
        v.error("", "at least one [[listener]] is required")
    if not routes:
        v.error("", "at least one [[route]] is required")
    v.raise_if_errors(path)
    return Config(
        path=path, gateway=gateway, log=log, admin=admin, audit=audit, workers=workers,
        listeners=listeners, routes=routes,
    )


class _Validator:
    """Collects errors with their key paths while building the dataclasses."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}" if where else message)

    def raise_if_errors(self, path: Path) -> None:
        if self.errors:
            lines = "\n  ".join(self.errors)
            raise ConfigError(f"{path}: invalid configuration:\n  {lines}")

    # -- primitives ------------------------------------------------------------------

    def unknown_keys(self, where: str, table: dict[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.error(where, f"unknown key '{key}' (allowed: {hint})")

    def table(self, where: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.error(where, f"must be a table, got {type(value).__name__}")
            return {}
        return value

    def get(
        self,
        where: str,
        table: dict[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
    ) -> Any:
        if key not in table:
            if required:
                self.error(where, f"{key} is required")
            return default
        value = table[key]
        # bool is an int subclass; "port = true" must not pass as 1.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            self.error(where, f"{key} must be {_kind_name(kind)}, got {value!r}")
            return default
        if not isinstance(value, kind):
            self.error(where, f"{key} must be {_kind_name(kind)}, got {value!r}")
            return default
        return value

    def number(
        self, where: str, table: dict[str, Any], key: str, default: float, lo: float, hi: float
    ) -> float:
        value = self.get(where, table, key, (int, float), default)
        if not lo <= value <= hi:
            self.error(where, f"{key} must be {lo:g}..{hi:g}, got {value!r}")
            return default
        return float(value)

    def integer(
        self, where: str, table: dict[str, Any], key: str, default: int, lo: int, hi: int
    ) -> int:
        value = self.get(where, table, key, int, default)
        if not lo <= value <= hi:
            self.error(where, f"{key} must be {lo}..{hi}, got {value!r}")
            return default
        return value

    def choice(
        self, where: str, table: dict[str, Any], key: str, choices: tuple[str, ...], default: Any
    ) -> Any:
        value = self.get(where, table, key, str, default)
        if value is not None and value not in choices:
            opts = ", ".join(repr(c) for c in choices)
            self.error(where, f"{key} must be one of {opts}, got {value!r}")
            return default
        return value

    def file(
        self, where: str, table: dict[str, Any], key: str, *, required: bool = False
    ) -> Path | None:
        value = self.get(where, table, key, str, None, required=required)
        if value is None:
            return None
        p = (self.base_dir / value).resolve()
        if not p.is_file():
            self.error(where, f"{key}: file not found: {p}")
        return p

    def str_list(self, where: str, table: dict[str, Any], key: str) -> tuple[str, ...] | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            self.error(where, f"{key} must be a string or a list of strings, got {value!r}")
            return None
        return tuple(value)

    def thumbprints(self, where: str, table: dict[str, Any], key: str) -> tuple[str, ...]:
        # Parsed here so that a typo is a config error with its key path, not a
        # ValueError out of context building (check, run, or a SIGHUP reload).
        items = self.str_list(where, table, key) or ()
        for item in items:
            try:
                parse_thumbprint(item)
            except ValueError as exc:
                self.error(where, f"{key}: {exc}")
        return items

    def ae(self, where: str, key: str, title: str | None, *, glob: bool = False) -> None:
        if title is None:
            return
        probe = title.replace("*", "A").replace("?", "A") if glob else title
        reason = validate_ae(probe)
        if reason:
            self.error(where, f"{key} {title!r} is not a valid AE title: {reason}")

    def listen(self, where: str, table: dict[str, Any], key: str) -> tuple[str, int]:
        value = self.get(where, table, key, str, None, required=True)
        if value is None:
            return ("", 0)
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            self.error(where, f"{key} must be 'HOST:PORT' (e.g. '0.0.0.0:2762'), got {value!r}")
            return ("", 0)
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            port = int(port_s)
        except ValueError:
            self.error(where, f"{key} port must be a number, got {port_s!r}")
            return (host, 0)
        if not 1 <= port <= 65535:
            self.error(where, f"{key} port must be 1..65535, got {port}")
        if host not in ("*", "localhost"):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                self.error(where, f"{key} host must be an IP address, got {host!r}")
        return (host, port)

    def password_source(self, where: str, table: dict[str, Any]) -> tuple[str | None, Path | None]:
        for inline in ("key_password", "password"):
            if inline in table:
                self.error(
                    where,
                    f"{inline}: passwords must not be written in the config; "
                    "use key_password_env or key_password_file",
                )
        env = self.get(where, table, "key_password_env", str)
        pw_file = self.file(where, table, "key_password_file")
        if env and pw_file:
            self.error(where, "key_password_env and key_password_file are mutually exclusive")
        return env, pw_file

    # -- sections --------------------------------------------------------------------

    def gateway(self, raw: Any) -> GatewaySettings:
        w = "[gateway]"
        t = self.table(w, raw)
        d = GatewaySettings()
        self.unknown_keys(w, t, set(d.__dataclass_fields__) | {"workers"})

        def seconds(key: str) -> float:
            return self.number(w, t, key, getattr(d, key), 0.001, 86400 * 7)

        return GatewaySettings(
            artim_timeout=seconds("artim_timeout"),
            handshake_timeout=seconds("handshake_timeout"),
            connect_timeout=seconds("connect_timeout"),
            backend_timeout=seconds("backend_timeout"),
            idle_timeout=seconds("idle_timeout"),
            release_timeout=seconds("release_timeout"),
            shutdown_grace=self.number(w, t, "shutdown_grace", d.shutdown_grace, 0, 86400),
            max_associations=self.integer(w, t, "max_associations", d.max_associations, 1, 10**6),
            max_pdu_length=self.integer(w, t, "max_pdu_length", d.max_pdu_length, 1024, 2**32 - 1),
        )

    def log(self, raw: Any) -> LogSettings:
        w = "[log]"
        t = self.table(w, raw)
        self.unknown_keys(w, t, {"format", "level"})
        fmt = self.choice(w, t, "format", ("json", "console"), "json")
        level = self.choice(w, t, "level", ("debug", "info", "warning", "error"), "info")
        return LogSettings(format=fmt, level=level)

    def admin(self, raw: Any) -> AdminSettings:
        w = "[admin]"
        t = self.table(w, raw)
        self.unknown_keys(w, t, {"listen"})
        if "listen" not in t:
            return AdminSettings()
        host, port = self.listen(w, t, "listen")
        return AdminSettings(host=host, port=port)

    def audit(self, raw: Any) -> AuditSettings:
        w = "[audit]"
        t = self.table(w, raw)
        self.unknown_keys(w, t, {"transport", "address", "path", "ca", "server_name", "cert",
                                 "key", "key_password_env", "key_password_file", "key_password",
                                 "queue_size", "source_id", "enterprise_site_id"})
        transport = self.choice(w, t, "transport", ("off", "udp", "tls", "file"), "off")
        host = port = path = None
        if transport in ("udp", "tls"):
            host, port = self.listen(w, t, "address")
        if transport == "file":
            value = self.get(w, t, "path", str, None, required=True)
            path = (self.base_dir / value).resolve() if value else None
        ca = self.file(w, t, "ca")
        if transport == "tls" and ca is None:
            self.error(w, "transport = 'tls' needs ca (the audit repository's CA bundle)")
        cert = None
        if "cert" in t:
            cert = self.certificate(w, {k: v for k, v in t.items() if k in _CERT_KEYS},
                                    with_sni=False)
        return AuditSettings(
            transport=transport, host=host, port=port, path=path, ca=ca,
            server_name=self.get(w, t, "server_name", str), certificate=cert,
            queue_size=self.integer(w, t, "queue_size", 1000, 1, 1_000_000),
            source_id=self.get(w, t, "source_id", str, "dicom-gateway"),
            enterprise_site_id=self.get(w, t, "enterprise_site_id", str),
        )

    def cidrs(self, where: str, table: dict[str, Any], key: str
              ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
        items = self.str_list(where, table, key)
        if items is None:
            return None
        nets = []
        for item in items:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.error(where, f"{key}: {item!r} is not an IP network (e.g. '10.0.0.0/8')")
        return tuple(nets)

    def certificate(self, where: str, raw: Any, *, with_sni: bool) -> CertificateConfig | None:
        t = self.table(where, raw)
        allowed = set(_CERT_KEYS)
        if with_sni:
            allowed |= {"sni", "staple"}
        self.unknown_keys(where, t, allowed)
        cert = self.file(where, t, "cert", required=True)
        key = self.file(where, t, "key")
        env, pw_file = self.password_source(where, t)
        sni = self.str_list(where, t, "sni") or ()
        staple = self.file(where, t, "staple")
        if cert is None:
            return None
        return CertificateConfig(
            cert=cert, key=key, sni=sni, key_password_env=env, key_password_file=pw_file,
            staple=staple,
        )

    def listeners(self, raw: Any) -> Iterator[ListenerConfig]:
        if not isinstance(raw, list):
            self.error("listener", "must be an array of tables ([[listener]])")
            return
        seen: dict[str, int] = {}
        for i, item in enumerate(raw):
            t = self.table(f"listener #{i + 1}", item)
            name = t.get("name")
            w = f"listener '{name}'" if isinstance(name, str) else f"listener #{i + 1}"
            name = self.get(w, t, "name", str, f"#{i + 1}", required=True)
            if name in seen:
                self.error(w, f"name {name!r} is used by more than one listener")
            seen[name] = i
            self.unknown_keys(
                w,
                t,
                {"name", "listen", "tls", "profile", "client_cert", "trust", "certificates",
                 "min_version", "ciphers", "proxy_protocol"},
            )
            host, port = self.listen(w, t, "listen")
            tls = self.get(w, t, "tls", (bool, str), False)
            if isinstance(tls, str) and tls != "auto":
                self.error(w, f"tls must be true, false or \"auto\", got {tls!r}")
                tls = False
            proxy = self.get(w, t, "proxy_protocol", bool, False)
            profile = self.choice(w, t, "profile", PROFILE_NAMES, "bcp195-rfc8996")
            client_cert = self.choice(
                w, t, "client_cert", ("required", "optional", "none"), "required"
            )
            trust = self.file(w, t, "trust")
            certs_raw = t.get("certificates", [])
            certs: list[CertificateConfig] = []
            if not isinstance(certs_raw, list):
                self.error(w, "certificates must be an array of tables")
                certs_raw = []
            for j, c in enumerate(certs_raw):
                cc = self.certificate(f"{w}: certificates[{j}]", c, with_sni=True)
                if cc:
                    certs.append(cc)
            if tls and not certs_raw:  # true or "auto"
                self.error(w, "a TLS listener needs at least one entry in certificates")
            if tls and client_cert == "required" and trust is None:
                self.error(
                    w,
                    "client_cert = 'required' needs trust (a CA bundle to verify clients); "
                    "or set client_cert = 'optional'/'none'",
                )
            if not tls and certs_raw:
                self.error(w, "certificates are set but tls = false")
            min_version = self.choice(w, t, "min_version", ("TLSv1.2", "TLSv1.3"), None)
            ciphers = self.get(w, t, "ciphers", str)
            yield ListenerConfig(
                name=name,
                host=host,
                port=port,
                tls=tls,
                profile=profile,
                client_cert=client_cert,
                trust=trust,
                certificates=tuple(certs),
                min_version=min_version,
                ciphers=ciphers,
                proxy_protocol=proxy,
            )

    def routes(self, raw: Any, listener_names: set[str]) -> Iterator[RouteConfig]:
        if not isinstance(raw, list):
            self.error("route", "must be an array of tables ([[route]])")
            return
        seen: set[str] = set()
        for i, item in enumerate(raw):
            t = self.table(f"route #{i + 1}", item)
            name = t.get("name")
            w = f"route '{name}'" if isinstance(name, str) else f"route #{i + 1}"
            name = self.get(w, t, "name", str, f"#{i + 1}", required=True)
            if name in seen:
                self.error(w, f"name {name!r} is used by more than one route")
            seen.add(name)
            self.unknown_keys(
                w,
                t,
                {"name", "called_ae", "calling_ae", "listeners", "sni", "verify", "trust",
                 "bind_calling_ae", "backend", "backend_tls", "thumbprints", "crl", "ocsp",
                 "ocsp_responder", "transport", "source", "inspect", "max_associations"},
            )
            called = self.get(w, t, "called_ae", str, "*", required=True)
            self.ae(w, "called_ae", called, glob=True)
            calling = self.str_list(w, t, "calling_ae")
            for c in calling or ():
                self.ae(w, "calling_ae", c, glob=True)
            lsts = self.str_list(w, t, "listeners")
            for ln in lsts or ():
                if ln not in listener_names:
                    known = ", ".join(sorted(listener_names)) or "none"
                    self.error(w, f"listeners: unknown listener {ln!r} (known: {known})")
            sni = self.get(w, t, "sni", str)
            verify = self.choice(
                w, t, "verify", ("chain", "thumbprint", "chain+thumbprint", "none"), None
            )
            thumbs = self.thumbprints(w, t, "thumbprints")
            if verify in ("thumbprint", "chain+thumbprint") and not thumbs:
                self.error(w, f"verify = {verify!r} needs thumbprints")
            trust = self.file(w, t, "trust")
            crl_names = self.str_list(w, t, "crl") or ()
            crls = []
            for c in crl_names:
                p = (self.base_dir / c).resolve()
                if not p.is_file():
                    self.error(w, f"crl: file not found: {p}")
                crls.append(p)
            ocsp = self.choice(w, t, "ocsp", ("off", "soft", "hard"), "off")
            transport = self.choice(w, t, "transport", ("any", "tls"), "any")
            source = self.cidrs(w, t, "source")
            inspect = self.choice(w, t, "inspect", ("dimse", "association"), "dimse")
            route_max = self.get(w, t, "max_associations", int)
            if route_max is not None and route_max < 1:
                self.error(w, f"max_associations must be ≥ 1, got {route_max}")
            bind = self.get(w, t, "bind_calling_ae", bool, False)
            backend = self.backend(f"{w}: backend", t.get("backend"), required="backend" in t)
            if "backend" not in t:
                self.error(w, "backend is required (backend = { host = ..., port = ... })")
            btls = None
            if "backend_tls" in t:
                btls = self.backend_tls(f"{w}: backend_tls", t["backend_tls"])
            yield RouteConfig(
                name=name,
                called_ae=called,
                calling_ae=calling,
                listeners=lsts,
                sni=sni,
                verify=verify,
                trust=trust,
                bind_calling_ae=bind,
                backend=backend,
                backend_tls=btls,
                transport=transport,
                source=source,
                thumbprints=thumbs,
                crl=tuple(crls),
                ocsp=ocsp,
                ocsp_responder=self.get(w, t, "ocsp_responder", str),
                inspect=inspect,
                max_associations=route_max,
            )

    def backend(self, where: str, raw: Any, *, required: bool) -> BackendConfig:
        t = self.table(where, raw) if required else {}
        self.unknown_keys(where, t, {"host", "port", "called_ae", "calling_ae"})
        host = self.get(where, t, "host", str, "", required=required)
        port = self.get(where, t, "port", int, 0, required=required)
        if required and isinstance(port, int) and not 1 <= port <= 65535:
            self.error(where.replace(": backend", ""), f"backend.port must be 1..65535, got {port}")
        called = self.get(where, t, "called_ae", str)
        calling = self.get(where, t, "calling_ae", str)
        self.ae(where, "called_ae", called)
        self.ae(where, "calling_ae", calling)
        return BackendConfig(host=host, port=port, called_ae=called, calling_ae=calling)

    def backend_tls(self, where: str, raw: Any) -> BackendTLSConfig:
        t = self.table(where, raw)
        self.unknown_keys(
            where,
            t,
            {"verify", "ca", "server_name", "thumbprints", "cert", "key", "key_password_env",
             "key_password_file", "key_password", "profile"},
        )
        verify = self.choice(where, t, "verify", ("chain", "thumbprint", "none"), "chain")
        ca = self.file(where, t, "ca")
        thumbs = self.thumbprints(where, t, "thumbprints")
        if verify == "chain" and ca is None:
            self.error(where, "verify = 'chain' needs ca (the backend's CA bundle)")
        if verify == "thumbprint" and not thumbs:
            self.error(where, "verify = 'thumbprint' needs thumbprints")
        cert = None
        if "cert" in t:
            cert = self.certificate(where, {k: v for k, v in t.items() if k in _CERT_KEYS},
                                    with_sni=False)
        elif "key" in t:
            self.error(where, "key is set without cert")
        return BackendTLSConfig(
            verify=verify,
            ca=ca,
            server_name=self.get(where, t, "server_name", str),
            thumbprints=thumbs,
            certificate=cert,
            profile=self.choice(where, t, "profile", PROFILE_NAMES, "bcp195-rfc8996"),
        )


_CERT_KEYS = frozenset({"cert", "key", "key_password_env", "key_password_file", "key_password"})


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if set(_as_tuple(kind)) == {int, float}:
        return "a number"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def read_key_password(cert: CertificateConfig, env: Callable[[str], str | None]) -> bytes | None:
    """Resolve a certificate's key password from its environment variable or file."""
    if cert.key_password_env:
        value = env(cert.key_password_env)
        if value is None:
            raise ConfigError(
                f"{cert.cert}: key_password_env names ${cert.key_password_env}, which is not set"
            )
        return value.encode()
    if cert.key_password_file:
        # Checked to exist at load time, but it may be unreadable to this user
        # (or gone by a SIGHUP reload): a ConfigError, not a crash of the reload.
        try:
            return cert.key_password_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(
                f"{cert.cert}: key_password_file {cert.key_password_file}: cannot read it "
                f"({exc.strerror or exc})"
            ) from None
    return None
