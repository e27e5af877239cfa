"""Simulated nodules inserted into real lungs: positives in the real scan's own texture.

Stage 2 learnt nodules from phantoms only. Fine-tuned with hard negatives from real lungs and
positives from phantoms (:mod:`training.finetune_real`, the ``lung_nodules_fp_v2`` candidate), it
can separate the classes by *domain* instead of by shape: real texture means "negative", and it
then stopped reporting the real tumours too. Inserting simulated nodules into the real scans puts
positives and negatives in the same images, the standard lesion-insertion remedy (e.g. Pezeshk A,
et al. "Seamless lesion insertion for data augmentation in CAD training", IEEE Trans Med Imaging
36(4):1005-1015, 2017).

A nodule is an ellipsoid (axes within 15 % of the radius, random orientation) with the density of
its kind (solid -30..60 HU; ground glass -680..-480 HU; part-solid: a ground-glass ellipsoid with
a solid core of 40-60 % of its radius). Each voxel receives the share of the ellipsoid inside it,
integrated over the slice thickness (the scan's own ``SliceThickness``) and 3 x 3 points in-plane,
then blurred in-plane by 0.6 px (the reconstruction kernel's spread). The difference to the lung's
level is *added* to the real voxels, so the scan's own noise stays on the nodule, and only where
the real voxel is lung (below -300 HU): a juxtapleural nodule does not brighten the chest wall.

Positions: inside the lung mask the detector itself computes, away from the tumour boxes (plus a
margin) and from each other, on parenchyma (the mean of the real voxels under the sphere below
-650 HU, so a nodule does not land on a hilar vessel); a share of them touches the pleura (its
centre between 0.5 and 1 radius from the mask's edge). Which scans this is run on is the caller's
business: for training only scans not in :data:`training.real_negatives.HELD_OUT`; inserted into a
held-out scan, it measures sensitivity on that scan's real background (simulated nodules, so
always reported as such).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from workers.volume import Volume

KINDS = ("solid", "part-solid", "ground-glass", "juxtapleural")
SHARES = (0.55, 0.15, 0.12, 0.18)
LUNG_BELOW_HU = -300.0


@dataclass(frozen=True)
class Inserted:
    """One simulated nodule: centre (LPS mm), diameter (mm), kind and density (HU)."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    hu: float

    def as_truth(self) -> dict[str, Any]:
        """In the ``truth.json`` nodule form the evaluation reads."""
        return {
            "center_mm": [round(v, 2) for v in self.center_mm],
            "diameter_mm": round(self.diameter_mm, 2),
            "type": "solid" if self.kind == "juxtapleural" else self.kind,
            "juxtapleural": self.kind == "juxtapleural",
        }


def _diameter(rng: np.random.Generator, lo: float, hi: float) -> float:
    # Log-uniform: small nodules are commoner and harder.
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return np.asarray(q * np.sign(np.diag(r)))


