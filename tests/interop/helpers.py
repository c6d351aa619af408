"""Plain helpers for the interop suite (no pytest fixtures here; see conftest.py).

Everything talks to 127.0.0.1 only. DCMTK tools are always called by their full
path (pynetdicom installs same-named scripts into the virtualenv) and always with
``TCP_NODELAY=1`` in their environment (DESIGN §8/§9).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from tests.certgen import make_certs

HOST = "127.0.0.1"
MAIN = Path(__file__).resolve().parents[2]
DCMTK_BIN = Path("/usr/bin")


def dcmtk(tool: str) -> str:
    """Full path of a DCMTK tool (never the pynetdicom script of the same name)."""
    return str(DCMTK_BIN / tool)


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (never the same one twice)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find a free port")


def listening_ports() -> set[int]:
    """Ports in LISTEN state on any local address (read from /proc, no probe connection).

    Probing with connect() would make the gateway log a junk connection (or a TLS
    handshake failure), so readiness is checked without touching the socket.
    """
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def is_listening(port: int) -> bool:
    if os.path.exists("/proc/net/tcp"):
        return port in listening_ports()
    with socket.socket() as s:  # pragma: no cover - non-Linux fallback
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def wait_listening(ports: Iterable[int], proc: subprocess.Popen | None, timeout: float) -> bool:
    """True once every port listens; False on timeout or when ``proc`` exited."""
    ports = list(ports)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if all(is_listening(p) for p in ports):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- DCMTK


def run_dcmtk(args: Sequence[str | os.PathLike], timeout: float = 60) -> tuple[int, str]:
    """Run a DCMTK tool (``args[0]`` is the tool name or full path).

    Returns (exit status, stdout+stderr). A timeout is reported as status -999 with
    whatever output there was, so the test fails with a readable message.
    """
    args = [str(a) for a in args]
    if "/" not in args[0]:
        args[0] = dcmtk(args[0])
    try:
        cp = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output or b""
        return -999, f"TIMEOUT after {timeout}s: {' '.join(args)}\n" + out.decode(errors="replace")
    return cp.returncode, cp.stdout.decode(errors="replace")


def scu_args(
    tool: str,
    port: int,
    *options: str | os.PathLike,
    called: str | None = "ARCHIVE",
    calling: str | None = None,
    files: Sequence[str | os.PathLike] = (),
) -> list[str | os.PathLike]:
    """A DCMTK SCU command line: ``TOOL OPTIONS [-aet CALLING] [-aec CALLED] HOST PORT FILES``."""
    aet = ["-aet", calling] if calling else []
    aec = ["-aec", called] if called else []
    return [tool, *options, *aet, *aec, HOST, str(port), *files]


def dcmtk_tls_client(pki: PKI, which: str = "client") -> list[str]:
    """DCMTK TLS client options towards the gateway: ``pki.<which>``'s cert, gateway CA."""
    return getattr(pki, which).dcmtk_client(pki.gateway_ca)


def count_store_successes(dcmtk_output: str) -> int:
    """Number of C-STORE responses with status Success that storescu reported (-v)."""
    return sum(
        1
        for line in dcmtk_output.splitlines()
        if "Received Store Response" in line and "Success" in line
    )


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class CertKey:
    cert: Path
    key: Path

    @property
    def dcmtk_tls(self) -> list[str]:
        """DCMTK's ``+tls KEYFILE CERTFILE`` (key first)."""
        return ["+tls", str(self.key), str(self.cert)]

    def dcmtk_client(self, ca: Path) -> list[str]:
        """DCMTK TLS client options: present this key and cert, trust ``ca`` (``+cf``)."""
        return [*self.dcmtk_tls, "+cf", str(ca)]


@dataclass(frozen=True)
class PKI:
    dir: Path
    gateway_ca: Path  # signs the gateway's server cert and its client cert for backends
    client_ca: Path  # signs the modality client cert (CN CT01)
    backend_ca: Path  # signs the TLS backend's server cert
    evil_ca: Path  # unrelated CA
    gateway_server: CertKey  # SAN localhost, 127.0.0.1
    gateway_client: CertKey  # gateway -> TLS backend (mutual TLS)
    client: CertKey  # CN CT01, by client_ca
    client2: CertKey  # CN MR01, by client_ca
    evil_client: CertKey  # CN CT01, by evil_ca
    backend_server: CertKey  # SAN localhost, 127.0.0.1, by backend_ca
    cas: dict = field(default_factory=dict, compare=False, repr=False)

    def issue_server_cert(self, ca: str, directory: Path, stem: str) -> CertKey:
        """A fresh server cert (SAN localhost, 127.0.0.1) from CA ``gateway``/``backend``."""
        return self.cas[ca].issue(
            directory, stem, "localhost", dns=["localhost"], ips=["127.0.0.1"]
        )


