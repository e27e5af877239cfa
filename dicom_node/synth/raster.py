"""Rasterising analytic shapes into a voxel grid with partial-volume edges.

Shapes are described in *grid millimetres* ``g = (k * dz, j * dy, i * dx)``, so distances are
true distances and the index of a point is ``g / spacing``. Each voxel receives the fraction of
it the shape covers, approximated by a linear ramp of the signed distance across one voxel
width (``edge`` mm): a 2 mm vessel at 0.7 mm pixels therefore fades out over its rim the way a
scanner's partial-volume effect does, rather than having a hard, aliased edge.
"""

from __future__ import annotations

import numpy as np


def _bbox(lo_mm: np.ndarray, hi_mm: np.ndarray, spacing: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    lo = np.maximum(np.floor(lo_mm / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(hi_mm / spacing).astype(int) + 1, np.array(shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _axes(box: tuple[slice, ...], spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = (np.arange(box[0].start, box[0].stop, dtype=np.float32) * np.float32(spacing[0]))[:, None, None]
    y = (np.arange(box[1].start, box[1].stop, dtype=np.float32) * np.float32(spacing[1]))[None, :, None]
    x = (np.arange(box[2].start, box[2].stop, dtype=np.float32) * np.float32(spacing[2]))[None, None, :]
    return z, y, x


def capsule_coverage(
    shape: tuple[int, ...],
    a: np.ndarray,
    b: np.ndarray,
    ra: float,
    rb: float,
    spacing: np.ndarray,
    edge: float,
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Coverage (float32 0..1) of a tapered capsule from ``a`` to ``b``, and its box."""
    rmax = max(ra, rb) + edge
    box = _bbox(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax, spacing, shape)
    if box is None:
        return None
    z, y, x = _axes(box, spacing)
    ab = (b - a).astype(np.float32)
    length2 = float(ab @ ab) or 1e-6
    vz, vy, vx = z - np.float32(a[0]), y - np.float32(a[1]), x - np.float32(a[2])
    t = np.clip((vz * ab[0] + vy * ab[1] + vx * ab[2]) / np.float32(length2), 0.0, 1.0)
    dz, dy, dx = vz - t * ab[0], vy - t * ab[1], vx - t * ab[2]
    dist = np.sqrt(dz * dz + dy * dy + dx * dx)
    radius = np.float32(ra) + t * np.float32(rb - ra)
    return box, np.clip(0.5 - (dist - radius) / np.float32(edge), 0.0, 1.0)


def capsule(
    target: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    ra: float,
    rb: float,
    spacing: np.ndarray,
    edge: float,
) -> None:
    """Max-composite a tapered capsule (a vessel segment) into ``target`` (uint8 coverage 0..255)."""
    hit = capsule_coverage(target.shape, a, b, ra, rb, spacing, edge)
    if hit is not None:
        composite_max_u8(target, *hit)


def blob_coverage(
    shape: tuple[int, ...],
    centre: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    spacing: np.ndarray,
    edge: float,
    lobes: np.ndarray | None = None,
    lobe_amplitude: float = 0.0,
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Coverage (float32 0..1) of a lobulated ellipsoid, and the box it lives in.

    ``radii`` are the semi-axes (mm) along the columns of ``rotation``; ``lobes`` are unit
    vectors whose squared projections modulate the surface by ``lobe_amplitude`` (a smooth,
    lobulated contour like that of real nodules, not a perfect sphere).
    """
    reach = float(np.max(radii)) * (1 + abs(lobe_amplitude)) + 2 * edge
    box = _bbox(centre - reach, centre + reach, spacing, shape)
    if box is None:
        return None
    z, y, x = _axes(box, spacing)
    rel = [z - np.float32(centre[0]), y - np.float32(centre[1]), x - np.float32(centre[2])]
    u = [rel[0] * rotation[0, c] + rel[1] * rotation[1, c] + rel[2] * rotation[2, c] for c in range(3)]
    rho = np.sqrt(sum((u[c] / np.float32(radii[c])) ** 2 for c in range(3)))
    mean_r = float(np.cbrt(np.prod(radii)))
    scale = np.ones_like(rho)
    if lobes is not None and lobe_amplitude:
        norm = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + np.float32(1e-6)
        mod = sum(((u[0] * v[0] + u[1] * v[1] + u[2] * v[2]) / norm) ** 2 for v in lobes)
        scale = 1.0 + np.float32(lobe_amplitude) * (mod / len(lobes) * 3.0 - 1.0)
    signed = (rho / scale - 1.0) * np.float32(mean_r)
    cover = np.clip(0.5 - signed / np.float32(edge), 0.0, 1.0).astype(np.float32)
    return box, cover


def composite_max_u8(target: np.ndarray, box: tuple[slice, ...], cover: np.ndarray) -> None:
    """Max-composite a float coverage into a uint8 coverage volume."""
    sub = target[box]
    np.maximum(sub, (cover * 255.0 + 0.5).astype(np.uint8), out=sub)


def paint_towards(hu: np.ndarray, box: tuple[slice, ...], cover: np.ndarray, value: np.ndarray | float) -> None:
    """Blend ``hu`` towards ``value`` by ``cover``, never darkening (ground glass over lung)."""
    sub = hu[box]
    blended = sub + cover * (np.asarray(value, dtype=np.float32) - sub)
    np.maximum(sub, blended, out=sub)
