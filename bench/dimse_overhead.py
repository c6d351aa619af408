"""Microbenchmark: PDUTracker vs DimseInspector on synthetic P-DATA.

Feeds ``--total`` bytes (default 1 GiB) in ``--chunk`` slices (default 256 KiB,
the relay's read size) through each tracker, for several shapes of traffic:
PDU size (the negotiated maximum: DCMTK's default 16 KiB, storescp -pdu 128 KiB)
and message size (a C-STORE-RQ command, then its data set in PDVs, then the
C-STORE-RSP as the other direction would carry it -- here in the same stream so
every message costs two decodes).

    .venv/bin/python bench/dimse_overhead.py            # 1 GiB per run
    .venv/bin/python bench/dimse_overhead.py --total 256 --repeat 5

Prints MB/s per tracker (median of ``--repeat`` interleaved runs) and the
inspector's overhead.  Only the feed() calls are timed.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.dul.dimse import DimseInspector
from gateway.dul.tracker import PDUTracker

CT = b"1.2.840.10008.5.1.4.1.1.2\0"
MB = 1024 * 1024


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, elem, len(value)) + value


def _command(field: int, msg_id: int, status: int | None) -> bytes:
    iuid = b"1.2.826.0.1.3680043.8.498.12345678901234567890.%d" % msg_id
    iuid += b"\0" * (len(iuid) % 2)
    body = _element(0x0002, CT) + _element(0x0100, struct.pack("<H", field))
    body += _element(0x0110 if status is None else 0x0120, struct.pack("<H", msg_id))
    body += _element(0x0800, struct.pack("<H", 0 if status is None else 0x0101))
    if status is not None:
        body += _element(0x0900, struct.pack("<H", status))
    body += _element(0x1000, iuid)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _pdata(ctx: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">LBB", len(fragment) + 2, ctx, control) + fragment
    return struct.pack(">BBL", 4, 0, len(item)) + item


def make_block(pdu_size: int, message_size: int, target: int = 16 * MB) -> bytes:
    """About ``target`` bytes of whole C-STORE exchanges (PDU-aligned, repeatable)."""
    frag = pdu_size - 6  # PDV header inside the PDU's max length
    data_pdu = _pdata(1, 0b00, b"\x5a" * frag)
    out = []
    size = 0
    msg_id = 0
    while size < target:
        msg_id += 1
        parts = [_pdata(1, 0b11, _command(0x0001, msg_id, None))]
        left = message_size
        while left > frag:
            parts.append(data_pdu)
            left -= frag
        parts.append(_pdata(1, 0b10, b"\x5a" * left))
        parts.append(_pdata(1, 0b11, _command(0x8001, msg_id, 0)))
        for p in parts:
            out.append(p)
            size += len(p)
    return b"".join(out)


def run_once(factory, block: bytes, total: int, chunk: int) -> tuple[float, int]:
    tracker = factory()
    view = memoryview(block)
    n = len(block)
    fed = 0
    t0 = time.perf_counter()
    while fed < total:
        for pos in range(0, n, chunk):
            tracker.feed(view[pos : pos + chunk])
        fed += n
    elapsed = time.perf_counter() - t0
    if not tracker.at_boundary:
        raise SystemExit("tracker lost the PDU boundaries")
    return fed / MB / elapsed, getattr(tracker, "messages", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=int, default=1024, help="MiB per run (default 1024)")
    ap.add_argument("--chunk", type=int, default=256, help="KiB per feed (default 256)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    total, chunk = args.total * MB, args.chunk * 1024
    shapes = [(16 * 1024, 64 * 1024), (16 * 1024, 16 * MB), (128 * 1024, 64 * 1024),
              (128 * 1024, 16 * MB)]
    seen: list[object] = []

    def inspector() -> DimseInspector:
        return DimseInspector(on_message=seen.append)

    print(f"{args.total} MiB per run in {args.chunk} KiB chunks, median of {args.repeat}")
    print(f"{'PDU':>8} {'message':>9} {'tracker MB/s':>13} {'inspector MB/s':>15} "
          f"{'overhead':>9} {'msgs/run':>9}")
    for pdu, msg in shapes:
        block = make_block(pdu, msg)
        t_rates, i_rates = [], []
        messages = 0
        for _ in range(args.repeat):  # interleaved: noise hits both alike
            t_rates.append(run_once(PDUTracker, block, total, chunk)[0])
            seen.clear()
            rate, messages = run_once(inspector, block, total, chunk)
            i_rates.append(rate)
        t, i = statistics.median(t_rates), statistics.median(i_rates)
        print(f"{pdu // 1024:>6}Ki {msg // 1024:>7}Ki {t:>13.0f} {i:>15.0f} "
              f"{(t / i - 1) * 100:>8.1f}% {messages:>9}")


if __name__ == "__main__":
    main()