def render(
    volume: Volume,
    centre_ijk: np.ndarray,
    axes_mm: np.ndarray,
    rotation: np.ndarray,
    core: float,
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Occupancy of an ellipsoid (and of its core at ``core`` times its size) on the source
    voxels around ``centre_ijk``: ``(box, outer, inner)``, each share in [0, 1]."""
    sk, sj, si = volume.spacing
    thick = float(volume.slice_thickness or sk)
    reach = float(axes_mm.max()) + 2.0
    lo = np.floor(centre_ijk - np.array([reach / sk + 1, reach / sj + 1, reach / si + 1])).astype(int)
    hi = np.ceil(centre_ijk + np.array([reach / sk + 1, reach / sj + 1, reach / si + 1])).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array(volume.shape))
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    shape = tuple(int(h - lo_) for lo_, h in zip(lo, hi, strict=True))
    # Sub-samples: across the slice's thickness (its sensitivity profile, as a box) and in-plane.
    zs = (np.arange(7) + 0.5) / 7 - 0.5
    ps = (np.arange(3) + 0.5) / 3 - 0.5
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    outer = np.zeros(shape, dtype=np.float32)
    inner = np.zeros(shape, dtype=np.float32)
    inv = rotation.T
    n = 0
    for dz in zs:
        for dy in ps:
            for dx in ps:
                z = (kk + lo[0] - centre_ijk[0]) * sk + dz * thick
                y = (jj + lo[1] - centre_ijk[1] + dy) * sj
                x = (ii + lo[2] - centre_ijk[2] + dx) * si
                local = np.stack([z, y, x], axis=-1) @ inv.T
                rho = np.sqrt(((local / axes_mm) ** 2).sum(axis=-1))
                outer += rho <= 1.0
                if core > 0:
                    inner += rho <= core
                n += 1
    outer /= n
    inner /= n
    outer = ndimage.gaussian_filter(outer, sigma=(0, 0.6, 0.6))
    inner = ndimage.gaussian_filter(inner, sigma=(0, 0.6, 0.6))
    return box, outer, inner


def insert(
    volume: Volume,
    mask: np.ndarray,
    mask_to_source: Any,
    mask_spacing: tuple[float, float, float],
    rng: np.random.Generator,
    count: int,
    *,
    avoid_mm: list[tuple[np.ndarray, np.ndarray]] | None = None,
    sizes_mm: tuple[float, float] = (4.0, 28.0),
) -> tuple[Volume, list[Inserted]]:
    """``volume`` with up to ``count`` simulated nodules added, and what was added.

    ``mask`` is the detector's lung mask on its detection grid, ``mask_to_source`` maps (N, 3)
    grid points to fractional source (k, j, i) (``Candidates.source_ijk``), ``avoid_mm`` boxes
    (lo, hi in LPS mm) where nothing may go (a tumour and its margin).
    """
    array = volume.array.copy()
    depth = ndimage.distance_transform_edt(mask, sampling=mask_spacing)
    lung_points = np.argwhere(mask)
    placed: list[Inserted] = []
    centres: list[np.ndarray] = []
    lung_level = float(np.median(volume.array[volume.array < -600])) if (volume.array < -600).any() else -850.0
    tries = 0
    while len(placed) < count and tries < 60 * count:
        tries += 1
        kind = str(rng.choice(KINDS, p=SHARES))
        d = _diameter(rng, *sizes_mm)
        r = d / 2
        p = lung_points[rng.integers(len(lung_points))]
        dist = float(depth[tuple(p)])
        if kind == "juxtapleural":
            if not (0.5 * r <= dist <= max(r, 2.0)):
                continue
        elif dist < r + 3.0:
            continue
        src = np.asarray(mask_to_source(p[None, :].astype(np.float64))[0], dtype=np.float64)
        mm = np.array(volume.index_to_patient(*src))
        if avoid_mm and any(np.all(mm >= lo - r) and np.all(mm <= hi + r) for lo, hi in avoid_mm):
            continue
        if any(np.linalg.norm(mm - c) < 2.5 * r + 10.0 for c in centres):
            continue
        axes = r * rng.uniform(0.85, 1.15, size=3)
        rot = _rotation(rng)
        core = float(rng.uniform(0.4, 0.6)) if kind == "part-solid" else 0.0
        box, outer, inner = render(volume, src, axes, rot, core)
        real = array[box]
        under = real[outer > 0.5]
        lung_under = under[under < LUNG_BELOW_HU]
        if under.size == 0 or lung_under.size < 0.5 * under.size:
            continue
        if kind != "juxtapleural" and float(under.mean()) > -650.0:
            continue  # on a vessel or the hilum: a reader could not call it a nodule either
        if kind == "ground-glass":
            hu = float(rng.uniform(-680, -480))
        elif kind == "part-solid":
            hu = float(rng.uniform(-650, -500))
        else:
            hu = float(rng.uniform(-30, 60))
        add = outer * (hu - lung_level)
        if core:
            add += inner * (float(rng.uniform(-50, 40)) - hu)
        lung = real < LUNG_BELOW_HU
        # Never above the nodule's own density where vessels already are.
        new = np.where(lung, np.minimum(real + add, np.maximum(real, hu + 60.0)), real)
        array[box] = new.astype(np.float32)
        placed.append(Inserted((float(mm[0]), float(mm[1]), float(mm[2])), float(2 * axes.mean()), kind, hu))
        centres.append(mm)
    return dataclasses.replace(volume, array=array), placed
