"""Destination probes and the configuration views (issue 20, item 6).

``dicom-node probe`` against a real Orthanc (DICOM and DICOMweb), live and then stopped; the
node probing on its own every ``probes.interval_s``; and the dashboard's Destinations page in
headless Chromium, admin-only, with every secret masked.

Screenshots go to the test's temporary folder (printed), and also to ``/work/notes/screens/``
when ``DICOM_NODE_SCREENSHOTS`` is set (read at import: the suite's fixtures clear every
``DICOM_NODE_*`` variable before a test runs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from dicom_node.delivery.probe import mask_url
from dicom_node.state import Database, ProbeResult
from tests.dicomgen import ct_series
from tests.peers import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    NodeProcess,
    Orthanc,
    free_port,
    storescu,
    wait_until,
)

SCREENSHOTS = (
    Path(os.environ["DICOM_NODE_SCREENSHOTS"]) if os.environ.get("DICOM_NODE_SCREENSHOTS") else None
)
"""A folder the screenshots are copied to (e.g. docs/screenshots), when set."""

ADMIN_TOKEN = "probe-admin-token"
VIEWER_TOKEN = "probe-viewer-token"
USER, PASSWORD = "pacs-admin", "probe-test-password"
WRONG_PASSWORD = "not-the-orthanc-password"
CARD_SHA256 = "9f2c" + "0" * 60


def _config(tmp: Path, orthanc: Orthanc, *, dead_port: int | None = None) -> Path:
    """Three destinations of one Orthanc: DICOM, DICOMweb with its credentials, DICOMweb with a
    wrong password; optionally a fourth on a port nobody listens on. A stat rule and a routine
    one."""
    dead = (
        f"""
[destinations.nowhere]
url = "dicom://NOBODY@127.0.0.1:{dead_port}"
timeout = 3
"""
        if dead_port
        else ""
    )
    text = f"""
[destinations.pacs-dicom]
url = "dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
timeout = 5

[destinations.pacs-web]
url = "http://{ORTHANC_USER}:{ORTHANC_PASSWORD}@127.0.0.1:{orthanc.http_port}/dicom-web"
timeout = 5

[destinations.pacs-web-badauth]
url = "http://{ORTHANC_USER}:{WRONG_PASSWORD}@127.0.0.1:{orthanc.http_port}/dicom-web"
timeout = 5
{dead}
[[routes]]
name = "emergency"
series_description = "STAT"
models = ["test-slow"]
destinations = ["pacs-dicom"{', "nowhere"' if dead_port else ""}]
priority = "stat"

[[routes]]
name = "chest"
modality = ["CT"]
series_description = "^(?!STAT)"
models = ["test-slow"]
destinations = ["pacs-web"]

