"""Choosing the series of a study a model runs on, with a reason for every series left out.

The job pipeline calls :func:`select_series` with headers read from the spooled files (no
pixel data). The images that count are the ones the volume loader would load, in its order
(:func:`dicom_node.geometry.order_slices`: no localizers, non-image objects, unreadable planes
or stray orientations). A series qualifies when its modality is accepted, it has enough of
them, they are axial (gantry tilt is fine), thin enough, all of one matrix size, one image per
position, and not too many voxels. Among those that qualify the choice is,
in order: a preferred reconstruction kernel (e.g. a lung kernel), thinner slices, more slices.

Reasons name only technical properties (modality, counts, millimetres, kernels), never
patient data.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.geometry import LOCALIZER, is_non_image, order_slices
from workers.models.base import InputRequirements

AXIAL_MAX_ANGLE_DEG = 45.0
"""A series is axial when its slice normal is within this angle of the patient's z axis."""


@dataclass
class SeriesSummary:
    """What selection learned about one series (no patient data)."""

    series_instance_uid: str
    modality: str
    images: int
    """Cross-sectional images (frames of multi-frame instances counted one by one)."""
    slice_thickness_mm: float | None
    kernel: str | None
    preferred_kernel: bool = False
    reason: str | None = None
    """Why the series does not qualify; None when it does."""

    def to_json(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "images": self.images,
            "slice_thickness_mm": self.slice_thickness_mm,
            "kernel": self.kernel,
            "preferred_kernel": self.preferred_kernel,
            "reason": self.reason,
        }


@dataclass
class SelectionResult:
    """The chosen series (or None) and why each other series was not chosen."""

    series_instance_uid: str | None
    reasons: dict[str, str] = field(default_factory=dict)
    """Series UID -> reason, for every series not chosen (qualifying ones too: 'ranked lower')."""
    summaries: list[SeriesSummary] = field(default_factory=list)

    def reason(self) -> str:
        """One line for the job record when nothing qualifies (or '' when a series was chosen)."""
        if self.series_instance_uid is not None:
            return ""
        if not self.reasons:
            return "the study has no series"
        counts = Counter(self.reasons.values())
        parts = [f"{r}" if n == 1 else f"{r} (x{n})" for r, n in counts.most_common()]
        return "no series qualifies: " + "; ".join(parts)

    def reasons_by_series(self) -> dict[str, str]:
        """Series UID -> why it was not chosen (for the job summary)."""
        return dict(self.reasons)


def _kernel(ds: Dataset) -> str | None:
    value = ds.get("ConvolutionKernel")
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        return "\\".join(str(v) for v in value)
    return str(value)


def summarise(uid: str, headers: list[Dataset], req: InputRequirements) -> SeriesSummary:
    """Check one series against ``req``; ``reason`` is set when it does not qualify."""
    modality = str(headers[0].get("Modality", "") or "") if headers else ""
    summary = SeriesSummary(uid, modality, 0, None, None)
    if not headers:
        summary.reason = "empty series"
        return summary
    modalities = {str(h.get("Modality", "") or "").upper() for h in headers}
    accepted = {m.upper() for m in req.modalities}
    if not modalities & accepted:
        summary.reason = f"modality {'/'.join(sorted(modalities)) or 'missing'} is not {'/'.join(sorted(accepted))}"
        return summary
    images = [h for h in headers if not is_non_image(h)]
    if not images:
        summary.reason = "no images (only SR/SEG/presentation or other non-image objects)"
        return summary
    order = order_slices(headers)
    slices = order.slices
    if not slices:
        localizers = order.count(LOCALIZER)
        summary.reason = (
            "only localizer/scout images" if localizers else "images lack position/orientation"
        )
        return summary
    kernels = Counter(k for k in (_kernel(h) for h in images) if k)
    summary.kernel = kernels.most_common(1)[0][0] if kernels else None
    summary.preferred_kernel = bool(
        summary.kernel
        and any(re.search(p, summary.kernel, re.IGNORECASE) for p in req.preferred_kernels)
    )
    summary.images = len(slices)
    normal = order.normal
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if req.axial_only and angle > AXIAL_MAX_ANGLE_DEG:
        plane = "sagittal" if abs(normal[0]) > abs(normal[1]) else "coronal"
        summary.reason = f"not axial ({plane}, {angle:.0f} degrees from axial)"
        return summary
    if len(slices) < req.min_slices:
        summary.reason = f"only {len(slices)} slice(s), at least {req.min_slices} needed"
        return summary
    if order.shared_positions:
        summary.reason = (
            f"{order.shared_positions} position(s) hold more than one image (several phases?)"
        )
        return summary
    gaps = np.diff(order.offsets)
    thicknesses = [f.thickness for f in slices if f.thickness]
    thickness = (
        float(np.median(thicknesses))
        if thicknesses
        else (float(np.median(gaps)) if gaps.size else None)
    )
    summary.slice_thickness_mm = round(thickness, 3) if thickness is not None else None
    max_thickness = req.max_slice_thickness_mm
    if max_thickness is not None and thickness is not None and thickness > max_thickness + 1e-6:
        summary.reason = f"slices {thickness:.2g} mm thick, at most {max_thickness:g} mm accepted"
        return summary
    # Matrix size and voxels of what the loader would load (a localizer's matrix does not count).
    sizes = {(f.rows, f.columns) for f in slices}
    if len(sizes) != 1:
        summary.reason = f"{len(sizes)} different matrix sizes in one series"
        return summary
    rows, cols = sizes.pop()
    voxels = len(slices) * rows * cols
    if voxels > req.max_voxels:
        summary.reason = f"too large: {voxels} voxels, at most {req.max_voxels}"
        return summary
    return summary


def select_series(
    series_headers: dict[str, list[Dataset]], req: InputRequirements
) -> SelectionResult:
    """Choose the series a model with requirements ``req`` should run on.

    ``series_headers`` maps SeriesInstanceUID to that series' headers (pixel data not needed).
    """
    summaries = [summarise(uid, headers, req) for uid, headers in series_headers.items()]
    qualifying = [s for s in summaries if s.reason is None]
    qualifying.sort(
        key=lambda s: (
            not s.preferred_kernel,
            s.slice_thickness_mm if s.slice_thickness_mm is not None else math.inf,
            -s.images,
            s.series_instance_uid,
        )
    )
    chosen = qualifying[0].series_instance_uid if qualifying else None
    reasons = {s.series_instance_uid: s.reason for s in summaries if s.reason is not None}
    for s in qualifying[1:]:
        assert chosen is not None
        reasons[s.series_instance_uid] = (
            "qualifies but ranked lower (kernel, thickness, slice count)"
        )
    return SelectionResult(chosen, reasons, summaries)
