"""The dashboard of a real ``dicom-node serve`` in headless Chromium (Debian chromium driven by
playwright-core, through the ``tests/viewer`` harness).

A study goes through the real pipeline (receiver, completion, Redis, a ``dicom-node worker``
with a test detector, STOW-RS write-back to a real Orthanc). The browser logs in with HTTP
basic credentials, sees the job appear and finish without reloading the page, filters the
list, opens the job page, and the preview's pixels on screen show the detection box where the
finding is. The "Open in OHIF" link opens OHIF (served by the viewer harness in front of the
same Orthanc) on the study. Retry and cancel are clicked like a user would, and audited.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from sqlalchemy import select

from dicom_node.state import AuditEvent, JobState
from tests.dicomgen import ct_series
from tests.peers import Orthanc, RedisServer, wait_until
from tests.pipeline_env import NodeEnv
from tests.viewer.assets import ohif_dist, playwright_core
from tests.viewer.browser import Browser
from tests.viewer.serve_ohif import OhifServer

pytestmark = [pytest.mark.viewer, pytest.mark.slow, pytest.mark.timeout(600)]

USER, PASSWORD = "radiology-it", "dashboard-test-password"
VIEWPORT = "window.cornerstone.getRenderingEngines()[0].getViewports()[0]"

CONFIG = """
[[routes]]
name = "ct"
modality = ["CT"]
models = ["test-slow"]

