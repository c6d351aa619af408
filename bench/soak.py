#!/usr/bin/env python3
"""Soak the gateway with mixed good and bad traffic for a set time (issue 4).

Starts its own gateway (``python -m gateway run``) on 127.0.0.1 with a plain and a
TLS listener in front of a DCMTK ``storescp --fork --ignore`` backend, then for
``--duration`` seconds runs, concurrently:

* good traffic: DCMTK ``echoscu`` and ``storescu`` (3 small CT files), plain and TLS;
  every one must succeed;
* bad traffic: random bytes, an HTTP request, a TLS ClientHello on the plain port,
  plain DICOM on the TLS port, a 0xFFFFFFFF PDU length, an unknown PDU type, P-DATA
  before association, a bad protocol version, an all-space Called AE, an item
  overrunning the PDU, a truncated RQ, and slowloris bursts (many connections that
  send one byte and hold) — each checked against its expected answer.

It reports associations done, errors by kind, and the gateway's RSS and open fds
at the start (after ``--warmup``) and at the end, and exits non-zero if any good
association failed, RSS grew by more than ``--max-rss-growth`` (10 %), or the
gateway crashed or printed a traceback.

    python bench/soak.py                  # 180 s
    python bench/soak.py --duration 300   # the 5-minute acceptance run
    python bench/soak.py --duration 14400 --json-out soak.json   # hours
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

MAIN = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(MAIN))

from tests.interop.helpers import (  # noqa: E402  (needs the path above)
    HOST,
    KB,
    RawPeer,
    abort_bytes,
    assoc_rq_bytes,
    dcmtk,
    dcmtk_env,
    echo_pdata,
    free_port,
    make_pki,
    open_fds,
    raw_pdu,
    reject_bytes,
    rss_kib,
    tls_client_hello,
    to_toml,
    wait_listening,
    write_ct_files,
)

GATEWAY_SETTINGS = {
    "artim_timeout": 2,
    "handshake_timeout": 2,
    "connect_timeout": 2,
    "backend_timeout": 10,
    "idle_timeout": 15,
    "release_timeout": 2,
    "shutdown_grace": 5,
    "max_associations": 200,
    "max_pdu_length": 65536,
}

ABORT_UNRECOGNIZED = abort_bytes(2, 1)

#: bad input name -> (listener, bytes to send, expected answer; None = closed silently)
BAD_INPUTS: dict[str, tuple[str, bytes, bytes | None]] = {
    "random-bytes": ("plain", bytes([0xA5]) + bytes(range(64)), ABORT_UNRECOGNIZED),
    "http": ("plain", b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n", ABORT_UNRECOGNIZED),
    "tls-on-plain": ("plain", b"", None),  # filled in with a real ClientHello
    "plain-on-tls": ("tls", assoc_rq_bytes(), abort_bytes(2, 0)),
    "length-ffffffff": ("plain", raw_pdu(0x01, b"", length=0xFFFFFFFF), abort_bytes(2, 6)),
    "unknown-pdu-type": ("plain", raw_pdu(0x0B, bytes(4)), ABORT_UNRECOGNIZED),
    "pdata-before-assoc": ("plain", echo_pdata(), abort_bytes(2, 2)),
    "bad-protocol-version": ("plain", assoc_rq_bytes(protocol_version=2), reject_bytes(1, 2, 2)),
    "all-space-called-ae": ("plain", assoc_rq_bytes(called_raw=b" " * 16), reject_bytes(1, 1, 7)),
    "item-overrun": ("plain", assoc_rq_bytes(user_info_length=0x1000), abort_bytes(2, 6)),
    "truncated-rq": ("plain", assoc_rq_bytes()[:40], None),
}


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_samples: dict[str, str] = {}
        self.stop = threading.Event()
        self.work = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
        self.procs: list[subprocess.Popen] = []

    # ----------------------------------------------------------------- set-up

    def setup(self) -> None:
        pki = make_pki(self.work / "pki")
        self.pki = pki
        self.files = write_ct_files(self.work / "files", [10 * KB, 20 * KB, 64 * KB])
        self.backend_port = free_port()
        self.backend = self._spawn(
            [dcmtk("storescp"), "--fork", "--ignore", str(self.backend_port)],
            "storescp",
            env=dcmtk_env(),
        )
        if not wait_listening([self.backend_port], self.backend, 10):
            raise SystemExit("storescp backend did not start")
        self.ports = {"plain": free_port(), "tls": free_port()}
        config = {
            "gateway": GATEWAY_SETTINGS,
            "log": {"format": "json", "level": "info"},
            "listener": [
                {"name": "plain", "listen": f"{HOST}:{self.ports['plain']}", "tls": False},
                {
                    "name": "tls",
                    "listen": f"{HOST}:{self.ports['tls']}",
                    "tls": True,
                    "client_cert": "required",
                    "trust": str(pki.client_ca),
                    "certificates": [
                        {"cert": str(pki.gateway_server.cert), "key": str(pki.gateway_server.key)}
                    ],
                },
            ],
            "route": [
                {
                    "name": "archive",
                    "called_ae": "ARCHIVE",
                    "backend": {"host": HOST, "port": self.backend_port},
                }
            ],
        }
        cfg = self.work / "gateway.toml"
        cfg.write_text(to_toml(config))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.gateway_log = self.work / "gateway.log"
        self.gateway = self._spawn(
            [sys.executable, "-m", "gateway", "run", str(cfg)], "gateway", env=env, cwd=MAIN
        )
        if not wait_listening(self.ports.values(), self.gateway, 15):
            raise SystemExit("gateway did not start:\n" + self.gateway_log.read_text()[-3000:])
        BAD_INPUTS["tls-on-plain"] = ("plain", tls_client_hello(), None)
        self.tls_args = [*pki.client.dcmtk_tls, "+cf", str(pki.gateway_ca)]

    def _spawn(self, args, name, *, env=None, cwd=None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(
            [str(a) for a in args],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        self.procs.append(proc)
        return proc

    # ----------------------------------------------------------------- traffic

    def _count(self, kind: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            if ok:
                self.done[kind] += 1
            else:
                self.errors[kind] += 1
                self.error_samples.setdefault(kind, detail[-1500:])

    def good_once(self) -> None:
        kind = self.rng.choice(["echo-plain", "echo-tls", "store-plain", "store-tls"])
        listener = kind.split("-")[1]
        tool = "echoscu" if kind.startswith("echo") else "storescu"
        args = [dcmtk(tool)]
        if listener == "tls":
            args += self.tls_args
        args += ["-aec", "ARCHIVE", HOST, str(self.ports[listener])]
        if tool == "storescu":
            args += [str(p) for p in self.files]
        try:
            cp = subprocess.run(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
                timeout=60,
                check=False,
            )
            self._count("good:" + kind, cp.returncode == 0, cp.stdout.decode(errors="replace"))
        except subprocess.TimeoutExpired:
            self._count("good:" + kind, False, "timeout after 60 s")

    def bad_once(self) -> None:
        name = self.rng.choice([*BAD_INPUTS, "slowloris"])
        if name == "slowloris":
            self.slowloris()
            return
        listener, data, want = BAD_INPUTS[name]
        try:
            with RawPeer(self.ports[listener], timeout=10) as peer:
                peer.send(data)
                if name == "truncated-rq":
                    peer.shutdown_write()
                got = peer.read_until_close(2 * GATEWAY_SETTINGS["artim_timeout"] + 3)
                ok = peer.closed and (got == (want or b""))
                self._count("bad:" + name, ok, f"answer {got[:32].hex()} closed={peer.closed}")
        except OSError as exc:
            self._count("bad:" + name, False, repr(exc))

    def slowloris(self) -> None:
        held = []
        try:
            for _ in range(self.args.slowloris):
                s = socket.create_connection((HOST, self.ports["plain"]), timeout=5)
                s.sendall(b"\x01")
                held.append(s)
            deadline = time.monotonic() + 2 * GATEWAY_SETTINGS["artim_timeout"] + 4
            open_ = list(held)
            while open_ and time.monotonic() < deadline:
                for s in list(open_):
                    s.settimeout(0.05)
                    try:
                        if not s.recv(4096):
                            open_.remove(s)
                    except (TimeoutError, BlockingIOError):
                        pass
                    except OSError:
                        open_.remove(s)
            self._count("bad:slowloris", not open_, f"{len(open_)} held connections not closed")
        except OSError as exc:
            self._count("bad:slowloris", False, repr(exc))
        finally:
            for s in held:
                s.close()

    def _worker(self, fn) -> None:
        while not self.stop.is_set():
            fn()

    # ----------------------------------------------------------------- run

    def sample(self) -> dict:
        pid = self.gateway.pid
        return {"rss_kib": rss_kib(pid), "fds": open_fds(pid)}

    def run(self) -> dict:
        a = self.args
        self.setup()
        boot = self.sample()
        threads = [
            threading.Thread(target=self._worker, args=(self.good_once,), daemon=True)
            for _ in range(a.good_workers)
        ] + [
            threading.Thread(target=self._worker, args=(self.bad_once,), daemon=True)
            for _ in range(a.bad_workers)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        warmup = min(a.warmup, a.duration / 3)
        time.sleep(warmup)
        start = self.sample()
        last_report = time.monotonic()
        while time.monotonic() - t0 < a.duration and self.gateway.poll() is None:
            time.sleep(1)
            if time.monotonic() - last_report >= a.report_every:
                last_report = time.monotonic()
                s = self.sample()
                print(
                    f"[{time.monotonic() - t0:6.0f} s] done={sum(self.done.values())} "
                    f"errors={sum(self.errors.values())} rss={s['rss_kib']} KiB fds={s['fds']}",
                    flush=True,
                )
        self.stop.set()
        for t in threads:
            t.join(90)
        time.sleep(1)  # let the last connections close
        alive = self.gateway.poll() is None
        end = self.sample() if alive else {"rss_kib": 0, "fds": 0}
        elapsed = time.monotonic() - t0
        log_text = self.gateway_log.read_text(errors="replace")
        growth = (end["rss_kib"] - start["rss_kib"]) / max(start["rss_kib"], 1) * 100
        good_failed = sum(v for k, v in self.errors.items() if k.startswith("good:"))
        summary = {
            "duration_s": round(elapsed, 1),
            "warmup_s": warmup,
            "associations_done": sum(self.done.values()),
            "good_ok": sum(v for k, v in self.done.items() if k.startswith("good:")),
            "good_failed": good_failed,
            "bad_answered_as_expected": sum(
                v for k, v in self.done.items() if k.startswith("bad:")
            ),
            "bad_unexpected_answer": sum(v for k, v in self.errors.items() if k.startswith("bad:")),
            "done_by_kind": dict(sorted(self.done.items())),
            "errors_by_kind": dict(sorted(self.errors.items())),
            "error_samples": self.error_samples,
            "gateway_alive": alive,
            "tracebacks": log_text.count("Traceback"),
            "crash_records": log_text.count("association.crashed"),
            "rss_kib": {"boot": boot["rss_kib"], "start": start["rss_kib"], "end": end["rss_kib"]},
            "rss_growth_pct": round(growth, 2),
            "fds": {"boot": boot["fds"], "start": start["fds"], "end": end["fds"]},
        }
        problems = []
        if good_failed:
            problems.append(f"{good_failed} good associations failed")
        if growth > a.max_rss_growth:
            problems.append(f"RSS grew {growth:.1f} % (> {a.max_rss_growth} %)")
        if not alive:
            problems.append("gateway died")
        if summary["tracebacks"] or summary["crash_records"]:
            problems.append("gateway logged tracebacks/crashes")
        if a.strict_bad and summary["bad_unexpected_answer"]:
            problems.append("bad inputs got unexpected answers")
        summary["problems"] = problems
        summary["ok"] = not problems
        return summary

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=180, help="seconds of traffic (180)")
    p.add_argument(
        "--warmup",
        type=float,
        default=30,
        help="seconds before the 'start' RSS sample (30; at most duration/3)",
    )
    p.add_argument("--good-workers", type=int, default=3)
    p.add_argument("--bad-workers", type=int, default=4)
    p.add_argument("--slowloris", type=int, default=50, help="connections per slowloris burst")
    p.add_argument("--max-rss-growth", type=float, default=10.0, help="percent (10)")
    p.add_argument(
        "--strict-bad",
        action="store_true",
        help="also fail when a bad input gets an unexpected answer",
    )
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--report-every", type=float, default=30)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = p.parse_args(argv)
    soak = Soak(args)
    try:
        summary = soak.run()
        summary["work_dir"] = str(soak.work) if args.keep else None
    finally:
        soak.close()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