_ORG = "dicom-gateway interop tests"


def _name(cn: str) -> x509.Name:
    return make_certs.make_name(cn, _ORG)


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    """An hour ago to 30 days ahead: the default life of every interop certificate."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)


class _CA:
    def __init__(self, cn: str):
        self.key = make_certs.new_key()
        self.name = _name(cn)
        self.cert = make_certs.build_ca(self.key, self.name, *_validity(), path_length=None)

    def write(self, path: Path) -> Path:
        path.write_bytes(make_certs.cert_pem(self.cert))
        return path

    def issue(
        self,
        directory: Path,
        stem: str,
        cn: str,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
    ) -> CertKey:
        key = make_certs.new_key()
        cert = make_certs.build_leaf(
            self.key,
            self.name,
            key,
            _name(cn),
            *_validity(),
            sans=make_certs.general_names(dns, ips),
            subject_key_id=True,
        )
        return CertKey(*make_certs.write_pair(directory, stem, key, cert))


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    gateway_ca = _CA("Interop Gateway CA")
    client_ca = _CA("Interop Client CA")
    backend_ca = _CA("Interop Backend CA")
    evil_ca = _CA("Evil CA")
    server_names = {"dns": ["localhost"], "ips": ["127.0.0.1"]}
    return PKI(
        dir=directory,
        gateway_ca=gateway_ca.write(directory / "gateway-ca.pem"),
        client_ca=client_ca.write(directory / "client-ca.pem"),
        backend_ca=backend_ca.write(directory / "backend-ca.pem"),
        evil_ca=evil_ca.write(directory / "evil-ca.pem"),
        gateway_server=gateway_ca.issue(directory, "gateway-server", "localhost", **server_names),
        gateway_client=gateway_ca.issue(directory, "gateway-client", "GATEWAY"),
        client=client_ca.issue(directory, "client-ct01", "CT01"),
        client2=client_ca.issue(directory, "client-mr01", "MR01"),
        evil_client=evil_ca.issue(directory, "evil-ct01", "CT01"),
        backend_server=backend_ca.issue(directory, "backend-server", "localhost", **server_names),
        cas={"gateway": gateway_ca, "backend": backend_ca, "client": client_ca, "evil": evil_ca},
    )


def sha256_thumbprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


# --------------------------------------------------------------------------- datasets

KB = 1024
MB = 1024 * 1024


def make_ct_dataset(
    size: int,
    *,
    patient_id: str = "PID001",
    patient_name: str = "Interop^Test",
    study_uid: str | None = None,
    series_uid: str | None = None,
    number: int = 1,
) -> Dataset:
    """A CT Image Storage dataset (explicit VR LE) whose encoded file is about ``size`` bytes."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{number:05d}"
    ds.Modality = "CT"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    # Choose the narrowest column count that keeps Rows (US) <= 65535.
    pixel_bytes = max(size - 1200, 128)
    for cols in (32, 256, 1024, 4096):
        rows = max(1, pixel_bytes // (cols * 2))
        if rows <= 65535:
            break
    ds.Rows = rows
    ds.Columns = cols
    ds.add_new(0x7FE00010, "OW", os.urandom(rows * cols * 2))
    return ds


def write_ct_files(
    directory: Path,
    sizes: Sequence[int],
    *,
    patient_id: str = "PID001",
    patient_name: str = "Interop^Test",
    prefix: str = "img",
) -> list[Path]:
    """Write one CT file per entry of ``sizes`` (one study, one series); return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for i, size in enumerate(sizes, start=1):
        ds = make_ct_dataset(
            size,
            patient_id=patient_id,
            patient_name=patient_name,
            study_uid=study_uid,
            series_uid=series_uid,
            number=i,
        )
        path = directory / f"{prefix}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def datasets_differences(a: Dataset, b: Dataset) -> list[str]:
    """Element-by-element comparison (every tag incl. PixelData); file meta is ignored."""
    diffs = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        if tag.group == 0x0002:
            continue
        if tag not in a or tag not in b:
            diffs.append(f"{tag}: only in {'first' if tag in a else 'second'}")
            continue
        va, vb = a[tag].value, b[tag].value
        if va != vb:
            if isinstance(va, bytes | bytearray) and isinstance(vb, bytes | bytearray):
                diffs.append(f"{tag} ({a[tag].keyword}): {len(va)} vs {len(vb)} bytes differ")
            else:
                diffs.append(f"{tag} ({a[tag].keyword}): {va!r:.80} != {vb!r:.80}")
    return diffs


def stored_files(directory: Path) -> list[Path]:
    """Regular files in an SCP output directory (DCMTK names them e.g. ``CT.<uid>``)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def assert_received_identical(
    outdir: Path, sent: Sequence[Path], *, expect_all: bool = True
) -> set[str]:
    """Every file stored in ``outdir`` equals (as a dataset) the sent file of the same
    SOP Instance UID; with ``expect_all`` every sent file must be there. Returns UIDs."""
    sent_by_uid = {}
    for p in sent:
        ds = dcmread(p)
        sent_by_uid[str(ds.SOPInstanceUID)] = p
    seen: set[str] = set()
    problems = []
    for p in stored_files(outdir):
        try:
            got = dcmread(p)
        except Exception as exc:
            problems.append(f"{p.name}: unreadable ({exc})")
            continue
        uid = str(got.SOPInstanceUID)
        if uid not in sent_by_uid:
            problems.append(f"{p.name}: unexpected SOP Instance UID {uid}")
            continue
        if uid in seen:
            problems.append(f"{p.name}: duplicate of {uid}")
        seen.add(uid)
        diffs = datasets_differences(dcmread(sent_by_uid[uid]), got)
        if diffs:
            problems.append(f"{p.name}: differs from {sent_by_uid[uid].name}: {diffs[:5]}")
    if expect_all:
        missing = sorted(set(sent_by_uid) - seen)
        if missing:
            names = [sent_by_uid[u].name for u in missing]
            problems.append(f"{len(missing)} of {len(sent_by_uid)} sent files missing: {names}")
    assert not problems, "\n".join(problems)
    return seen


# --------------------------------------------------------------------------- TOML


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | os.PathLike):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


