"""Benchmark: the gateway against stunnel and direct connections, on one machine.

DCMTK ``storescu +tls`` sends the same data through

* ``direct plain`` -- storescu (no TLS) to storescp: the ceiling of the machine;
* ``direct TLS``   -- storescu +tls to storescp +tls: TLS without any proxy;
* ``stunnel``      -- stunnel4 terminating TLS in front of a plain storescp;
* ``gateway``      -- the gateway (1 worker, DIMSE inspection on);
* ``gw no-inspect``-- the gateway with ``inspect = "association"`` (PDU tracking only);
* ``gateway x2``   -- the gateway with 2 workers (SO_REUSEPORT).

For each, interleaved and repeated: bulk throughput (16 MB files), small
objects (64 KB files), association setup rate with K concurrent TLS clients
(p50/p99 latency), bulk with 2 concurrent senders, the proxy's CPU seconds and
peak RSS, and -- for stunnel and the gateway -- RSS per idle TLS association
with 1,000 associations open.  Writes ``bench/results/YYYY-MM-DD-HHMM.md`` and
prints it.

    .venv/bin/python bench/run.py            # full run, < 10 min on 2 cores
    .venv/bin/python bench/run.py --quick    # smoke test, ~1 min
    .venv/bin/python bench/run.py --profile  # plus a py-spy profile of a bulk run

Every number is relative: the client, the proxy and the server share the
machine's cores, so ratios within one run are what to compare (DESIGN §9).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAIN = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(MAIN))

from tests.interop.helpers import (  # noqa: E402  (after the path set-up)
    HOST,
    PKI,
    dcmtk,
    free_port,
    make_pki,
    to_toml,
    wait_listening,
    write_ct_files,
)

MB = 1_000_000
RESULTS = MAIN / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one run."""

    bulk_files: int = 64  # x 16 MiB = 1 GiB
    bulk_size: int = 16 * 1024 * 1024
    small_files: int = 2000
    small_size: int = 64 * 1024
    repeats: int = 3
    assoc_seconds: float = 3.0
    concurrency: int = 8
    idle: int = 1000


QUICK = Plan(bulk_files=8, small_files=200, repeats=1, assoc_seconds=1.0, idle=100)


# --------------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers of a supervisor), from /proc."""
    kids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _tree(pid: int) -> list[int]:
    return [pid, *_children(pid)]


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Proxy:
    """A process between client and sink whose CPU and memory we watch."""

    proc: subprocess.Popen
    name: str

    def cpu(self) -> float:
        """CPU seconds (user + system) of the process and its workers so far."""
        return sum(_cpu_seconds(p) for p in _tree(self.proc.pid))

    def rss_kib(self) -> int:
        """Resident memory now (sum over the process tree)."""
        return sum(_status_kib(p, "VmRSS") for p in _tree(self.proc.pid))

    def peak_rss_kib(self) -> int:
        """Peak resident memory (VmHWM, summed over the process tree)."""
        return sum(_status_kib(p, "VmHWM") for p in _tree(self.proc.pid))


class Procs:
    """Every process the benchmark starts; stopped (only those) at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[subprocess.Popen] = []

    def spawn(self, args: Sequence[str | os.PathLike], name: str, *,
              env: dict[str, str] | None = None, wait_port: int | None = None
              ) -> subprocess.Popen:
        out = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=MAIN)
        self.started.append(proc)
        if wait_port is not None and not wait_listening([wait_port], proc, 15):
            raise RuntimeError(f"{name} did not listen on {wait_port}; see "
                               f"{self.logdir / (name + '.log')}")
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}  # DESIGN §9: DCMTK leaves Nagle on


# --------------------------------------------------------------------------- setups


@dataclass
class Setup:
    """One way from storescu to storescp."""

    name: str
    port: int
    tls: bool
    proxy: Proxy | None = None
    results: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    latencies: list[float] = field(default_factory=list)  # association setup, seconds
    cpu_per_gib: list[float] = field(default_factory=list)
    cpu_ms_per_assoc: list[float] = field(default_factory=list)
    peak_rss_kib: int | None = None
    idle_kib: float | None = None


def stunnel_config(pki: PKI, port: int, sink: int, work: Path, name: str) -> Path:
    """stunnel as a DICOM TLS terminator with the gateway's certificate and client CA."""
    cfg = work / f"{name}.conf"
    cfg.write_text(f"""\
foreground = yes
pid =
debug = 3
[dicom]
accept = {HOST}:{port}
connect = {HOST}:{sink}
cert = {pki.gateway_server.cert}
key = {pki.gateway_server.key}
CAfile = {pki.client_ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.2
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
""")
    return cfg


