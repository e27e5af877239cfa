"""Building a chest-CT phantom volume (HU) with its ground truth, reproducibly from a seed."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dicom_node.synth import raster
from dicom_node.synth.anatomy import BONE, SOFT, Chest
from dicom_node.synth.nodules import NODULE_TYPES, NoduleTruth, beside_vessel, place_nodules
from dicom_node.synth.vessels import LungField, grow_trees, landmarks

Progress = Callable[[str, float], None]
"""Progress callback: (stage name, fraction of the whole job done 0..1)."""

TRUTH_FORMAT = "dicom-node-synth/1"
HIDDEN_SHARE = 0.5
"""A nodule whose inner 0.7 radius is more than this share vessel would be hidden: it is moved."""


def _core_vessel_share(
    tissue: np.ndarray, centre: np.ndarray, radius: float, spacing: np.ndarray
) -> float:
    """Mean vessel coverage (0..1) of the voxels within 0.7 ``radius`` of ``centre`` (grid mm)."""
    reach = 0.7 * radius
    lo = np.maximum(np.floor((centre - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / spacing).astype(int) + 1, np.array(tissue.shape))
    if np.any(hi <= lo):
        return 0.0
    axes = [np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, spacing, centre, strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = zz**2 + yy**2 + xx**2 <= reach**2
    box = tissue[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return float(box[inside].mean() / 255.0) if inside.any() else 0.0


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate. The same spec (seed included) always gives the same pixels and UIDs."""

    seed: int = 0
    slices: int = 300
    slice_thickness: float = 1.0
    """Slice thickness and spacing between slice centres, mm."""
    pixel_spacing: float = 0.7
    matrix: int = 512
    nodules: int | None = None
    """Number of nodules; None draws 4-8 from the seed; 0 makes a nodule-free phantom."""
    nodule_types: tuple[str, ...] = NODULE_TYPES
    min_diameter: float = 3.0
    max_diameter: float = 30.0
    noise_hu: float | None = None
    """Standard deviation of the image noise; None draws 15-35 HU from the seed."""
    vessels: bool = True
    juxtavascular: float = 0.0
    """Share of the nodules (juxtapleural ones excepted) moved to touch a vessel of similar
    calibre: hard examples for training. 0 leaves placement to chance, as in the benchmark."""
    patient_name: str = "SYNTH^PHANTOM"
    patient_id: str | None = None
    """Defaults to ``SYNTH-<seed>``."""

    def __post_init__(self) -> None:
        if self.slices < 1 or self.matrix < 16:
            raise ValueError("a phantom needs at least 1 slice and a 16 x 16 matrix")
        if self.slice_thickness <= 0 or self.pixel_spacing <= 0:
            raise ValueError("slice thickness and pixel spacing must be positive")
        unknown = set(self.nodule_types) - set(NODULE_TYPES)
        if unknown or not self.nodule_types:
            raise ValueError(f"nodule types must be among {', '.join(NODULE_TYPES)}")
        if not 0.0 <= self.juxtavascular <= 1.0:
            raise ValueError("juxtavascular is a share between 0 and 1")
        if not 0 < self.min_diameter <= self.max_diameter:
            raise ValueError("need 0 < min_diameter <= max_diameter")

    def digest(self) -> str:
        """A short hash of the spec (goes into the UIDs, so different specs never collide)."""
        data = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Phantom:
    """A generated volume in HU (int16, index order (k, j, i)) and its ground truth."""

    spec: PhantomSpec
    hu: np.ndarray
    x0: float
    y0: float
    z_top: float
    nodules: list[NoduleTruth]
    noise_hu: float
    vessel_segments: int
    vessel_landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    """Branch points, bends and free ends of the vessel trees (:func:`vessels.landmarks`)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.spec.slice_thickness, self.spec.pixel_spacing, self.spec.pixel_spacing)

    def position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``k`` (slice 0 is the most superior)."""
        return (self.x0, self.y0, self.z_top - k * self.spec.slice_thickness)

    def truth(self) -> dict[str, Any]:
        """The ground truth as JSON-ready data (no UIDs here; the writer adds them)."""
        spec = asdict(self.spec)
        spec["nodule_types"] = list(self.spec.nodule_types)
        return {
            "format": TRUTH_FORMAT,
            "seed": self.spec.seed,
            "spec": spec,
            "geometry": {
                "slices": self.spec.slices,
                "rows": self.spec.matrix,
                "columns": self.spec.matrix,
                "pixel_spacing_mm": self.spec.pixel_spacing,
                "slice_thickness_mm": self.spec.slice_thickness,
                "first_position_mm": list(self.position(0)),
                "orientation": [1, 0, 0, 0, 1, 0],
            },
            "noise_hu": round(self.noise_hu, 2),
            "vessel_segments": self.vessel_segments,
            "nodules": [n.to_json() for n in self.nodules],
        }


