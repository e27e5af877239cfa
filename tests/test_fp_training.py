"""The training script of the detector's false-positive reduction: jittered positive patches
stay on the nodule, differ from the plain patch, and leave the candidates untouched; context
channels show the same centre on a wider cube; hard negatives are the false candidates on thick
vessels' branch points and ends; the threshold keeps to the FP target and stays
above every score on the nodule-free chests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.train_fp_reduction import (
    CLEAN_MARGIN,
    JITTER_SCALE,
    JITTER_SHIFT,
    calibrate_threshold,
    clean_bound,
    hard_negatives,
    jittered_patches,
    main,
    phantom_volume,
)
from workers.grid import uniform_grid
from workers.models.lung_nodules import FEATURE_NAMES, Candidates, LungNoduleDetector
from workers.models.nodule_classifier import PATCH, PATCH_RADII, FeatureMlp, FpReducer, PatchCnn

RADIUS_MM = 5.0


def _one_nodule() -> Candidates:
    """A 5 mm-radius solid sphere in lung at 1 mm voxels, and the candidate at its centre."""
    shape = (48, 64, 64)
    k, j, i = np.indices(shape)
    hu = np.full(shape, -850.0, dtype=np.float32)
    hu[(k - 24) ** 2 + (j - 32) ** 2 + (i - 32) ** 2 <= RADIUS_MM**2] = 0.0
    geometry = {
        "pixel_spacing_mm": 1.0,
        "slice_thickness_mm": 1.0,
        "first_position_mm": [0.0, 0.0, 47.0],
    }
    volume = phantom_volume(hu, {"geometry": geometry})
    return Candidates(
        points=np.array([[24, 32, 32]]),
        features=np.zeros((1, 1), dtype=np.float32),
        radius_mm=np.array([RADIUS_MM]),
        offsets=np.zeros((1, 3)),
        centre_hu=np.array([0.0]),
        grid=uniform_grid(volume),
        factor=1,
        spacing=(1.0, 1.0, 1.0),
        mask=np.ones(shape, dtype=bool),
        lung_level=-850.0,
        timings={},
    )


def test_jittered_patches_move_around_the_nodule_and_leave_the_candidates_alone() -> None:
    detector = LungNoduleDetector(device="cpu")
    cands = _one_nodule()
    which = np.array([0])
    plain = detector.patches(cands, which)
    copies = jittered_patches(detector, cands, which, 6, np.random.default_rng(1))

    assert len(copies) == 6
    assert np.array_equal(cands.offsets, np.zeros((1, 3))) and cands.radius_mm[0] == RADIUS_MM
    # a patch is a cube of PATCH_RADII radii, so one radius is PATCH / PATCH_RADII samples
    samples_per_mm = PATCH / (PATCH_RADII * RADIUS_MM)
    centre = (PATCH - 1) / 2
    for patch in copies:
        assert patch.shape == plain.shape
        assert not np.allclose(patch.numpy(), plain.numpy())
        density = patch[0, 0].numpy()
        nodule = density > 0.5  # above -400 HU
        # the patch centre still lies on the nodule
        c = int(centre)
        assert nodule[c : c + 2, c : c + 2, c : c + 2].all()
        # and the nodule's centre of mass moved by no more than the largest shift (+ 1 sample
        # for the scale change and interpolation)
        offset = np.array(np.nonzero(nodule)).mean(axis=1) - centre
        limit = JITTER_SHIFT * np.sqrt(3) * RADIUS_MM * np.exp(JITTER_SCALE) * samples_per_mm + 1
        assert np.linalg.norm(offset) <= limit


# A validation FROC curve as ``workers.evaluate.froc`` gives it: thresholds falling, FP/scan rising.
CURVE = {"threshold": [0.99, 0.95, 0.9, 0.8, 0.6], "fps_per_scan": [0.0, 0.25, 0.5, 1.0, 3.0]}


def test_threshold_is_the_lowest_within_the_fp_target() -> None:
    assert calibrate_threshold(CURVE, 0.5) == (0.9, "0.5 FP/scan on the validation scans")
    assert calibrate_threshold(CURVE, 1.0, [])[0] == 0.8
    # a clean chest scoring below that threshold changes nothing
    assert calibrate_threshold(CURVE, 0.5, [0.7, 0.2])[0] == 0.9


def test_threshold_rises_above_the_highest_score_on_a_nodule_free_chest() -> None:
    threshold, rule = calibrate_threshold(CURVE, 0.5, [0.4, 0.93, 0.6])
    assert threshold == 0.93 + CLEAN_MARGIN and threshold > 0.93
    assert "nodule-free" in rule
    threshold, rule = calibrate_threshold(CURVE, 0.5, [0.995])
    assert threshold == 0.99 and "clamped" in rule


def test_a_clean_rate_lets_that_share_of_the_nodule_free_chests_keep_a_finding() -> None:
    """With 20 chests and a rate of 0.1, the two highest may stay above the threshold, which
    then clears the third; the rule says so. A rate too small to excuse one chest changes
    nothing."""
    clean = [0.5 + 0.02 * n for n in range(20)]  # 0.5 ... 0.88, highest last
    threshold, rule = calibrate_threshold(CURVE, 0.5, clean, clean_rate=0.1)
    assert threshold == 0.9  # the third highest (0.84) is below the FP-target threshold
    assert sum(c >= threshold for c in clean) == 0
    clean[-3:] = [0.97, 0.98, 0.96]
    threshold, rule = calibrate_threshold(CURVE, 0.5, clean, clean_rate=0.1)
    assert threshold == 0.96 + CLEAN_MARGIN
    assert sum(c >= threshold for c in clean) == 2
    assert "all but 2 of 20" in rule
    assert calibrate_threshold(CURVE, 0.5, clean, clean_rate=0.04)[0] == 0.98 + CLEAN_MARGIN
    assert clean_bound(clean, 0.05) == (0.97, 1)
    assert clean_bound([], 0.0) is None
    assert clean_bound([0.3], 0.5) == (0.3, 0)


def test_context_channels_see_the_same_centre_on_a_wider_cube(tmp_path: Path) -> None:
    """With ``context``, the patches get two channels from a cube that many times wider (the
    plain two unchanged), and a card saying so loads a CNN that takes them."""
    detector = LungNoduleDetector(device="cpu")
    cands = _one_nodule()
    which = np.array([0])
    plain = detector.patches(cands, which)
    wide = detector.patches(cands, which, context=2.0)
    assert wide.shape == (1, 4, PATCH, PATCH, PATCH)
    assert torch.equal(wide[:, :2], plain)
    on_plain = int((plain[0, 0] > 0.5).sum())
    on_wide = int((wide[0, 2] > 0.5).sum())
    # twice the side: the nodule fills about an eighth of the voxels it fills in the plain cube
    assert 0.05 * on_plain <= on_wide <= 0.3 * on_plain
    c = PATCH // 2
    assert bool((wide[0, 2, c - 1 : c + 1, c - 1 : c + 1, c - 1 : c + 1] > 0.5).all())

    n = len(FEATURE_NAMES)
    torch.manual_seed(3)
    pt = tmp_path / "fp.pt"
    torch.save(
        {"stage1": FeatureMlp(n).state_dict(), "stage2": PatchCnn(n, channels=4).state_dict()}, pt
    )
    card = {
        "file": pt.name,
        "sha256": hashlib.sha256(pt.read_bytes()).hexdigest(),
        "features": list(FEATURE_NAMES),
        "context": 2.0,
    }
    (tmp_path / "fp.json").write_text(json.dumps(card))
    reducer = FpReducer.load(tmp_path / "fp.json")
    assert reducer.context == 2.0
    scores = reducer.stage2_scores(wide, np.zeros((1, n)))
    assert scores.shape == (1,) and 0.0 < scores[0] < 1.0


def test_hard_negatives_are_the_false_candidates_on_thick_branch_points_and_ends() -> None:
    landmarks = np.array(
        [
            [0.0, 0.0, 0.0, 3.0, 2],  # thick branch point
            [50.0, 0.0, 0.0, 2.0, 0],  # thick free end
            [100.0, 0.0, 0.0, 3.0, 1],  # thick bend: not a hard spot
            [150.0, 0.0, 0.0, 0.5, 2],  # thin branch point
        ]
    )
    centres = np.array(
        [
            [6.0, 0.0, 0.0],  # its 4 mm sphere reaches the 3 mm branch point
            [0.0, 8.0, 0.0],  # its 4 mm sphere does not
            [50.0, 3.5, 0.0],  # its 2 mm sphere reaches the 2 mm end
            [100.0, 0.0, 0.0],  # on the bend
            [150.0, 2.0, 0.0],  # its sphere reaches the thin branch point: thin, so not hard
            [1.0, 1.0, 0.0],  # on the branch point, but it hits a nodule
        ]
    )
    radius = np.array([4.0, 4.0, 2.0, 4.0, 2.0, 4.0])
    hit = np.array([-1, -1, -1, -1, -1, 3])
    assert hard_negatives(centres, radius, hit, landmarks, 1.25).tolist() == [0, 2]
    assert hard_negatives(centres, radius, hit, landmarks, 0.4).tolist() == [0, 2, 4]
    assert hard_negatives(centres, radius * 0.5, hit, landmarks, 1.25).tolist() == []
    assert hard_negatives(centres, radius, hit, landmarks[:0], 1.25).tolist() == []


def test_plain_members_need_context_and_a_member_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--plain-members`` (ensemble members without the context channels) is refused before any
    work when no member would keep the context, or there is no context to leave out."""
    for args in (
        ["--ensemble", "2", "--plain-members", "1"],
        ["--context", "2", "--ensemble", "2", "--plain-members", "2"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--cache", str(tmp_path / "cache"), *args])
        assert exit_info.value.code == 2
        assert "--plain-members needs --context" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_a_clean_rate_outside_zero_to_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for rate in ("-0.1", "1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--cache", str(tmp_path / "cache"), "--clean-rate", rate])
        assert exit_info.value.code == 2
        assert "--clean-rate is a share" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