[models.test-slow]
plugin = "tests.plugins.detectors:SlowDetector"
"""
    # A model folder: the page reads its card (no weights are loaded on the edge).
    folder = tmp / "my-nodules"
    folder.mkdir(exist_ok=True)
    (folder / "model.toml").write_text(
        'name = "my-nodules"\nversion = "2.1.0"\nfile = "model.pt"\n'
        f'sha256 = "{CARD_SHA256}"\n'
        "[validated_input]\nslice_thickness_mm = [0.5, 2.5]\nlung_noise_hu = [0, 60]\n"
    )
    text += f'\n[models.my-nodules]\npath = "{folder}"\nqueue = "gpu"\n'
    path = tmp / "node.toml"
    path.write_text(text)
    return path


def _probe_results(url: str) -> list[tuple[str, bool]]:
    db = Database(url)
    try:
        with db.session() as s:
            rows = s.execute(
                sa.select(ProbeResult.destination, ProbeResult.ok).order_by(ProbeResult.id)
            ).all()
            return [(name, bool(ok)) for name, ok in rows]
    finally:
        db.dispose()


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("https://ai:pw@pacs:8443/dicom-web") == "https://ai:***@pacs:8443/dicom-web"
    assert mask_url("https://pacs/dicom-web") == "https://pacs/dicom-web"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_probe_exit_codes_against_a_live_and_a_stopped_orthanc(
    tmp_path: Path, sqlite_url: str
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        cli = NodeProcess(
            tmp_path / "var",
            {"DICOM_NODE_DATABASE_URL": sqlite_url},
            config=_config(tmp_path, orthanc),
        )
        up = cli.run("probe", "pacs-dicom", "pacs-web")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "pacs-dicom: up, C-ECHO ORTHANC@127.0.0.1" in up.stdout
        assert "pacs-web: up, QIDO-RS" in up.stdout and " ms" in up.stdout
        assert ORTHANC_PASSWORD not in up.stdout + up.stderr

        # Every destination: the wrong password makes one of them down (exit 1), and says why.
        every = cli.run("probe", "--json")
        assert every.returncode == 1, every.stdout + every.stderr
        answers = {a["destination"]: a for a in map(json.loads, every.stdout.splitlines())}
        assert {n: a["up"] for n, a in answers.items()} == {
            "pacs-dicom": True,
            "pacs-web": True,
            "pacs-web-badauth": False,
        }
        assert answers["pacs-dicom"]["method"] == "C-ECHO"
        assert answers["pacs-web"]["latency_ms"] > 0
        assert "401" in answers["pacs-web-badauth"]["error"]
        assert WRONG_PASSWORD not in every.stdout + every.stderr

        unknown = cli.run("probe", "no-such-pacs")
        assert unknown.returncode == 2, unknown.stdout + unknown.stderr
        assert "unknown destination 'no-such-pacs'" in unknown.stderr

        orthanc.stop()
        down = cli.run("probe", "pacs-dicom", "pacs-web", "--json")
        assert down.returncode == 1, down.stdout + down.stderr
        answers = {a["destination"]: a for a in map(json.loads, down.stdout.splitlines())}
        assert not answers["pacs-dicom"]["up"] and not answers["pacs-web"]["up"]
        assert answers["pacs-dicom"]["latency_ms"] is None and answers["pacs-web"]["error"]
        only_web = cli.run("probe", "pacs-web")
        assert only_web.returncode == 1 and "pacs-web: DOWN, QIDO-RS" in only_web.stdout

        # Each run added to the history the dashboard reads.
        history = _probe_results(sqlite_url)
        assert history[:2] == [("pacs-dicom", True), ("pacs-web", True)]
        assert history[-3:] == [("pacs-dicom", False), ("pacs-web", False), ("pacs-web", False)]
    finally:
        orthanc.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_destinations_page_shows_probes_rules_and_models_to_admins_only(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The node probes on its own (every second here); the page shows each destination up or
    down with the time and round trip, the routing rules with their priority and the models;
    no password or token appears; a viewer is refused."""
    from tests.viewer.assets import playwright_core
    from tests.viewer.browser import Browser

    playwright_core()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    node = NodeProcess(
        tmp_path / "var",
        {
            "DICOM_NODE_DATABASE_URL": sqlite_url,
            "DICOM_NODE_STABLE_SECONDS": "1",
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "1",
            "DICOM_NODE_PROBES__INTERVAL_S": "1",
            "DICOM_NODE_HTTP__TOKENS": json.dumps(
                [ADMIN_TOKEN, {"name": "ward", "token": VIEWER_TOKEN, "role": "viewer"}]
            ),
            "DICOM_NODE_HTTP__USERS": json.dumps({USER: PASSWORD}),
        },
        config=_config(tmp_path, orthanc, dead_port=free_port()),
    ).start()
    browser = Browser(width=1400, height=900, http_credentials=(USER, PASSWORD))
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        base = f"http://127.0.0.1:{node.http_port}"
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        def probed() -> dict[str, Any] | None:
            body = requests.get(base + "/api/destinations", headers=admin, timeout=10).json()
            views = {d["name"]: d for d in body["destinations"]}
            return body if all(v["probe"] for v in views.values()) else None

        config = wait_until(probed, 30, 0.5, "a probe of every destination")
        views = {d["name"]: d for d in config["destinations"]}
        assert {n: v["probe"]["up"] for n, v in views.items()} == {
            "pacs-dicom": True,
            "pacs-web": True,
            "pacs-web-badauth": False,
            "nowhere": False,
        }
        masked = f"{ORTHANC_USER}:***@127.0.0.1:{orthanc.http_port}/dicom-web"
        assert views["pacs-web"]["url"].endswith(masked)
        rules = {r["name"]: r["priority"] for r in config["routes"]}
        assert rules == {"emergency": "stat", "chest": "routine"}
        models = {m["name"]: m for m in config["models"]}
        assert sorted(models) == ["my-nodules", "test-slow"]
        assert models["test-slow"]["source"].startswith("plug-in ")
        assert models["my-nodules"]["card"] == {
            "name": "my-nodules",
            "version": "2.1.0",
            "sha256": CARD_SHA256,
            "validated_input": {"slice_thickness_mm": [0.5, 2.5], "lung_noise_hu": [0, 60]},
        }
        assert models["my-nodules"]["queue"] == "gpu"

        viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
        assert requests.get(base + "/destinations", headers=viewer, timeout=10).status_code == 403
        assert requests.get(base + "/api/destinations", headers=viewer, timeout=10).status_code == 403

        # A stat study: its job carries the rule's priority; its results reach Orthanc over
        # C-STORE, and wait to be retried for the destination that is down.
        paths = ct_series(tmp_path / "stat", slices=6, size=48, description="STAT CHEST")
        assert storescu(node.dicom_port, paths).returncode == 0
        job = wait_until(
            lambda: next(
                iter(requests.get(base + "/api/jobs", headers=admin, timeout=10).json()["jobs"]),
                None,
            ),
            60,
            0.5,
            "the stat study's job",
        )
        assert job["priority"] == "stat" and job["rule"] == "emergency"

        def delivered() -> dict[str, Any] | None:
            body = requests.get(base + "/api/destinations", headers=admin, timeout=10).json()
            views = {d["name"]: d["deliveries"] for d in body["destinations"]}
            last = {n: v.get("last", {}).get("state") for n, v in views.items()}
            return views if last["pacs-dicom"] == "done" and last["nowhere"] == "retry" else None

        deliveries = wait_until(delivered, 120, 0.5, "a delivery done and one waiting to retry")
        assert deliveries["pacs-dicom"]["counts"] == {"done": 1}
        assert "could not connect" in deliveries["nowhere"]["last"]["error"]

        browser.goto(base + "/destinations")
        browser.wait("#destinations tbody tr[data-destination]")
        states = browser.eval(
            "Object.fromEntries(Array.from(document.querySelectorAll('#destinations tr[data-destination]'),"
            " r => [r.dataset.destination, r.querySelector('.probe span').textContent]))"
        )
        assert states == {
            "nowhere": "down",
            "pacs-dicom": "up",
            "pacs-web": "up",
            "pacs-web-badauth": "down",
        }
        html = browser.eval("document.documentElement.outerHTML")
        assert ORTHANC_PASSWORD not in html and WRONG_PASSWORD not in html
        assert "emergency" in browser.eval("document.getElementById('routes').textContent")
        assert "2.1.0" in browser.eval("document.getElementById('models').textContent")
        page = browser.screenshot(shots / "destinations.png")
        browser.goto(f"{base}/jobs/{job['id']}")
        browser.wait("#job")
        assert browser.eval("document.getElementById('job-priority').textContent") == "stat"
        job_page = browser.screenshot(shots / "job-stat.png")
        errors = [
            m
            for m in browser.console()
            if m["type"] in ("error", "pageerror") and "Applying inline style" not in m["text"]
        ]
        assert not errors, errors
        print(f"screenshots: {page} {job_page}")
        if SCREENSHOTS is not None:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            for shot in (page, job_page):
                shutil.copyfile(shot, SCREENSHOTS / shot.name)
            print(f"screenshots copied to {SCREENSHOTS}")
    finally:
        browser.close()
        node.stop()
        orthanc.stop()
    assert ORTHANC_PASSWORD not in node.log() and WRONG_PASSWORD not in node.log()
