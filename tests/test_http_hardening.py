"""The HTTP edge under attack, against the real app on a real uvicorn (``HttpServer``, the
component ``dicom-node serve`` runs) on 127.0.0.1: slow-loris and idle clients, the
concurrency cap, oversized headers and bodies (declared and chunked), stalled bodies, HTTPS
(TLS >= 1.2, BCP 195 suites), cross-site posts, framing and sniffing headers, the API docs
without a CDN, and failed-login audit and back-off. Hostile clients are raw sockets."""

from __future__ import annotations

import base64
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import trustme
from sqlalchemy import select as sql_select

from dicom_node.api.server import HttpServer
from dicom_node.api.throttle import LoginThrottle
from dicom_node.errors import ConfigError
from dicom_node.settings import Settings
from dicom_node.state import AuditEvent, Database, open_database
from tests.dicomgen import ct_series
from tests.peers import free_port
from tests.test_stow import BOUNDARY, MULTIPART, multipart

USER, PASSWORD = "radiology-it", "pw-7b2e-secret"
TOKEN = "tok-91c4-secret"
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
MAX_CONNECTIONS = 30
MAX_STOW = 256 * 1024


class Node:
    def __init__(self, server: HttpServer, db: Database) -> None:
        self.server, self.db = server, db
        self.port = server.settings.http_port
        self.base = f"{server.scheme}://127.0.0.1:{self.port}"


@contextmanager
def serve(tmp_path: Path, **http: Any) -> Iterator[Node]:
    """A started HttpServer with the given ``http`` settings (credentials always set)."""
    settings = Settings(
        data_dir=tmp_path,
        http_port=free_port(),
        http={"users": {USER: PASSWORD}, "tokens": [TOKEN], **http},
    )
    settings.spool_dir.mkdir(parents=True, exist_ok=True)  # as `serve` has it, for /healthz
    db = open_database(settings.resolved_database_url)
    server = HttpServer(settings, db)
    server.start()
    try:
        yield Node(server, db)
    finally:
        server.stop()
        db.dispose()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with serve(
        tmp_path_factory.mktemp("node"),
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
        max_stow_bytes=MAX_STOW,
        login_failures=1000,
    ) as n:
        yield n


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (bounded by ``timeout``)."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


# -- slow and idle clients ----------------------------------------------------------------------


def test_slow_loris_clients_are_cut_off_and_healthz_still_answers(node: Node) -> None:
    # 20 clients trickling a header a byte every 0.3 s, one that sends nothing at all.
    slow = [raw(node.port) for _ in range(20)]
    idle = raw(node.port)
    opened = time.monotonic()
    closed_after: dict[int, float] = {}
    for i, sock in enumerate(slow):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
        sock.setblocking(False)

    def trickle() -> None:
        while len(closed_after) < len(slow) and time.monotonic() - opened < 10:
            for i, sock in enumerate(slow):
                if i in closed_after:
                    continue
                try:
                    if sock.recv(4096) == b"" or True:  # a 408, then the close
                        closed_after[i] = time.monotonic() - opened
                except BlockingIOError:
                    try:
                        sock.send(b"a")
                    except OSError:
                        closed_after[i] = time.monotonic() - opened
                except OSError:
                    closed_after[i] = time.monotonic() - opened
            time.sleep(0.3)

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        # Meanwhile a normal client is served at once.
        started = time.monotonic()
        r = requests.get(node.base + "/healthz", timeout=5)
        assert r.status_code == 200 and time.monotonic() - started < 1.0
        idle_answer = read_response(idle, timeout=10)
        idle_closed = time.monotonic() - opened
    finally:
        trickler.join(timeout=15)
        for sock in [*slow, idle]:
            sock.close()
    assert status_of(idle_answer) == 408
    assert HEADER_TIMEOUT - 0.1 <= idle_closed <= HEADER_TIMEOUT + 2.0
    assert len(closed_after) == len(slow)
    # Cut off by the header deadline, not before it, and within a bound.
    assert all(HEADER_TIMEOUT - 0.1 <= t <= HEADER_TIMEOUT + 2.0 for t in closed_after.values()), (
        closed_after
    )


