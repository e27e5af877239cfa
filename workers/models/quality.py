"""Input quality control of the built-in lung-nodule detector: does its model card apply here?

The detector's figures were measured on a narrow kind of input (see the card's
``validated_input`` block, ``weights/lung_nodules_fp.json``). Before its result is believed,
:func:`measure` takes the measures that decide whether the figures can apply, on the image the
detector works on (the detection grid: uniform slices, about 1.4 mm pixels) and its lung mask:

* noise: a robust standard deviation (1.4826 x median absolute deviation) of a high-pass
  residual (the image minus its 3 x 3 in-plane mean, rescaled so that white noise reads true)
  in the air around the body (away from the body, the table and the field-of-view edge) and in
  the lung parenchyma (inside the eroded lung mask, below -600 HU so vessels do not count);
* calibration: the median HU of that outside air and of the trachea when found (air is -1000);
* the lungs: their volume (litres), the balance of left and right (the smaller over the larger:
  0 when a lung is missing), and the share of the lung outline on the edge of the field of
  view (in all, and on the worst slice): lungs cut by a small field of view;
* from the headers: slice thickness and spacing, pixel spacing, the convolution kernel and
  whether a contrast agent is named (recorded, not checked: the kernel acts through the noise,
  which is checked);
* the number of findings above the threshold (:func:`check_findings`): more than a chest holds
  is a failure signal, never a list cut short.

:func:`check` compares a measurement with a :class:`ValidatedRange` and gives one
patient-free reason per measure outside it (numbers and names of measures only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

from dicom_node.errors import NoInputError
from workers.models.lungs import PADDING_HU, body_hull
from workers.volume import Volume

SAMPLE_SLICES = 24
"""Noise and calibration are measured on this many slices spread over the lungs (enough for a
stable median, cheap on any scan)."""
AIR_MARGIN_MM = 10.0
"""Outside air counts this far from the body, the table and the field-of-view edge."""

MEASURES: dict[str, tuple[str, str, str]] = {
    # name -> (words in a reason, unit, format)
    "lung_noise_hu": ("lung noise", "HU", ".0f"),
    "air_noise_hu": ("air noise", "HU", ".0f"),
    "air_hu": ("outside air", "HU", ".0f"),
    "airway_hu": ("tracheal air", "HU", ".0f"),
    "lung_volume_l": ("lung volume", "L", ".2f"),
    "lung_balance": ("smaller/larger lung", "", ".2f"),
    "fov_edge_share": ("lung outline on the field-of-view edge", "", ".3f"),
    "fov_edge_share_max": ("lung outline on the field-of-view edge on one slice", "", ".2f"),
    "slice_thickness_mm": ("slice thickness", "mm", ".2f"),
    "slice_spacing_mm": ("slice spacing", "mm", ".2f"),
    "pixel_spacing_mm": ("pixel spacing", "mm", ".2f"),
}


@dataclass(frozen=True)
class InputQuality:
    """What :func:`measure` found (None where it could not be measured)."""

    lung_noise_hu: float | None
    air_noise_hu: float | None
    air_hu: float | None
    airway_hu: float | None
    lung_volume_l: float
    lung_balance: float
    fov_edge_share: float
    fov_edge_share_max: float
    slice_thickness_mm: float | None
    slice_spacing_mm: float
    pixel_spacing_mm: float
    kernel: str | None = None
    contrast_agent: bool | None = None
    findings_above_threshold: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Rounded, patient-free (for the job summary and logs)."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ValidatedRange:
    """The input range a model card declares as validated: per measure ``(low, high)``, either
    bound None when open, and the most findings above the threshold a chest plausibly holds."""

    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    max_findings: int = 20

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> ValidatedRange | None:
        """The card's ``validated_input`` block; None when it has none. Unknown measures are
        refused (a typo would silently check nothing)."""
        block = card.get("validated_input")
        if not block:
            return None
        bounds: dict[str, tuple[float | None, float | None]] = {}
        for name, value in block.items():
            if name in ("basis", "max_findings"):
                continue
            if name not in MEASURES or not isinstance(value, list) or len(value) != 2:
                raise ValueError(f"validated_input: {name!r} is not a measure with [low, high]")
            lo, hi = value
            bounds[name] = (None if lo is None else float(lo), None if hi is None else float(hi))
        return cls(bounds=bounds, max_findings=int(block.get("max_findings", 20)))


def check(quality: InputQuality, validated: ValidatedRange) -> list[str]:
    """One reason per measure outside ``validated`` (``[]`` when all are inside), e.g.
    ``"lung noise 92 HU > 60 HU"``. A measure that could not be taken is not a reason."""
    reasons = []
    for name, (lo, hi) in validated.bounds.items():
        value = getattr(quality, name)
        if value is None:
            continue
        words, unit, fmt = MEASURES[name]
        unit = f" {unit}" if unit else ""
        for bound, sign in ((lo, "<"), (hi, ">")):
            if bound is not None and (value < bound if sign == "<" else value > bound):
                shown = _shown(value, bound, fmt)
                reasons.append(f"{words} {shown[0]}{unit} {sign} {shown[1]}{unit}")
    return reasons


def _shown(value: float, bound: float, fmt: str) -> tuple[str, str]:
    """Value and bound as text, with one more decimal where they would read the same."""
    if f"{value:{fmt}}" == f"{bound:{fmt}}":
        fmt = f".{int(fmt[1:-1]) + 1}f"
    return f"{value:{fmt}}", f"{bound:{fmt}}"


def check_findings(count: int, validated: ValidatedRange) -> str | None:
    """The reason when ``count`` findings above the threshold are more than a chest holds."""
    if count <= validated.max_findings:
        return None
    return (
        f"{count} findings above the threshold, more than a chest holds "
        f"(at most {validated.max_findings}): the model does not apply to this input"
    )


def measure(
    volume: Volume,
    lung_mask: np.ndarray,
    image: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    cranial: int = 1,
) -> InputQuality:
    """The measures of the module docstring on ``image`` (K, R, C HU, voxel ``spacing`` mm; the
    detection grid) with its ``lung_mask``; ``cranial`` is +1 when the head is towards higher
    k. ``volume`` gives the header values."""
    voxel_l = spacing[0] * spacing[1] * spacing[2] / 1e6
    pixel_mm = (spacing[1], spacing[2])
    valid = image >= PADDING_HU
    lung_slices = np.flatnonzero(lung_mask.any(axis=(1, 2)))
    sample = (
        lung_slices[
            np.unique(np.linspace(0, len(lung_slices) - 1, SAMPLE_SLICES).round().astype(int))
        ]
        if len(lung_slices)
        else lung_slices
    )
    lung_noise, air_noise, air_hu = _noise(image, lung_mask, valid, sample, pixel_mm)
    edge_share, edge_max = _fov_edge(lung_mask, valid, lung_slices)
    header = volume.headers[0] if volume.headers else None
    kernel = header.get("ConvolutionKernel") if header is not None else None
    if kernel is not None and not isinstance(kernel, str):
        kernel = "\\".join(str(v) for v in kernel)
    agent = header.get("ContrastBolusAgent") if header is not None else None
    return InputQuality(
        lung_noise_hu=lung_noise,
        air_noise_hu=air_noise,
        air_hu=air_hu,
        airway_hu=_airway(image, lung_mask, lung_slices, pixel_mm, cranial),
        lung_volume_l=float(lung_mask.sum() * voxel_l),
        lung_balance=_balance(lung_mask),
        fov_edge_share=edge_share,
        fov_edge_share_max=edge_max,
        slice_thickness_mm=volume.slice_thickness,
        slice_spacing_mm=float(volume.slice_spacing),
        pixel_spacing_mm=float(np.mean(volume.pixel_spacing)),
        kernel=str(kernel) if kernel else None,
        contrast_agent=None if header is None else bool(agent),
    )


def _robust_sd(values: np.ndarray) -> float | None:
    if values.size < 200:
        return None
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _noise(
    image: np.ndarray,
    lung: np.ndarray,
    valid: np.ndarray,
    sample: np.ndarray,
    pixel_mm: tuple[float, float],
) -> tuple[float | None, float | None, float | None]:
    """(lung noise, air noise, median outside air) over the ``sample`` slices."""
    lung_res: list[np.ndarray] = []
    air_res: list[np.ndarray] = []
    air_val: list[np.ndarray] = []
    margin = max(1, round(AIR_MARGIN_MM / min(pixel_mm)))
    disk = ndimage.generate_binary_structure(2, 1)
    for k in sample:
        plane = image[k].astype(np.float64)
        # Residual of the 3 x 3 mean; for white noise its SD is sqrt(8/9) of the noise's.
        residual = (plane - ndimage.uniform_filter(plane, 3, mode="nearest")) * np.sqrt(9 / 8)
        inner = ndimage.binary_erosion(lung[k], structure=disk, iterations=2) & (plane < -600)
        lung_res.append(residual[inner])
        hull = body_hull(plane[None], valid[k][None])[0]
        # Away from the body, anything else dense (table, arms, clothing) and the FOV edge.
        near = ndimage.binary_dilation(
            hull | (plane > -500) | ~valid[k], structure=disk, iterations=margin, border_value=1
        )
        air = ~near
        air_res.append(residual[air])
        air_val.append(plane[air])
    lung_sd = _robust_sd(np.concatenate(lung_res)) if lung_res else None
    air_sd = _robust_sd(np.concatenate(air_res)) if air_res else None
    values = np.concatenate(air_val) if air_val else np.zeros(0)
    return lung_sd, air_sd, (float(np.median(values)) if values.size >= 200 else None)


def _fov_edge(lung: np.ndarray, valid: np.ndarray, slices: np.ndarray) -> tuple[float, float]:
    """Share of lung-outline pixels within two pixels of the field of view's edge (the image
    border or the padding of a round reconstruction): in all, and on the worst slice with an
    outline of at least 20 pixels."""
    if slices.size == 0:
        return 0.0, 0.0
    # Only the box around the lungs matters (plus the reach, and the image border inside it).
    rows, cols = np.flatnonzero(lung.any(axis=(0, 2))), np.flatnonzero(lung.any(axis=(0, 1)))
    box = (
        slice(int(slices[0]), int(slices[-1]) + 1),
        slice(max(int(rows[0]) - 4, 0), int(rows[-1]) + 5),
        slice(max(int(cols[0]) - 4, 0), int(cols[-1]) + 5),
    )
    plane = np.zeros((1, 3, 3), dtype=bool)
    plane[0] = ndimage.generate_binary_structure(2, 1)
    sub, fov = (
        lung[box],
        np.pad(valid[box[0]], ((0, 0), (1, 1), (1, 1)))[
            :, box[1].start : box[1].stop + 2, box[2].start : box[2].stop + 2
        ],
    )
    # The padding of one pixel all round is outside the image: the border counts as FOV edge.
    edge = fov & ~ndimage.binary_erosion(fov, structure=plane, border_value=1)
    near = ndimage.binary_dilation(edge, structure=plane, iterations=2)[:, 1:-1, 1:-1]
    near = near[:, : sub.shape[1], : sub.shape[2]]
    boundary = sub & ~ndimage.binary_erosion(sub, structure=plane)
    n = boundary.sum(axis=(1, 2))
    t = (boundary & near).sum(axis=(1, 2))
    per_slice = np.where(n >= 20, t / np.maximum(n, 1), 0.0)
    total = int(n.sum())
    return (float(t.sum()) / total if total else 0.0), float(per_slice.max())


def _balance(lung: np.ndarray) -> float:
    """Smaller over larger lung volume, the two sides split at the middle of the lungs' columns
    (0 when one side is empty)."""
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    if cols.size == 0:
        return 0.0
    per_col = lung.sum(axis=(0, 1))
    # The split: the emptiest column between the outer quarters of the lungs' extent (the
    # mediastinum), so a shifted body does not move a lung to the other side.
    lo, hi = cols[0] + (cols[-1] - cols[0]) // 4, cols[-1] - (cols[-1] - cols[0]) // 4
    split = lo + int(np.argmin(per_col[lo : hi + 1])) if hi > lo else int(cols.mean())
    left, right = float(per_col[:split].sum()), float(per_col[split:].sum())
    return min(left, right) / max(left, right) if max(left, right) > 0 else 0.0


def _airway(
    image: np.ndarray,
    lung: np.ndarray,
    slices: np.ndarray,
    pixel_mm: tuple[float, float],
    cranial: int,
) -> float | None:
    """Median HU inside the trachea: on the ten most cranial lung slices, a mask component of
    1-7 cm² whose centre lies within 25 mm of the lungs' middle column."""
    if slices.size == 0:
        return None
    top = slices[::-1][:10] if cranial > 0 else slices[:10]
    area_px = pixel_mm[0] * pixel_mm[1]
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    middle = 0.5 * (cols[0] + cols[-1])
    values = []
    for k in top:
        lab, n = ndimage.label(lung[k])
        for c in range(1, n + 1):
            comp = lab == c
            area = comp.sum() * area_px
            if not 100.0 <= area <= 700.0:
                continue
            if abs(np.argwhere(comp)[:, 1].mean() - middle) * pixel_mm[1] > 25.0:
                continue
            values.append(image[k][ndimage.binary_erosion(comp)])
    inner = np.concatenate(values) if values else np.zeros(0)
    return float(np.median(inner)) if inner.size >= 20 else None


