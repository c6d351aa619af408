"""Command line: ``dicom-gateway run|check|thumbprint|demo``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import structlog
import trio

from .config import Config, load_config, read_key_password
from .errors import GatewayError
from .observe.log import configure_logging
from .policy import effective_verify

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

    def report(where: str, cert, purpose: str) -> None:
        nonlocal ok
        try:
            password = read_key_password(cert, os.environ.get)
        except (GatewayError, OSError) as exc:
            lines.append(f"  ERROR   {where}: {exc}")
            ok = False
            return
        for st in check_identity(cert.cert, cert.key, password=password, purpose=purpose):
            lines.append(f"  {st.level.upper():<7} {where}: {st.message}")
            ok = ok and st.level != "error"

    for lst in config.listeners:
        if lst.tls and not lst.certificates:
            lines.append(f"  ERROR   listener '{lst.name}': no certificate configured")
            ok = False
        for i, cert in enumerate(lst.certificates):
            report(f"listener '{lst.name}' certificates[{i}]", cert, "server")
    for route in config.routes:
        if route.backend_tls and route.backend_tls.certificate:
            report(f"route '{route.name}' backend_tls", route.backend_tls.certificate, "client")
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
    return lines


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

    password = os.environ.get(args.password_env).encode() if args.password_env else None
    try:
        certs = load_certificates(Path(args.file), password=password)
    except GatewayError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
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
