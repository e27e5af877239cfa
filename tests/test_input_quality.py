"""Input quality control of the built-in lung-nodule detector (workers/models/quality.py): a
chest like the ones the weights were validated on passes; doubled noise, a field of view cut
through the lungs and a head CT end skipped with a patient-free reason; more findings above the
threshold than a chest holds is a failure signal, never a list cut short."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicom_node.cli import main
from dicom_node.errors import NoInputError
from workers.models import lungs, nodule_ops
from workers.models import quality as qc
from workers.models.lung_nodules import WEIGHTS, LungNoduleDetector
from workers.volume import Volume, load_series

# Inside the card's validated input (0.6-0.8 mm pixels, <= 1.25 mm slices, noise 15-35 HU), with
# fewer slices than the detector tests use (160 x 1.25 mm still holds whole lungs).
GEOMETRY = [
    "--slices",
    "160",
    "--matrix",
    "512",
    "--pixel-size",
    "0.7",
    "--thickness",
    "1.25",
    "--noise",
    "20",
    "--no-progress",
]


@dataclasses.dataclass
class Seen:
    """What the detector's quality control sees: the detection grid and its lung mask."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    quality: qc.InputQuality


class _Stop(Exception):
    def __init__(self, seen: Seen) -> None:
        super().__init__("seen")
        self.seen = seen


def seen_by(detector: LungNoduleDetector, volume: Volume) -> Seen:
    """The measures on the detector's own detection grid and lung mask (stops after them)."""

    def stop(
        image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], cranial: int
    ) -> None:
        quality = qc.measure(volume, mask, image, spacing, cranial=cranial)
        raise _Stop(Seen(image, mask, spacing, quality))

    with pytest.raises(_Stop) as caught:
        detector.candidates(volume, check=stop)
    return caught.value.seen


def quality_of(detector: LungNoduleDetector, volume: Volume) -> qc.InputQuality:
    return seen_by(detector, volume).quality


