"""Lung masses for the built-in ``lung-nodules`` detector: solid lesions of about 3 cm and more
that lie mostly in aerated lung, including those that abut the mediastinum or the hilum.

The nodule stages look for blobs *inside* the lung mask, and a large tumour at the mediastinum
lies mostly outside it (docs/detection.md, "Known failure modes"); their scales end at 28 mm.
This stage asks a geometric question instead, on a 4 mm isotropic copy of the detection image:

* **solid ball**: at least :data:`SOLID_SHARE` of a ball of radius r (``RADII_MM``: 14-24 mm,
  so a lesion of about 28 mm or more) is denser than :data:`TISSUE_HU` and inside the body;
* **mostly in the lung**: the share of the shell between 1.3 r and 1.8 r around it that is
  aerated lung (the lung mask below :data:`AIR_HU`) — the **lung-surround share**.

A ball half-embedded in a flat wall has a share below 0.5 (the shell's half beyond the wall
plane, less the partial volume); the mediastinum, heart, spine and diaphragm present smooth,
wide surfaces to the lung and stay near or below that. A mass that protrudes into the lung by
more than half its size is surrounded by lung on more than half of its shell. Local maxima of
the share at or above ``threshold`` (default :data:`DEFAULT_THRESHOLD`, "clearly more than a
hemisphere") are masses, one per :data:`SUPPRESS_FACTOR` radii.

A mass about half embedded in the mediastinum (a paravertebral or hilar tumour) has the share
of the normal wall, and is told from it by what lies **above and below** it: the normal
structures that reach as far into the lung — aorta, hila, spine, heart — are tubes or domes
along the body axis, with tissue above or below them, while a mass has lung on both sides
along z. So a local maximum whose share is at most :data:`EMBEDDED_MARGIN` below ``threshold``
is also a mass when the lung takes at least :data:`POLAR_SHARE` of **both** polar caps of its
shell (the parts within 45 degrees of the body axis, above and below).

These shares are measured on the 4 mm grid and on the same grid moved by half a voxel
(:data:`LATTICE_SHIFTS`): on one grid alone they move by up to 0.1 with where the grid falls,
so that whether a borderline mass was found depended on its position by a millimetre.

What this does not find: a mass embedded in the mediastinum or the chest wall by more than half
its size, or half embedded with tissue above or below it (a mass on the diaphragm or at the
apex), and anything smaller than about 28 mm (the nodule stages' job). Dense consolidation or
atelectasis surrounded by lung is found as a mass. The rule and its thresholds were set while
looking at the Lung-PET-CT-Dx tumours and ``lidc-idri-0002``: figures on those scans are
development figures, not a validation (weights card, ``mass_stage``; docs/detection.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

from workers.models import lungs

VOXEL_MM = 4.0
"""Isotropic grid of the search: a 3 cm lesion still spans about 7 voxels."""
RADII_MM = (14.0, 18.0, 24.0)
SHELL = (1.3, 1.8)
"""The surround shell, in radii."""
TISSUE_HU = -300.0
AIR_HU = -500.0
SOLID_SHARE = 0.85
DEFAULT_THRESHOLD = 0.6
EMBEDDED_MARGIN = 0.15
"""How far below ``threshold`` the share of a mass with lung above and below may be."""
POLAR_SHARE = 0.52
"""The lung share both polar caps of the shell need for a half-embedded mass: midway between
the normal anatomy of the five development scans (at most 0.48 on the search lattice) and the
A0001 paravertebral tumour (0.55-0.56)."""
POLAR_COS = math.cos(math.radians(45.0))
"""The polar caps: the shell within 45 degrees of the body axis."""
LATTICE_SHIFTS = (0.0, 0.5)
"""The search grid, and the same grid moved by half a voxel along every axis: together a
body-centred cubic lattice, on which no point of the image is more than 2.3 mm from a sample
(3.5 mm on the grid alone), so whether a borderline mass is found depends less on where the
grid happens to fall."""
SUPPRESS_FACTOR = 2.0
DETACH_MM = 2.0
"""Opening radius of the segmentation: vessels and spiculae under 4 mm across are cut off."""
MAX_MASSES = 5
"""At most this many masses per scan are looked at (more is the findings check's business)."""


@dataclass(frozen=True)
class Mass:
    """One mass found on the detection grid."""

    centre: np.ndarray
    """(k, r, c) on the detection grid (fractional)."""
    radius_mm: float
    """The radius of the solid ball that scored best."""
    share: float
    """The lung-surround share (0..1)."""
    polar: float
    """The lower of the lung shares of the shell's two polar caps (above and below; 0..1)."""
    evidence: float
    """How far the mass clears the rule that found it, 0 (just) to 1 (surrounded by lung)."""


def _kernel(r_in: float, r_out: float, cap: int = 0) -> np.ndarray:
    """The shell between ``r_in`` and ``r_out`` (mm) as a normalised convolution kernel; with
    ``cap`` +1 or -1 only its polar cap towards +z or -z (:data:`POLAR_COS`)."""
    n = math.ceil(r_out / VOXEL_MM)
    z, y, x = np.mgrid[-n : n + 1, -n : n + 1, -n : n + 1].astype(np.float32) * VOXEL_MM
    d = np.sqrt(z * z + y * y + x * x)
    k = (d >= r_in) & (d <= r_out)
    if cap:
        k &= cap * z >= POLAR_COS * d
    kf = k.astype(np.float32)
    return kf / kf.sum()


def find_masses(
    image: np.ndarray,
    lung_mask: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Mass]:
    """Masses in ``image`` (HU on the detection grid, voxel ``spacing`` mm) given the detector's
    ``lung_mask`` on the same grid; best first.

    The search runs on each lattice of :data:`LATTICE_SHIFTS`; a mass seen on both is kept once,
    where its share is higher."""
    if not lung_mask.any():
        return []
    embedded = threshold - EMBEDDED_MARGIN
    # (share, centre on the detection grid, radius, polar) of every peak that qualifies
    found: list[tuple[float, np.ndarray, float, float]] = []
    for shift in LATTICE_SHIFTS:
        img, lung, step = _lattice(image, lung_mask, spacing, shift)
        share, polar, radius = _scores(img, lung)
        qualifies = (share >= threshold) | ((share >= embedded) & (polar >= POLAR_SHARE))
        peaks = qualifies & (share == ndimage.maximum_filter(share, size=5))
        for p in np.argwhere(peaks):
            at = tuple(p)
            found.append((float(share[at]), (p + shift) * step, float(radius[at]), float(polar[at])))
    found.sort(key=lambda f: -f[0])  # stable: ties keep lattice and scan order
    kept: list[Mass] = []
    placed: list[tuple[np.ndarray, float]] = []
    for sh, centre, r, po in found:
        mm = centre * np.asarray(spacing)
        if any(np.linalg.norm(mm - q) < SUPPRESS_FACTOR * max(r, rq) for q, rq in placed):
            continue
        placed.append((mm, r))
        # How far it clears the share rule, or the weaker of its margins on the embedded rule.
        by_share = (sh - threshold) / max(1.0 - threshold, 1e-6)
        embedded_margin = min((sh - embedded) / max(1.0 - embedded, 1e-6), (po - POLAR_SHARE) / (1.0 - POLAR_SHARE))
        evidence = float(np.clip(max(by_share, embedded_margin), 0.0, 1.0))
        kept.append(Mass(centre=centre, radius_mm=r, share=sh, polar=po, evidence=evidence))
        if len(kept) >= MAX_MASSES:
            break
    return kept


def _lattice(
    image: np.ndarray, lung_mask: np.ndarray, spacing: tuple[float, float, float], shift: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image`` and its aerated lung resampled (linearly) on the :data:`VOXEL_MM` search grid
    moved by ``shift`` of its voxel along every axis, and the detection-grid step of one of its
    voxels per axis: search voxel ``p`` lies at detection-grid index ``(p + shift) * step``."""
    shape = tuple(round(n * s / VOXEL_MM) for n, s in zip(image.shape, spacing, strict=True))
    # As ndimage.zoom does, the search grid's corners sit on the image's: output index p is
    # input p * (n - 1) / (m - 1).
    step = np.array([(n - 1) / max(m - 1, 1) for n, m in zip(image.shape, shape, strict=True)])
    if shift == 0.0:
        img = ndimage.zoom(image.astype(np.float32), np.array(shape) / np.array(image.shape), order=1)
        lung = ndimage.zoom(lung_mask.astype(np.float32), np.array(shape) / np.array(image.shape), order=1)
    else:
        # One sample fewer per axis keeps every shifted sample inside the image.
        inner = tuple(max(m - 1, 1) for m in shape)
        img = ndimage.affine_transform(image.astype(np.float32), step, offset=shift * step, output_shape=inner, order=1)
        lung = ndimage.affine_transform(
            lung_mask.astype(np.float32), step, offset=shift * step, output_shape=inner, order=1
        )
    return img, (lung > 0.5) & (img < AIR_HU), step


def _scores(img: np.ndarray, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per search voxel, the best lung-surround share over :data:`RADII_MM` of a solid ball
    centred there (0 where no ball is solid), the polar-cap share and the radius that gave it."""
    body = lungs.body_hull(img)
    tissue = ((img > TISSUE_HU) & body).astype(np.float32)
    air = lung.astype(np.float32)
    share = np.zeros(img.shape, dtype=np.float32)
    polar = np.zeros(img.shape, dtype=np.float32)
    radius = np.zeros(img.shape, dtype=np.float32)
    for r in RADII_MM:
        solid = signal.fftconvolve(tissue, _kernel(0.0, r), mode="same")
        around = signal.fftconvolve(air, _kernel(SHELL[0] * r, SHELL[1] * r), mode="same")
        s = np.where(solid >= SOLID_SHARE, around, 0.0)
        better = s > share
        share[better] = s[better]
        radius[better] = r
        caps = np.minimum(
            *(signal.fftconvolve(air, _kernel(SHELL[0] * r, SHELL[1] * r, cap), mode="same") for cap in (1, -1))
        )
        polar[better] = caps[better]
    return share, polar, radius


def segment(
    patch: np.ndarray,
    lung: np.ndarray,
    spacing: tuple[float, float, float],
    centre: np.ndarray,
    radius_mm: float,
) -> np.ndarray:
    """The mass's voxels in ``patch`` (HU, voxel ``spacing``) around ``centre`` (patch index):
    the tissue in the solid ball that found it (radius r), and the tissue inside the lung mask
    ``lung`` up to 1.6 r that stays connected to it once opened by a ball of
    :data:`DETACH_MM` (lobulation reaches into the lung; vessels and thin spiculae are cut
    off, so the long axis measures the mass, not the vessels running to it)."""
    smooth = ndimage.uniform_filter(patch.astype(np.float32), size=(1, 3, 3))
    tissue = smooth > TISSUE_HU
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(patch.shape, spacing, strict=True)), indexing="ij")
    c = np.asarray(centre) * np.array(spacing)
    dist = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    core = tissue & (dist <= radius_mm)
    reach = tissue & lung & (dist <= 1.6 * radius_mm)
    reach = ndimage.binary_opening(reach, structure=_ball(DETACH_MM, spacing))
    labels, count = ndimage.label(reach | core)
    if count == 0:
        return core
    touching = np.unique(labels[core])
    return np.isin(labels, touching[touching > 0])


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """A ball of ``radius_mm`` as a structuring element on a grid of voxel ``spacing``."""
    half = [max(int(radius_mm // s), 0) for s in spacing]
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.asarray(zz**2 + yy**2 + xx**2 <= radius_mm**2)
