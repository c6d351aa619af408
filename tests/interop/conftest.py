"""Fixtures for the end-to-end interop suite (real DCMTK and pynetdicom peers).

Everything listens on 127.0.0.1 on ports from ``free_port()``. Every subprocess a
fixture starts is recorded by the ``procs`` fixture and ended at teardown (SIGTERM,
then SIGKILL after 5 s) -- only those processes, by their Popen handle.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from .helpers import (
    HOST,
    KB,
    MAIN,
    MB,
    PKI,
    dcmtk,
    dcmtk_env,
    free_port,
    make_pki,
    stored_files,
    to_toml,
    wait_listening,
    write_ct_files,
)

# --------------------------------------------------------------------------- processes


class ProcessTracker:
    """Starts subprocesses with output to files and ends exactly those at teardown."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.procs: list[tuple[subprocess.Popen, str]] = []
        self._n = 0

    def spawn(
        self,
        args: Sequence[str | os.PathLike],
        name: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> tuple[subprocess.Popen, Path, Path]:
        self._n += 1
        out = self.directory / f"{self._n:02d}-{name}.stdout"
        err = self.directory / f"{self._n:02d}-{name}.stderr"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [str(a) for a in args],
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
            )
        self.procs.append((proc, name))
        return proc, out, err

    @staticmethod
    def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)

    def close(self) -> None:
        for proc, _ in reversed(self.procs):
            self.stop(proc)

    def __enter__(self) -> ProcessTracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessTracker]:
    d = tmp_path / "proc-logs"
    d.mkdir()
    with ProcessTracker(d) as tracker:
        yield tracker


# --------------------------------------------------------------------------- PKI


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Gateway CA (gateway server cert + gateway-as-client cert), client CA (CT01, MR01),
    backend CA (backend server cert), and an unrelated evil CA (a CT01 cert)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_ssl_context(pki: PKI, which: str = "client", *, trust: Path | None = None):
    """An ``ssl.SSLContext`` for pynetdicom SCUs talking to the gateway's TLS listener."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(trust or pki.gateway_ca))
    if which:
        ck = getattr(pki, which)
        ctx.load_cert_chain(str(ck.cert), str(ck.key))
    return ctx


def server_ssl_context(pki: PKI, *, require_client_from: Path | None = None) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for a pynetdicom SCP acting as a TLS backend."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.backend_server.cert), str(pki.backend_server.key))
    if require_client_from is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(require_client_from))
    return ctx


# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="session")
def dicom_files(tmp_path_factory: pytest.TempPathFactory):
    """Factory ``dicom_files(name, sizes, **kw) -> [Path]``, cached per name for the session."""
    root = tmp_path_factory.mktemp("dicom")
    cache: dict[str, list[Path]] = {}

    def make(name: str, sizes: Sequence[int], **kw) -> list[Path]:
        if name not in cache:
            cache[name] = write_ct_files(root / name, sizes, **kw)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def mixed_files(dicom_files) -> list[Path]:
    """21 files: 16 x ~10 KB, 4 x ~1 MB, 1 x ~55 MB (last)."""
    return dicom_files("mixed", [10 * KB] * 8 + [1 * MB] * 4 + [10 * KB] * 8 + [55 * MB])


@pytest.fixture(scope="session")
def small_files(dicom_files) -> list[Path]:
    return dicom_files("small", [10 * KB, 20 * KB, 64 * KB])


@pytest.fixture(scope="session")
def qr_files(dicom_files) -> list[Path]:
    """Instances the Q/R SCP holds for patient QR001."""
    return dicom_files(
        "qr", [12 * KB, 200 * KB, 30 * KB], patient_id="QR001", patient_name="Query^Retrieve"
    )


# --------------------------------------------------------------------------- storescp


@dataclass
class StoreSCP:
    port: int
    outdir: Path
    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    tls: bool

    def files(self) -> list[Path]:
        return stored_files(self.outdir)

    def kill(self) -> None:
        """SIGKILL the storescp (e.g. mid-transfer)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(5)

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@pytest.fixture
def storescp(procs: ProcessTracker, pki: PKI, tmp_path: Path):
    """Factory: ``storescp(tls=False, pdu=131072, require_client_cert=True, extra=())``.

    TLS mode serves the backend cert (backend CA) and trusts the gateway CA (whose
    gateway-client cert the gateway presents). storescp demands a client cert by default.
    """
    n = 0

    def start(
        *,
        tls: bool = False,
        pdu: int | None = 131072,
        require_client_cert: bool = True,
        extra: Sequence[str] = (),
    ) -> StoreSCP:
        nonlocal n
        n += 1
        port = free_port()
        outdir = tmp_path / f"storescp{n}-out"
        outdir.mkdir()
        args = [dcmtk("storescp"), "-v", "--output-directory", str(outdir)]
        if pdu:
            args += ["-pdu", str(pdu)]
        if tls:
            args += [*pki.backend_server.dcmtk_tls, "+cf", str(pki.gateway_ca)]
            if not require_client_cert:
                args.append("-ic")
        args += [*extra, str(port)]
        proc, out, err = procs.spawn(args, f"storescp{n}", env=dcmtk_env())
        if not wait_listening([port], proc, 10):
            ProcessTracker.stop(proc)
            pytest.fail(
                f"storescp did not listen on {port}: rc={proc.poll()}\n"
                + out.read_text(errors="replace")
                + err.read_text(errors="replace")
            )
        return StoreSCP(port, outdir, proc, out, err, tls)

    return start


