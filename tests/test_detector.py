"""The built-in lung-nodule detector on small generated phantoms: it finds the nodules (LUNA16
hit criterion), reports nothing on a nodule-free chest, measures what it finds, maps results
to the source slices of an unevenly spaced series, and refuses tampered weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dicom_node.cli import main
from dicom_node.errors import ModelLoadError
from workers.evaluate import _assign
from workers.models.lung_nodules import WEIGHTS, LungNoduleDetector
from workers.volume import Volume, load_series

# A chest of the size the detector is made for (issue 5's benchmark geometry, 200 of its >= 200
# slices): 512 x 512 at 0.7 mm, 1.25 mm slices. Much shorter volumes squeeze the phantom's
# anatomy (lungs and vessel trees scale with the z extent) into something no scan looks like.
GEOMETRY = ["--slices", "200", "--matrix", "512", "--pixel-size", "0.7", "--thickness", "1.25", "--noise", "20", "--no-progress"]


def synth(out: Path, *args: str) -> Path:
    assert main(["synth", str(out), *GEOMETRY, *args]) == 0
    return out


@pytest.fixture(scope="module")
def detector() -> LungNoduleDetector:
    if not WEIGHTS.is_file():
        pytest.fail(f"the detector's weights are missing ({WEIGHTS}); they ship with the package")
    return LungNoduleDetector(device="cpu")


@pytest.fixture(scope="module")
def nodule_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth(tmp_path_factory.mktemp("ph") / "nodules", "--seed", "31", "--nodules", "4",
                 "--nodule-types", "solid,part-solid,juxtapleural", "--min-size", "6", "--max-size", "16")  # fmt: skip


def truth_of(folder: Path) -> list[dict]:
    return json.loads((folder / "truth.json").read_text())["nodules"]


def centre_index(volume: Volume, centre_mm: list[float]) -> tuple[int, int, int]:
    k, j, i = volume.patient_to_index(*centre_mm)
    return round(k), round(j), round(i)


def test_finds_the_nodules_of_a_small_phantom(detector: LungNoduleDetector, nodule_phantom: Path) -> None:
    volume = load_series(sorted(nodule_phantom.glob("slice_*.dcm")))
    truth = truth_of(nodule_phantom)
    assert len(truth) == 4
    result = detector.predict(volume)
    centres = np.array([f.center_mm for f in result.findings]).reshape(-1, 3)
    hits = _assign(centres, truth)
    # The benchmark measures sensitivity over 20 scans; on one scan: all but at most one nodule,
    # and at most one false positive.
    found = set(hits[hits >= 0].tolist())
    assert len(found) >= len(truth) - 1, (truth, [f.summary() for f in result.findings])
    assert int((hits < 0).sum()) <= 1, [f.summary() for f in result.findings]
    assert [f.confidence for f in result.findings] == sorted((f.confidence for f in result.findings), reverse=True)
    for finding, hit in zip(result.findings, hits, strict=True):
        assert finding.mask is not None and finding.mask.shape == volume.shape
        if hit < 0:
            continue
        nodule = truth[hit]
        k, j, i = centre_index(volume, nodule["center_mm"])
        # The mask covers the nodule's centre and the key slice cuts through the nodule.
        assert finding.mask[k, j, i]
        assert finding.mask[finding.key_slice].any()
        z_key = volume.positions[finding.key_slice][2]
        assert abs(z_key - nodule["center_mm"][2]) <= nodule["diameter_mm"] / 2
        # Long axis and volume of the right order (a mask at a density threshold, not the truth's sphere).
        assert 0.6 * nodule["diameter_mm"] <= finding.diameter_mm <= 1.8 * nodule["long_axis_mm"] + 2
        assert 0.3 * nodule["volume_mm3"] <= finding.volume_mm3 <= 3.0 * nodule["volume_mm3"] + 50
        left, top, right, bottom = finding.bbox_2d
        rows, cols = np.nonzero(finding.mask[finding.key_slice])
        assert (left, top, right, bottom) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        if nodule["type"] in ("solid", "juxtapleural"):
            assert finding.kind == "solid"
        assert finding.label.meaning == "Nodule" and finding.site is not None and finding.site.meaning == "Lung"
    assert result.extra["candidates"], "the scored candidates for the FROC are listed"


def test_no_finding_on_a_nodule_free_phantom(detector: LungNoduleDetector, tmp_path: Path) -> None:
    folder = synth(tmp_path / "clean", "--seed", "32", "--no-nodules")
    result = detector.predict(load_series(sorted(folder.glob("slice_*.dcm"))))
    assert result.findings == [], [f.summary() for f in result.findings]
    assert not result.positive


def test_uneven_spacing_maps_results_to_source_slices(detector: LungNoduleDetector, nodule_phantom: Path) -> None:
    """Every fifth slice missing: the detector resamples to an even grid, and masks and key
    slices come back on the source slices that show the nodule."""
    paths = sorted(nodule_phantom.glob("slice_*.dcm"))
    kept = [p for n, p in enumerate(paths) if n % 5 != 2]
    volume = load_series(kept)
    assert not volume.uniform
    truth = truth_of(nodule_phantom)
    result = detector.predict(volume)
    hits = _assign(np.array([f.center_mm for f in result.findings]).reshape(-1, 3), truth)
    assert len(set(hits[hits >= 0].tolist())) >= len(truth) - 1
    for finding, hit in zip(result.findings, hits, strict=True):
        if hit < 0:
            continue
        assert finding.mask is not None and finding.mask.shape == volume.shape
        nodule = truth[hit]
        slices = np.flatnonzero(finding.mask.any(axis=(1, 2)))
        z = volume.positions[slices, 2]
        # Every slice the mask is on lies within the nodule (plus one slice gap).
        assert np.all(np.abs(z - nodule["center_mm"][2]) <= nodule["long_axis_mm"] / 2 + 2.5)


def test_identity_says_reference_detector(detector: LungNoduleDetector) -> None:
    info = detector.info
    assert info.name == "lung-nodules"
    assert "Not a medical device" in info.description
    card = json.loads(WEIGHTS.read_text())
    assert info.weights_sha256 == card["sha256"]
    assert card["version"] in info.version
    import workers.models.lung_nodules as module

    assert "not a cleared medical device" in (module.__doc__ or "")


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    card = json.loads(WEIGHTS.read_text())
    shutil.copy(WEIGHTS, tmp_path / WEIGHTS.name)
    data = bytearray((WEIGHTS.parent / card["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / card["file"]).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="refusing to load"):
        LungNoduleDetector(weights=tmp_path / WEIGHTS.name)


def test_ensemble_weights_average_the_stage2_logits(tmp_path: Path) -> None:
    """A card whose stage 2 is a list of CNNs loads all of them, and a patch's score is the
    sigmoid of their mean logit (over the test-time views too)."""
    import hashlib

    import torch

    from workers.models.lung_nodules import FEATURE_NAMES
    from workers.models.nodule_classifier import PATCH, FeatureMlp, FpReducer, PatchCnn

    n = len(FEATURE_NAMES)
    torch.manual_seed(7)
    stage1, members = FeatureMlp(n), [PatchCnn(n), PatchCnn(n)]
    pt = tmp_path / "fp.pt"
    torch.save({"stage1": stage1.state_dict(), "stage2": [m.state_dict() for m in members]}, pt)
    card = {"file": pt.name, "sha256": hashlib.sha256(pt.read_bytes()).hexdigest(), "features": list(FEATURE_NAMES), "views": 2}
    (tmp_path / "fp.json").write_text(json.dumps(card))

    reducer = FpReducer.load(tmp_path / "fp.json")
    assert len(reducer.stage2) == 2
    patches = torch.rand(3, 2, PATCH, PATCH, PATCH)
    features = np.random.default_rng(0).normal(size=(3, n))
    f = torch.from_numpy(features.astype(np.float32))
    with torch.no_grad():
        logits = [m.eval()(view, f) for m in members for view in (patches, patches.flip(2))]
    expected = torch.sigmoid(torch.stack(logits).mean(0)).numpy()
    assert np.allclose(reducer.stage2_scores(patches, features), expected, atol=1e-6)
    # Either member alone scores differently: the second model really takes part.
    alone = FpReducer(reducer.stage1, reducer.stage2[:1], FEATURE_NAMES, card={"views": 2})
    assert not np.allclose(alone.stage2_scores(patches, features), expected, atol=1e-4)


def test_a_mixed_ensemble_gives_its_plain_members_the_candidate_scale_channels_only(tmp_path: Path) -> None:
    """A card naming each member's channels (``stage2_channels``) loads a member without context
    next to one with it; the plain member scores the first two channels of the 4-channel patches,
    and a card whose channels do not fit its weights is refused."""
    import hashlib

    import torch

    from workers.models.lung_nodules import FEATURE_NAMES
    from workers.models.nodule_classifier import PATCH, FeatureMlp, FpReducer, PatchCnn

    n = len(FEATURE_NAMES)
    torch.manual_seed(11)
    stage1, plain, wide = FeatureMlp(n), PatchCnn(n, channels=2), PatchCnn(n, channels=4)
    pt = tmp_path / "fp.pt"
    torch.save({"stage1": stage1.state_dict(), "stage2": [plain.state_dict(), wide.state_dict()]}, pt)
    card = {"file": pt.name, "sha256": hashlib.sha256(pt.read_bytes()).hexdigest(), "features": list(FEATURE_NAMES),
            "views": 1, "context": 2.0, "stage2_channels": [2, 4]}  # fmt: skip
    (tmp_path / "fp.json").write_text(json.dumps(card))

    reducer = FpReducer.load(tmp_path / "fp.json")
    assert [m.channels for m in reducer.stage2] == [2, 4] and reducer.context == 2.0
    patches = torch.rand(3, 4, PATCH, PATCH, PATCH)
    features = np.random.default_rng(1).normal(size=(3, n))
    f = torch.from_numpy(features.astype(np.float32))
    with torch.no_grad():
        expected = torch.sigmoid((plain.eval()(patches[:, :2], f) + wide.eval()(patches, f)) / 2).numpy()
    assert np.allclose(reducer.stage2_scores(patches, features), expected, atol=1e-6)

    # Every member with context, as a card without stage2_channels would say: refused, with reasons.
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in card.items() if k != "stage2_channels"}))
    with pytest.raises(ModelLoadError, match="do not match the card"):
        FpReducer.load(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text(json.dumps({**card, "stage2_channels": [4]}))
    with pytest.raises(ModelLoadError, match="stage2_channels"):
        FpReducer.load(tmp_path / "short.json")


def test_detect_misses_agrees_with_evaluate(detector: LungNoduleDetector, nodule_phantom: Path) -> None:
    """The development tool that says where nodules are lost reads the same candidates, scores
    and hits as ``dicom-node evaluate`` does."""
    from benchmarks.detect_misses import SUBSETS, study_fates
    from workers.evaluate import match, run_study

    fates, fp_scores = study_fates(detector, nodule_phantom, SUBSETS["all"])
    scan = run_study(nodule_phantom, detector)
    hits = match(scan)
    assert len(fates) == len(scan.nodules) == 4
    for k, fate in enumerate(fates):
        best = max((c.score for c, h in zip(scan.candidates, hits, strict=True) if h == k), default=None)
        assert (fate.score is None) == (best is None) == (fate.lost_at is not None), (fate, best)
        if best is not None:
            assert fate.score == pytest.approx(best, abs=1e-4)
    evaluated_fps = sorted(c.score for c, h in zip(scan.candidates, hits, strict=True) if h < 0)
    assert sorted(fp_scores) == pytest.approx(evaluated_fps, abs=1e-4)


def test_shape_features_tell_a_blob_from_a_tube_and_a_plate() -> None:
    """The research shape measures (workers.models.shape_features) on ideal shapes at the
    detection grid's spacing: a 8 mm sphere is a contained blob, a vessel-like tube runs out of
    two faces of its box, a fissure-like plate out of four."""
    from workers.models.shape_features import SHAPE_FEATURE_NAMES, shape_features

    spacing = (1.25, 1.4, 1.4)
    shape = (60, 60, 60)
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    cz, cy, cx = 30 * 1.25, 30 * 1.4, 30 * 1.4
    shapes = {
        "sphere": ((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 4.0**2, 4.0),
        "tube": ((y - cy) ** 2 + (x - cx) ** 2 <= 2.0**2, 2.4),
        "plate": (np.abs(z - cz) <= 1.0, 2.0),
    }
    got = {}
    for name, (solid, radius) in shapes.items():
        image = np.where(solid, 0.0, -850.0).astype(np.float32)
        f = shape_features(image, np.ones(shape, dtype=bool), spacing, np.array([[30, 30, 30]]), np.array([radius]), -850.0)
        got[name] = dict(zip(SHAPE_FEATURE_NAMES, f[0].tolist(), strict=True))
    assert got["sphere"]["blob"] > 0.8 and got["sphere"]["contained"] > 0.9 and got["sphere"]["faces"] == 0
    assert got["tube"]["tube"] > 0.8 and got["tube"]["blob"] < 0.2 and got["tube"]["faces"] == 2
    assert got["plate"]["plate"] > 0.8 and got["plate"]["faces"] == 4 and got["plate"]["flatness"] > 0.8