def ball(
    shape: tuple[int, ...],
    centre: tuple[float, float, float],
    spacing: tuple[float, float, float],
    radius_mm: float,
) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((k - centre[0]) * spacing[0]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2 + (
        (i - centre[2]) * spacing[2]
    ) ** 2 <= radius_mm**2


@pytest.fixture(scope="module")
def detector() -> LungNoduleDetector:
    if not WEIGHTS.is_file():
        pytest.fail(f"the detector's weights are missing ({WEIGHTS}); they ship with the package")
    return LungNoduleDetector(device="cpu")


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    out = tmp_path_factory.mktemp("qc") / "chest"
    assert main(["synth", str(out), *GEOMETRY, "--seed", "33", "--nodules", "4",
                 "--nodule-types", "solid,part-solid", "--min-size", "6", "--max-size", "14"]) == 0  # fmt: skip
    return load_series(sorted(out.glob("slice_*.dcm")))


def test_the_card_declares_the_validated_input(detector: LungNoduleDetector) -> None:
    validated = detector.validated
    assert validated.bounds["lung_noise_hu"][1] is not None
    assert validated.bounds["lung_volume_l"] == (1.5, 10.0)
    assert validated.max_findings == 20
    with pytest.raises(ValueError, match="not a measure"):
        qc.ValidatedRange.from_card({"validated_input": {"lung_noize_hu": [0, 1]}})


def test_a_chest_like_the_validated_ones_passes(
    detector: LungNoduleDetector, chest: Volume
) -> None:
    quality = quality_of(detector, chest)
    assert qc.check(quality, detector.validated) == [], quality
    assert 15.0 <= (quality.lung_noise_hu or 0) <= 25.0  # the phantom's noise is 20 HU
    assert 2.0 <= quality.lung_volume_l <= 9.0 and quality.lung_balance > 0.8
    assert quality.fov_edge_share == 0.0
    assert quality.airway_hu is not None and abs(quality.airway_hu + 1000) <= 30
    assert quality.slice_thickness_mm == 1.25 and quality.kernel == "LUNG"
    result = detector.predict(chest)
    assert "qualifier" not in result.extra and "qualifier" not in result.summary()
    assert result.extra["quality"]["findings_above_threshold"] == len(result.findings) <= 20
    assert result.extra["quality"]["lung_volume_l"] == pytest.approx(
        quality.lung_volume_l, abs=1e-3
    )


def test_doubled_noise_is_skipped_with_a_reason_naming_the_noise(
    detector: LungNoduleDetector, chest: Volume
) -> None:
    # Noise of the phantom's kind (white noise smoothed by [1, 2, 1] x [1, 2, 1] / 16, which keeps
    # 0.375 of its SD), sqrt(3) x 20 HU more: 40 HU in all.
    rng = np.random.default_rng(5)
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    white = rng.standard_normal(chest.array.shape).astype(np.float32) * np.float32(
        20 * np.sqrt(3) / 0.375
    )
    noisy = dataclasses.replace(
        chest, array=chest.array + ndimage.convolve(white, kernel[None], mode="wrap")
    )
    with pytest.raises(NoInputError) as caught:
        detector.predict(noisy)
    reason = str(caught.value)
    assert reason.startswith("input outside the validated range: ")
    match = re.search(r"lung noise ([\d.]+) HU > ([\d.]+) HU", reason)
    assert match and 35 < float(match.group(1)) <= 45, reason


def test_a_half_field_of_view_is_skipped_with_a_reason_naming_the_field_of_view(
    detector: LungNoduleDetector, chest: Volume
) -> None:
    """The middle half of the columns: both lungs cut at the image edge on every slice. The
    lung mask keeps them (they lie inside the body), and the QC says why they do not count."""
    cut = chest.shape[2] // 4
    row_dir = np.asarray(chest.orientation[:3], dtype=np.float64)
    cropped = dataclasses.replace(
        chest,
        array=np.ascontiguousarray(chest.array[:, :, cut : 3 * cut]),
        positions=chest.positions + cut * chest.pixel_spacing[1] * row_dir,
    )
    quality = quality_of(detector, cropped)
    assert quality.lung_volume_l >= 1.5 and quality.lung_balance > 0.5, quality
    assert quality.fov_edge_share_max > 0.1
    with pytest.raises(
        NoInputError,
        match=r"lung outline on the field-of-view edge (on one slice )?[\d.]+ > [\d.]+",
    ):
        detector.predict(cropped)


def test_a_head_ct_is_skipped_for_want_of_lungs(
    detector: LungNoduleDetector, real_ct: Path
) -> None:
    """The real tilted head CT (a non-chest CT): no lungs, so the job ends skipped with the
    lung volume as the reason (and no crash on tilt and uneven spacing)."""
    folder = real_ct / "ge-head-tilt"
    assert folder.is_dir(), f"ge-head-tilt not found under {real_ct}"
    with pytest.raises(NoInputError, match=r"lung volume 0\.00 L < 1\.50 L"):
        detector.predict(load_series(sorted(folder.glob("*.dcm"))))


def test_too_many_findings_are_a_failure_signal_not_a_cut(chest: Volume) -> None:
    """At threshold 0 every candidate is a finding: skipped with the count, not cut to 20."""
    with pytest.raises(NoInputError) as caught:
        LungNoduleDetector(device="cpu", threshold=0.0).predict(chest)
    match = re.search(
        r"(\d+) findings above the threshold, more than a chest holds \(at most 20\)",
        str(caught.value),
    )
    assert match and int(match.group(1)) > 20, str(caught.value)


@pytest.mark.slow
def test_qualify_writes_every_finding_with_the_qualifier(chest: Volume) -> None:
    """With ``outside_range = "qualify"`` the findings are all written, and the result says why
    they are qualified (in its summary, which the job record keeps)."""
    skip = LungNoduleDetector(device="cpu", options={"max_findings": 1})
    with pytest.raises(
        NoInputError,
        match=r"\d+ findings above the threshold, more than a chest holds \(at most 1\)",
    ):
        skip.predict(chest)
    qualify = LungNoduleDetector(
        device="cpu", options={"max_findings": 1, "outside_range": "qualify"}
    )
    result = qualify.predict(chest)
    assert len(result.findings) >= 2
    assert f"{len(result.findings)} findings above the threshold" in result.summary()["qualifier"]
    with pytest.raises(ValueError, match="outside_range"):
        LungNoduleDetector(device="cpu", options={"outside_range": "ignore"})


def test_a_mass_at_the_pleura_stays_inside_the_lung_mask(
    detector: LungNoduleDetector, chest: Volume
) -> None:
    """A 40 mm soft-tissue mass on the lateral pleura of the right lung: the lung mask takes it in
    (a convex-hull fill of dents on the chest-wall side), so it can be found; without that fill
    the mask leaves the mass out."""
    before = seen_by(detector, chest)
    k = int(np.median(np.flatnonzero(before.mask.any(axis=(1, 2)))))
    col = int(np.flatnonzero(before.mask[k].any(axis=0))[0])  # the lateral pleura of the right lung
    row = int(np.flatnonzero(before.mask[k][:, col]).mean())
    f = round(before.spacing[1] / chest.pixel_spacing[0])  # detection grid -> source pixels
    source_centre = (k, f * row + (f - 1) / 2, f * col + (f - 1) / 2)
    array = chest.array.copy()
    array[ball(array.shape, source_centre, chest.spacing, 20.0)] = 40.0
    after = seen_by(detector, dataclasses.replace(chest, array=array))
    was_lung = ball(before.mask.shape, (k, row, col), before.spacing, 19.0) & before.mask
    assert was_lung.sum() > 1000
    assert (after.mask & was_lung).sum() >= 0.85 * was_lung.sum()
    coarse = nodule_ops.pool_inplane(torch.from_numpy(after.image), 2).numpy()
    plain, _ = lungs.lung_mask(
        after.image, coarse, after.spacing, 2, closing_mm=12.0, cranial=1, pleural=False
    )
    assert (plain & was_lung).sum() <= 0.2 * was_lung.sum()


def test_gas_below_the_lungs_is_not_lung(detector: LungNoduleDetector, chest: Volume) -> None:
    """40 abdominal slices added below the chest with a 50 mm gas bubble (65 mL, the stomach's)
    under the left lung: not in the lung mask (it would be without the direction rule)."""
    pad = 40
    step = chest.positions[1] - chest.positions[0]
    below = np.repeat(chest.array[:1], pad, axis=0)  # the phantom's lowest slice: soft tissue
    before = seen_by(detector, chest).mask
    cols = np.flatnonzero(before[before.shape[0] // 2].any(axis=0))
    rows = np.flatnonzero(before[before.shape[0] // 2].any(axis=1))
    f = chest.shape[2] // before.shape[2]
    centre = (pad / 2, f * rows.mean(), f * (cols[-1] - (cols[-1] - cols[0]) / 4))
    below[ball(below.shape, centre, chest.spacing, 25.0)] = -1000.0
    longer = dataclasses.replace(
        chest,
        array=np.concatenate([below, chest.array]),
        positions=np.concatenate(
            [chest.positions[0] - step * np.arange(pad, 0, -1)[:, None], chest.positions]
        ),
        slices=chest.slices[:1] * pad + chest.slices,
        headers=chest.headers[:1] * pad + chest.headers,
    )
    seen = seen_by(detector, longer)
    assert not seen.mask[:pad].any()
    assert seen.quality.lung_volume_l == pytest.approx(
        quality_of(detector, chest).lung_volume_l, rel=0.02
    )
    coarse = nodule_ops.pool_inplane(torch.from_numpy(seen.image), 2).numpy()
    undirected, _ = lungs.lung_mask(
        seen.image, coarse, seen.spacing, 2, closing_mm=12.0, cranial=None
    )
    assert undirected[:pad].sum() * np.prod(seen.spacing) / 1000 > 30.0  # mL of gas