# --------------------------------------------------------------------------- pynetdicom SCP


@dataclass
class SeenAssociation:
    called_ae: str
    calling_ae: str


def _ae_str(v: object) -> str:
    if isinstance(v, bytes):
        v = v.decode("ascii", errors="replace")
    return str(v).strip()


def _matches(query: Dataset, inst: Dataset) -> bool:
    for elem in query:
        kw = elem.keyword
        if kw in ("QueryRetrieveLevel", "SpecificCharacterSet") or elem.VR == "SQ":
            continue
        want = "" if elem.value is None else str(elem.value)
        if not want or want == "*":
            continue
        have = str(inst.get(kw, ""))
        if not fnmatch.fnmatchcase(have, want):
            return False
    return True


@dataclass
class PynetdicomSCP:
    """A pynetdicom SCP in a thread: Verification, Storage, C-FIND and C-MOVE."""

    ae_title: str
    port: int
    instances: list[Dataset] = field(default_factory=list)
    move_destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    seen: list[SeenAssociation] = field(default_factory=list)
    stored: list[Dataset] = field(default_factory=list)
    pdu_types: list[int] = field(default_factory=list)  # first byte of every PDU received
    echoes: int = 0
    store_delay: float = 0.0  # seconds each C-STORE handler sleeps (slow backend)
    server: object = None
    ae: AE | None = None

    def _on_requested(self, event) -> None:
        rq = event.assoc.requestor.primitive
        self.seen.append(SeenAssociation(_ae_str(rq.called_ae_title), _ae_str(rq.calling_ae_title)))

    def _on_data(self, event) -> None:
        if event.data:
            self.pdu_types.append(event.data[0])

    def _on_echo(self, event) -> int:
        self.echoes += 1
        return 0x0000

    def _on_store(self, event) -> int:
        if self.store_delay:
            time.sleep(self.store_delay)
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.stored.append(ds)
        return 0x0000

    def _select(self, query: Dataset) -> list[Dataset]:
        return [inst for inst in self.instances if _matches(query, inst)]

    def _on_find(self, event):
        query = event.identifier
        level = str(query.get("QueryRetrieveLevel", ""))
        key_of = {
            "PATIENT": "PatientID",
            "STUDY": "StudyInstanceUID",
            "SERIES": "SeriesInstanceUID",
        }.get(level, "SOPInstanceUID")
        done = set()
        for inst in self._select(query):
            k = str(inst.get(key_of, ""))
            if k in done:
                continue
            done.add(k)
            ident = Dataset()
            ident.QueryRetrieveLevel = level
            for elem in query:
                if elem.keyword and elem.keyword != "QueryRetrieveLevel" and elem.VR != "SQ":
                    setattr(ident, elem.keyword, inst.get(elem.keyword, ""))
            yield 0xFF00, ident

    def _on_move(self, event):
        dest = self.move_destinations.get(_ae_str(event.move_destination))
        if dest is None:
            yield None, None
            return
        yield dest[0], dest[1]
        matches = self._select(event.identifier)
        yield len(matches)
        for inst in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, inst

    def start(self, ssl_context: ssl.SSLContext | None = None) -> PynetdicomSCP:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.acse_timeout = 15
        ae.dimse_timeout = 30
        ae.network_timeout = 30
        ae.add_supported_context(Verification)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        for sop in (
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(sop)
        # For C-MOVE sub-operations (the store association towards the destination)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        self.ae = ae
        self.server = ae.start_server(
            (HOST, self.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def _pynetdicom_scps() -> Iterator[Callable[..., PynetdicomSCP]]:
    """Body of the ``pynetdicom_scp`` fixtures: yield the factory, stop its SCPs after."""
    started: list[PynetdicomSCP] = []

    def start(
        ae_title: str = "PACS",
        *,
        ssl_context: ssl.SSLContext | None = None,
        instances: Sequence[Path | Dataset] = (),
        move_destinations: dict[str, tuple[str, int]] | None = None,
        store_delay: float = 0.0,
    ) -> PynetdicomSCP:
        loaded = [dcmread(i) if isinstance(i, Path | str) else i for i in instances]
        scp = PynetdicomSCP(
            ae_title,
            free_port(),
            instances=loaded,
            move_destinations=move_destinations or {},
            store_delay=store_delay,
        )
        started.append(scp)
        scp.start(ssl_context)
        if not wait_listening([scp.port], None, 5):
            pytest.fail(f"pynetdicom SCP {ae_title} did not listen on {scp.port}")
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture
def pynetdicom_scp():
    """Factory: ``pynetdicom_scp(ae_title, *, ssl_context=None, instances=[paths or datasets],
    move_destinations={AE: (host, port)})`` -> a started ``PynetdicomSCP``."""
    yield from _pynetdicom_scps()


# --------------------------------------------------------------------------- gateway

GATEWAY_SETTINGS = {
    "artim_timeout": 10,
    "handshake_timeout": 10,
    "connect_timeout": 3,
    "idle_timeout": 60,
    "max_associations": 100,
}


def gateway_available() -> bool:
    return (MAIN / "gateway" / "__main__.py").exists() or (MAIN / "gateway" / "cli.py").exists()


def gateway_command(*args: str | os.PathLike) -> list[str]:
    return [sys.executable, "-m", "gateway", *[str(a) for a in args]]


def gateway_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def run_gateway_cli(*args: str | os.PathLike, timeout: float = 30) -> tuple[int, str]:
    """Run ``python -m gateway ARGS`` to completion; (rc, stdout+stderr)."""
    try:
        cp = subprocess.run(
            gateway_command(*args),
            cwd=MAIN,
            env=gateway_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.output or b"").decode(errors="replace")
        return -999, f"TIMEOUT after {timeout}s: gateway {' '.join(map(str, args))}\n{out}"
    return cp.returncode, cp.stdout.decode(errors="replace")


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    config_path: Path
    ports: dict[str, int]
    stdout: Path
    stderr: Path
    config: dict = field(default_factory=dict)

    def port(self, listener: str) -> int:
        return self.ports[listener]

    def output(self) -> str:
        """Raw stdout + stderr (for failure messages)."""
        return (
            "--- gateway stdout ---\n"
            + self.stdout.read_text(errors="replace")
            + "\n--- gateway stderr ---\n"
            + self.stderr.read_text(errors="replace")
        )

    def logs(self) -> list[dict]:
        """Parsed JSON log lines from stderr and stdout (non-JSON lines ignored)."""
        records = []
        for path in (self.stderr, self.stdout):
            for line in path.read_text(errors="replace").splitlines():
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
        return records

    def events(self, name: str) -> list[dict]:
        return [r for r in self.logs() if r.get("event") == name]

    def wait_for_event(self, name: str, timeout: float = 5.0) -> list[dict]:
        """Poll the logs until at least one ``event == name`` record appears."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def crashes(self) -> list[dict]:
        """Log records of unexpected gateway failures (``*.crashed`` / critical)."""
        return [
            r
            for r in self.logs()
            if "crash" in str(r.get("event", "")) or r.get("level") == "critical"
        ]

    def write_config(self, config: dict | str) -> None:
        """Replace the config file (a dict in the §4 shape, or raw text) -- then SIGHUP."""
        text = config if isinstance(config, str) else to_toml(config)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        ProcessTracker.stop(self.proc)
        return self.proc.returncode


def _gateways(procs: ProcessTracker, directory: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Body of the ``gateway`` fixtures: yield the factory, check for crashes after.

    Config files go to ``directory``, processes to ``procs``.
    """
    if not gateway_available():
        pytest.fail("gateway package has no gateway/__main__.py or gateway/cli.py yet")
    started: list[GatewayProcess] = []

    def start(
        listeners: Sequence[dict],
        routes: Sequence[dict],
        *,
        settings: dict | None = None,
        log_level: str = "info",
        sections: dict | None = None,
    ) -> GatewayProcess:
        ports: dict[str, int] = {}
        lst = []
        for listener in listeners:
            listener = dict(listener)
            listener.setdefault("listen", f"{HOST}:{free_port()}")
            ports[listener["name"]] = int(str(listener["listen"]).rsplit(":", 1)[1])
            lst.append(listener)
        config = {
            "gateway": {**GATEWAY_SETTINGS, **(settings or {})},
            "log": {"format": "json", "level": log_level},
            **(sections or {}),  # e.g. {"admin": {...}, "audit": {...}}
            "listener": lst,
            "route": list(routes),
        }
        name = f"gateway{len(started) + 1}"
        cfg = directory / f"{name}.toml"
        cfg.write_text(to_toml(config))
        proc, out, err = procs.spawn(gateway_command("run", cfg), name, env=gateway_env(), cwd=MAIN)
        gw = GatewayProcess(proc, cfg, ports, out, err, config)
        if not wait_listening(ports.values(), proc, 10):
            rc = proc.poll()
            ProcessTracker.stop(proc)
            pytest.fail(
                f"gateway did not listen on {ports} within 10 s (rc={rc})\n"
                f"--- config ---\n{cfg.read_text()}\n{gw.output()}"
            )
        started.append(gw)
        return gw

    yield start
    # A test that "passed" while the gateway crashed internally (e.g. a negative test
    # where any failure looks right) is reported as an error at teardown.
    crashed = [r for gw in started for r in gw.crashes()]
    if crashed:
        pytest.fail(
            "gateway logged crashes:\n" + "\n".join(json.dumps(r)[:3000] for r in crashed),
            pytrace=False,
        )


@pytest.fixture
def gateway(procs: ProcessTracker, tmp_path: Path):
    """Factory: ``gateway(listeners, routes, settings=None, log_level="info", sections=None)``.

    ``sections`` adds top-level tables such as ``[admin]`` and ``[audit]``.

    Each listener dict gets ``listen = "127.0.0.1:<free port>"`` unless it has one.
    Waits (10 s) until every listener port listens, else fails with the gateway's output.
    SIGTERM at teardown, SIGKILL after 5 s.
    """
    yield from _gateways(procs, tmp_path)


# --------------------------------------------------------------------------- shared gateway
#
# Added for the robustness suite (issue 4): one gateway (and its pynetdicom backend)
# per test module, for tables of many small cases that each leave the gateway as they
# found it. Tests tell their connections apart by the log's ``peer`` field.


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessTracker]:
    with ProcessTracker(tmp_path_factory.mktemp("module-proc-logs")) as tracker:
        yield tracker


@pytest.fixture(scope="module")
def module_gateway(module_procs: ProcessTracker, tmp_path_factory: pytest.TempPathFactory):
    """Like ``gateway`` but module-scoped: ``module_gateway(listeners, routes, settings=)``."""
    yield from _gateways(module_procs, tmp_path_factory.mktemp("module-gateway"))


@pytest.fixture(scope="module")
def module_pynetdicom_scp():
    """Module-scoped ``pynetdicom_scp`` factory (same arguments)."""
    yield from _pynetdicom_scps()
