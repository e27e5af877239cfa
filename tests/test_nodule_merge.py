"""The detector's shape-aware suppression (``merge_objects``) on small hand-built images: the
extra peaks a large nodule gives on its rim are merged into it, while a nodule further along a
vessel that carries a better-scored candidate survives."""

from __future__ import annotations

import numpy as np

from workers.models.lung_nodules import merge_objects

SPACING = (1.0, 1.4, 1.4)
LUNG = -850.0


def image_and_mask(shape: tuple[int, int, int] = (80, 60, 60)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lung-density image, an all-lung mask, and each voxel's position in mm (K, R, C, 3)."""
    rng = np.random.default_rng(0)
    image = (LUNG + rng.normal(0, 15, shape)).astype(np.float32)
    grid = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING, strict=True)), indexing="ij"), axis=-1)
    return image, np.ones(shape, dtype=bool), grid


def voxel(mm: tuple[float, float, float]) -> list[int]:
    return [round(v / s) for v, s in zip(mm, SPACING, strict=True)]


def test_rim_peaks_of_a_large_part_solid_nodule_are_merged_into_it() -> None:
    image, mask, grid = image_and_mask()
    centre = np.array([40.0, 42.0, 42.0])
    dist = np.linalg.norm(grid - centre, axis=-1)
    # A 28 mm part-solid nodule: a solid core of 5 mm radius in a ground-glass ball of 12 mm
    # with a lobulation reaching out to 15 mm on one side.
    lobe = np.linalg.norm(grid - (centre + np.array([0.0, 0.0, 11.0])), axis=-1) <= 4.0
    image[(dist <= 12.0) | lobe] = -600.0
    image[dist <= 5.0] = 0.0
    points = np.array(
        [
            voxel(tuple(centre)),  # the nodule itself, found at the largest scale
            voxel(tuple(centre + np.array([0.0, 0.0, 14.0]))),  # on the lobulation, beyond the radius
            voxel(tuple(centre + np.array([11.5, 0.0, 0.0]))),  # on the ground-glass rim
            voxel(tuple(centre + np.array([0.0, -11.0, 0.0]))),
        ]
    )
    radius = np.array([13.86, 1.73, 1.73, 2.42])
    scores = np.array([0.99, 0.95, 0.9, 0.8])
    kept, _ = merge_objects(points, radius, scores, np.arange(4), image, mask, SPACING, LUNG)
    assert kept.tolist() == [0]


def test_a_nodule_along_a_vessel_survives_a_better_scored_vessel_candidate() -> None:
    image, mask, grid = image_and_mask((60, 60, 90))
    # A vessel of 1.5 mm radius running the whole width of the image along the column axis.
    axis_yz = np.array([30.0, 42.0])
    image[np.linalg.norm(grid[..., :2] - axis_yz, axis=-1) <= 1.5] = 40.0
    # 7 mm solid nodules touching the vessel 25 mm along it from the vessel candidate, and
    # 7 mm along it on the other side (within the candidate's reach, but a larger blob).
    far = np.array([30.0, 42.0 + 1.5 + 3.0, 80.0])
    near = np.array([30.0, 42.0 - 1.5 - 3.0, 48.0])
    for nodule in (far, near):
        image[np.linalg.norm(grid - nodule, axis=-1) <= 3.5] = 40.0
    points = np.array(
        [
            voxel((30.0, 42.0, 55.0)),  # on the vessel, scored best
            voxel((30.0, 42.0, 60.0)),  # the same vessel 5 mm on: a duplicate
            voxel(tuple(far)),
            voxel(tuple(near)),
        ]
    )
    radius = np.array([2.42, 1.73, 3.46, 3.46])
    scores = np.array([0.9, 0.7, 0.6, 0.5])
    kept, _ = merge_objects(points, radius, scores, np.arange(4), image, mask, SPACING, LUNG)
    assert kept.tolist() == [0, 2, 3]


def test_a_rim_peak_scored_above_the_centre_hands_its_score_to_the_central_candidate() -> None:
    image, mask, grid = image_and_mask()
    centre = np.array([40.0, 42.0, 42.0])
    image[np.linalg.norm(grid - centre, axis=-1) <= 5.0] = 30.0  # a 10 mm solid nodule
    points = np.array([voxel(tuple(centre + np.array([0.0, 0.0, 4.8]))), voxel(tuple(centre))])
    radius = np.array([1.73, 2.42])
    scores = np.array([0.98, 0.95])
    kept, merged = merge_objects(points, radius, scores, np.arange(2), image, mask, SPACING, LUNG)
    assert kept.tolist() == [1]
    assert merged[1] == 0.98
    assert scores.tolist() == [0.98, 0.95]  # the caller's scores are left alone
