"""Pulmonary vessel trees: branching, tapering tubes grown from each hilum.

Trunks of 3.5-6 mm radius leave the mediastinum at the hilum and bifurcate with Murray's law
(r0³ = r1³ + r2³) until they are thinner than a voxel can show. Near the hilum they have the
calibre of nodules, and their branch points and the way they cross each other in a slice are
the classic false positives of nodule detection, which is why the phantom has them.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from dicom_node.synth.anatomy import Chest


@dataclass(frozen=True)
class Segment:
    """A tapered tube from ``a`` to ``b`` (patient mm) with radii ``ra`` -> ``rb`` (mm)."""

    a: np.ndarray
    b: np.ndarray
    ra: float
    rb: float


class LungField:
    """The chest's lung signed distance sampled on a coarse grid for fast point queries."""

    def __init__(self, chest: Chest, step: float = 2.5) -> None:
        half_x = chest.body_ax + 5
        half_y = chest.body_ay + 5
        self.step = step
        self.lo = np.array([-half_x, -half_y, chest.base - 10.0])
        nx = int(2 * half_x / step) + 2
        ny = int(2 * half_y / step) + 2
        nz = int((chest.apex - chest.base + 20.0) / step) + 2
        xs = self.lo[0] + step * np.arange(nx)
        ys = self.lo[1] + step * np.arange(ny)
        self.grid = np.empty((nz, ny, nx), dtype=np.float32)
        xx, yy = np.meshgrid(xs, ys)
        for kz in range(nz):
            self.grid[kz] = chest.lung_distance(xx, yy, self.lo[2] + step * kz)
        self.shape = np.array(self.grid.shape[::-1])  # (nx, ny, nz)

    def __call__(self, p: np.ndarray) -> float:
        idx = np.rint((p - self.lo) / self.step).astype(int)
        if np.any(idx < 0) or np.any(idx >= self.shape):
            return 1e3
        return float(self.grid[idx[2], idx[1], idx[0]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return _unit(v - (v @ d) * d)


def grow_trees(
    chest: Chest,
    field: LungField,
    rng: np.random.Generator,
    *,
    max_segments: int = 25000,
    min_radius: float = 0.3,
) -> list[Segment]:
    """Grow the vessel trees of both lungs (breadth first, so big vessels always exist)."""
    queue: deque[tuple[np.ndarray, np.ndarray, float]] = deque()
    for side in (-1.0, 1.0):
        # Find the hilum: march laterally from the mediastinum at hilum height until inside.
        y = chest.lung_cy - 0.06 * chest.fov
        x = side * chest.med_ax
        entry = None
        for _ in range(200):
            p = np.array([x, y, chest.hilum_z])
            if field(p) < -6.0:
                entry = p
                break
            x += side * 1.0
        if entry is None:
            continue
        directions = [
            (0.2, 0.0, 1.0), (0.3, 0.0, -1.0), (1.0, 0.0, 0.2), (0.6, -1.0, 0.0),
            (0.6, 1.0, -0.3), (0.7, 0.3, -0.8), (0.6, -0.6, 0.8), (0.5, 0.8, 0.7),
            (0.8, -0.5, -0.6), (0.4, 0.2, 1.0), (0.5, -0.2, -1.0),
        ]
        for dx, dy, dz in directions:
            dv = _unit(np.array([side * dx, dy, dz]) + rng.normal(0, 0.15, 3))
            start = entry - side * np.array([6.0, 0, 0]) + rng.normal(0, 3.0, 3) * np.array([0, 1, 1])
            queue.append((start, dv, float(rng.uniform(3.5, 6.0))))

    segments: list[Segment] = []
    while queue and len(segments) < max_segments:
        p, d, r = queue.popleft()
        length = float(np.clip(r * rng.uniform(4.0, 8.0) + 1.5, 2.0, 30.0))
        placed = None
        for attempt in range(6):
            d2 = _unit(d + (0.15 + 0.3 * attempt) * rng.normal(size=3))
            q = p + length * d2
            r_end = r * 0.97
            if field(q) < -(r_end + 1.5) and field(0.5 * (p + q)) < -(r_end + 0.5):
                placed = (q, d2, r_end)
                break
        if placed is None:
            continue
        q, d2, r_end = placed
        segments.append(Segment(p, q, r, r_end))
        if r_end < min_radius:
            continue
        if rng.random() < 0.25:
            queue.append((q, d2, r_end * 0.97))  # a bend without a branch
            continue
        alpha = rng.uniform(0.45, 1.0)
        r1 = r_end / (1.0 + alpha**3) ** (1.0 / 3.0)
        r2 = alpha * r1
        perp = _perpendicular(d2, rng)
        t1 = np.radians(rng.uniform(8, 35))
        t2 = np.radians(rng.uniform(35, 75))
        queue.append((q, _unit(np.cos(t1) * d2 + np.sin(t1) * perp), r1))
        if r2 >= min_radius:
            queue.append((q, _unit(np.cos(t2) * d2 - np.sin(t2) * perp), r2))
    return segments


def _point_key(p: np.ndarray) -> tuple[float, ...]:
    return tuple(np.round(p, 6).tolist())


def landmarks(segments: list[Segment]) -> np.ndarray:
    """Where the trees branch, bend and end: one row ``(x, y, z, radius, children)`` per segment
    end (patient mm; ``children`` 0 for a free end, 1 for a bend or a branch whose thinner arm
    fell below the smallest radius, 2 for a branch point).

    These are the spots a nodule detector mistakes for nodules when the vessel is thick, so
    training can show them to it as negatives."""
    children = Counter(_point_key(seg.a) for seg in segments)
    rows = [(*seg.b.tolist(), seg.rb, children[_point_key(seg.b)]) for seg in segments]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)
