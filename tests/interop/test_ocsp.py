"""OCSP against a local ``openssl ocsp`` responder on 127.0.0.1.

Client certificates: good / revoked / responder down (soft vs hard), the
answer cached for its validity. Stapling: the listener serves a staple file
(fetched from the same responder) to ``openssl s_client -status``.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ProcessTracker
from .helpers import (
    HOST,
    CertKey,
    free_port,
    issue_cert,
    new_ca,
    route,
    scu_associate,
    wait_listening,
    write_ca,
    write_ocsp_index,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@dataclass(frozen=True)
class OcspPKI:
    dir: Path
    ca: Path
    ca_key: Path
    responder: CertKey  # delegated OCSP signer issued by the CA
    good: CertKey  # CN GOOD01, AIA -> responder
    revoked: CertKey  # CN BAD01, AIA -> responder
    dead: CertKey  # CN DEAD01, AIA -> a port nobody listens on
    server: CertKey  # the gateway's server certificate (SAN localhost) for stapling
    port: int
    index: Path


@pytest.fixture(scope="module")
def opki(tmp_path_factory: pytest.TempPathFactory) -> OcspPKI:
    d = tmp_path_factory.mktemp("ocsp-pki")
    ca = new_ca("OCSP Test CA")
    ca_cert, ca_key = write_ca(ca, d, "ocsp-ca")
    port, dead_port = free_port(), free_port()
    url = f"http://{HOST}:{port}/"
    good = issue_cert(ca, d, "good", "GOOD01", ocsp_url=url)
    revoked = issue_cert(ca, d, "revoked", "BAD01", ocsp_url=url)
    server = issue_cert(ca, d, "server", "localhost", dns=["localhost"], ips=["127.0.0.1"])
    index = write_ocsp_index(d / "index.txt", good=[good.cert, server.cert],
                             revoked=[revoked.cert])
    return OcspPKI(
        dir=d, ca=ca_cert, ca_key=ca_key,
        responder=issue_cert(ca, d, "responder", "OCSP Responder", eku=(), ocsp_signing=True),
        good=good, revoked=revoked,
        dead=issue_cert(ca, d, "dead", "DEAD01", ocsp_url=f"http://{HOST}:{dead_port}/"),
        server=server, port=port, index=index,
    )


@pytest.fixture
def responder(opki: OcspPKI, procs: ProcessTracker):
    """``openssl ocsp`` serving the index on opki.port; stopped at teardown."""
    proc, out, err = procs.spawn(
        ["openssl", "ocsp", "-index", opki.index, "-port", str(opki.port),
         "-rsigner", opki.responder.cert, "-rkey", opki.responder.key, "-CA", opki.ca,
         "-nmin", "10"],
        "ocsp-responder",
    )
    if not wait_listening([opki.port], proc, 10):
        pytest.fail("openssl ocsp did not listen: " + out.read_text() + err.read_text())
    return proc


def _listener(opki: OcspPKI, **extra) -> dict:
    return {
        "name": "tls", "tls": True, "client_cert": "required", "trust": str(opki.ca),
        "certificates": [{"cert": str(opki.server.cert), "key": str(opki.server.key),
                          **extra}],
    }


def _associate(gw, opki: OcspPKI, ck: CertKey, calling: str):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(opki.ca))
    ctx.load_cert_chain(str(ck.cert), str(ck.key))
    res = scu_associate(gw.port("tls"), "ARCHIVE", calling_ae=calling, ssl_context=ctx)
    accepted = res.ac_ae_titles() is not None
    if res.established:
        res.assoc.release()
    return res, accepted


def _rj_received(res) -> tuple[int, int, int] | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ as received on the wire."""
    for pdu in res.raw_received:
        if pdu[:1] == b"\x03" and len(pdu) >= 10:
            return pdu[7], pdu[8], pdu[9]
    return None


def _checked(gw, n: int) -> list[dict]:
    gw.wait_for_event("ocsp.checked")
    recs = gw.events("ocsp.checked")
    assert len(recs) >= n, gw.output()
    return recs


def test_ocsp_good_accepted_and_cached(opki, responder, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_listener(opki)], [route("archive", "ARCHIVE", scp.port, ocsp="hard")])
    for _ in range(2):
        res, accepted = _associate(gw, opki, opki.good, "GOOD01")
        assert accepted, res.state() + gw.output()
    first, second = _checked(gw, 2)[:2]
    assert first["status"] == "good" and first["cached"] is False, first
    assert first["responder"] == f"http://{HOST}:{opki.port}/", first
    assert second["status"] == "good" and second["cached"] is True, second
    assert len(scp.seen) == 2


def test_ocsp_revoked_rejected(opki, responder, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_listener(opki)], [route("archive", "ARCHIVE", scp.port, ocsp="soft")])
    res, accepted = _associate(gw, opki, opki.revoked, "BAD01")
    assert not accepted and _rj_received(res) == (1, 1, 3), res.state() + gw.output()
    assert _checked(gw, 1)[0]["status"] == "revoked"
    rej = gw.wait_for_event("association.rejected")[-1]
    assert rej["check"] == "ocsp" and "revoked" in rej["why"], rej
    assert scp.seen == []


def test_ocsp_responder_down_soft_accepts(opki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_listener(opki)], [route("archive", "ARCHIVE", scp.port, ocsp="soft")])
    res, accepted = _associate(gw, opki, opki.dead, "DEAD01")
    assert accepted, res.state() + gw.output()
    rec = _checked(gw, 1)[0]
    assert rec["status"] == "unavailable" and "unreachable" in rec["detail"], rec
    assert len(scp.seen) == 1


def test_ocsp_responder_down_hard_rejects(opki, pynetdicom_scp, gateway):
    scp = pynetdicom_scp("ARCHIVE")
    gw = gateway([_listener(opki)], [route("archive", "ARCHIVE", scp.port, ocsp="hard")])
    res, accepted = _associate(gw, opki, opki.dead, "DEAD01")
    assert not accepted and _rj_received(res) == (1, 1, 3), res.state() + gw.output()
    assert _checked(gw, 1)[0]["status"] == "unavailable"
    rej = gw.wait_for_event("association.rejected")[-1]
    assert rej["check"] == "ocsp" and "hard" in rej["why"], rej
    assert scp.seen == []


def _s_client_status(port: int, ca: Path) -> str:
    cp = subprocess.run(
        ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", "localhost",
         "-status", "-CAfile", str(ca)],
        input=b"", capture_output=True, timeout=15, check=False,
    )
    return (cp.stdout + cp.stderr).decode(errors="replace")


def test_ocsp_stapling(opki, responder, pynetdicom_scp, gateway):
    staple = opki.dir / "server-staple.der"
    cp = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(opki.ca), "-cert", str(opki.server.cert),
         "-url", f"http://{HOST}:{opki.port}/", "-CAfile", str(opki.ca),
         "-respout", str(staple)],
        capture_output=True, timeout=15, check=False,
    )
    assert cp.returncode == 0 and staple.exists(), cp.stdout + cp.stderr
    scp = pynetdicom_scp("ARCHIVE")
    listener = _listener(opki, staple=str(staple))
    listener["client_cert"] = "none"
    plain = _listener(opki)
    plain.update(name="nostaple", client_cert="none")
    gw = gateway([listener, plain], [route("archive", "ARCHIVE", scp.port)])
    out = _s_client_status(gw.port("tls"), opki.ca)
    assert "OCSP Response Status: successful" in out, out
    assert "Cert Status: good" in out, out
    out = _s_client_status(gw.port("nostaple"), opki.ca)
    assert "OCSP response: no response sent" in out, out
