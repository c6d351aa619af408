"""Command line: ``dicom-gateway run|check|thumbprint|demo``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import structlog
import trio

from .config import Config, RouteConfig, load_config, read_key_password
from .errors import GatewayError
from .observe.log import configure_logging
from .policy import effective_verify
from .tls.verify import STRICT_KEY_PROFILES

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _cmd_run(args: argparse.Namespace) -> int:
    from .server import load_runtime, run_gateway

    try:
        config = load_config(args.config)
        configure_logging(args.log_format or config.log.format, config.log.level)
        load_runtime(args.config)  # every certificate loads before anything listens
    except GatewayError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_ERROR
    workers = args.workers or config.workers
    if args.worker_index is None and workers > 1:
        from .workers import Supervisor

        return Supervisor(args.config, workers, grace=config.gateway.shutdown_grace,
                          log_format=args.log_format).run()
    if args.worker_index is not None:
        # Every line this worker logs says which worker (and process) it came from.
        structlog.contextvars.bind_contextvars(worker=args.worker_index, pid=os.getpid())
    try:
        trio.run(functools.partial(run_gateway, args.config,
                                   reuse_port=args.worker_index is not None))
    except GatewayError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"dicom-gateway: cannot listen: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _certificate_lines(config: Config) -> tuple[list[str], bool]:
    from .tls.certs import check_identity

    lines: list[str] = []
    ok = True

    def report(where: str, cert, purpose: str, profile: str) -> None:
        nonlocal ok
        try:
            password = read_key_password(cert, os.environ.get)
        except (GatewayError, OSError) as exc:
            lines.append(f"  ERROR   {where}: {exc}")
            ok = False
            return
        found = check_identity(cert.cert, cert.key, password=password, purpose=purpose,
                               strict_keys=profile in STRICT_KEY_PROFILES)
        # One line per certificate: the worst level, then every finding
        # (check_identity sorts worst first); repeated file names are dropped.
        first = found[0].message
        prefix = first.split(": ", 1)[0] + ": " if ": " in first else ""
        rest = [f.message.removeprefix(prefix) for f in found[1:]]
        lines.append(f"  {found[0].level.upper():<7} {where}: " + "; ".join([first, *rest]))
        ok = ok and all(f.level != "error" for f in found)

    for lst in config.listeners:
        if lst.tls and not lst.certificates:
            lines.append(f"  ERROR   listener '{lst.name}': no certificate configured")
            ok = False
        for i, cert in enumerate(lst.certificates):
            report(f"listener '{lst.name}' certificates[{i}]", cert, "server", lst.profile)
    for route in config.routes:
        bt = route.backend_tls
        if bt and bt.certificate:
            report(f"route '{route.name}' backend_tls", bt.certificate, "client", bt.profile)
    return lines, ok


def _route_lines(config: Config) -> list[str]:
    lines = []
    for r in config.routes:
        listeners = r.listeners or tuple(lst.name for lst in config.listeners)
        policies = {effective_verify(r, config.listener(n)) for n in listeners}
        calling = ",".join(r.calling_ae) if r.calling_ae else "*"
        rewrite = ""
        if r.backend.called_ae or r.backend.calling_ae:
            rewrite = f" as {r.backend.calling_ae or '(same)'}→{r.backend.called_ae or '(same)'}"
        transport = "tls" if r.backend_tls else "plain"
        lines.append(
            f"  {r.name}: {calling} → {r.called_ae} on {','.join(listeners)}"
            f" → {r.backend.host}:{r.backend.port} ({transport}){rewrite};"
            f" verify={'/'.join(sorted(policies))}"
            f"{'; bind_calling_ae' if r.bind_calling_ae else ''}"
        )
        lines.append(f"      policy: {_policy_text(config, r, listeners)}")
    return lines


def _policy_text(config: Config, r: RouteConfig, listeners: tuple[str, ...]) -> str:
    """What the route checks, in words: trust, CRLs, pins, OCSP, names, transport."""
    per_listener: dict[str, list[str]] = {}
    for name in listeners:
        lst = config.listener(name)
        verify = effective_verify(r, lst)
        if not lst.may_use_tls:
            what = ("no client certificate possible (plain), every association refused"
                    if verify != "none" else "no certificate checks (plain)")
        else:
            trust = r.trust or lst.trust
            what = f"verify {verify}"
            if verify in ("chain", "chain+thumbprint"):
                what += (f" against {trust.name} ({'route' if r.trust else 'listener'} trust)"
                         if trust else " without a trust bundle (config error)")
        per_listener.setdefault(what, []).append(name)
    # Listeners that get the same treatment are listed together.
    parts = [f"{what} on {','.join(names)}" for what, names in per_listener.items()]
    if r.crl:
        parts.append("revocation by CRL " + ", ".join(p.name for p in r.crl))
    if r.thumbprints:
        parts.append(f"{len(r.thumbprints)} pinned thumbprint(s)")
    if r.ocsp != "off":
        via = r.ocsp_responder or "the certificate's AIA responder"
        parts.append(f"OCSP {r.ocsp} via {via}")
    if r.bind_calling_ae:
        parts.append("Calling AE must be the certificate's CN or a DNS/dicom-ae SAN")
    if r.sni:
        parts.append(f"only for SNI {r.sni}")
    if r.transport == "tls":
        parts.append("TLS connections only")
    return "; ".join(parts)


def _cmd_check(args: argparse.Namespace) -> int:
    from .server import build_runtime

    try:
        config = load_config(args.config)
    except GatewayError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_ERROR
    cert_lines, ok = _certificate_lines(config)
    print(f"config {config.path}: {len(config.listeners)} listener(s), "
          f"{len(config.routes)} route(s)")
    print("certificates:")
    print("\n".join(cert_lines) if cert_lines else "  (no TLS certificates configured)")
    print("routes (first match wins):")
    print("\n".join(_route_lines(config)))
    if ok:
        try:
            build_runtime(config)
        except GatewayError as exc:
            print(f"dicom-gateway: {exc}", file=sys.stderr)
            ok = False
    if not ok:
        print("dicom-gateway: check failed", file=sys.stderr)
        return EXIT_ERROR
    print("OK")
    return EXIT_OK


def _cmd_thumbprint(args: argparse.Namespace) -> int:
    from .tls.certs import load_certificates, thumbprint

    password = None
    if args.password_env:
        value = os.environ.get(args.password_env)
        if value is None:
            print(f"dicom-gateway: --password-env names ${args.password_env}, which is not set",
                  file=sys.stderr)
            return EXIT_ERROR
        password = value.encode()
    try:
        certs = load_certificates(Path(args.file), password=password)
    except GatewayError as exc:
        hint = ""
        if "PKCS#12" in str(exc) and password is None:
            hint = " (give its password with --password-env VARIABLE)"
        print(f"dicom-gateway: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR
    for cert in certs:
        print(f"subject: {cert.subject.rfc4514_string()}")
        print(f"sha256:{thumbprint(cert, 'sha256')}")
        print(f"sha1:{thumbprint(cert, 'sha1')}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.config) if args.config else None)


def _worker_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"must be an integer 1..64, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="dicom-gateway", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve until SIGTERM/SIGINT; SIGHUP reloads")
    run.add_argument("config")
    run.add_argument("--log-format", choices=("json", "console"), default=None)
    run.add_argument("--workers", type=_worker_count, default=None, metavar="N",
                     help="run N worker processes sharing the listeners (SO_REUSEPORT) "
                          "under a supervisor; default: [gateway] workers, else 1")
    # Set by the supervisor for its children; not for people.
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check", help="validate the config and every certificate")
    check.add_argument("config")
    check.set_defaults(func=_cmd_check)
    tp = sub.add_parser("thumbprint", help="print SHA-256 and SHA-1 thumbprints")
    tp.add_argument("file")
    tp.add_argument("--password-env", help="environment variable holding a PKCS#12 password")
    tp.set_defaults(func=_cmd_thumbprint)
    demo = sub.add_parser("demo", help="run the shipped example end to end")
    demo.add_argument("config", nargs="?", default=None)
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dicom-gateway`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
