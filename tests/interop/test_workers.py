"""``--workers N`` / ``[gateway] workers``: N processes share the listener with
SO_REUSEPORT under a supervisor that restarts dead workers and forwards signals."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .helpers import HOST, plain_listener, route, run_dcmtk

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


def _echo(port: int) -> None:
    rc, out = run_dcmtk(["echoscu", "-aet", "CT01", "-aec", "ARCHIVE", HOST, port], timeout=15)
    assert rc == 0, out


def _workers(gw) -> dict[int, int]:
    """worker index -> pid of its latest start, from the gateway.started lines."""
    seen: dict[int, int] = {}
    for rec in gw.events("gateway.started"):
        if "worker" in rec:
            seen[rec["worker"]] = rec["pid"]
    return seen


def _wait(predicate, timeout: float, what: str, gw) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{gw.output()[-4000:]}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent, the supervisor, reaps it).
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_two_workers_share_the_listener_restart_and_stop(storescp, gateway):
    scp = storescp()
    gw = gateway(
        [plain_listener()],
        [route("archive", "ARCHIVE", scp.port)],
        settings={"workers": 2, "shutdown_grace": 2},
    )
    port = gw.port("plain")
    _wait(lambda: len(_workers(gw)) == 2, 10, "two workers to start", gw)
    first = _workers(gw)
    assert len(set(first.values())) == 2 and gw.proc.pid not in first.values()

    # The kernel spreads connections over both sockets (hash of the 4-tuple):
    # with 40 associations the chance that one worker gets none is 2**-39.
    for _ in range(40):
        _echo(port)
    _wait(lambda: len(gw.events("association.released")) >= 40, 10, "40 releases", gw)
    served = {r["worker"]: r["pid"] for r in gw.events("association.released")}
    assert served == first, f"both workers must serve: {served} vs started {first}"

    # A worker that dies is restarted (new pid, same index); the other keeps serving.
    os.kill(first[0], signal.SIGKILL)
    _wait(lambda: _workers(gw).get(0) not in (None, first[0]), 10, "worker 0 restarted", gw)
    assert gw.events("worker.died")[0]["worker_pid"] == first[0]
    for _ in range(10):
        _echo(port)

    # SIGTERM to the supervisor ends every worker, then the supervisor, with 0.
    now = _workers(gw)
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(15) == 0, gw.output()[-4000:]
    assert not any(_alive(pid) for pid in now.values())
    assert len(gw.events("gateway.stopped")) >= 2
