"""``dicom-gateway demo``: the shipped example, end to end, in one process.

Starts an embedded storage SCP (pynetdicom) where the example's ``archive``
route points, the gateway on ``rules/example.toml``, and a TLS client with the
example modality certificate that sends a C-ECHO and a C-STORE through the
gateway. Prints what happened; exit status 0 only if both succeeded.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import Any

import trio

from .config import Config, load_config
from .errors import GatewayError
from .observe.log import configure_logging

_REPO = Path(__file__).resolve().parent.parent


def _default_config() -> Path:
    for candidate in (Path("rules/example.toml"), _REPO / "rules" / "example.toml"):
        if candidate.is_file():
            return candidate
    raise GatewayError("rules/example.toml not found; run the demo from the repository root")


def _demo_dataset() -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "DEMO^GATEWAY"
    ds.PatientID = "DEMO-0001"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 32
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _client(config: Config, certs: Path, port: int, called_ae: str) -> dict[str, Any]:
    """Run the TLS SCU (blocking; called in a thread)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / "modality.pem"), str(certs / "modality.key"))
    ae = AE(ae_title="DEMO_SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    out: dict[str, Any] = {}
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        out["error"] = "association not established (rejected or aborted)"
        return out
    echo = assoc.send_c_echo()
    out["echo"] = echo.Status if echo else None
    store = assoc.send_c_store(_demo_dataset())
    out["store"] = store.Status if store else None
    assoc.release()
    return out


def _status(value: int | None) -> str:
    return "none" if value is None else f"0x{value:04X}"


def run_demo(config_path: Path | None = None) -> int:
    """Run the demo; return the process exit status."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    from .server import GatewayServer, build_runtime

    try:
        path = config_path or _default_config()
        config = load_config(path)
        runtime = build_runtime(config)
    except GatewayError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    configure_logging(config.log.format, config.log.level)
    route = next(r for r in config.routes if r.backend_tls is None)
    tls_listener = next(lst for lst in config.listeners if lst.tls)
    certs = (Path(path).resolve().parent / "../certs-example").resolve()

    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title=route.called_ae)
    scp.add_supported_context(Verification)
    scp.add_supported_context(CTImageStorage)
    try:
        server_scp = scp.start_server((route.backend.host, route.backend.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except OSError as exc:
        print(f"demo: cannot start the storage SCP on {route.backend.host}:"
              f"{route.backend.port}: {exc}", file=sys.stderr)
        return 1

    events: list[tuple[str, dict[str, Any]]] = []
    result: dict[str, Any] = {}

    async def main() -> None:
        gw = GatewayServer(runtime, on_event=lambda e, f: events.append((e, f)))
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.serve)
            result.update(await trio.to_thread.run_sync(
                _client, config, certs, tls_listener.port, route.called_ae))
            # Let the gateway log the release before stopping it.
            with trio.move_on_after(2):
                while not any(e in ("association.released", "association.aborted")
                              for e, _ in events):
                    await trio.sleep(0.02)
            gw.stop()

    try:
        trio.run(main)
    except OSError as exc:
        print(f"demo: cannot listen: {exc}", file=sys.stderr)
        return 1
    finally:
        server_scp.shutdown()

    print()
    print("demo summary")
    print(f"  listener     {tls_listener.name} 127.0.0.1:{tls_listener.port} (TLS)")
    print(f"  route        {route.name}: Called AE {route.called_ae} → "
          f"{route.backend.host}:{route.backend.port}")
    # What each event adds; the association's context is printed once, with the first.
    shown = {
        "association.accepted": ("route", "calling_ae", "called_ae", "tls_version", "cipher",
                                 "client_subject"),
        "dimse.message": ("command", "sop_class", "status"),
        "association.released": ("bytes_up", "bytes_down", "duration_s", "dimse"),
        "association.rejected": ("result", "source", "reason", "why"),
        "association.aborted": ("by", "reason"),
        "tls.handshake_failed": ("reason",),
    }
    for name, fields in events:
        if name not in shown:
            continue
        detail = ", ".join(f"{k}={fields[k]}" for k in shown[name] if fields.get(k) is not None)
        print(f"  event        {name}: {detail}")
    echo, store = result.get("echo"), result.get("store")
    print(f"  C-ECHO       status {_status(echo)}")
    print(f"  C-STORE      status {_status(store)}; the SCP stored {len(stored)} instance(s)")
    ok = echo == 0 and store == 0 and len(stored) == 1
    print("  result       " + ("OK" if ok else f"FAILED {result.get('error', '')}"))
    return 0 if ok else 1