def gateway_config(pki: PKI, port: int, sink: int, work: Path, name: str, *,
                   workers: int = 1, inspect: str = "dimse") -> Path:
    """A gateway with one TLS listener (client certificate required) and one route."""
    cfg = work / f"{name}.toml"
    cfg.write_text(to_toml({
        "gateway": {"max_associations": 5000, "idle_timeout": 600, "workers": workers,
                    "shutdown_grace": 2},
        "log": {"format": "json", "level": "info"},
        "listener": [{
            "name": "tls", "listen": f"{HOST}:{port}", "tls": True,
            "client_cert": "required", "trust": str(pki.client_ca),
            "certificates": [{"cert": str(pki.gateway_server.cert),
                              "key": str(pki.gateway_server.key)}],
        }],
        "route": [{"name": "sink", "called_ae": "*", "inspect": inspect,
                   "backend": {"host": HOST, "port": sink}}],
    }))
    return cfg


def start_gateway(procs: Procs, cfg: Path, port: int, name: str) -> Proxy:
    proc = procs.spawn([sys.executable, "-m", "gateway", "run", cfg], name,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, wait_port=port)
    return Proxy(proc, name)


def start_stunnel(procs: Procs, cfg: Path, port: int, name: str) -> Proxy:
    return Proxy(procs.spawn([shutil.which("stunnel4") or "stunnel4", cfg], name,
                             wait_port=port), name)


def start_storescp(procs: Procs, pki: PKI, port: int, name: str, *, tls: bool) -> None:
    args = [dcmtk("storescp"), "--ignore", "-pdu", "131072"]
    if tls:
        args += [*pki.gateway_server.dcmtk_tls, "+cf", str(pki.client_ca)]
    procs.spawn([*args, str(port)], name, env=dcmtk_env(), wait_port=port)


# --------------------------------------------------------------------------- clients


def storescu(setup: Setup, pki: PKI, paths: Sequence[Path]) -> float:
    """Send ``paths`` in one association; return the wall time in seconds."""
    args = [dcmtk("storescu"), "-aet", "CT01", "-aec", "ARCHIVE", "-pdu", "131072"]
    if setup.tls:
        args += [*pki.client.dcmtk_tls, "+cf", str(pki.gateway_ca)]
    args += [HOST, str(setup.port), *map(str, paths)]
    t0 = time.perf_counter()
    cp = subprocess.run(args, env=dcmtk_env(), capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if cp.returncode != 0:
        raise RuntimeError(f"storescu via {setup.name} failed:\n"
                           f"{cp.stdout.decode()[-2000:]}{cp.stderr.decode()[-2000:]}")
    return elapsed


def storescu_parallel(setup: Setup, pki: PKI, groups: Sequence[Sequence[Path]]) -> float:
    """Several storescu at once, one association each; wall time until all finished."""
    args0 = [dcmtk("storescu"), "-aet", "CT01", "-aec", "ARCHIVE", "-pdu", "131072"]
    if setup.tls:
        args0 += [*pki.client.dcmtk_tls, "+cf", str(pki.gateway_ca)]
    t0 = time.perf_counter()
    running = [subprocess.Popen([*args0, HOST, str(setup.port), *map(str, g)],
                                env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) for g in groups]
    for p in running:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"parallel storescu via {setup.name} failed: {err[-2000:]!r}")
    return time.perf_counter() - t0


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(called: bytes = b"ARCHIVE", calling: bytes = b"CT01") -> bytes:
    """A minimal A-ASSOCIATE-RQ proposing Verification (what echoscu sends)."""
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1")
            + _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1")
                    + _item(0x40, b"1.2.840.10008.1.2"))
            + _item(0x50, _item(0x51, struct.pack(">I", 16384))
                    + _item(0x52, b"1.2.826.0.1.3680043.9.7433.2")))
    return struct.pack(">BBI", 1, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBI", 5, 0, 4) + bytes(4)


def _read_pdu(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    head = exactly(6)
    return head + exactly(struct.unpack(">I", head[2:])[0])


def client_context(pki: PKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.gateway_ca))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return ctx


def _assoc_loop(port: int, tls: bool, pki: PKI, seconds: float, out: multiprocessing.Queue
                ) -> None:
    """One client process: associate + release, as fast as possible, for ``seconds``."""
    ctx = client_context(pki) if tls else None
    rq = associate_rq()
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname="localhost")
            with sock:
                sock.sendall(rq)
                if _read_pdu(sock)[0] != 0x02:
                    raise ConnectionError("not accepted")
                lat.append(time.perf_counter() - t0)
                sock.sendall(RELEASE_RQ)
                _read_pdu(sock)
        except (OSError, ConnectionError):
            errors += 1
    out.put((lat, errors))


