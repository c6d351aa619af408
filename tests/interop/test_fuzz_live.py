"""Bounded fuzzing (issue 4): random bytes and mutated valid A-ASSOCIATE-RQs against a
live gateway — zero crashes, still serving, no leaked sockets — plus a hypothesis
property over the same mutations through the gateway's framer and codec.

The seed is ``FUZZ_SEED`` (default fixed, so a failure reproduces); ``FUZZ_CASES``
sets the number of live connections (default 300).
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dul.codec import decode_pdu
from gateway.dul.framer import PDUFramer
from gateway.errors import ProtocolError

from .helpers import (
    RawPeer,
    assert_no_tracebacks,
    assoc_rq_bytes,
    echoscu_ok,
    open_fds,
    plain_listener,
    route,
)

SEED = int(os.environ.get("FUZZ_SEED", "20240104"))
CASES = int(os.environ.get("FUZZ_CASES", "300"))
VALID_RQ = assoc_rq_bytes("ARCHIVE", "FUZZER")


def mutate(rng: random.Random, rq: bytes = VALID_RQ) -> bytes:
    """One mutation of a valid RQ: bit flips, truncation, a changed PDU or item length,
    a changed byte, inserted or appended junk — or plain random bytes."""
    kind = rng.randrange(7)
    data = bytearray(rq)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randint(1, 300))
    if kind == 1:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncation
        del data[rng.randrange(1, len(data)) :]
    elif kind == 3:  # PDU length field
        body = len(data) - 6
        n = rng.choice([0, 1, body - 1, body + 1, 0xFFFF, 0xFFFFFFFF, rng.getrandbits(32)])
        struct.pack_into(">L", data, 2, n)
    elif kind == 4:  # an item length (items start at offset 74)
        pos = 74
        starts = []
        while pos + 4 <= len(data):
            starts.append(pos)
            pos += 4 + struct.unpack_from(">H", data, pos + 2)[0]
        at = rng.choice(starts)
        struct.pack_into(">H", data, at + 2, rng.choice([0, 1, 3, 0xFFFF, rng.getrandbits(16)]))
    elif kind == 5:  # a byte anywhere
        data[rng.randrange(len(data))] = rng.randrange(256)
    else:  # junk inserted or appended
        junk = rng.randbytes(rng.randint(1, 64))
        i = rng.choice([len(data), rng.randrange(len(data))])
        data[i:i] = junk
    return bytes(data)


def _one(port: int, data: bytes) -> str:
    """Send one fuzz case, read until the gateway closes; return the answer's kind."""
    try:
        with RawPeer(port, timeout=5) as peer:
            peer.send(data)
            first = peer.read_pdu(4)
            kind = {1: "?", 2: "AC", 3: "RJ", 7: "ABORT"}.get(first[0], "other") if first else ""
            if not first:
                kind = "closed" if peer.closed else "open"
            return kind
    except OSError as exc:
        return f"error:{type(exc).__name__}"


@pytest.mark.interop
@pytest.mark.timeout(90)
def test_live_fuzz_no_crash_no_leak(pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    scp.ae.maximum_associations = 200  # pynetdicom's default of 10 would be the bottleneck
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port)],
        settings={
            "artim_timeout": 1,
            "handshake_timeout": 1,
            "backend_timeout": 3,
            "idle_timeout": 3,
            "release_timeout": 1,
            "max_pdu_length": 65536,
        },
    )
    port = gw.port("plain")
    assert echoscu_ok(port)[0], gw.output()
    time.sleep(0.3)
    fds0 = open_fds(gw.proc.pid)

    rng = random.Random(SEED)
    cases = [mutate(rng) for _ in range(CASES)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=30) as pool:
        answers = list(pool.map(lambda d: _one(port, d), cases))
    kinds = Counter(answers)
    if os.environ.get("FUZZ_DUMP"):
        for d, a in zip(cases, answers, strict=True):
            print("CASE", a, d.hex())
    took = time.monotonic() - t0
    print(f"fuzz seed={SEED} cases={CASES} in {took:.1f} s: {dict(kinds)}")
    assert took < 30, f"fuzz run took {took:.1f} s"
    assert not [k for k in kinds if k.startswith("error:ConnectionRefused")], kinds

    assert gw.proc.poll() is None, gw.output()
    ok, out = echoscu_ok(port)
    assert ok, "gateway no longer serves after fuzzing\n" + out + gw.output()
    assert_no_tracebacks(gw)
    # every fuzz connection's sockets are closed again (client and backend side)
    deadline = time.monotonic() + 10
    while open_fds(gw.proc.pid) > fds0 + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_fds(gw.proc.pid) <= fds0 + 2, (
        f"gateway fds {fds0} before, {open_fds(gw.proc.pid)} after the fuzz run: leaked sockets"
    )


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chunk=st.integers(1, 64))
def test_property_mutated_rq_through_framer_and_codec(seed: int, chunk: int) -> None:
    """What the gateway does with the first PDU — frame it (fed in chunks), then decode
    it — raises nothing but ProtocolError for any mutation."""
    data = mutate(random.Random(seed))
    framer = PDUFramer(65536)
    try:
        for i in range(0, len(data), chunk):
            framer.feed(data[i : i + chunk])
            pdu = framer.next_pdu()
            if pdu is not None:
                decode_pdu(pdu.data)
                break
    except ProtocolError as exc:
        assert 0 <= exc.abort_reason <= 6