# keys of a [[route]] / [[listener]] entry written as a sub-table rather than inline
_SUBTABLES = {"backend_tls"}


def to_toml(config: dict) -> str:
    """Write the DESIGN §4 config shape: top-level tables, arrays of tables, and
    ``[route.backend_tls]`` sub-tables. Values that are dicts elsewhere are inline."""
    lines: list[str] = []
    for section, body in config.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
            lines.append("")
        elif isinstance(body, list):
            for entry in body:
                lines.append(f"[[{section}]]")
                subs = {}
                for k, v in entry.items():
                    if k in _SUBTABLES and isinstance(v, dict):
                        subs[k] = v
                    else:
                        lines.append(f"{k} = {_toml_value(v)}")
                for k, v in subs.items():
                    lines.append(f"[{section}.{k}]")
                    lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
                lines.append("")
        else:
            lines.append(f"{section} = {_toml_value(body)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- config pieces


def tls_listener(pki: PKI, name: str = "tls", client_cert: str = "required", **extra) -> dict:
    return {
        "name": name,
        "tls": True,
        "client_cert": client_cert,
        "trust": str(pki.client_ca),
        "certificates": [
            {"cert": str(pki.gateway_server.cert), "key": str(pki.gateway_server.key)}
        ],
        **extra,
    }


def plain_listener(name: str = "plain", **extra) -> dict:
    return {"name": name, "tls": False, **extra}


def route(
    name: str,
    called_ae: str,
    backend_port: int,
    *,
    listeners: Sequence[str] | None = None,
    calling_ae: Sequence[str] | None = None,
    backend_called_ae: str | None = None,
    backend_calling_ae: str | None = None,
    backend_tls: dict | None = None,
    **extra,
) -> dict:
    r: dict = {"name": name, "called_ae": called_ae}
    if calling_ae is not None:
        r["calling_ae"] = list(calling_ae)
    if listeners is not None:
        r["listeners"] = list(listeners)
    r.update(extra)
    backend: dict = {"host": HOST, "port": backend_port}
    if backend_called_ae:
        backend["called_ae"] = backend_called_ae
    if backend_calling_ae:
        backend["calling_ae"] = backend_calling_ae
    r["backend"] = backend
    if backend_tls is not None:
        r["backend_tls"] = backend_tls
    return r


def backend_tls(pki: PKI, *, mutual: bool = True) -> dict:
    t = {"verify": "chain", "ca": str(pki.backend_ca), "server_name": "localhost"}
    if mutual:
        t["cert"] = str(pki.gateway_client.cert)
        t["key"] = str(pki.gateway_client.key)
    return t


# --------------------------------------------------------------------------- pynetdicom SCU


@dataclass
class SCUResult:
    """What a pynetdicom SCU association attempt produced."""

    assoc: object
    raw_received: list[bytes]

    @property
    def established(self) -> bool:
        return bool(self.assoc.is_established)

    @property
    def rejected(self) -> bool:
        """pynetdicom saw an A-ASSOCIATE-RJ (see ``reject_triplet`` for its race)."""
        return self.reject_triplet() is not None

    def reject_triplet(self) -> tuple[int, int, int] | None:
        """(result, source, reason) of the A-ASSOCIATE-RJ, if rejected.

        pynetdicom 3.0 on a loaded machine sometimes reports a received RJ as
        "aborted" (a race between its reactor and the association thread,
        `InvalidEventError Evt7/Sta13`). The RJ PDU is then still in the bytes it
        received: read the triplet from the wire, which is what the gateway sent.
        """
        if self.assoc.is_rejected:
            p = self.assoc.acceptor.primitive
            return int(p.result), int(p.result_source), int(p.diagnostic)
        for pdu in self.raw_received:
            if pdu[:1] == b"\x03" and len(pdu) >= 10:
                return pdu[7], pdu[8], pdu[9]
        return None

    def ac_ae_titles(self) -> tuple[str, str] | None:
        """(called, calling) AE titles in the raw A-ASSOCIATE-AC (bytes 11-42)."""
        for pdu in self.raw_received:
            if pdu[:1] == b"\x02" and len(pdu) >= 42:
                return pdu[10:26].decode("ascii").strip(), pdu[26:42].decode("ascii").strip()
        return None

    def state(self) -> str:
        a = self.assoc
        return (
            f"established={a.is_established} rejected={a.is_rejected} "
            f"aborted={a.is_aborted} released={a.is_released} triplet={self.reject_triplet()}"
        )


def scu_associate(
    port: int,
    called_ae: str,
    *,
    calling_ae: str = "CT01",
    ssl_context=None,
    server_hostname: str = "localhost",
    contexts: Sequence[str] | None = None,
) -> SCUResult:
    """Associate with a pynetdicom SCU (TLS when ``ssl_context`` is given)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind, Verification

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 15
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    ae.connection_timeout = 10
    for cx in contexts or (
        Verification,
        CTImageStorage,
        PatientRootQueryRetrieveInformationModelFind,
    ):
        ae.add_requested_context(cx)
    raw: list[bytes] = []

    def on_data(event):
        raw.append(bytes(event.data))

    kwargs = {}
    if ssl_context is not None:
        kwargs["tls_args"] = (ssl_context, server_hostname)
    assoc = ae.associate(
        HOST, port, ae_title=called_ae, evt_handlers=[(evt.EVT_DATA_RECV, on_data)], **kwargs
    )
    return SCUResult(assoc, raw)


def find_patients(assoc, patient_id: str = "*") -> tuple[list[Dataset], list[int]]:
    """C-FIND at PATIENT level; (matches, statuses)."""
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = patient_id
    q.PatientName = ""
    matches, statuses = [], []
    for status, ident in assoc.send_c_find(q, PatientRootQueryRetrieveInformationModelFind):
        statuses.append(int(status.Status) if status else -1)
        if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
            matches.append(ident)
    return matches, statuses


def assert_prefix_stored(outdir: Path, sent: Sequence[Path], n: int) -> None:
    """The first ``n`` sent files are all stored in ``outdir`` and identical as datasets.

    Other files in ``outdir`` (e.g. one half-written when the SCP was killed) are
    ignored: this is the "no file reported stored that the receiver does not have" check.
    """
    have: dict[str, Path] = {}
    for p in stored_files(outdir):
        try:
            have[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
        except Exception:
            continue
    problems = []
    for p in sent[:n]:
        ds = dcmread(p)
        got = have.get(str(ds.SOPInstanceUID))
        if got is None:
            problems.append(f"{p.name} reported stored but not in {outdir}")
            continue
        diffs = datasets_differences(ds, dcmread(got))
        if diffs:
            problems.append(f"{p.name} stored as {got.name} but differs: {diffs[:5]}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- scenarios


def movescu_args(
    host: str,
    port: int,
    called_ae: str,
    incoming_port: int,
    outdir: Path,
    patient_id: str,
    *,
    calling_ae: str = "MODALITY",
    move_destination: str = "MODALITY",
) -> list[str | os.PathLike | int]:
    """DCMTK movescu (patient root, PATIENT level), its own storage SCP on ``incoming_port``."""
    return [
        "movescu",
        "-v",
        "-P",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-aem",
        move_destination,
        "--port",
        incoming_port,
        "-od",
        outdir,
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        f"PatientID={patient_id}",
        host,
        port,
    ]


def store_and_kill_backend(
    storescu_args: Sequence[str | os.PathLike | int],
    backend,
    *,
    after_files: int = 3,
    timeout: float = 60,
) -> tuple[int, str, int]:
    """Run storescu in the background; SIGKILL ``backend`` (has .files() and .kill()) as
    soon as ``after_files`` files arrived. Returns (storescu rc, output, files at kill)."""
    args = [str(a) for a in storescu_args]
    if "/" not in args[0]:
        args[0] = dcmtk(args[0])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env())
    n_at_kill = -1
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            n = len(backend.files())
            if n >= after_files:
                backend.kill()
                n_at_kill = n
                break
            time.sleep(0.005)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -999, "TIMEOUT\n" + out.decode(errors="replace"), n_at_kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(errors="replace"), n_at_kill


# --------------------------------------------------------------------------- raw PDUs
#
# Hand-built wire bytes (PS3.8 §9.3), independent of the gateway's own codec, so a
# codec bug cannot hide behind the same bug in the test's encoder.

APP_CONTEXT_UID = "1.2.840.10008.3.1.1.1"
VERIFICATION_UID = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
TEST_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"


def raw_pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """Header (type, reserved, 4-byte big-endian length) + body; ``length`` overrides."""
    n = len(body) if length is None else length
    return struct.pack(">BBL", pdu_type, 0, n) + body


def raw_item(item_type: int, body: bytes, *, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return struct.pack(">BBH", item_type, 0, n) + body


def ae16(title: str) -> bytes:
    """A 16-byte, space-padded AE title field."""
    return title.encode("ascii").ljust(16)[:16]


def assoc_rq_bytes(
    called: str = "ARCHIVE",
    calling: str = "CT01",
    *,
    protocol_version: int = 1,
    abstract: str = VERIFICATION_UID,
    transfer: str = IMPLICIT_VR_LE,
    max_length: int = 16384,
    user_info_length: int | None = None,
    called_raw: bytes | None = None,
    calling_raw: bytes | None = None,
) -> bytes:
    """A valid A-ASSOCIATE-RQ (one presentation context, id 1); knobs to break it."""
    pc = raw_item(
        0x20,
        bytes([1, 0, 0, 0]) + raw_item(0x30, abstract.encode()) + raw_item(0x40, transfer.encode()),
    )
    ui_body = raw_item(0x51, struct.pack(">L", max_length)) + raw_item(
        0x52, TEST_IMPLEMENTATION_UID.encode()
    )
    ui = raw_item(0x50, ui_body, length=user_info_length)
    body = (
        struct.pack(">HH", protocol_version, 0)
        + (called_raw if called_raw is not None else ae16(called))
        + (calling_raw if calling_raw is not None else ae16(calling))
        + bytes(32)
        + raw_item(0x10, APP_CONTEXT_UID.encode())
        + pc
        + ui
    )
    return raw_pdu(0x01, body)


def _items(data: bytes, start: int) -> Iterable[tuple[int, bytes]]:
    pos = start
    while pos + 4 <= len(data):
        t, _, n = struct.unpack_from(">BBH", data, pos)
        yield t, data[pos + 4 : pos + 4 + n]
        pos += 4 + n


def assoc_ac_for(rq: bytes) -> bytes:
    """An A-ASSOCIATE-AC answering ``rq``: echoes the AE titles and accepts every
    presentation context with its first transfer syntax."""
    called, calling = rq[10:26], rq[26:42]
    items = raw_item(0x10, APP_CONTEXT_UID.encode())
    for t, body in _items(rq, 74):
        if t != 0x20:
            continue
        ts = next((b for st, b in _items(body, 4) if st == 0x40), IMPLICIT_VR_LE.encode())
        items += raw_item(0x21, bytes([body[0], 0, 0, 0]) + raw_item(0x40, ts))
    items += raw_item(
        0x50,
        raw_item(0x51, struct.pack(">L", 16384)) + raw_item(0x52, TEST_IMPLEMENTATION_UID.encode()),
    )
    return raw_pdu(0x02, struct.pack(">HH", 1, 0) + called + calling + bytes(32) + items)


def abort_bytes(source: int, reason: int) -> bytes:
    """A-ABORT: 07 00 00000004 00 00 source reason."""
    return raw_pdu(0x07, bytes([0, 0, source, reason]))


def reject_bytes(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ: 03 00 00000004 00 result source reason."""
    return raw_pdu(0x03, bytes([0, result, source, reason]))


RELEASE_RQ = raw_pdu(0x05, bytes(4))
RELEASE_RP = raw_pdu(0x06, bytes(4))


def echo_pdata() -> bytes:
    """A P-DATA-TF with one PDV: a C-ECHO-RQ command (context 1, command, last)."""

    def elem(tag_group: int, tag_elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", tag_group, tag_elem, len(value)) + value

    cmd = (
        elem(0x0000, 0x0002, VERIFICATION_UID.encode() + b"\0")
        + elem(0x0000, 0x0100, struct.pack("<H", 0x0030))
        + elem(0x0000, 0x0110, struct.pack("<H", 1))
        + elem(0x0000, 0x0800, struct.pack("<H", 0x0101))
    )
    elements = elem(0x0000, 0x0000, struct.pack("<L", len(cmd))) + cmd
    pdv = struct.pack(">L", len(elements) + 2) + bytes([1, 0x03]) + elements
    return raw_pdu(0x04, pdv)


def split_pdus(data: bytes) -> list[bytes]:
    """Cut a received byte stream into whole PDUs (a trailing partial one is kept)."""
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 6:
            out.append(data[pos:])
            break
        n = struct.unpack_from(">L", data, pos + 2)[0]
        out.append(data[pos : pos + 6 + n])
        pos += 6 + n
    return out


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello record, 16 03 ...)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# --------------------------------------------------------------------------- raw peers


class RawPeer:
    """A blocking TCP (optionally TLS) client that sends exact bytes and reads what comes
    back, for rows of the bad-input matrix that no real DICOM tool would produce."""

    def __init__(
        self,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        host: str = HOST,
    ):
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port: int = raw.getsockname()[1]
        self.sock: socket.socket = (
            ssl_context.wrap_socket(raw, server_hostname="localhost") if ssl_context else raw
        )
        self.received = bytearray()
        self.closed = False
        self.connected_at = time.monotonic()
        self.closed_at: float | None = None

    @property
    def peer_field(self) -> str:
        """How the gateway's logs name this connection (``peer`` field)."""
        return f"{HOST}:{self.local_port}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_some(self, timeout: float) -> bytes | None:
        """Up to 64 KiB; b"" on EOF/reset; None on timeout."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
            data = b""
        if not data:
            if not self.closed:
                self.closed, self.closed_at = True, time.monotonic()
            return b""
        self.received += data
        return data

    def read_pdu(self, timeout: float = 5.0) -> bytes | None:
        """The next whole PDU (consumed from ``received``); None on close or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.received) >= 6:
                n = struct.unpack_from(">L", self.received, 2)[0]
                if len(self.received) >= 6 + n:
                    pdu = bytes(self.received[: 6 + n])
                    del self.received[: 6 + n]
                    return pdu
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            if self._recv_some(left) == b"":
                continue

    def read_until_close(self, timeout: float = 5.0) -> bytes:
        """Everything received until the gateway closes (or ``timeout``); see ``closed``."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._recv_some(left)
        return bytes(self.received)

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def send_raw_under_tls(self, data: bytes) -> None:
        """Write bytes straight onto the TCP connection beneath the TLS layer."""
        fd = os.dup(self.sock.fileno())
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_associate(port: int, called: str = "ARCHIVE", calling: str = "CT01", **kw) -> RawPeer:
    """Open an association with raw PDUs; returns the peer after the A-ASSOCIATE-AC.

    Raises AssertionError with what came back if the answer is not an AC."""
    peer = RawPeer(port, **kw)
    peer.send(assoc_rq_bytes(called, calling))
    answer = peer.read_pdu(10)
    if not answer or answer[0] != 0x02:
        peer.close()
        raise AssertionError(f"expected A-ASSOCIATE-AC, got {answer!r}")
    return peer


class FakeBackend:
    """A raw-socket backend in a thread, for backends no real SCP imitates.

    mode ``"silent"``: accept TCP, read, never answer (backend_timeout);
    mode ``"accept"``: answer every A-ASSOCIATE-RQ with an AC, then read and record
    every PDU and answer nothing (e.g. an A-RELEASE-RQ left unanswered);
    mode ``"stall"``: answer the RQ with an AC, then never read again (backpressure);
    mode ``"flood"``: answer the RQ with an AC, then send P-DATA-TF as fast as the
    connection takes it (``flooded`` counts the bytes);
    mode ``"cut"``: answer the RQ with an AC, send one P-DATA-TF and the first 5000
    bytes of a second, then close (a backend dying in the middle of a PDU);
    mode ``"bad-rj"``: answer the RQ with an A-ASSOCIATE-RJ whose body is 5 bytes;
    mode ``"slow-accept"``: like ``"accept"``, but the AC leaves 0.5 s after the RQ.
    ``pdu_types`` lists the first byte of every PDU received (all connections).
    """

    def __init__(self, mode: str = "accept"):
        self.mode = mode
        self.server = socket.create_server((HOST, 0))
        self.port: int = self.server.getsockname()[1]
        self.pdu_types: list[int] = []
        self.connections = 0
        self.flooded = 0
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 6:
                n = struct.unpack_from(">L", buf, 2)[0]
                if len(buf) < 6 + n:
                    break
                pdu = bytes(buf[: 6 + n])
                del buf[: 6 + n]
                self.pdu_types.append(pdu[0])
                if self.mode == "bad-rj" and pdu[0] == 0x01:
                    with contextlib.suppress(OSError):
                        conn.sendall(raw_pdu(0x03, bytes([0, 1, 1, 7, 0])))  # 5-byte body
                    continue
                if self.mode != "silent" and pdu[0] == 0x01:
                    if self.mode == "slow-accept":
                        time.sleep(0.5)
                    with contextlib.suppress(OSError):
                        conn.sendall(assoc_ac_for(pdu))
                    if self.mode == "stall":
                        self._stop.wait()
                        return
                    if self.mode == "cut":
                        pdv = struct.pack(">L", 16386) + bytes([1, 0]) + bytes(16384)
                        pdata = raw_pdu(0x04, pdv)
                        with contextlib.suppress(OSError):
                            conn.sendall(pdata + pdata[:5000])
                            time.sleep(0.2)
                            conn.shutdown(socket.SHUT_RDWR)
                        conn.close()
                        return
                    if self.mode == "flood":
                        self._flood(conn)
                        return

    def _flood(self, conn: socket.socket) -> None:
        chunk = raw_pdu(0x04, struct.pack(">L", 65536 - 4) + bytes([1, 0]) + bytes(65536 - 6))
        conn.settimeout(None)  # blocks while the gateway pushes back; close() ends it
        while not self._stop.is_set():
            try:
                conn.sendall(chunk)
            except OSError:
                return
            self.flooded += len(chunk)

    def wait_for_pdu(self, pdu_type: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while pdu_type not in self.pdu_types and time.monotonic() < deadline:
            time.sleep(0.02)
        return pdu_type in self.pdu_types

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.server.close()
        for s in self._socks:
            # shutdown first: it also ends a sendall blocked in another thread, so a
            # flooding backend really dies in the middle of a PDU
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(2)


def echoscu_ok(port: int, called: str = "ARCHIVE", *extra: str | os.PathLike) -> tuple[bool, str]:
    """DCMTK echoscu through the gateway: (succeeded, output)."""
    rc, out = run_dcmtk(scu_args("echoscu", port, "-v", *extra, called=called), timeout=30)
    return rc == 0, out


def peer_records(gw, peer: RawPeer | str, event: str | None = None) -> list[dict]:
    """The gateway's log records about one client connection (by its ``peer`` field)."""
    field_ = peer.peer_field if isinstance(peer, RawPeer) else peer
    return [
        r
        for r in gw.logs()
        if r.get("peer") == field_ and (event is None or r.get("event") == event)
    ]


