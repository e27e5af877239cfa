"""The lung mask of the built-in lung-nodule detector, from HU and morphology.

:func:`lung_mask`: air inside the body (inside the per-slice convex hull of the body,
:func:`body_hull`, so lungs that a small field of view cuts at the image edge stay lungs),
without gas below the lungs (stomach, bowel), then a per-slice, per-component closing
(:func:`close_slices`) that pulls juxtapleural nodules and hilar vessel stubs into the mask
without bridging the mediastinum (closing each 2D component on its own never merges the
trachea with a lung), and a convex-hull fill of dents on the chest-wall side
(:func:`pleural_fill`: a mass or consolidation at the pleura).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError


def _disk_closing(mask: np.ndarray, radius_px: tuple[float, float]) -> np.ndarray:
    """Binary closing with an elliptical disk of the given radii (rows, cols) via distance maps."""
    pad = math.ceil(max(radius_px)) + 2
    m = np.pad(mask, pad)
    sampling = (1.0 / radius_px[0], 1.0 / radius_px[1])  # distances in units of the radius
    dilated = ndimage.distance_transform_edt(~m, sampling=sampling) <= 1.0
    closed = ndimage.distance_transform_edt(dilated, sampling=sampling) > 1.0
    return closed[pad:-pad, pad:-pad]


PADDING_HU = -1500.0
"""Below this a pixel is outside the reconstructed field of view (scanners pad with -2000,
-2048 or -3024), never air."""


def hull_fill(mask2d: np.ndarray) -> np.ndarray:
    """The filled convex hull of a 2D mask (of its pixels' corners); the mask itself when it
    has too few pixels for a hull."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    if len(rows) == 0:
        return mask2d.copy()
    # Each row's first and last pixel are all the hull needs.
    first = np.argmax(mask2d[rows], axis=1)
    last = mask2d.shape[1] - 1 - np.argmax(mask2d[rows, ::-1], axis=1)
    pts = np.concatenate([np.stack([rows, first], axis=1), np.stack([rows, last], axis=1)])
    if len(np.unique(pts, axis=0)) < 3:
        return mask2d.copy()
    corners = (
        pts[:, None, :] + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])[None]
    ).reshape(-1, 2)
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return mask2d.copy()
    # Row by row, each facet a j + b i + c <= 0 bounds i from one side: the span is where all agree.
    a, b, c = hull.equations.T
    j = np.arange(rows[0], rows[-1] + 1, dtype=np.float64)[:, None]
    rhs = -(c[None, :] + a[None, :] * j)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / b[None, :]
    lo = np.where(b[None, :] < -1e-12, bound, -np.inf).max(axis=1)
    hi = np.where(b[None, :] > 1e-12, bound, np.inf).min(axis=1)
    flat = np.abs(b) <= 1e-12  # facets along a row: the row is wholly in or out
    ok = np.all(np.where(flat[None, :], rhs >= -1e-9, True), axis=1)
    cols = np.arange(mask2d.shape[1])[None, :]
    out = mask2d.copy()
    out[rows[0] : rows[-1] + 1] |= (
        (cols >= lo[:, None] - 1e-9) & (cols <= hi[:, None] + 1e-9) & ok[:, None]
    )
    return out


def body_hull(
    hu: np.ndarray, valid: np.ndarray | None = None, *, tissue_hu: float = -400.0
) -> np.ndarray:
    """Per slice, the filled convex hull of the body: the largest 2D component denser than
    ``tissue_hu`` (the table, a separate component, stays out). Lungs lie inside it even where
    the field of view cuts them at the image edge; the air around the body does not."""
    tissue = hu > tissue_hu
    if valid is not None:
        tissue &= valid
    out = np.zeros(hu.shape, dtype=bool)
    for k in range(hu.shape[0]):
        lab, n = ndimage.label(tissue[k])
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[k] = hull_fill(lab == int(np.argmax(sizes)))
    return out