def test_connection_cap_answers_503_until_the_slow_clients_are_gone(node: Node) -> None:
    hogs = [raw(node.port) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # the server has accepted them all
        assert requests.get(node.base + "/healthz", timeout=5).status_code == 503
        time.sleep(HEADER_TIMEOUT + 0.5)  # the hogs' header deadline passes
        assert requests.get(node.base + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in hogs:
            sock.close()


def test_oversized_headers_are_refused(node: Node) -> None:
    sock = raw(node.port)
    try:
        # Whole at once (431 from the app's check) ...
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert status_of(read_response(sock)) == 431
    finally:
        sock.close()
    sock = raw(node.port)
    try:
        # ... or growing without end (400 from h11's incomplete-event limit).
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        refused = False
        for _ in range(10):
            try:
                sock.sendall(b"X-More: " + b"a" * 4000 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                refused = True  # closed after its 400, which the reset may have swallowed
                break
            time.sleep(0.05)
        answer = read_response(sock)
        assert refused or status_of(answer) == 400
    finally:
        sock.close()


# -- request bodies -----------------------------------------------------------------------------


def test_stow_declared_length_over_the_limit_is_413_before_the_body(node: Node) -> None:
    sock = raw(node.port)
    try:
        auth = basic()["Authorization"]
        sock.sendall(
            (
                "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {auth}\r\nAccept: application/dicom+json\r\n"
                f"Content-Type: {MULTIPART}\r\nContent-Length: {8 * 1024**3}\r\n\r\n"
            ).encode()
        )
        answer = read_response(sock, timeout=5)  # without a single body byte sent
    finally:
        sock.close()
    assert status_of(answer) == 413
    assert b"connection: close" in answer.lower()


def test_chunked_stow_body_is_cut_at_the_limit_and_earlier_parts_kept(
    node: Node, tmp_path: Path
) -> None:
    instance = ct_series(tmp_path / "ct", slices=1, size=32)[0].read_bytes()
    head = multipart([instance], close=False) + f"--{BOUNDARY}\r\n".encode()
    head += b"Content-Type: application/dicom\r\n\r\n"
    planned = 64 * 1024 * 1024
    sent = 0
    sock = raw(node.port)
    try:
        sock.sendall(
            (
                "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {basic()['Authorization']}\r\n"
                "Accept: application/dicom+json\r\n"
                f"Content-Type: {MULTIPART}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        chunk = b"\x00" * 65536
        pieces = [head] + [chunk] * (planned // len(chunk))
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        answer = read_response(sock, timeout=10)
    finally:
        sock.close()
    assert status_of(answer) == 413
    assert sent < planned // 4  # refused while streaming, not after the whole body
    # The complete instance before the cut was stored and is retrievable.
    studies = requests.get(
        node.base + "/dicom-web/studies",
        headers={**basic(), "Accept": "application/dicom+json"},
        timeout=10,
    ).json()
    assert len(studies) >= 1


def test_small_body_limit_on_other_routes(node: Node) -> None:
    r = requests.post(
        node.base + "/api/jobs/none/retry",
        data=b"x" * (2 * 1024 * 1024),
        headers=basic(),
        timeout=10,
    )
    assert r.status_code == 413


def test_stalled_stow_body_times_out_with_408(node: Node) -> None:
    sock = raw(node.port)
    try:
        sock.sendall(
            (
                "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {basic()['Authorization']}\r\n"
                "Accept: application/dicom+json\r\n"
                f"Content-Type: {MULTIPART}\r\nContent-Length: 100000\r\n\r\n--{BOUNDARY}\r\n"
            ).encode()
        )
        started = time.monotonic()
        answer = read_response(sock, timeout=10)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert status_of(answer) == 408
    assert BODY_TIMEOUT - 0.1 <= waited <= BODY_TIMEOUT + 2.0


# -- browser protections ------------------------------------------------------------------------


def test_pages_cannot_be_framed_or_sniffed(node: Node) -> None:
    for path in ("/", "/api/jobs", "/api/docs"):
        r = requests.get(node.base + path, headers=basic(), timeout=10)
        assert r.status_code == 200, path
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    # Refusals carry them too.
    r = requests.get(node.base + "/", timeout=10)
    assert r.status_code == 401 and r.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "null"},
        {"Origin": "http://evil.example"},
        {"Origin": "http://127.0.0.1:1"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
    ids=["origin-null", "other-host", "other-port", "fetch-cross-site", "fetch-same-site"],
)
def test_cross_site_posts_are_refused(node: Node, headers: dict[str, str]) -> None:
    r = requests.post(
        node.base + "/api/jobs/none/retry", headers={**basic(), **headers}, timeout=10
    )
    assert r.status_code == 403 and r.json()["detail"] == "cross-site request refused"


def test_same_origin_and_non_browser_posts_pass(node: Node) -> None:
    host = urlsplit(node.base).netloc
    for headers in ({}, {"Origin": node.base}, {"Sec-Fetch-Site": "same-origin", "Host": host}):
        r = requests.post(
            node.base + "/api/jobs/none/retry", headers={**basic(), **headers}, timeout=10
        )
        assert r.status_code == 404, headers  # past the check: there is no such job


def test_api_docs_need_no_other_host(node: Node) -> None:
    r = requests.get(node.base + "/api/docs", headers=basic(), timeout=10)
    assert r.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", r.text)
    assert urls, r.text
    for url in urls:
        assert urlsplit(url).netloc == "" and not url.startswith("//"), url
    assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
    assert {u.rsplit(".", 1)[1] for u in assets} == {"js", "css", "png"}
    for url in assets:
        asset = requests.get(node.base + url, headers=basic(), timeout=10)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    js = requests.get(node.base + "/api/docs/swagger-ui-bundle.js", headers=basic(), timeout=10)
    assert js.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in js.text
    # The one inline script is allowed by its hash, nothing else inline.
    assert "'sha256-" in r.headers["Content-Security-Policy"]
    assert (
        "'unsafe-inline'"
        not in r.headers["Content-Security-Policy"].split("script-src")[1].split(";")[0]
    )
    assert requests.get(node.base + "/api/docs/swagger-ui-bundle.js", timeout=10).status_code == 401


# -- HTTPS --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_https_tls12_plus_with_bcp195_suites(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    with serve(tmp_path / "var", tls_certificate=cert_file, tls_private_key=key_file) as n:
        assert n.base.startswith("https://")
        # (Connection: close: a TLS connection left open would hold up the graceful stop.)
        headers = {**basic(), "Connection": "close"}
        r = requests.get(n.base + "/api/jobs", headers=headers, verify=str(ca_file), timeout=10)
        assert r.status_code == 200 and r.json()["jobs"] == []

        def handshake(ctx: ssl.SSLContext) -> tuple[str | None, Any]:
            ctx.load_verify_locations(str(ca_file))
            with (
                socket.create_connection(("127.0.0.1", n.port), timeout=10) as s,
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls,
            ):
                return tls.version(), tls.cipher()

        version, _ = handshake(ssl.create_default_context())
        assert version in ("TLSv1.2", "TLSv1.3")
        tls12 = ssl.create_default_context()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        version, cipher = handshake(tls12)
        assert version == "TLSv1.2" and ("GCM" in cipher[0] or "CHACHA20" in cipher[0])
        # No forward secrecy or CBC: refused, although OpenSSL's defaults would accept them.
        weak = ssl.create_default_context()
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("AES128-SHA:AES256-SHA:AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA")
        with pytest.raises(ssl.SSLError):
            handshake(weak)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            handshake(old)
        # Plain HTTP on the HTTPS port gets nothing useful.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{n.port}/healthz", timeout=5)

    # A key that does not load is a configuration error at start-up, not a crash later.
    key_file.write_text("not a key")
    settings = Settings(
        data_dir=tmp_path / "bad",
        http_port=free_port(),
        http={"tokens": [TOKEN], "tls_certificate": cert_file, "tls_private_key": key_file},
    )
    with pytest.raises(ConfigError, match="http: cannot load the TLS"):
        HttpServer(settings, open_database(settings.resolved_database_url))


# -- failed logins ------------------------------------------------------------------------------


def test_failed_logins_are_audited_and_slowed(tmp_path: Path) -> None:
    with serve(tmp_path, login_failures=3, login_lockout_max=4) as n:
        url = n.base + "/api/jobs"
        # Requests without credentials are challenges, not failures.
        for _ in range(5):
            assert requests.get(url, timeout=5).status_code == 401
        assert requests.get(url, headers=basic(), timeout=5).status_code == 200
        wrong = [
            basic(USER, "wrong"),
            basic(PASSWORD, ""),  # a password typed into the user name field
            {"Authorization": "Bearer " + TOKEN + "x"},
        ]
        for headers in wrong:
            assert requests.get(url, headers=headers, timeout=5).status_code == 401
        assert requests.get(url, headers=basic(USER, "wrong"), timeout=5).status_code == 401
        # Four failures, three free: the address waits 1 s, right credentials or not.
        blocked = requests.get(url, headers=basic(), timeout=5)
        assert blocked.status_code == 429 and blocked.headers["Retry-After"] == "1"
        assert requests.get(n.base + "/healthz", timeout=5).status_code == 200
        time.sleep(1.1)
        assert requests.get(url, headers=basic(USER, "wrong"), timeout=5).status_code == 401
        assert requests.get(url, headers=basic(), timeout=5).headers["Retry-After"] == "2"
        time.sleep(2.1)
        assert requests.get(url, headers=basic(), timeout=5).status_code == 200  # and cleared
        assert requests.get(url, headers=basic(USER, "wrong"), timeout=5).status_code == 401

        with n.db.session() as s:
            events = s.scalars(
                sql_select(AuditEvent)
                .where(AuditEvent.event == "auth-failed")
                .order_by(AuditEvent.id)
            ).all()
            rows = [(e.actor, e.outcome, dict(e.detail)) for e in events]
    assert [actor for actor, _, _ in rows] == [
        f"http:{USER}@127.0.0.1",
        "http:?@127.0.0.1",
        "http:token@127.0.0.1",
        f"http:{USER}@127.0.0.1",
        f"http:{USER}@127.0.0.1",
        f"http:{USER}@127.0.0.1",
    ]
    assert all(outcome == "failure" for _, outcome, _ in rows)
    assert [d["lockout_seconds"] for _, _, d in rows] == [0, 0, 0, 1, 2, 0]
    assert PASSWORD not in repr(rows) and TOKEN not in repr(rows)


def test_login_throttle_doubles_and_stays_bounded() -> None:
    now = [1000.0]
    throttle = LoginThrottle(5, 60.0, max_addresses=100, clock=lambda: now[0])
    waits = [throttle.failed("192.0.2.1") for _ in range(12)]
    assert waits == [0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60]
    assert throttle.retry_after("192.0.2.1") == 60
    now[0] += 60
    assert throttle.retry_after("192.0.2.1") == 0
    throttle.succeeded("192.0.2.1")
    assert throttle.failed("192.0.2.1") == 0
    for i in range(10_000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100


@pytest.mark.parametrize("trusted", [True, False], ids=["behind-trusted-proxy", "untrusted"])
def test_client_address_through_a_proxy(tmp_path: Path, trusted: bool) -> None:
    proxies = ["127.0.0.1"] if trusted else []
    with serve(tmp_path, login_failures=1, trusted_proxies=proxies) as n:
        url = n.base + "/api/jobs"
        via = {"X-Forwarded-For": "192.0.2.7"}
        for _ in range(2):
            r = requests.get(url, headers={**basic(USER, "wrong"), **via}, timeout=5)
            assert r.status_code == 401
        assert requests.get(url, headers={**basic(), **via}, timeout=5).status_code == 429
        # The proxy's own address is locked out only when the forwarded one is not believed.
        assert requests.get(url, headers=basic(), timeout=5).status_code == (
            200 if trusted else 429
        )
        with n.db.session() as s:
            actors = set(
                s.scalars(sql_select(AuditEvent.actor).where(AuditEvent.event == "auth-failed"))
            )
    assert actors == {f"http:{USER}@{'192.0.2.7' if trusted else '127.0.0.1'}"}