def wait_peer_records(gw, peer: RawPeer | str, event: str, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = peer_records(gw, peer, event)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def assert_no_tracebacks(gw) -> None:
    """No Python traceback and no crash record anywhere in the gateway's output."""
    text = gw.stdout.read_text(errors="replace") + gw.stderr.read_text(errors="replace")
    assert "Traceback" not in text, "gateway printed a traceback\n" + gw.output()
    assert "association.crashed" not in text, "gateway logged association.crashed\n" + gw.output()


def open_fds(pid: int) -> int:
    """Open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- policy PKI
# Certificates with the properties the per-route policy tests need (validity,
# names, AIA OCSP URL, key size), CRLs and an `openssl ocsp` index. Additive:
# built on _CA, nothing above changes.


def new_ca(cn: str) -> _CA:
    """A fresh self-signed test CA (RSA-2048, SHA-256, valid ±30 days)."""
    return _CA(cn)


def write_ca(ca: _CA, directory: Path, stem: str) -> tuple[Path, Path]:
    """Write a CA's certificate and (unencrypted) key; (cert, key)."""
    return make_certs.write_pair(directory, stem, ca.key, ca.cert)


def issue_cert(
    ca: _CA,
    directory: Path,
    stem: str,
    cn: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    ocsp_url: str | None = None,
    key_size: int = 2048,
    eku: Sequence[x509.ObjectIdentifier] = make_certs.SERVER_AND_CLIENT,
    ocsp_signing: bool = False,
) -> CertKey:
    """A leaf certificate from ``ca`` with the given names, validity and extensions.

    Unlike ``_CA.issue`` it has no key usage extension.
    """
    key = make_certs.new_key(key_size)
    start, end = _validity()
    extensions: list[x509.ExtensionType] = []
    if ocsp_url:
        ocsp = x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
        )
        extensions.append(x509.AuthorityInformationAccess([ocsp]))
    cert = make_certs.build_leaf(
        ca.key,
        ca.name,
        key,
        _name(cn),
        not_before or start,
        not_after or end,
        sans=make_certs.general_names(dns, ips, uris),
        eku=[*eku, *([ExtendedKeyUsageOID.OCSP_SIGNING] if ocsp_signing else [])],
        key_usage=False,
        extensions=extensions,
    )
    return CertKey(*make_certs.write_pair(directory, stem, key, cert))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def write_crl(ca: _CA, path: Path, revoked: Sequence[Path] = ()) -> Path:
    """A CRL from ``ca`` (valid for a day) listing the certificates in ``revoked``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.name)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
    )
    for cert_path in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(load_cert(cert_path).serial_number)
            .revocation_date(now - datetime.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def write_ocsp_index(path: Path, good: Sequence[Path] = (), revoked: Sequence[Path] = ()) -> Path:
    """An ``openssl ocsp -index`` file: V lines for ``good``, R lines for ``revoked``."""

    def line(flag: str, cert_path: Path) -> str:
        cert = load_cert(cert_path)
        expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        revoked_at = (
            (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1))
            .strftime("%y%m%d%H%M%SZ")
            if flag == "R"
            else ""
        )
        subject = "/" + "/".join(
            f"{a.rfc4514_attribute_name}={a.value}" for a in cert.subject
        )
        serial = f"{cert.serial_number:X}"
        serial = "0" * (len(serial) % 2) + serial  # openssl writes whole bytes
        return f"{flag}\t{expiry}\t{revoked_at}\t{serial}\tunknown\t{subject}\n"

    path.write_text(
        "".join(line("V", p) for p in good) + "".join(line("R", p) for p in revoked)
    )
    return path