def association_rate(setup: Setup, pki: PKI, plan: Plan) -> tuple[float, list[float], int]:
    """K concurrent clients; (associations per second, setup latencies, errors)."""
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue = ctx.Queue()
    workers = [ctx.Process(target=_assoc_loop,
                           args=(setup.port, setup.tls, pki, plan.assoc_seconds, q))
               for _ in range(plan.concurrency)]
    for w in workers:
        w.start()
    lat: list[float] = []
    errors = 0
    for _ in workers:
        got, err = q.get(timeout=plan.assoc_seconds + 60)
        lat += got
        errors += err
    for w in workers:
        w.join()
    return len(lat) / plan.assoc_seconds, lat, errors


async def _open_idle(port: int, pki: PKI, n: int) -> list[asyncio.StreamWriter]:
    ctx = client_context(pki)
    sem = asyncio.Semaphore(32)
    rq = associate_rq()

    async def one() -> asyncio.StreamWriter:
        async with sem:
            reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx,
                                                           server_hostname="localhost")
            writer.write(rq)
            head = await reader.readexactly(6)
            await reader.readexactly(struct.unpack(">I", head[2:])[0])
            if head[0] != 0x02:
                raise RuntimeError(f"idle association not accepted (PDU 0x{head[0]:02X})")
            return writer

    return list(await asyncio.gather(*(one() for _ in range(n))))


def idle_rss(proxy: Proxy, port: int, pki: PKI, n: int) -> float:
    """KiB of proxy RSS per idle TLS association, with ``n`` of them open."""
    async def run() -> float:
        # Warm up lazily initialised state (first handshake, first association).
        for w in await _open_idle(port, pki, 4):
            w.close()
        await asyncio.sleep(1.0)
        before = proxy.rss_kib()
        writers = await _open_idle(port, pki, n)
        await asyncio.sleep(2.0)
        after = proxy.rss_kib()
        for w in writers:
            w.close()
        await asyncio.sleep(0.5)
        return (after - before) / n

    return asyncio.run(run())


# --------------------------------------------------------------------------- profile


