"""Lung nodules of the four kinds radiologists report, with their ground truth.

* ``solid`` — soft-tissue density, lobulated ellipsoid;
* ``part-solid`` — ground-glass halo around an off-centre solid core;
* ``ground-glass`` — faint (-700 to -450 HU), fuzzy-edged;
* ``juxtapleural`` — solid, its centre within a radius of the pleura so that it merges with
  the chest wall (lung masks that stop at the pleura cut it off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from dicom_node.synth.anatomy import Chest
from dicom_node.synth.vessels import LungField, Segment

NODULE_TYPES = ("solid", "part-solid", "ground-glass", "juxtapleural")
TYPE_WEIGHTS = {"solid": 0.4, "part-solid": 0.15, "ground-glass": 0.2, "juxtapleural": 0.25}

# Diameter bands (mm) and how often each is drawn: most nodules in practice are small.
SIZE_BANDS = ((3.0, 5.0, 0.2), (5.0, 10.0, 0.45), (10.0, 20.0, 0.25), (20.0, 30.0, 0.10))


@dataclass
class NoduleTruth:
    """Ground truth of one nodule (patient mm, LPS)."""

    id: int
    type: str
    center_mm: tuple[float, float, float]
    diameter_mm: float
    """Equivalent-sphere diameter of the nodule (the LUNA16 hit radius is half of it)."""
    long_axis_mm: float
    volume_mm3: float
    hu: float
    solid_core_mm: float | None = None
    juxtapleural: bool = False
    # Rendering parameters (not part of the JSON truth).
    radii: np.ndarray = field(default_factory=lambda: np.ones(3), repr=False)
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3), repr=False)
    lobes: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)
    lobe_amplitude: float = 0.0
    core_offset: np.ndarray = field(default_factory=lambda: np.zeros(3), repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("radii", "rotation", "lobes", "lobe_amplitude", "core_offset"):
            data.pop(key)
        data["center_mm"] = [round(float(v), 3) for v in self.center_mm]
        for key in ("diameter_mm", "long_axis_mm", "volume_mm3", "hu"):
            data[key] = round(float(data[key]), 3)
        if data["solid_core_mm"] is not None:
            data["solid_core_mm"] = round(float(data["solid_core_mm"]), 3)
        return data


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def draw_diameter(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A diameter in [lo, hi] mm, drawn from :data:`SIZE_BANDS` restricted to that range."""
    bands = []
    for a, b, w in SIZE_BANDS:
        a2, b2 = max(a, lo), min(b, hi)
        if b2 > a2:
            bands.append((a2, b2, w * (b2 - a2) / (b - a)))
    if not bands:
        return float(np.clip(lo, 1.0, max(hi, 1.0)))
    weights = np.array([w for _, _, w in bands])
    a, b, _ = bands[int(rng.choice(len(bands), p=weights / weights.sum()))]
    return float(rng.uniform(a, b))


def place_nodules(
    chest: Chest,
    field_: LungField,
    rng: np.random.Generator,
    count: int,
    *,
    types: tuple[str, ...] = NODULE_TYPES,
    min_diameter: float = 3.0,
    max_diameter: float = 30.0,
    z_range: tuple[float, float] | None = None,
    others: Sequence[NoduleTruth] = (),
    accept: Callable[[np.ndarray, float], bool] | None = None,
) -> list[NoduleTruth]:
    """Draw ``count`` non-overlapping nodules inside the lungs (juxtapleural: at the pleura).

    ``others`` are nodules already placed (the new ones keep clear of them); ``accept(centre,
    radius)`` can veto a position (e.g. one buried in a vessel)."""
    weights = np.array([TYPE_WEIGHTS.get(t, 0.1) for t in types])
    weights = weights / weights.sum()
    nodules: list[NoduleTruth] = []
    z_lo, z_hi = z_range or (chest.base, chest.apex)
    while len(nodules) < count:
        kind = types[rng.choice(len(types), p=weights)]
        diameter = draw_diameter(rng, min_diameter, max_diameter)
        centre = None
        # Place the drawn kind and size; if there is no room, try a smaller one.
        for attempt in range(600):
            if attempt and attempt % 200 == 0:
                diameter = max(min_diameter, diameter * 0.7)
            r = diameter / 2
            if kind == "juxtapleural":
                c = _pleural_point(chest, field_, rng, r, z_lo, z_hi)
                if c is None:
                    continue
            else:
                c = np.array(
                    [
                        rng.uniform(-chest.body_ax, chest.body_ax),
                        rng.uniform(-chest.body_ay, chest.body_ay),
                        rng.uniform(z_lo, z_hi),
                    ]
                )
                if field_(c) > -(r + 3.0) or not _ball_inside(field_, c, r + 2.0):
                    continue
            if any(
                np.linalg.norm(c - np.array(n.center_mm)) < r + n.diameter_mm / 2 + 8.0
                for n in (*others, *nodules)
            ):
                continue
            if accept is not None and not accept(c, r):
                continue
            centre = c
            break
        if centre is None:
            break  # the lungs are full (or too small for more nodules)
        r = diameter / 2
        aspect = rng.uniform(0.8, 1.0, 2)
        radii = r * np.array([1.0, aspect[0], aspect[1]]) / np.cbrt(aspect[0] * aspect[1])
        if kind == "ground-glass":
            hu = float(rng.uniform(-700, -450))
        elif kind == "part-solid":
            hu = float(rng.uniform(-650, -450))
        else:
            hu = float(rng.uniform(10, 60))
        core = float(diameter * rng.uniform(0.3, 0.6)) if kind == "part-solid" else None
        nodules.append(
            NoduleTruth(
                id=len(nodules) + 1,
                type=kind,
                center_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                diameter_mm=float(diameter),
                long_axis_mm=float(2 * radii.max()),
                volume_mm3=float(4.0 / 3.0 * np.pi * np.prod(radii)),
                hu=hu,
                solid_core_mm=core,
                juxtapleural=kind == "juxtapleural",
                radii=radii,
                rotation=_random_rotation(rng),
                lobes=np.array([v / np.linalg.norm(v) for v in rng.normal(size=(3, 3))]),
                lobe_amplitude=float(rng.uniform(0.0, 0.12)),
                core_offset=rng.normal(0, 0.12 * r, 3),
            )
        )
    nodules.sort(key=lambda n: -n.center_mm[2])
    for i, n in enumerate(nodules, start=1):
        n.id = i
    return nodules