def lung_components(
    coarse_hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    air_hu: float = -400.0,
    min_lung_ml: float = 15.0,
    min_total_ml: float = 100.0,
    valid: np.ndarray | None = None,
    cranial: int | None = None,
    hull: np.ndarray | None = None,
) -> np.ndarray:
    """Lung (and airway) air on a coarse grid (K, R, C) with voxel ``spacing`` (mm).

    Air below ``air_hu`` (and inside ``valid``, the reconstructed field of view) in a 3D
    component of at least ``min_lung_ml`` millilitres that lies wholly inside the body's
    per-slice convex hull (``hull``, :func:`body_hull` when not given): the air around the
    body reaches outside it, lungs cut by a small field of view at the image edge do not.
    With ``cranial`` (+1 when the head is towards higher k, -1 when lower), a component much
    smaller than the largest (under 15 %) whose centre lies caudal to the lungs' centre is gas
    in the stomach or bowel and is left out; the airway above the lungs stays. Less than
    ``min_total_ml`` in all is not lung (sinuses, mastoids, bowel gas): no mask.
    """
    air = coarse_hu < air_hu
    if valid is not None:
        air &= valid
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros_like(air)
    if hull is None:
        hull = body_hull(coarse_hu, valid)
    outside = np.unique(
        labels[air & ~ndimage.binary_dilation(hull, structure=np.ones((1, 3, 3), dtype=bool))]
    )
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    keep = sizes * voxel_ml >= min_lung_ml
    keep[0] = False
    keep[outside] = False
    if cranial is not None and keep.sum() > 1:
        ids = np.flatnonzero(keep)
        z = np.asarray(ndimage.mean(np.indices(air.shape)[0], labels, ids))
        big = sizes[ids] >= 0.15 * sizes[ids].max()
        lungs_z = float(np.average(z[big], weights=sizes[ids][big]))
        gas = ~big & ((z - lungs_z) * cranial < 0)
        keep[ids[gas]] = False
    if sizes[keep].sum() * voxel_ml < min_total_ml:
        return np.zeros_like(air)
    return keep[labels]


def pleural_fill(
    lungs: np.ndarray,
    hull: np.ndarray,
    pixel_mm: tuple[float, float],
    *,
    medial_deg: float = 60.0,
    wall_mm: float = 25.0,
    max_share: float = 0.3,
    min_dent_mm2: float = 150.0,
) -> np.ndarray:
    """Dents in the lungs' outline on the chest-wall side, per slice and lung: regions of the
    lung's convex hull outside the lung (a mass or consolidation at the pleura pushes the air
    away from the ribs) that lie, seen from the lung's centre, more than ``medial_deg`` away
    from the direction of the body's midline (the centre column of ``hull``, the body's
    per-slice hull), whose hull edge (the chord across the dent) lies at most ``wall_mm``
    deeper in the body than the lung's outline nearest the skin, each of at least
    ``min_dent_mm2`` (smaller dents are the closing's, :func:`close_slices`) and at most
    ``max_share`` of the lung's area. Dents towards the mediastinum (heart, hilum), under the
    heart or the liver's dome, and across the midline (the mediastinum between lungs that the
    mask joins in front of or behind it) stay out."""
    out = np.zeros_like(lungs)
    min_px = min_dent_mm2 / (pixel_mm[0] * pixel_mm[1])
    cos_medial = math.cos(math.radians(medial_deg))
    scale = np.array(pixel_mm)
    for k in range(lungs.shape[0]):
        if not lungs[k].any() or not hull[k].any():
            continue
        midline = float(np.argwhere(hull[k])[:, 1].mean())
        depth: np.ndarray | None = None
        lab2, n = ndimage.label(lungs[k])
        for c in range(1, n + 1):
            comp = lab2 == c
            filled = hull_fill(comp)
            dents, m = ndimage.label(filled & ~comp)
            if m == 0:
                continue
            edge = filled & ~ndimage.binary_erosion(filled)
            sizes = np.bincount(dents.ravel())
            centre = np.argwhere(comp).mean(axis=0)
            medial = np.array([0.0, 1.0 if midline > centre[1] else -1.0])
            for d in np.flatnonzero((sizes >= min_px) & (sizes <= max_share * comp.sum())):
                if d == 0:
                    continue
                where = np.argwhere(dents == d)
                if where[:, 1].min() <= midline <= where[:, 1].max():
                    continue  # across the midline: the mediastinum between joined lungs
                v = (where.mean(axis=0) - centre) * scale
                if float(v @ medial) >= cos_medial * float(np.linalg.norm(v)):
                    continue  # towards the mediastinum
                if depth is None:
                    # The image border counts as the surface where the body reaches it.
                    depth = ndimage.distance_transform_edt(np.pad(hull[k], 1), sampling=pixel_mm)[
                        1:-1, 1:-1
                    ]
                # The chord of a dent at the ribs runs along the chest wall, as near the body's
                # surface as the lung's outline there; under the heart or the liver's dome it
                # runs deep into the body.
                chord = (dents == d) & edge
                outline = comp & ~ndimage.binary_erosion(comp)
                wall = float(np.percentile(depth[outline], 10))
                if chord.any() and float(np.percentile(depth[chord], 90)) <= wall + wall_mm:
                    out[k] |= dents == d
    return out