def profile_bulk(proxy: Proxy, setup: Setup, pki: PKI, paths: Sequence[Path],
                 out_stem: Path) -> str:
    """py-spy the gateway during one bulk run; return a text summary of where time goes."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw = out_stem.with_suffix(".collapsed.txt")
    speedscope = out_stem.with_suffix(".speedscope.json")
    duration = 30
    summaries = []
    for fmt, path in (("raw", raw), ("speedscope", speedscope)):
        spy = subprocess.Popen([pyspy, "record", "--pid", str(proxy.proc.pid), "--rate", "250",
                                "--format", fmt, "-o", str(path), "--duration", str(duration),
                                "--nonblocking"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
        time.sleep(1.0)
        seconds = storescu(setup, pki, paths)
        spy.send_signal(signal.SIGINT)  # stop recording now and write the file
        spy.wait(30)
        summaries.append(seconds)
    return summarize_collapsed(raw, _total_bytes(paths), summaries[0])


def _total_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def summarize_collapsed(raw: Path, nbytes: int, seconds: float) -> str:
    """Self time per function and inclusive time of the relay's main steps."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        # "func (file.py:123)" -> "func (file.py)": one row per function, not per line.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    lines = [f"py-spy, {total} samples at 250 Hz during one bulk run "
             f"({nbytes / MB:.0f} MB in {seconds:.2f} s, {nbytes / MB / seconds:.0f} MB/s)", "",
             "self time (top 15):", ""]
    for frame, n in self_time.most_common(15):
        lines.append(f"  {100 * n / total:5.1f} %  {frame}")
    lines += ["", "inclusive time of selected steps:", ""]
    keys = ("_pump", "receive_some", "send_all", "_read_available", "_encrypt",
            "_drain_outgoing", "_refill", "feed", "run (trio/_core/_run.py")
    for frame, n in inclusive.most_common():
        if any(k in frame for k in keys):
            lines.append(f"  {100 * n / total:5.1f} %  {frame}")
    return "\n".join(lines[:60])


# --------------------------------------------------------------------------- report


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cell(xs: Sequence[float], fmt: str = "{:.0f}") -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def pct(lat: Sequence[float], q: float) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


