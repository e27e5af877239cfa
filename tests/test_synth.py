"""``dicom-node synth``: phantoms that are reproducible, honour their options, carry truth that
matches the pixels, look like a chest CT (lungs, vessels, noise) and are valid DICOM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.cli import main
from dicom_node.synth import PhantomSpec, make_phantom

SMALL = ["--slices", "48", "--matrix", "192", "--pixel-size", "0.9", "--thickness", "1.25", "--no-progress"]


def synth(out: Path, *args: str) -> int:
    return main(["synth", str(out), *SMALL, *args])


def read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("slice_*.dcm"))]


def test_same_seed_same_series_other_seed_other_series(tmp_path: Path) -> None:
    assert synth(tmp_path / "a", "--seed", "5") == 0
    assert synth(tmp_path / "b", "--seed", "5") == 0
    assert synth(tmp_path / "c", "--seed", "6") == 0
    a, b, c = (read_series(tmp_path / n) for n in "abc")
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert all(x.PixelData == y.PixelData for x, y in zip(a, b, strict=True))
    assert (tmp_path / "a" / "truth.json").read_text() == (tmp_path / "b" / "truth.json").read_text()
    assert a[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert any(x.PixelData != y.PixelData for x, y in zip(a, c, strict=True))


def test_options_are_honoured(tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert main(
        ["synth", str(out), "--seed", "3", "--slices", "30", "--matrix", "160", "--pixel-size", "1.1", "--thickness", "2.5",
         "--nodules", "3", "--nodule-types", "ground-glass", "--min-size", "8", "--max-size", "10",
         "--patient-name", "TEST^NAME", "--no-progress"]
    ) == 0  # fmt: skip
    series = read_series(out)
    assert len(series) == 30
    first = series[0]
    assert (first.Rows, first.Columns) == (160, 160)
    assert [float(v) for v in first.PixelSpacing] == [1.1, 1.1]
    assert float(first.SliceThickness) == 2.5
    z = sorted(float(d.ImagePositionPatient[2]) for d in series)
    assert np.allclose(np.diff(z), 2.5)
    assert str(first.PatientName) == "TEST^NAME"
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["nodules"]) == 3
    assert {n["type"] for n in truth["nodules"]} == {"ground-glass"}
    assert all(8.0 <= n["diameter_mm"] <= 10.0 for n in truth["nodules"])
    assert truth["series_instance_uid"] == first.SeriesInstanceUID


def test_default_patient_is_clearly_synthetic_and_no_nodules_option(tmp_path: Path) -> None:
    assert synth(tmp_path / "p", "--no-nodules") == 0
    first = read_series(tmp_path / "p")[0]
    assert str(first.PatientName) == "SYNTH^PHANTOM"
    assert json.loads((tmp_path / "p" / "truth.json").read_text())["nodules"] == []


def test_refuses_to_mix_into_an_existing_phantom(tmp_path: Path) -> None:
    assert synth(tmp_path / "p", "--seed", "1") == 0
    assert synth(tmp_path / "p", "--seed", "2") == 2
    assert synth(tmp_path / "p", "--seed", "2", "--overwrite") == 0
    assert json.loads((tmp_path / "p" / "truth.json").read_text())["seed"] == 2


def test_count_writes_one_folder_per_seed(tmp_path: Path) -> None:
    assert synth(tmp_path, "--seed", "20", "--count", "2") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed-20", "seed-21"]


def test_truth_matches_the_pixels_and_the_chest_looks_like_a_chest() -> None:
    spec = PhantomSpec(seed=8, slices=80, matrix=256, pixel_spacing=0.75, slice_thickness=1.25, nodules=8, noise_hu=20.0)
    ph = make_phantom(spec)
    hu = ph.hu.astype(np.float32)
    assert hu.shape == (80, 256, 256)
    # Nodule cores: soft tissue for solid kinds, ground glass (denser than lung, far below soft
    # tissue) for ground-glass ones. The median over the inner 0.7 radius beats the noise and a
    # vessel that may run through the nodule.
    kk, jj, ii = np.meshgrid(
        ph.z_top - np.arange(80) * spec.slice_thickness,
        ph.y0 + np.arange(256) * spec.pixel_spacing,
        ph.x0 + np.arange(256) * spec.pixel_spacing,
        indexing="ij",
        sparse=True,
    )
    for n in ph.nodules:
        x, y, z = n.center_mm
        core = (kk - z) ** 2 + (jj - y) ** 2 + (ii - x) ** 2 <= (0.7 * n.diameter_mm / 2) ** 2
        centre = float(np.median(hu[core]))
        if n.type in ("solid", "juxtapleural"):
            assert centre > -150, (n.type, n.diameter_mm, centre)
        elif n.type == "ground-glass":
            assert -800 < centre < -350, (n.type, n.diameter_mm, centre)
        else:  # part-solid: ground glass with a solid core
            assert centre > -700, (n.type, n.diameter_mm, centre)
    # Lungs: a large region near -860 HU; noise close to what was asked for.
    lung = (hu > -950) & (hu < -750)
    assert lung.mean() > 0.08
    background = hu[lung]
    assert -900 < float(np.median(background)) < -790
    flat = hu[40, 5:25, 5:25]  # air outside the body: only noise there
    assert 12 < float(flat.std()) < 30
    # Vessels: tissue-density voxels inside the lung envelope, from thick to thin.
    assert ph.vessel_segments > 1000
    # Bone (ribs, spine) is present.
    assert (hu > 300).mean() > 0.001


def test_series_is_valid_dicom(tmp_path: Path) -> None:
    assert synth(tmp_path / "p", "--seed", "4", "--nodules", "2") == 0
    for path in sorted((tmp_path / "p").glob("slice_*.dcm"))[::16]:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], errors


@pytest.mark.parametrize("module", ["dicom_node.synth", "dicom_node.cli.synth"])
def test_synth_stays_on_the_edge(module: str) -> None:
    """The phantom generator is part of the edge: importing it must not pull in torch."""
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules or 'workers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="nodule types"):
        PhantomSpec(nodule_types=("spiculated",))
    with pytest.raises(ValueError, match="min_diameter"):
        PhantomSpec(min_diameter=10, max_diameter=5)


def _attached(ph, nodule: dict) -> bool:  # type: ignore[no-untyped-def]
    """Whether the dense (> -300 HU) object at a nodule's centre reaches well beyond the nodule:
    it is joined to a vessel (an isolated nodule is its own object)."""
    from scipy import ndimage

    g = ph.truth()["geometry"]
    px, dz = g["pixel_spacing_mm"], g["slice_thickness_mm"]
    x0, y0, z_top = g["first_position_mm"]
    x, y, z = nodule["center_mm"]
    centre = np.array([(z_top - z) / dz, (y - y0) / px, (x - x0) / px])
    reach = np.array([dz, px, px])
    half = np.ceil((nodule["long_axis_mm"] / 2 + 6.0) / reach).astype(int)
    lo = np.maximum(np.round(centre).astype(int) - half, 0)
    hi = np.minimum(np.round(centre).astype(int) + half + 1, ph.hu.shape)
    box = ph.hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > -300
    labels, _ = ndimage.label(box)
    own = labels[tuple(np.round(centre).astype(int) - lo)]
    if own == 0:
        return False
    voxel_mm3 = dz * px * px
    return float((labels == own).sum() * voxel_mm3) > 1.5 * nodule["volume_mm3"]


def test_juxtavascular_share_puts_nodules_against_vessels() -> None:
    """The training option: nodules moved to touch vessels of their calibre. The default (0)
    leaves the phantom exactly as before; the count of nodules is kept either way."""
    common = {"seed": 22, "slices": 160, "matrix": 448, "pixel_spacing": 0.75, "nodules": 8, "nodule_types": ("solid",)}
    natural = make_phantom(PhantomSpec(**common))
    assert np.array_equal(natural.hu, make_phantom(PhantomSpec(**common, juxtavascular=0.0)).hu)
    against = make_phantom(PhantomSpec(**common, juxtavascular=1.0))
    assert len(against.nodules) == len(natural.nodules) == 8
    natural_attached = [_attached(natural, n) for n in natural.truth()["nodules"]]
    attached = [_attached(against, n) for n in against.truth()["nodules"]]
    assert sum(attached) >= 7, attached
    assert sum(attached) > sum(natural_attached), (attached, natural_attached)
    with pytest.raises(ValueError, match="juxtavascular"):
        PhantomSpec(juxtavascular=1.5)


def test_vessel_landmarks_are_on_the_vessels_and_tell_branches_from_ends() -> None:
    """The branch points, bends and free ends the training uses as hard negatives: each thick
    one lies in vessel-dense pixels, and the children counts add up to the tree's segments."""
    ph = make_phantom(PhantomSpec(seed=8, slices=80, matrix=256, pixel_spacing=0.75, slice_thickness=1.25, nodules=0))
    marks = ph.vessel_landmarks
    assert marks.shape == (ph.vessel_segments, 5)
    children = marks[:, 4].astype(int)
    assert set(np.unique(children)) <= {0, 1, 2}
    assert (children == 2).sum() > 100 and (children == 0).sum() > 100
    # Every segment but the trunks starts where another one ends.
    trunks = 22  # at most 11 per hilum
    assert ph.vessel_segments - trunks <= int(children.sum()) <= ph.vessel_segments
    thick = marks[marks[:, 3] >= 2.0]
    assert len(thick) > 10
    k = np.rint((ph.z_top - thick[:, 2]) / ph.spec.slice_thickness).astype(int)
    j = np.rint((thick[:, 1] - ph.y0) / ph.spec.pixel_spacing).astype(int)
    i = np.rint((thick[:, 0] - ph.x0) / ph.spec.pixel_spacing).astype(int)
    inside = (k >= 0) & (k < ph.hu.shape[0])
    assert inside.sum() > 10
    centre_hu = ph.hu[k[inside], j[inside], i[inside]]
    assert np.median(centre_hu) > -200, np.median(centre_hu)
