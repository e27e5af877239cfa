"""A bundle's outputs as findings: boxes (detection) and label maps (segmentation), in the
node's terms (:class:`~workers.findings.Finding`: patient coordinates, source slices).

Geometry goes through :mod:`workers.models.bundle.orientation`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from workers.findings import (
    DIAMETER,
    MM,
    Finding,
    Measurement,
)
from workers.models.bundle.metadata import GENERIC, LabelCode
from workers.models.bundle.orientation import flip_lps_ras, image_to_lps, lps_to_source
from workers.models.measure import finding_from_mask, slice_volumes_mm3
from workers.volume import Volume

__all__ = ["GENERIC", "box_convention", "box_finding", "label_map_findings"]


def _target(item: Any) -> str:
    return str(item.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(item, dict) else ""


def box_convention(post_items: list[dict[str, Any]]) -> tuple[str, str]:
    """(box mode, space) of the boxes after a bundle's ``postprocessing`` items: space is
    ``image`` (voxels of the preprocessed image), ``lps`` or ``ras`` (world, per
    ``AffineBoxToWorldCoordinated`` and its ``affine_lps_to_ras``)."""
    mode, space = "xyzxyz", "image"
    for item in post_items:
        target = _target(item)
        if target == "AffineBoxToWorldCoordinated":
            space = "lps" if item.get("affine_lps_to_ras") is True else "ras"
        elif target == "AffineBoxToImageCoordinated":
            space = "image"
        elif target == "ConvertBoxModed":
            mode = str(item.get("dst_mode", mode))
        elif target == "ConvertBoxToStandardModed":
            mode = "xyzxyz"
    return mode, space


def box_finding(
    volume: Volume, image_affine: Any, box: np.ndarray, code: LabelCode, score: float, space: str
) -> Finding | None:
    """One ``xyzxyz`` box in ``space`` as a finding on ``volume``; None when its centre lies
    outside the stack. ``image_affine`` (RAS) is used for boxes in image space."""
    ends = np.stack([box[:3], box[3:]]).astype(np.float64)
    if space == "image":
        ends = image_to_lps(image_affine, ends)
    elif space == "ras":
        ends = flip_lps_ras(ends)
    centre = ends.mean(axis=0)
    half = np.abs(ends[1] - ends[0]) / 2  # LPS half-extents of the (world axis-aligned) box
    k, j, i = lps_to_source(volume, centre[None])[0]
    if not (-0.5 <= k <= volume.shape[0] - 0.5):
        return None
    key = int(np.clip(np.rint(k), 0, volume.shape[0] - 1))
    # The 2D box is the extent of the ellipsoid inscribed in the world box along the image
    # plane's row and column directions (its support function): on an oblique or tilted plane
    # an axis-aligned world box would otherwise grow by its depth.
    half_i = float(np.linalg.norm(volume.orientation[:3] * half)) / volume.pixel_spacing[1]
    half_j = float(np.linalg.norm(volume.orientation[3:] * half)) / volume.pixel_spacing[0]
    # Fractional index (voxel centres at integers) -> DICOM image coordinates (pixel (i, j)
    # spans [i, i + 1)), the Finding's 2D box convention.
    bbox = (i + 0.5 - half_i, j + 0.5 - half_j, i + 0.5 + half_i, j + 0.5 + half_j)
    diameter = 2 * max(half_i * volume.pixel_spacing[1], half_j * volume.pixel_spacing[0])
    volume_mm3 = float(np.pi / 6 * np.prod(2 * half))
    return Finding(
        label=code.concept,
        site=code.site,
        category=code.category,
        confidence=float(np.clip(score, 0.0, 1.0)),
        center_ijk=(float(k), float(j), float(i)),
        center_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        key_slice=key,
        bbox_2d=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])),
        diameter_mm=float(diameter),
        volume_mm3=volume_mm3,
        measurements=[Measurement(DIAMETER, round(float(np.cbrt(6.0 * volume_mm3 / np.pi)), 3), MM)],
    )


def label_map_findings(volume: Volume, source: np.ndarray, labels: dict[int, LabelCode]) -> list[Finding]:
    """A label map on the source slices as findings: one per label value present, carrying the
    label's mask (one SEG segment each), and, where the label's settings ask, one per connected
    component without a mask (SR findings only)."""
    voxel_mm3 = slice_volumes_mm3(volume)
    findings: list[Finding] = []
    for value in sorted(int(v) for v in np.unique(source) if v != 0):
        code = labels.get(value, GENERIC)
        mask = source == value
        whole = finding_from_mask(volume, mask, 1.0, label=code.concept, site=code.site)
        if whole is None:
            continue
        whole.category = code.category
        whole.measurements = []  # a label's region: its volume is the measurement
        findings.append(whole)
        if not code.per_component:
            continue
        components, _ = ndimage.label(mask)
        for n, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            comp = components[box] == n
            if float((comp.sum(axis=(1, 2)) * voxel_mm3[box[0]]).sum()) < code.min_volume_mm3:
                continue
            offset = (int(box[0].start), int(box[1].start), int(box[2].start))
            part = finding_from_mask(volume, comp, 1.0, label=code.concept, site=code.site, offset=offset)
            if part is not None:
                part.mask = None  # one SEG segment per label; components are SR findings
                findings.append(part)
    return findings
