"""DICOM TLS: the node's listener (``scp.tls``) and the C-STORE SCU (``dicom_node.tls``), with
DCMTK's TLS-enabled ``storescu``/``echoscu``/``storescp`` and pynetdicom as peers.

Certificates come from a throw-away CA made with trustme; a second, untrusted CA stands for a
stranger with a certificate of its own.
"""

from __future__ import annotations

import errno
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from sqlalchemy import func, select

from dicom_node.scu import STATUS_NOT_SENT, Peer, collect_files, echo, send_files
from dicom_node.settings import TlsSettings
from dicom_node.state import AuditEvent, Database, Instance
from dicom_node.tls import client_ssl_context
from tests.dicomgen import ct_series
from tests.peers import NodeProcess, StoreSCP, storescu, wait_until

SERVER_NAME = "localhost"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path

    def client(self, *, rogue: bool = False, trust: Path | None = None) -> TlsSettings:
        """TLS settings of an SCU: our client certificate (or the stranger's)."""
        return TlsSettings(
            enabled=True,
            certificate=self.rogue_cert if rogue else self.client_cert,
            private_key=self.rogue_key if rogue else self.client_key,
            ca_certificates=trust or self.ca,
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    rsa = trustme.KeyType.RSA  # DCMTK 3.6.7's BCP 195 profile negotiates RSA suites
    ca, rogue = trustme.CA(key_type=rsa), trustme.CA(key_type=rsa)
    server = ca.issue_cert(SERVER_NAME, "127.0.0.1", key_type=rsa)
    client = ca.issue_cert("modality.hospital.example", key_type=rsa)
    stranger = rogue.issue_cert("modality.hospital.example", key_type=rsa)
    paths = Pki(*(d / n for n in ("ca.pem", "srv.pem", "srv.key", "cli.pem", "cli.key", "rogue-ca.pem", "rogue.pem", "rogue.key")))
    ca.cert_pem.write_to_path(paths.ca)
    rogue.cert_pem.write_to_path(paths.rogue_ca)
    for cert, cert_path, key_path in (
        (server, paths.server_cert, paths.server_key),
        (client, paths.client_cert, paths.client_key),
        (stranger, paths.rogue_cert, paths.rogue_key),
    ):
        cert.cert_chain_pems[0].write_to_path(cert_path)
        cert.private_key_pem.write_to_path(key_path)
    return paths


def dcmtk_tls(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def echoscu(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aec", "AINODE", "-to", "10", "-ta", "10", "-td", "10", *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def still_open(sock: socket.socket) -> bool:
    """True while the peer has not closed the connection (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


def test_tls_listener(tmp_path: Path, database_url: str, pki: Pki) -> None:
    node = NodeProcess(
        tmp_path / "var",
        {
            "DICOM_NODE_DATABASE_URL": database_url,
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
            "DICOM_NODE_SCP__RECEIVERS": "1",
            "DICOM_NODE_SCP__NETWORK_TIMEOUT": "60",
            "DICOM_NODE_SCP__TLS__ENABLED": "true",
            "DICOM_NODE_SCP__TLS__CERTIFICATE": str(pki.server_cert),
            "DICOM_NODE_SCP__TLS__PRIVATE_KEY": str(pki.server_key),
            "DICOM_NODE_SCP__TLS__CA_CERTIFICATES": str(pki.ca),
        },
    ).start()
    db = Database(database_url)
    try:
        port = node.dicom_port
        series = ct_series(tmp_path / "s", slices=3, size=32)

        # A trusted client certificate: DCMTK storescu stores over TLS.
        run = storescu(port, series, extra=dcmtk_tls(pki.client_key, pki.client_cert, pki.ca))
        assert run.returncode == 0, run.stdout + run.stderr
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 3

        # Refused: a certificate from an untrusted CA, no certificate at all, plain TCP.
        assert echoscu(port, *dcmtk_tls(pki.rogue_key, pki.rogue_cert, pki.ca)).returncode != 0
        assert echoscu(port, "+tla", "+cf", str(pki.ca)).returncode != 0
        assert echoscu(port).returncode != 0
        no_cert = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises(ConnectionError):
            echo(Peer("AINODE", "127.0.0.1", port, tls=no_cert, server_hostname=SERVER_NAME))

        # Our own SCU (write-back) with the node's client context: verified both ways.
        files, _ = collect_files(series[:1])
        tls = client_ssl_context(pki.client())
        (outcome,) = send_files(Peer("AINODE", "127.0.0.1", port, tls=tls, server_hostname=SERVER_NAME), files)
        assert outcome.status == 0x0000

        # Silent TCP clients (no ClientHello) do not stall the accept loop: a legitimate TLS
        # client is served while they are still connected. The client gives up after 30 s, well
        # before the node's 60 s network timeout would drop the silent ones.
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            result: list[int] = []
            peer = Peer(
                "AINODE", "127.0.0.1", port, tls=client_ssl_context(pki.client()), server_hostname=SERVER_NAME,
                acse_timeout=30, dimse_timeout=30, network_timeout=30,
            )
            worker = threading.Thread(target=lambda: result.append(echo(peer)))
            worker.start()
            worker.join(60)
            assert result == [0x0000]
            assert all(still_open(s) for s in silent)
        finally:
            for s in silent:
                s.close()

        # Only the three trusted associations got as far as the DICOM layer; each refused
        # handshake is one audit record and one log line (no traceback), with OpenSSL's reason.
        def events(name: str) -> list[AuditEvent]:
            with db.session() as s:
                return list(s.scalars(select(AuditEvent).where(AuditEvent.event == name)))

        wait_until(lambda: len(events("association-rejected")) >= 4, 10, message="audit records")
        assert len(events("association-accepted")) == 3
        reasons = sorted(e.detail["reason"] for e in events("association-rejected"))
        assert len(reasons) == 4 and all(r.startswith("TLS handshake failed: ") for r in reasons)
        assert any("CERTIFICATE_VERIFY_FAILED" in r for r in reasons)  # the stranger
        assert any("CERTIFICATE" in r and "VERIFY" not in r for r in reasons)  # no certificate
        log = node.log()
        assert log.count("DICOM TLS handshake with 127.0.0.1 failed") == 4
        assert "Traceback" not in log
    finally:
        db.dispose()
        node.stop()


def test_tls_scu_against_dcmtk_storescp(tmp_path: Path, pki: Pki) -> None:
    """The SCU side: certificate and host name of the server checked, ours presented."""
    scp = StoreSCP(tmp_path / "storescp", flags=dcmtk_tls(pki.server_key, pki.server_cert, pki.ca)).start()
    try:
        files, _ = collect_files(ct_series(tmp_path / "s", slices=2, size=32))

        def send(tls: TlsSettings, hostname: str = SERVER_NAME) -> list[int]:
            peer = Peer(scp.aet, "127.0.0.1", scp.port, tls=client_ssl_context(tls, hostname), server_hostname=hostname)
            return [o.status for o in send_files(peer, files)]

        assert send(pki.client()) == [0x0000, 0x0000]
        assert len(scp.received) == 2
        # The server's certificate does not name this host: refused before anything is sent.
        assert send(pki.client(), "pacs.hospital.example") == [STATUS_NOT_SENT] * 2
        # The server's CA is not in our trust list.
        assert send(pki.client(trust=pki.rogue_ca)) == [STATUS_NOT_SENT] * 2
        # storescp refuses our certificate when a stranger's CA signed it.
        assert send(pki.client(rogue=True)) == [STATUS_NOT_SENT] * 2
        assert len(scp.received) == 2
    finally:
        scp.stop()


def test_client_context_settings(pki: Pki) -> None:
    ctx = client_ssl_context(pki.client())
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with pytest.raises(ValueError):
        client_ssl_context(TlsSettings())
