"""A DICOM sink that holds thousands of associations open at almost no cost.

storescp serves one association at a time, so it cannot stand behind 1,000
idle associations.  This trio server answers every A-ASSOCIATE-RQ with an
A-ASSOCIATE-AC that accepts each presentation context with its first transfer
syntax, answers A-RELEASE-RQ with A-RELEASE-RP, and otherwise discards data.

Usage: ``python bench/sink.py PORT`` (prints ``ready`` when listening).
"""

from __future__ import annotations

import struct
import sys

import trio

_HDR = struct.Struct(">BBI")
_ITEM = struct.Struct(">BBH")
RELEASE_RP = _HDR.pack(0x06, 0, 4) + bytes(4)


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, 0, len(value)) + value


def associate_ac(rq: bytes) -> bytes:
    """Build an A-ASSOCIATE-AC for the A-ASSOCIATE-RQ body ``rq`` (after the 6-byte header)."""
    out = [rq[:68]]  # version, reserved, called AE, calling AE, reserved: echoed (PS3.8)
    pos = 68
    while pos + 4 <= len(rq):
        item_type, _, length = _ITEM.unpack_from(rq, pos)
        value = rq[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type == 0x10:
            out.append(_item(0x10, value))
        elif item_type == 0x20:
            ctx_id = value[0]
            sub, ts = 4, b"1.2.840.10008.1.2"
            while sub + 4 <= len(value):
                st, _, sl = _ITEM.unpack_from(value, sub)
                if st == 0x40:
                    ts = value[sub + 4 : sub + 4 + sl]
                    break
                sub += 4 + sl
            out.append(_item(0x21, bytes([ctx_id, 0, 0, 0]) + _item(0x40, ts)))
    out.append(_item(0x50, _item(0x51, struct.pack(">I", 131072))
                     + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1")))
    body = b"".join(out)
    return _HDR.pack(0x02, 0, len(body)) + body


async def _serve(stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while True:
            data = await stream.receive_some(262144)
            if not data:
                return
            buf += data
            while len(buf) >= 6:
                pdu_type, _, length = _HDR.unpack_from(buf)
                if len(buf) < 6 + length:
                    break
                body = bytes(buf[6 : 6 + length])
                del buf[: 6 + length]
                if pdu_type == 0x01:
                    await stream.send_all(associate_ac(body))
                elif pdu_type == 0x05:
                    await stream.send_all(RELEASE_RP)
                elif pdu_type == 0x07:
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def main(port: int) -> None:
    """Serve on 127.0.0.1:``port`` forever."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    print("ready", flush=True)
    await trio.serve_listeners(_serve, listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