def _ball_inside(field_: LungField, centre: np.ndarray, radius: float) -> bool:
    for d in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
        if field_(centre + radius * np.array(d, dtype=float)) > -1.0:
            return False
    return True


def _pleural_point(
    chest: Chest, field_: LungField, rng: np.random.Generator, r: float, z_lo: float, z_hi: float
) -> np.ndarray | None:
    """A centre 0.2-0.6 r inside the costal pleura (lateral, anterior or posterior wall).

    The pleura is found on the exact (analytic) lung surface, not the coarse field, so the
    nodule really bulges into the lung by 1.2-1.6 radii (a coarse estimate can bury a small
    nodule in the chest wall, where no reader could see it)."""
    side = rng.choice([-1.0, 1.0])
    z = rng.uniform(z_lo, z_hi)
    angle = rng.uniform(-0.6 * np.pi, 0.6 * np.pi)  # away from the mediastinum
    direction = np.array([side * np.cos(angle), np.sin(angle), 0.0])
    start = np.array([side * chest.lung_cx, chest.lung_cy, z])

    def distance(p: np.ndarray) -> float:
        return float(chest.lung_distance(np.array(p[0]), np.array(p[1]), float(p[2])))

    if distance(start) > -5.0:
        return None
    # March out to the surface, then bisect it to 0.05 mm.
    inside, step = start.copy(), 2.0
    for _ in range(400):
        q = inside + step * direction
        if distance(q) > 0.0:
            break
        inside = q
    else:
        return None
    outside = inside + step * direction
    for _ in range(6):
        mid = 0.5 * (inside + outside)
        if distance(mid) > 0.0:
            outside = mid
        else:
            inside = mid
    depth = r * rng.uniform(0.2, 0.6)
    centre = inside - direction * depth
    if distance(centre) > -0.5 * depth or field_(centre - direction * r) > -1.0:
        return None  # the surface is too oblique here, or the lung too thin
    return centre


def beside_vessel(
    nodule: NoduleTruth,
    segments: Sequence[Segment],
    field_: LungField,
    rng: np.random.Generator,
    *,
    others: Sequence[NoduleTruth] = (),
    accept: Callable[[np.ndarray, float], bool] | None = None,
    tries: int = 300,
) -> NoduleTruth | None:
    """``nodule`` moved so that it touches a vessel of similar calibre (a juxtavascular nodule,
    the hardest kind for a blob detector), or ``None`` when no such spot is found."""
    r = nodule.diameter_mm / 2
    calibre = [s for s in segments if 0.3 * r <= 0.5 * (s.ra + s.rb) <= 1.5 * r and 0.5 * (s.ra + s.rb) >= 0.7]
    if not calibre:
        return None
    for _ in range(tries):
        seg = calibre[int(rng.integers(len(calibre)))]
        t = float(rng.uniform(0.1, 0.9))
        axis = seg.b - seg.a
        length = float(np.linalg.norm(axis))
        if length < 1e-6:
            continue
        axis = axis / length
        side = np.cross(axis, rng.normal(size=3))
        if np.linalg.norm(side) < 1e-6:
            continue
        side /= np.linalg.norm(side)
        vessel_r = seg.ra + t * (seg.rb - seg.ra)
        c = seg.a + t * length * axis + side * (vessel_r + 0.7 * r)
        if field_(c) > -(r + 3.0) or not _ball_inside(field_, c, r + 2.0):
            continue
        if any(np.linalg.norm(c - np.array(n.center_mm)) < r + n.diameter_mm / 2 + 8.0 for n in others):
            continue
        if accept is not None and not accept(c, r):
            continue
        return replace(nodule, center_mm=(float(c[0]), float(c[1]), float(c[2])))
    return None
