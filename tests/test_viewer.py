"""OHIF 3.13 (prebuilt static build, served on loopback in front of a real Orthanc) shows our SEG
overlay and our TID 1500 SR measurement on the right slice of the source CT.

Assertions are made on screenshot pixels: the regions where the nodule must appear are
computed from the finding (image coordinates of the key slice -> patient coordinates -> the
viewport's own world-to-canvas transform), and compared with the same viewport before the SR
and SEG are loaded, so the test fails when an overlay is missing or misplaced. Screenshots are
kept in the test's temporary directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests import dicomgen
from tests.resultdata import detection, job_for, load_volume, sphere_finding
from tests.viewer.assets import ohif_dist, playwright_core
from tests.viewer.browser import Browser
from tests.viewer.serve_ohif import OhifServer
from workers.results import encode_results, write_results

pytestmark = [pytest.mark.viewer, pytest.mark.timeout(400)]

VIEWPORT = "window.cornerstone.getRenderingEngines()[0].getViewports()[0]"
SR_ITEM = '[data-cy="study-browser-thumbnail-no-image"][data-series="9001"]'
SEG_ITEM = '[data-cy="study-browser-thumbnail-no-image"][data-series="9002"]'


@pytest.fixture(scope="module")
def ohif_build() -> Path:
    playwright_core()
    return ohif_dist()


@pytest.fixture
def ohif(clean_orthanc, ohif_build: Path) -> Iterator[OhifServer]:
    server = OhifServer(ohif_build, clean_orthanc.url, *clean_orthanc.auth).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser(width=1400, height=900)
    try:
        yield b
    finally:
        b.close()


# -- pixels -----------------------------------------------------------------------------------


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def red_overlay(rgb: np.ndarray) -> np.ndarray:
    """Pixels tinted by the SEG's first segment colour (a saturated red over grey CT)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r - np.maximum(g, b)) > 40