OUTSIDE_RANGE = ("skip", "qualify")


def gate(reasons: list[str], outside_range: str) -> str | None:
    """Act on ``reasons``: none, None; with ``outside_range`` "skip", raise
    :class:`~dicom_node.errors.NoInputError` (the job ends skipped with the reasons); with
    "qualify", the qualifier the findings are written with."""
    if not reasons:
        return None
    text = "input outside the validated range: " + "; ".join(reasons)
    if outside_range == "skip":
        raise NoInputError(text)
    return text


class QualityControl:
    """One detection's quality control: measure and gate the input (called by the detector
    with its detection image and lung mask), then gate the number of findings; what it found
    goes into ``DetectionResult.extra`` (:meth:`extra`)."""

    def __init__(self, volume: Volume, validated: ValidatedRange, outside_range: str) -> None:
        self.volume = volume
        self.validated = validated
        self.outside_range = outside_range
        self.quality: InputQuality | None = None
        self.qualifiers: list[str] = []

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], cranial: int
    ) -> None:
        """Measure the input; outside the validated range, skip or note the qualifier."""
        self.quality = measure(self.volume, mask, image, spacing, cranial=cranial)
        self._gate(check(self.quality, self.validated))

    def findings(self, count: int) -> None:
        """Gate ``count`` findings above the threshold (all of them are written in qualify mode)."""
        if self.quality is not None:
            self.quality = replace(self.quality, findings_above_threshold=count)
        reason = check_findings(count, self.validated)
        self._gate([reason] if reason else [])

    def _gate(self, reasons: list[str]) -> None:
        text = gate(reasons, self.outside_range)
        if text:
            self.qualifiers.append(text)

    def extra(self) -> dict[str, Any]:
        """``quality`` (the measures) and, when the input was outside the range, ``qualifier``."""
        out: dict[str, Any] = {"quality": self.quality.to_json() if self.quality else None}
        if self.qualifiers:
            out["qualifier"] = "; ".join(self.qualifiers)
        return out