def close_slices(air: np.ndarray, pixel_mm: tuple[float, float], closing_mm: float) -> np.ndarray:
    """Per slice, close each 2D component of ``air`` on its own with a disk of ``closing_mm``
    and fill its holes: vessels and nodules inside the lung and bumps at the pleura (juxtapleural
    nodules) join the mask, while separate components (trachea, the other lung) never merge."""
    radius = (closing_mm / pixel_mm[0], closing_mm / pixel_mm[1])
    pad = math.ceil(max(radius)) + 1
    out = np.zeros_like(air)
    for k in range(air.shape[0]):
        if not air[k].any():
            continue
        lab2, _ = ndimage.label(air[k])
        for c, sl in enumerate(ndimage.find_objects(lab2), start=1):
            if sl is None:
                continue
            j0, j1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, air.shape[1])
            i0, i1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, air.shape[2])
            comp = lab2[j0:j1, i0:i1] == c
            if comp.sum() < 4:
                continue
            out[k, j0:j1, i0:i1] |= ndimage.binary_fill_holes(_disk_closing(comp, radius))
    return out


def lung_mask(
    image_hu: np.ndarray,
    coarse_hu: np.ndarray,
    spacing: tuple[float, float, float],
    factor: int,
    *,
    air_hu: float = -400.0,
    closing_mm: float = 10.0,
    cranial: int | None = None,
    pleural: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Lung mask at the resolution of ``image_hu`` (K, R, C; voxel ``spacing``), using
    ``coarse_hu`` (the same image mean-pooled in-plane by ``factor``) to find the lungs.

    ``cranial`` (see :func:`lung_components`) leaves out gas below the lungs; ``pleural``
    adds dents at the chest wall (:func:`pleural_fill`) to the closed mask.
    Returns ``(mask, air)``: the closed mask (where nodules are looked for) and the lung air
    itself, eroded by one pixel so that the partial-volume rim of the pleura stays outside.
    """
    coarse_spacing = (spacing[0], spacing[1] * factor, spacing[2] * factor)
    valid = ~_block_any(image_hu < PADDING_HU, factor, coarse_hu.shape)
    hull = body_hull(coarse_hu, valid)
    lungs_c = lung_components(
        coarse_hu, coarse_spacing, air_hu=air_hu, valid=valid, cranial=cranial, hull=hull
    )
    fill_c = (
        pleural_fill(lungs_c, hull, (coarse_spacing[1], coarse_spacing[2]))
        if pleural and lungs_c.any()
        else None
    )
    lungs_c = ndimage.binary_dilation(lungs_c, iterations=1)
    air = (
        _upsample(lungs_c, factor, image_hu.shape) & (image_hu < air_hu) & (image_hu >= PADDING_HU)
    )
    # One pixel in-plane erosion: drop the pleural partial-volume rim.
    air = ndimage.binary_erosion(
        air, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)
    )
    mask = close_slices(air, (spacing[1], spacing[2]), closing_mm)
    if fill_c is not None and fill_c.any():
        mask |= _upsample(fill_c, factor, image_hu.shape)
    return mask, air


def _upsample(coarse: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """A coarse mask repeated ``factor`` times in-plane, cut or padded (False) to ``shape``."""
    up = np.repeat(np.repeat(coarse, factor, axis=1), factor, axis=2)
    full: np.ndarray = np.zeros(shape, dtype=bool)
    r, c = min(up.shape[1], shape[1]), min(up.shape[2], shape[2])
    full[:, :r, :c] = up[:, :r, :c]
    return full


def _block_any(mask: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Whether any pixel of each ``factor`` x ``factor`` block is set, on a grid of ``shape``."""
    if factor == 1:
        return mask[:, : shape[1], : shape[2]]
    k, r, c = shape
    blocks = mask[:, : r * factor, : c * factor].reshape(k, r, factor, c, factor)
    return np.asarray(blocks.any(axis=(2, 4)))