def make_phantom(spec: PhantomSpec, progress: Progress | None = None) -> Phantom:
    """Generate the phantom volume described by ``spec``.

    Memory: about 1.3 bytes x 4 per voxel at the peak (a float32 volume plus a uint8 coverage
    volume), 400 MB for 300 x 512 x 512. Time: about 10-20 s for that size on one core.
    """
    report = progress or (lambda stage, fraction: None)
    rng = np.random.default_rng(spec.seed)
    n, dz, px = spec.matrix, spec.slice_thickness, spec.pixel_spacing
    k_count = spec.slices
    x0 = -(n - 1) / 2 * px
    y0 = -(n - 1) / 2 * px
    z_top = (k_count - 1) / 2 * dz
    z_bottom = z_top - (k_count - 1) * dz
    chest = Chest(fov=n * px, z_top=z_top, z_bottom=z_bottom, rng_state=int(rng.integers(2**31)))
    field_ = LungField(chest, step=max(2.0, min(4.0, chest.fov / 140)))
    spacing = np.array([dz, px, px])
    edge = float((dz + 2 * px) / 3)

    def grid_mm(p: np.ndarray) -> np.ndarray:
        return np.array([z_top - p[2], p[1] - y0, p[0] - x0])

    # Patient (x, y, z) -> grid (z_top - z, y - y0, x - x0): a reflection and a permutation.
    to_grid = np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], dtype=np.float64)

    count = spec.nodules if spec.nodules is not None else int(rng.integers(4, 9))
    margin = min(10.0, 0.05 * (z_top - z_bottom))
    z_range = (max(chest.base, z_bottom + margin), min(chest.apex, z_top - margin))
    nodules = place_nodules(
        chest,
        field_,
        rng,
        count,
        types=spec.nodule_types,
        min_diameter=spec.min_diameter,
        max_diameter=spec.max_diameter,
        z_range=z_range,
    )
    noise = spec.noise_hu if spec.noise_hu is not None else float(rng.uniform(15, 35))
    report("anatomy", 0.02)

    hu = np.empty((k_count, n, n), dtype=np.float32)
    xs = x0 + px * np.arange(n, dtype=np.float32)
    ys = y0 + px * np.arange(n, dtype=np.float32)
    for k in range(k_count):
        hu[k] = chest.slice_hu(xs, ys, z_top - k * dz, edge)
        if k % 16 == 0:
            report("anatomy", 0.02 + 0.28 * k / k_count)

    for path in chest.rib_paths(rng):
        for a, b in itertools.pairwise(path):
            hit = raster.capsule_coverage(hu.shape, grid_mm(a), grid_mm(b), 4.0, 4.0, spacing, edge)
            if hit is not None:
                raster.paint_towards(hu, hit[0], hit[1], BONE)
    report("ribs", 0.33)

    tissue = np.zeros(hu.shape, dtype=np.uint8)
    segments = grow_trees(chest, field_, rng) if spec.vessels else []
    for s_i, seg in enumerate(segments):
        raster.capsule(tissue, grid_mm(seg.a), grid_mm(seg.b), seg.ra, seg.rb, spacing, edge)
        if s_i % 200 == 0:
            report("vessels", 0.33 + 0.32 * s_i / max(1, len(segments)))
    report("vessels", 0.65)

    # A nodule whose core lies inside a thicker vessel could not be seen by anyone: it moves to
    # a free spot of the same kind and size (drawn from a second stream seeded from the seed, so
    # the rest of the phantom stays the same); if the lungs have no such spot it is dropped.
    def clear_of_vessels(centre: np.ndarray, radius: float, vessels: np.ndarray = tissue) -> bool:
        return _core_vessel_share(vessels, grid_mm(centre), radius, spacing) <= HIDDEN_SHARE

    if spec.juxtavascular > 0 and segments:
        near = np.random.default_rng((spec.seed, 2))
        for i, nod in enumerate(nodules):
            if nod.juxtapleural or near.random() >= spec.juxtavascular:
                continue
            moved_to = beside_vessel(
                nod, segments, field_, near, others=[n for j, n in enumerate(nodules) if j != i], accept=clear_of_vessels
            )
            if moved_to is not None:
                nodules[i] = moved_to

    relocate = np.random.default_rng((spec.seed, 1))
    visible = []
    for i, nod in enumerate(nodules):
        if clear_of_vessels(np.array(nod.center_mm), nod.diameter_mm / 2):
            visible.append(True)
            continue
        moved = place_nodules(
            chest,
            field_,
            relocate,
            1,
            types=(nod.type,),
            min_diameter=nod.diameter_mm,
            max_diameter=nod.diameter_mm,
            z_range=z_range,
            others=[n for j, n in enumerate(nodules) if j != i],
            accept=clear_of_vessels,
        )
        if moved:
            nodules[i] = moved[0]
        visible.append(bool(moved))
    for nod, shown in zip(nodules, visible, strict=True):
        centre = grid_mm(np.array(nod.center_mm))
        rot = to_grid @ nod.rotation
        if nod.type in ("ground-glass", "part-solid"):
            fuzzy = edge + float(rng.uniform(1.0, 2.5))
            if not shown:
                continue
            hit = raster.blob_coverage(
                hu.shape, centre, nod.radii, rot, spacing, fuzzy, nod.lobes, nod.lobe_amplitude
            )
            if hit is not None:
                raster.paint_towards(hu, hit[0], hit[1], nod.hu)
            if nod.type == "part-solid" and nod.solid_core_mm:
                core_r = nod.solid_core_mm / 2
                core_radii = nod.radii * (core_r / (nod.diameter_mm / 2))
                hit = raster.blob_coverage(
                    hu.shape,
                    centre + nod.core_offset,
                    core_radii,
                    rot,
                    spacing,
                    edge,
                    nod.lobes,
                    nod.lobe_amplitude,
                )
                if hit is not None:
                    raster.composite_max_u8(tissue, *hit)
        elif shown:
            hit = raster.blob_coverage(
                hu.shape, centre, nod.radii, rot, spacing, edge, nod.lobes, nod.lobe_amplitude
            )
            if hit is not None:
                raster.composite_max_u8(tissue, *hit)
    nodules = sorted(
        (n for n, shown in zip(nodules, visible, strict=True) if shown),
        key=lambda n: -n.center_mm[2],
    )
    for number, nod in enumerate(nodules, start=1):
        nod.id = number
    report("nodules", 0.7)

    # Composite soft tissue, add correlated noise, store as int16 HU, one slice at a time.
    out = np.empty(hu.shape, dtype=np.int16)
    white = noise / 0.375  # the [1,2,1]x[1,2,1]/16 smoothing keeps 0.375 of the std
    for k in range(k_count):
        plane = hu[k]
        plane += tissue[k].astype(np.float32) * np.float32(1 / 255) * (np.float32(SOFT) - plane)
        w: np.ndarray = rng.standard_normal((n + 2, n + 2), dtype=np.float32)
        w = (w[:-2] + 2 * w[1:-1] + w[2:]) / 4
        w = (w[:, :-2] + 2 * w[:, 1:-1] + w[:, 2:]) / 4
        plane += np.float32(white) * w
        np.clip(np.rint(plane), -1024, 3071, out=plane)
        out[k] = plane
        if k % 16 == 0:
            report("noise", 0.7 + 0.3 * k / k_count)
    del hu, tissue
    report("done", 1.0)
    return Phantom(
        spec=spec,
        hu=out,
        x0=float(x0),
        y0=float(y0),
        z_top=float(z_top),
        nodules=nodules,
        noise_hu=float(noise),
        vessel_segments=len(segments),
        vessel_landmarks=landmarks(segments),
    )