def green_annotation(rgb: np.ndarray) -> np.ndarray:
    """Pixels of OHIF's (green) SR measurement graphics."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (g - np.maximum(r, b)) > 60


def near(mask: np.ndarray, pixels: int = 3) -> np.ndarray:
    """``mask`` grown by a few pixels: OHIF draws unconfirmed SR graphics with dashed lines."""
    return ndimage.binary_dilation(mask, iterations=pixels)


def _sample(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    xs = np.clip(np.round(points[:, 0]).astype(int), 0, mask.shape[1] - 1)
    ys = np.clip(np.round(points[:, 1]).astype(int), 0, mask.shape[0] - 1)
    return mask[ys, xs]


# -- the viewer -------------------------------------------------------------------------------


def _to_screen(browser: Browser, world: np.ndarray) -> np.ndarray:
    """Page (= screenshot) pixel coordinates of patient-space points, via the viewport itself."""
    pts = [[float(v) for v in p] for p in world]
    out = browser.eval(
        f"""(() => {{ const vp = {VIEWPORT}; const r = vp.canvas.getBoundingClientRect();
        return {pts}.map(p => {{ const c = vp.worldToCanvas(p); return [c[0] + r.left, c[1] + r.top]; }}); }})()"""
    )
    return np.asarray(out, dtype=np.float64)


def _show_slice(browser: Browser, sop_instance_uid: str) -> None:
    browser.eval(
        f"""(async () => {{ const vp = {VIEWPORT};
        const i = vp.getImageIds().findIndex(id => id.includes('/instances/{sop_instance_uid}/'));
        if (i < 0) throw new Error('image not in the viewport stack');
        await vp.setImageIdIndex(i); vp.render(); }})()"""
    )
    _wait_slice(browser, sop_instance_uid)


def _wait_slice(browser: Browser, sop_instance_uid: str, timeout_ms: int = 30000) -> None:
    browser.wait_for(f"(() => {{ try {{ return {VIEWPORT}.getCurrentImageId().includes('/instances/{sop_instance_uid}/'); }} catch (e) {{ return false; }} }})()", timeout_ms)


def _answer_prompt(browser: Browser, text: str, answer: str) -> None:
    """OHIF asks before tracking SR measurements / hydrating a SEG; answer it if it shows up."""
    try:
        browser.wait(f"text={text}", timeout_ms=15000)
    except Exception:  # the prompt is optional in OHIF; the pixel checks decide
        return
    browser.call("click", selector=f'button:text-is("{answer}")', ms=15000, timeout=30)


def _screenshot_until(browser: Browser, path: Path, ok: Callable[[np.ndarray], bool], seconds: float = 30) -> np.ndarray:
    """Screenshots until ``ok(rgb)`` or the time is up; returns the last one (also on failure)."""
    deadline = time.monotonic() + seconds
    while True:
        rgb = _rgb(browser.screenshot(path))
        if ok(rgb) or time.monotonic() > deadline:
            return rgb
        time.sleep(0.5)


def test_ohif_shows_seg_overlay_and_sr_measurement_on_the_key_slice(
    tmp_path: Path, clean_orthanc, ohif: OhifServer, browser: Browser
) -> None:
    # A generated CT study with one known nodule, encoded by the real encoders and stored in
    # Orthanc next to its source images.
    paths = dicomgen.ct_series(tmp_path / "ct", slices=12, size=128, pixel_spacing=1.0, slice_thickness=2.5)
    volume = load_volume(paths)
    finding = sphere_finding(volume, (8, 45, 80), 9.0)
    key = finding.key_slice
    key_uid = volume.slices[key].sop_instance_uid
    far = 0 if key > volume.shape[0] // 2 else volume.shape[0] - 1
    assert not finding.mask[far].any()  # a slice the nodule does not reach
    objects = encode_results(volume, detection(volume, [finding]), job_for(volume))
    assert [o.kind for o in objects] == ["sr", "seg"]
    clean_orthanc.upload([*paths, *write_results(objects, tmp_path / "results")])
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # Where the nodule must show: its mask on the key slice, and the SR box edges.
    jj, ii = np.nonzero(finding.mask[key])
    c0, r0, c1, r1 = finding.bbox_2d

    def world_at(k: int, points_ij: np.ndarray) -> np.ndarray:
        # image coordinates (column, row) of slice k, pixel centres at +0.5 -> patient mm
        return np.array([volume.index_to_patient(k, r - 0.5, c - 0.5) for c, r in points_ij])

    def world(points_ij: np.ndarray) -> np.ndarray:
        return world_at(key, points_ij)

    def box_edges(n: int = 40) -> np.ndarray:
        t = np.linspace(0.15, 0.85, n)
        left, right, top, bottom = c0, c1, r0, r1
        return np.concatenate([
            np.stack([left + (right - left) * t, np.full(n, top)], 1),
            np.stack([left + (right - left) * t, np.full(n, bottom)], 1),
            np.stack([np.full(n, left), top + (bottom - top) * t], 1),
            np.stack([np.full(n, right), top + (bottom - top) * t], 1),
        ])

    browser.goto(f"{ohif.url}/viewer?StudyInstanceUIDs={volume.study_instance_uid}")
    browser.wait_for(
        f"(() => {{ try {{ return {VIEWPORT}.getImageIds().length === {volume.shape[0]}; }} catch (e) {{ return false; }} }})()",
        120000,
    )
    browser.wait(SR_ITEM)
    browser.wait(SEG_ITEM)

    # 1. Baseline: the CT alone on the key slice. No overlay, no annotation where the nodule is.
    _show_slice(browser, key_uid)
    mask_px = _to_screen(browser, world(np.stack([ii + 0.5, jj + 0.5], 1)))
    edge_px = _to_screen(browser, world(box_edges()))
    # ring of points around the nodule (clearly outside mask and box) as the control region
    centre = mask_px.mean(axis=0)
    radius = np.abs(_to_screen(browser, world(np.array([[c1, r1]]))) - centre).max() * 2.5
    angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    ring_px = centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    before = _rgb(browser.screenshot(shots / "1-ct.png"))
    assert _sample(red_overlay(before), mask_px).mean() < 0.02
    assert _sample(near(green_annotation(before)), edge_px).mean() < 0.02

    # 2. The SR: OHIF jumps to the key slice and draws the box with its measurements.
    browser.call("dblclick", selector=SR_ITEM)
    _wait_slice(browser, key_uid)
    _answer_prompt(browser, "continue tracking measurements", "No")
    # the viewport may be rebuilt for the SR: map again with its own transform
    edge_px = _to_screen(browser, world(box_edges()))
    sr_shot = _screenshot_until(
        browser, shots / "2-sr.png", lambda rgb: _sample(near(green_annotation(rgb)), edge_px).mean() > 0.95
    )
    on_edges = _sample(near(green_annotation(sr_shot)), edge_px).mean()
    assert on_edges > 0.95, f"SR box not drawn where expected (green near {on_edges:.0%} of the edge points)"
    assert _sample(green_annotation(sr_shot), mask_px).mean() < 0.05  # an outline, not a fill
    assert _sample(green_annotation(sr_shot), ring_px).mean() < 0.2  # only the labels nearby
    labels = browser.eval("Array.from(document.querySelectorAll('svg text')).map(t => t.textContent).join(' ')")
    assert "Certainty of Finding" in labels and "Volume" in labels and "mm" in labels

    # 3. The SEG: hydrate it, then check slice by slice that the overlay covers the nodule's
    # mask where it has one (key slice and a smaller cross-section) and nothing where it has none.
    browser.call("dblclick", selector=SEG_ITEM)
    _answer_prompt(browser, "open this Segmentation", "Yes")
    browser.wait_for(f"(() => {{ try {{ return {VIEWPORT}.getImageIds().length === {volume.shape[0]}; }} catch (e) {{ return false; }} }})()")
    side = key - 2 if finding.mask[key - 2].any() else key + 2
    for k, name in ((key, "3-seg-key-slice"), (side, "4-seg-other-slice"), (far, "5-seg-far-slice"), (key, "6-seg-key-again")):
        _show_slice(browser, volume.slices[k].sop_instance_uid)
        jj_k, ii_k = np.nonzero(finding.mask[k])
        canvas = browser.eval(f"(() => {{ const r = {VIEWPORT}.canvas.getBoundingClientRect(); return {{x: r.left, y: r.top, width: r.width, height: r.height}}; }})()")
        x0, y0 = int(canvas["x"]), int(canvas["y"])
        assert canvas["width"] > 300 and canvas["height"] > 300
        if len(jj_k):
            inside_px = _to_screen(browser, world_at(k, np.stack([ii_k + 0.5, jj_k + 0.5], 1)))
            ring_k = inside_px.mean(axis=0) + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
            shot = _screenshot_until(browser, shots / f"{name}.png", lambda rgb, p=inside_px: _sample(red_overlay(rgb), p).mean() > 0.8)
            inside = _sample(red_overlay(shot), inside_px).mean()
            assert inside > 0.8, f"{name}: SEG overlay missing (red on {inside:.0%} of the nodule's pixels)"
            assert _sample(red_overlay(shot), ring_k).mean() < 0.02, f"{name}: overlay spills outside the nodule"
        else:
            time.sleep(1.0)  # give a stale overlay time to show up, if it were (wrongly) drawn
            shot = _rgb(browser.screenshot(shots / f"{name}.png"))
            region = shot[y0 : y0 + int(canvas["height"]), x0 : x0 + int(canvas["width"])]
            assert red_overlay(region).sum() < 20, f"{name}: overlay shown on a slice without the nodule"

    errors = [m["text"] for m in browser.console() if m["type"] == "pageerror"]
    assert not any("Unsupported GraphicType" in e or "Cannot read properties" in e for e in errors), errors