[models.test-slow]
plugin = "tests.plugins.detectors:SlowDetector"
[models.test-slow.options]
seconds = {seconds}
{destinations}
"""


@pytest.fixture(scope="module")
def ohif_build() -> Path:
    playwright_core()
    return ohif_dist()


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser(width=1400, height=1000, http_credentials=(USER, PASSWORD))
    try:
        yield b
    finally:
        b.close()


def make_env(
    tmp_path: Path,
    database_url: str,
    redis: RedisServer | None,
    *,
    seconds: float,
    destinations: str = "",
    env: dict[str, str] | None = None,
    stable_seconds: float = 1.0,
) -> NodeEnv:
    (tmp_path / "node").mkdir(exist_ok=True)
    return NodeEnv(
        tmp_path / "node",
        database_url,
        broker_url=redis.url if redis else None,
        stable_seconds=stable_seconds,
        config_text=CONFIG.format(seconds=seconds, destinations=destinations),
        extra_env={"DICOM_NODE_HTTP__USERS": json.dumps({USER: PASSWORD}), **(env or {})},
    )


def start(env: NodeEnv) -> str:
    """Start the node; its base URL once HTTP answers (the DICOM port opens first)."""
    env.start()
    base = f"http://127.0.0.1:{env.node.http_port}"
    wait_until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, 30, message="healthz")
    return base


def select_option(browser: Browser, name: str, value: str) -> None:
    """Choose a filter value the way a user does (the change event drives the page script)."""
    browser.eval(
        f"""(() => {{ const s = document.querySelector('select[name="{name}"]'); s.value = {json.dumps(value)};
        s.dispatchEvent(new Event('change', {{ bubbles: true }})); }})()"""
    )
    assert browser.eval(f"document.querySelector('select[name=\"{name}\"]').value") == value, f"no {value!r} in the {name} filter"


def set_date(browser: Browser, name: str, value: str) -> None:
    browser.eval(
        f"""(() => {{ const i = document.querySelector('input[name="{name}"]'); i.value = {json.dumps(value)};
        i.dispatchEvent(new Event('change', {{ bubbles: true }})); }})()"""
    )


def box_colour(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the preview's detection boxes (saturated red; the CT itself is grey)."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    return (r > 200) & (g < 110) & (b < 110)


def test_dashboard_shows_the_processed_job_with_preview_and_opens_ohif(
    tmp_path: Path,
    database_url: str,
    redis_server: RedisServer,
    clean_orthanc: Orthanc,
    ohif_build: Path,
    browser: Browser,
) -> None:
    ohif = OhifServer(ohif_build, clean_orthanc.url, *clean_orthanc.auth).start()
    env = make_env(
        tmp_path,
        database_url,
        redis_server,
        seconds=0.5,
        destinations=f'[destinations.pacs]\nurl = "{clean_orthanc.dicomweb_url_with_credentials}"\n',
        env={"DICOM_NODE_HTTP__OHIF_URL": ohif.url},
    )
    try:
        base = start(env)
        shots = tmp_path / "screenshots"
        shots.mkdir()

        # The list is open before the study arrives; the page must never reload from here on.
        browser.goto(base + "/")
        browser.wait("#jobs")
        assert browser.eval("document.title").startswith("Jobs")
        browser.eval("window.__sameDocument = true")

        paths = ct_series(tmp_path / "study", slices=8, size=64)
        clean_orthanc.upload(paths)  # the PACS holds the images; the node adds SR + SEG to it
        env.send(paths)
        env.add_worker()
        (job,) = env.wait_all_terminal(1, timeout=180)
        assert job.state == JobState.DONE.value, env.diagnostics()
        study_uid = str(json.loads(requests.get(f"{base}/api/jobs/{job.id}", auth=(USER, PASSWORD), timeout=10).text)["study"]["study_instance_uid"])

        row = f'tr[data-job-id="{job.id}"]'
        browser.wait_for(f"(() => {{ const r = document.querySelector('{row}'); return r && r.dataset.state === 'done'; }})()", 30000)
        assert browser.eval("window.__sameDocument === true"), "the list reloaded instead of refreshing"
        cells = browser.call("text", selector=f"{row} td")
        state, short_id, study, model, created, timings, findings, delivery, error = cells
        assert state == "done" and short_id == job.id[:8]
        assert "8 inst." in study
        assert model == "test-slow 1.0.0"
        assert created == job.created_at.strftime("%Y-%m-%d %H:%M:%S")
        assert all(stage in timings for stage in ("load", "detect", "encode", "deliver"))
        assert findings == "1" and delivery == "pacs done" and error == ""
        browser.screenshot(shots / "1-list.png")

        # Filters, applied without reloading: no failed job; the done job by state and model.
        select_option(browser, "state", "failed")
        browser.wait_for(f"!document.querySelector('{row}') && document.querySelector('#jobs tr.empty') !== null", 15000)
        select_option(browser, "state", "done")
        select_option(browser, "model", "test-slow")
        browser.wait_for(f"document.querySelector('{row}') !== null", 15000)
        assert browser.eval("location.search") == "?state=done&model=test-slow"
        # By creation date (UTC): nothing from tomorrow on; the job on the day it was created.
        day = job.created_at.date()
        set_date(browser, "from", (day + timedelta(days=1)).isoformat())
        browser.wait_for(f"!document.querySelector('{row}') && document.querySelector('#jobs tr.empty') !== null", 15000)
        set_date(browser, "from", day.isoformat())
        set_date(browser, "to", day.isoformat())
        browser.wait_for(f"document.querySelector('{row}') !== null", 15000)
        assert browser.eval("window.__sameDocument === true")

        # The job page: preview drawn by the node, with the detection where the finding is.
        browser.call("click", selector=f'{row} a[href="/jobs/{job.id}"]')
        browser.wait_for("(() => { const i = document.getElementById('preview'); return i && i.complete && i.naturalWidth > 0; })()", 30000)
        assert browser.eval("document.getElementById('job-state').textContent") == "done"
        natural = browser.eval("document.getElementById('preview').naturalWidth")
        box = browser.call("box", selector="#preview")
        shot = np.asarray(Image.open(browser.screenshot(shots / "2-job.png")).convert("RGB"))
        x0, y0 = round(box["x"]), round(box["y"])
        region = shot[y0 : y0 + round(box["height"]), x0 : x0 + round(box["width"])]
        red = box_colour(region)
        (finding,) = job.summary["findings"]
        c0, r0, c1, r1 = finding["bbox_2d"]
        assert natural == 512  # the 64-pixel slice enlarged to the preview size
        scale = box["width"] / 64  # image pixels -> screen pixels
        left, top, right, bottom = c0 * scale, r0 * scale, (c1 + 1) * scale, (r1 + 1) * scale
        t = np.linspace(0.1, 0.9, 30)
        edges = np.concatenate([
            np.stack([left + (right - left) * t, np.full(30, top)], 1),
            np.stack([left + (right - left) * t, np.full(30, bottom)], 1),
            np.stack([np.full(30, left), top + (bottom - top) * t], 1),
            np.stack([np.full(30, right), top + (bottom - top) * t], 1),
        ])
        grown = np.zeros_like(red)
        ys, xs = np.nonzero(red)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                grown[np.clip(ys + dy, 0, red.shape[0] - 1), np.clip(xs + dx, 0, red.shape[1] - 1)] = True
        on_edges = grown[np.clip(edges[:, 1].astype(int), 0, red.shape[0] - 1), np.clip(edges[:, 0].astype(int), 0, red.shape[1] - 1)].mean()
        assert on_edges > 0.95, f"detection box not drawn where the finding is (box colour on {on_edges:.0%} of its edge)"
        inner = red[int(top + 4 * scale / 2) : int(bottom - 4 * scale / 2), int(left + 4 * scale / 2) : int(right - 4 * scale / 2)]
        assert inner.size and inner.mean() < 0.02, "the box is filled, not outlined"
        assert red.sum() < 0.1 * red.size, "box colour all over the preview"
        preview = requests.get(f"{base}/api/jobs/{job.id}/preview.png", auth=(USER, PASSWORD), timeout=30)
        assert preview.headers["x-preview"] == "image" and preview.content[:8] == b"\x89PNG\r\n\x1a\n"

        # Outputs with their UIDs, and the delivery.
        outputs = browser.call("text", selector="#outputs")[0]
        for output in env.outputs(job.id):
            if output.kind in ("sr", "seg"):
                assert output.sop_instance_uid in outputs
        deliveries = browser.call("text", selector="#deliveries")[0]
        assert "pacs" in deliveries and "done" in deliveries
        # Everything the pages loaded came from the node itself (no CDN).
        resources = browser.eval("performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(base + "/") for r in resources), resources
        # So do the API docs: the node's own Swagger UI renders the schema under its CSP.
        browser.goto(base + "/api/docs")
        browser.wait(".swagger-ui .info .title", 30000)
        assert browser.eval("document.querySelectorAll('.opblock').length") > 5
        resources = browser.eval("performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(base + "/") for r in resources), resources
        browser.goto(f"{base}/jobs/{job.id}")
        browser.wait("#open-ohif")

        # "Open in OHIF" opens the viewer on this study, with our SR and SEG next to the CT.
        href = browser.eval("document.getElementById('open-ohif').href")
        assert href == f"{ohif.url}/viewer?StudyInstanceUIDs={study_uid}"
        opened = browser.call("click_popup", selector="#open-ohif")
        assert opened.startswith(ohif.url)
        browser.wait_for(
            f"(() => {{ try {{ return {VIEWPORT}.getImageIds().length === 8; }} catch (e) {{ return false; }} }})()", 120000
        )
        browser.wait_for("document.querySelectorAll('[data-cy=\"study-browser-thumbnail-no-image\"]').length >= 2", 60000)
        canvas = browser.call("box", selector=".cornerstone-canvas, canvas")
        viewer = np.asarray(Image.open(browser.screenshot(shots / "3-ohif.png")).convert("L"), dtype=np.float32)
        cx, cy = round(canvas["x"]), round(canvas["y"])
        pixels = viewer[cy : cy + round(canvas["height"]), cx : cx + round(canvas["width"])]
        assert pixels.size and pixels.std() > 10, "the OHIF viewport shows no image"
    finally:
        ohif.stop()
        env.stop()


def test_cancel_and_retry_from_the_job_page(
    tmp_path: Path, database_url: str, redis_server: RedisServer, browser: Browser
) -> None:
    env = make_env(tmp_path, database_url, redis_server, seconds=6.0)
    try:
        base = start(env)
        env.send(ct_series(tmp_path / "study", slices=8, size=64))
        env.add_worker()
        (job,) = env.wait_for_jobs(1)
        env.wait_for_state(job.id, JobState.RUNNING, timeout=60)

        browser.goto(f"{base}/jobs/{job.id}")
        browser.wait("#cancel")
        browser.eval("window.__sameDocument = true")
        browser.call("click", selector="#cancel")
        browser.wait_for("document.getElementById('job-state')?.textContent === 'cancelled'", 30000)
        assert env.job(job.id).state == JobState.CANCELLED.value
        browser.wait("#retry")
        browser.call("click", selector="#retry")
        browser.wait_for("document.getElementById('job-state')?.textContent === 'done'", 120000)
        assert browser.eval("window.__sameDocument === true"), "the job page reloaded instead of refreshing"
        done = env.job(job.id)
        assert done.state == JobState.DONE.value and done.attempts == 1, env.diagnostics()

        with env.db.session() as s:
            actions = [
                (e.actor, e.detail.get("action"), e.outcome)
                for e in s.scalars(select(AuditEvent).where(AuditEvent.event == "http-action", AuditEvent.job_id == job.id).order_by(AuditEvent.id))
            ]
        assert actions == [(USER, "cancel", "success"), (USER, "retry", "success")]

        # The same actions over the API: refused when not applicable, and from another site.
        auth = (USER, PASSWORD)
        r = requests.post(f"{base}/api/jobs/{job.id}/cancel", auth=auth, timeout=10)
        assert r.status_code == 409 and r.json()["applied"] is False
        r = requests.post(f"{base}/api/jobs/{job.id}/retry", auth=auth, headers={"Origin": "http://elsewhere.example"}, timeout=10)
        assert r.status_code == 403
        assert requests.post(f"{base}/api/jobs/{job.id}/retry", timeout=10).status_code == 401
        # A plain form post (no script) lands back on the job page.
        r = requests.post(f"{base}/api/jobs/{job.id}/cancel", auth=auth, headers={"Accept": "text/html"}, allow_redirects=False, timeout=10)
        assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job.id}"
        assert requests.post(f"{base}/api/jobs/nope/retry", auth=auth, timeout=10).status_code == 404
        assert env.job(job.id).state == JobState.DONE.value
    finally:
        env.stop()


def test_pages_need_credentials_and_ship_their_assets(tmp_path: Path, sqlite_url: str) -> None:
    env = make_env(tmp_path, sqlite_url, None, seconds=0.1, stable_seconds=120)
    try:
        base = start(env)
        for path in ("/", "/jobs/x", "/static/dashboard.js", "/api/jobs/x/preview.png", "/api/studies"):
            r = requests.get(base + path, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic "), path
        auth = (USER, PASSWORD)
        page = requests.get(base + "/", auth=auth, timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for asset in ("/static/dashboard.js", "/static/dashboard.css"):
            r = requests.get(base + asset, auth=auth, timeout=10)
            assert r.status_code == 200 and r.content and asset.split("/")[-1] in page.text
        assert requests.get(base + "/static/..%2Ftemplates%2Fbase.html", auth=auth, timeout=10).status_code == 404
        assert requests.get(base + "/jobs/nope", auth=auth, timeout=10).status_code == 404
        assert requests.get(base + "/api/jobs/nope/preview.png", auth=auth, timeout=10).status_code == 404
        # A study in its quiet period shows as "receiving" before it has a job.
        env.send(ct_series(tmp_path / "study", slices=3, size=32))
        (receiving,) = requests.get(base + "/api/studies", auth=auth, timeout=10).json()["receiving"]
        assert receiving["instances"] == 3
        page = requests.get(base + "/", auth=auth, timeout=10).text
        assert receiving["key"][:12] in page and "3 instance(s)" in page
        schema = requests.get(base + "/api/openapi.json", auth=auth, timeout=10).json()
        assert "/api/jobs/{job_id}/preview.png" in schema["paths"] and "/metrics" in schema["paths"]
    finally:
        env.stop()