def report(setups: dict[str, Setup], plan: Plan, meta: dict[str, str], profile: str | None
           ) -> str:
    bulk_mb = plan.bulk_files * plan.bulk_size / MB
    lines = [
        f"# Benchmark {meta['when']}",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. "
        f"{plan.repeats} interleaved repeats; cells are median (min-max).",
        f"Bulk: {plan.bulk_files} x {plan.bulk_size // (1024 * 1024)} MiB "
        f"({bulk_mb / 1000:.2f} GB) in one association; small: {plan.small_files} x "
        f"{plan.small_size // 1024} KiB; association rate: {plan.concurrency} concurrent "
        f"TLS clients for {plan.assoc_seconds:g} s (associate + release); 2x bulk: two "
        f"storescu at once, half the bulk set each; idle: {plan.idle} TLS associations held "
        f"open. TLS: {meta['tls']}.",
        "",
        "| setup | bulk MB/s | small files/s | assoc/s | setup p50 / p99 ms | 2x bulk MB/s "
        "| proxy CPU s/GB | proxy CPU ms/assoc | proxy peak RSS MiB | KiB / idle TLS assoc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in setups.values():
        r = s.results
        lat = f"{pct(s.latencies, 0.5):.1f} / {pct(s.latencies, 0.99):.1f}" \
            if s.latencies else "-"
        cpu = cell(s.cpu_per_gib, "{:.2f}") if s.cpu_per_gib else "-"
        rss = f"{s.peak_rss_kib / 1024:.0f}" if s.peak_rss_kib else "-"
        cpu_a = cell(s.cpu_ms_per_assoc, "{:.1f}") if s.cpu_ms_per_assoc else "-"
        idle = f"{s.idle_kib:.0f}" if s.idle_kib is not None else "-"
        lines.append(f"| {s.name} | {cell(r['bulk'])} | {cell(r['small'])} | "
                     f"{cell(r['assoc'])} | {lat} | {cell(r['bulk2'])} | {cpu} | {cpu_a} | {rss} "
                     f"| {idle} |")

    def ratio(a: str, b: str, metric: str) -> float | None:
        if a not in setups or b not in setups:
            return None
        x, y = med(setups[a].results[metric]), med(setups[b].results[metric])
        return x / y if y else None

    def row(label: str, value: float | None, target: float | None) -> str:
        if value is None:
            return f"| {label} | - | {'' if target is None else f'≥ {target:g}x'} | |"
        verdict = "" if target is None else ("met" if value >= target else "**missed**")
        t = "" if target is None else f"≥ {target:g}x"
        return f"| {label} | {value:.2f}x | {t} | {verdict} |"

    gw, idle = setups.get("gateway"), None
    if gw is not None and gw.idle_kib is not None:
        idle = gw.idle_kib
    lines += [
        "",
        "| ratio (medians, same run) | value | target | |",
        "|---|---:|---:|---|",
        row("gateway / stunnel, bulk", ratio("gateway", "stunnel", "bulk"), 1.0),
        row("gateway / direct TLS, bulk", ratio("gateway", "direct TLS", "bulk"), 0.8),
        row("gateway / direct plain, bulk (DESIGN §9: not reachable on 2 shared cores)",
            ratio("gateway", "direct plain", "bulk"), None),
        row("gateway / stunnel, small files", ratio("gateway", "stunnel", "small"), None),
        row("gateway / stunnel, association rate", ratio("gateway", "stunnel", "assoc"), 1.0),
        row("DIMSE inspection on / off, bulk (cost < 10 %)",
            ratio("gateway", "gw no-inspect", "bulk"), 0.9),
        row("2 workers / 1 worker, association rate", ratio("gateway x2", "gateway", "assoc"),
            None),
        row("2 workers / 1 worker, 2x bulk", ratio("gateway x2", "gateway", "bulk2"), None),
    ]
    if idle is not None:
        verdict = "met" if idle <= 64 else "**missed**"
        lines.append(f"| gateway KiB per idle TLS association | {idle:.0f} KiB | ≤ 64 KiB "
                     f"| {verdict} |")
    errors = meta.get("errors")
    if errors:
        lines += ["", f"Client errors during the association-rate runs: {errors}."]
    if profile:
        lines += ["", "## Profile of the gateway during a bulk transfer", "", "```", profile,
                  "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def make_data(root: Path, plan: Plan) -> tuple[list[Path], list[Path]]:
    """The data sets, cached between runs (same sizes → same files)."""
    def cached(name: str, count: int, size: int) -> list[Path]:
        d = root / f"{name}-{count}x{size}"
        done = d / ".complete"
        if not done.exists():
            shutil.rmtree(d, ignore_errors=True)
            # write_ct_files makes a CT image with ~size bytes of pixel data.
            write_ct_files(d, [size] * count, prefix=name)
            done.touch()
        return sorted(p for p in d.iterdir() if p.suffix == ".dcm")

    return cached("bulk", plan.bulk_files, plan.bulk_size), \
        cached("small", plan.small_files, plan.small_size)


def negotiated_tls(logdir: Path) -> str:
    for line in (logdir / "gateway.log").read_text(errors="replace").splitlines():
        if '"association.accepted"' in line and "cipher" in line:
            import json

            rec = json.loads(line)
            return f"{rec.get('tls_version')} {rec.get('cipher')} (storescu → gateway)"
    return "see logs"


def _stunnel_version() -> str:
    cp = subprocess.run(["stunnel4", "-version"], capture_output=True, text=True, check=False)
    for line in cp.stderr.splitlines():
        if line.startswith("stunnel "):
            return line.split(" on ")[0]
    return "stunnel ?"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print and write the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also record a py-spy profile of the gateway during a bulk run")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) /
                    "dicom-gateway-bench", help="where the data sets are cached")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.repeats:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gwbench-"))
    logdir = work / "logs"
    logdir.mkdir()
    print(f"work dir {work}; data in {args.data}", flush=True)
    bulk, small = make_data(args.data, plan)
    bulk_bytes = _total_bytes(bulk)
    pki = make_pki(work / "pki")
    procs = Procs(logdir)
    errors: list[str] = []
    profile_text = None
    try:
        plain_sink, tls_sink, idle_sink = free_port(), free_port(), free_port()
        start_storescp(procs, pki, plain_sink, "storescp-plain", tls=False)
        start_storescp(procs, pki, tls_sink, "storescp-tls", tls=True)
        procs.spawn([sys.executable, MAIN / "bench" / "sink.py", idle_sink], "idle-sink",
                    wait_port=idle_sink)

        setups: dict[str, Setup] = {
            "direct plain": Setup("direct plain", plain_sink, tls=False),
            "direct TLS": Setup("direct TLS", tls_sink, tls=True),
        }

        def add(name: str, make: Callable[[int], Proxy]) -> None:
            port = free_port()
            setups[name] = Setup(name, port, tls=True, proxy=make(port))

        add("stunnel", lambda p: start_stunnel(
            procs, stunnel_config(pki, p, plain_sink, work, "stunnel"), p, "stunnel"))
        add("gateway", lambda p: start_gateway(
            procs, gateway_config(pki, p, plain_sink, work, "gateway"), p, "gateway"))
        add("gw no-inspect", lambda p: start_gateway(
            procs, gateway_config(pki, p, plain_sink, work, "gw-noinspect",
                                  inspect="association"), p, "gw-noinspect"))
        add("gateway x2", lambda p: start_gateway(
            procs, gateway_config(pki, p, plain_sink, work, "gw2", workers=2), p, "gw2"))
        time.sleep(1.0)  # workers of "gateway x2" bind a moment after the first

        half = [bulk[0::2], bulk[1::2]]
        for rep in range(plan.repeats):
            print(f"repeat {rep + 1}/{plan.repeats}", flush=True)
            for s in setups.values():
                cpu0 = s.proxy.cpu() if s.proxy else 0.0
                seconds = storescu(s, pki, bulk)
                s.results["bulk"].append(bulk_bytes / MB / seconds)
                if s.proxy:
                    s.cpu_per_gib.append((s.proxy.cpu() - cpu0) / (bulk_bytes / 1e9))
                print(f"  {s.name:14} bulk  {bulk_bytes / MB / seconds:7.0f} MB/s", flush=True)
            for s in setups.values():
                seconds = storescu(s, pki, small)
                s.results["small"].append(len(small) / seconds)
                print(f"  {s.name:14} small {len(small) / seconds:7.0f} files/s", flush=True)
            for s in setups.values():
                cpu0 = s.proxy.cpu() if s.proxy else 0.0
                rate, lat, err = association_rate(s, pki, plan)
                if s.proxy and lat:
                    s.cpu_ms_per_assoc.append(1000 * (s.proxy.cpu() - cpu0) / len(lat))
                s.results["assoc"].append(rate)
                s.latencies += lat
                if err:
                    errors.append(f"{s.name}: {err}")
                print(f"  {s.name:14} assoc {rate:7.0f} /s (errors {err})", flush=True)
            for name in ("stunnel", "gateway", "gateway x2"):
                s = setups[name]
                seconds = storescu_parallel(s, pki, half)
                s.results["bulk2"].append(bulk_bytes / MB / seconds)
                print(f"  {s.name:14} 2xbulk {bulk_bytes / MB / seconds:6.0f} MB/s", flush=True)

        for s in setups.values():
            if s.proxy:
                s.peak_rss_kib = s.proxy.peak_rss_kib()

        # Idle associations: stunnel and the gateway in front of the holding sink.
        for name, make in (
            ("stunnel", lambda p: start_stunnel(
                procs, stunnel_config(pki, p, idle_sink, work, "stunnel-idle"), p,
                "stunnel-idle")),
            ("gateway", lambda p: start_gateway(
                procs, gateway_config(pki, p, idle_sink, work, "gateway-idle"), p,
                "gateway-idle")),
        ):
            port = free_port()
            proxy = make(port)
            setups[name].idle_kib = idle_rss(proxy, port, pki, plan.idle)
            print(f"  {name:14} idle  {setups[name].idle_kib:7.1f} KiB/association", flush=True)

        if args.profile:
            stem = args.out / f"profile-{datetime.datetime.now():%Y-%m-%d-%H%M}"
            args.out.mkdir(parents=True, exist_ok=True)
            gw = setups["gateway"]
            assert gw.proxy is not None
            profile_text = profile_bulk(gw.proxy, gw, pki, bulk, stem)
            print(profile_text, flush=True)
        tls = negotiated_tls(logdir)
    finally:
        procs.stop_all()

    when = datetime.datetime.now()
    meta = {
        "when": f"{when:%Y-%m-%d %H:%M}",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                   f"Python {platform.python_version()}, {_stunnel_version()}",
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tls": tls,
        "errors": "; ".join(errors),
    }
    text = report(setups, plan, meta, profile_text)
    text += f"\nTotal benchmark time: {time.monotonic() - t_start:.0f} s.\n"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{when:%Y-%m-%d-%H%M}{'-quick' if args.quick else ''}.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
