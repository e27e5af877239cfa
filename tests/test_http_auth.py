"""HTTP access control on a real ``dicom-node serve``: every route but /healthz needs
credentials, bearer tokens and basic users both work, and the node refuses to start with an
open HTTP API beyond loopback."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount

from dicom_node.api.app import create_app
from dicom_node.api.auth import check_exposure
from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings
from dicom_node.state import open_database
from tests.peers import REPO, NodeProcess, free_port, wait_until

TOKEN = "tok-3f9a1c"
USER, PASSWORD = "radiology-it", "pw-7b2e"
_PARAM = re.compile(r"\{[^}]+\}")


def _requests_for(app: Any) -> list[tuple[str, str]]:
    """(method, path) for every route of the app (included routers flattened, mounts too),
    with path parameters filled in."""
    out = []
    for ctx in iter_route_contexts(app.routes):
        path = _PARAM.sub("1.2.3", ctx.path)
        if isinstance(ctx.original_route, Mount):
            out.append(("GET", path.rstrip("/") + "/anything"))
            continue
        for method in sorted(ctx.methods or {"GET"}):
            out.append((method, path))
    return out


def _basic(user: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def test_every_route_but_healthz_needs_credentials(tmp_path: Path, database_url: str) -> None:
    env = {
        "DICOM_NODE_DATABASE_URL": database_url,
        "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
        "DICOM_NODE_HTTP__TOKENS": json.dumps([TOKEN]),
        "DICOM_NODE_HTTP__USERS": json.dumps({USER: PASSWORD}),
        # This test fails logins on purpose, hundreds of times; the back-off has its own test
        # (test_http_hardening.py).
        "DICOM_NODE_HTTP__LOGIN_FAILURES": "100000",
    }
    node = NodeProcess(tmp_path / "var", env).start()
    try:
        base = f"http://127.0.0.1:{node.http_port}"
        wait_until(lambda: requests.get(base + "/healthz", timeout=5).ok, 30, message="healthz")

        # The same route modules the node mounted, enumerated in process: a new route cannot
        # slip through without this test seeing it.
        settings = load_settings(None, data_dir=tmp_path / "enum", database_url=database_url)
        db = open_database(settings.resolved_database_url)
        try:
            app = create_app(settings, db)
            calls = _requests_for(app)
        finally:
            db.dispose()
        paths = {path for _, path in calls}
        # The enumeration covers the DICOMweb and API routes and the schema/docs pages.
        for expected in (
            "/dicom-web/studies",
            "/dicom-web/studies/1.2.3/series/1.2.3/instances/1.2.3",
            "/api/jobs",
            "/api/openapi.json",
            "/api/docs",
            "/healthz",
        ):
            assert expected in paths

        schema = requests.get(base + "/api/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert schema.status_code == 200
        schema_paths = {_PARAM.sub("1.2.3", p) for p in schema.json()["paths"]}
        assert schema_paths <= paths, schema_paths - paths

        wrong = [
            {},
            {"Authorization": "Bearer not-the-token"},
            {"Authorization": f"bearer {TOKEN}x"},
            _basic(USER, "wrong"),
            _basic("nobody", PASSWORD),
            {"Authorization": "Basic !!!not-base64"},
        ]
        open_routes = []
        for method, path in calls:
            if path == "/healthz":
                continue
            for headers in wrong:
                r = requests.request(method, base + path, headers=headers, timeout=10)
                if r.status_code != 401:
                    open_routes.append((method, path, headers, r.status_code))
                else:
                    assert "Basic" in r.headers.get("WWW-Authenticate", "")
        assert open_routes == []

        # /healthz is the one public route.
        assert requests.get(base + "/healthz", timeout=10).status_code == 200

        # Both kinds of credentials work, on the API and on DICOMweb.
        for good in ({"Authorization": f"Bearer {TOKEN}"}, _basic(USER, PASSWORD)):
            assert requests.get(base + "/api/jobs", headers=good, timeout=10).status_code == 200
            r = requests.get(base + "/dicom-web/studies", headers=good, timeout=10)
            assert r.status_code == 200 and r.json() == []
            assert requests.get(base + "/api/openapi.json", headers=good, timeout=10).status_code == 200
    finally:
        node.stop()


# -- the start-up refusal --------------------------------------------------------------------

# Runs `dicom-node serve` in this interpreter under an audit hook that records every socket
# bind and blocks any beyond loopback, so the test itself never listens on another address.
_GUARDED_SERVE = textwrap.dedent(
    """
    import json, os, sys
    binds = []
    def hook(event, args):
        if event == "socket.bind":
            address = args[1]
            binds.append(repr(address))
            host = address[0] if isinstance(address, tuple) else None
            if host is not None and host not in ("127.0.0.1", "::1"):
                raise PermissionError("test guard: bind beyond loopback blocked")
    sys.addaudithook(hook)
    from dicom_node.cli import main
    try:
        rc = main(["serve"])
    finally:
        with open(os.environ["BIND_LOG"], "w") as fh:
            json.dump(binds, fh)
    sys.exit(rc)
    """
)


@pytest.mark.parametrize(
    "bind_env",
    [
        {"DICOM_NODE_HTTP__BIND": "0.0.0.0"},
        {"DICOM_NODE_BIND": "0.0.0.0"},
        {"DICOM_NODE_HTTP__BIND": "10.255.255.1"},
    ],
    ids=["http-bind-any", "node-bind-any", "http-bind-lan"],
)
def test_serve_refuses_open_http_beyond_loopback(tmp_path: Path, bind_env: dict[str, str]) -> None:
    bind_log = tmp_path / "binds.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update(
        {
            "DICOM_NODE_DATA_DIR": str(tmp_path / "var"),
            "DICOM_NODE_DICOM_PORT": str(free_port()),
            "DICOM_NODE_HTTP_PORT": str(free_port()),
            "DICOM_NODE_BIND": "127.0.0.1",
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
            "BIND_LOG": str(bind_log),
            "PYTHONPATH": str(REPO),
            **bind_env,
        }
    )
    run = subprocess.run(
        [sys.executable, "-c", _GUARDED_SERVE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "refusing to serve the HTTP API" in run.stderr
    assert "without credentials" in run.stderr and "DICOM_NODE_HTTP__TOKENS" in run.stderr
    # It refused before listening on anything: not the HTTP port, not the DICOM port.
    assert json.loads(bind_log.read_text()) == []


def test_exposure_rule(tmp_path: Path) -> None:
    """Which settings the start-up check lets through (no server started)."""

    def settings(**kw: Any) -> Any:
        return load_settings(None, data_dir=tmp_path, **kw)

    check_exposure(settings())  # loopback, no credentials: the zero-configuration default
    check_exposure(settings(bind="0.0.0.0", http={"bind": "127.0.0.1"}))  # DICOM out, HTTP in
    check_exposure(settings(bind="0.0.0.0", http={"tokens": [TOKEN]}))
    check_exposure(settings(bind="0.0.0.0", http={"users": {USER: PASSWORD}}))
    check_exposure(settings(bind="0.0.0.0", http_port=0))  # no HTTP server at all
    with pytest.raises(ConfigError, match="without credentials"):
        check_exposure(settings(bind="0.0.0.0"))
    with pytest.raises(ConfigError, match="without credentials"):
        check_exposure(settings(http={"bind": "192.168.1.10"}))
