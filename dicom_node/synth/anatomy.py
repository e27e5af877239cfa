"""The chest of a phantom: body, lungs, mediastinum, heart, aorta, spine, ribs, trachea.

Every structure is an analytic shape in patient millimetres (x to the patient's left, y
posterior, z superior, as in DICOM LPS), scaled to the field of view and jittered by the
seed, so each phantom is a different "patient". :meth:`Chest.lung_distance` is an approximate
signed distance to the lung surface (negative inside), used to render the lungs with
partial-volume edges and to keep vessels and nodules where they belong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR = -1000.0
FAT = -100.0
SOFT = 40.0
LUNG = -860.0
BONE = 650.0
MARROW = 250.0


def _ellipse_distance(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float | np.ndarray, ay: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipse."""
    ax = float(max(ax, 1e-3)) if np.ndim(ax) == 0 else np.maximum(ax, 1e-3)
    ay = float(max(ay, 1e-3)) if np.ndim(ay) == 0 else np.maximum(ay, 1e-3)
    rho = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return (rho - 1.0) * np.minimum(ax, ay)


@dataclass
class Chest:
    """Dimensions (mm) of one phantom's chest, drawn from the seed."""

    fov: float
    z_top: float
    z_bottom: float
    rng_state: int

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.rng_state)
        f = self.fov
        size = rng.uniform(0.9, 1.0)
        self.body_ax = 0.47 * f * size
        self.body_ay = 0.33 * f * size
        self.lung_cx = 0.225 * f * size
        self.lung_cy = 0.02 * f * size
        self.lung_ax = 0.19 * f * size * rng.uniform(0.95, 1.05)
        self.lung_ay = 0.25 * f * size * rng.uniform(0.95, 1.05)
        height = self.z_top - self.z_bottom
        lung_height = min(0.93 * height, 300.0)
        mid = 0.5 * (self.z_top + self.z_bottom)
        self.apex = mid + lung_height / 2
        self.base = mid - lung_height / 2
        self.lung_height = lung_height
        self.dome = 0.2 * lung_height
        self.med_cy = -0.03 * f * size
        self.med_ax = 0.075 * f * size
        self.med_ay = 0.28 * f * size
        self.heart = (0.04 * f * size, -0.07 * f * size, self.base + 0.3 * lung_height)
        self.heart_axes = (0.14 * f * size, 0.12 * f * size, 0.2 * lung_height)
        self.aorta = (0.055 * f * size, 0.16 * f * size, 0.032 * f * size)
        self.spine = (0.0, 0.215 * f * size, 0.05 * f * size)
        self.canal = (0.0, 0.285 * f * size, 0.02 * f * size)
        self.trachea_r = 0.025 * f * size
        self.trachea_y = -0.05 * f * size
        self.carina_z = self.apex - 0.32 * lung_height
        self.hilum_z = self.apex - 0.45 * lung_height
        self.size = size
        self.gradient = rng.uniform(40, 90)
        """Dependent density: HU added from anterior to posterior lung."""
        self.texture = [
            (rng.normal(0, 1, 3) / rng.uniform(15, 40), rng.uniform(0, 2 * np.pi), rng.uniform(4, 10))
            for _ in range(4)
        ]

    # -- lungs --------------------------------------------------------------------------------

    def _profile(self, z: np.ndarray | float) -> np.ndarray:
        """Relative width of the lung cross-section at height z (0 above the apex)."""
        t = (self.apex - np.asarray(z, dtype=np.float64)) / self.lung_height
        rise = np.clip(t / 0.45, 0.0, 1.0)
        w = np.sqrt(np.clip(1.0 - (1.0 - rise) ** 2, 0.0, 1.0))
        return np.where(t < 0, 0.0, w * (1.0 + 0.08 * np.clip(t - 0.45, 0, 1)))

    def lung_distance(self, x: np.ndarray, y: np.ndarray, z: np.ndarray | float) -> np.ndarray:
        """Approximate signed distance (mm) to the lung surface, negative inside either lung."""
        x = np.asarray(x)
        y = np.asarray(y)
        if x.dtype != np.float32:
            x = x.astype(np.float64)
            y = np.asarray(y, dtype=np.float64)
        scalar_z = np.ndim(z) == 0
        # A scalar z stays a Python float so that float32 grids are not promoted to float64.
        z = float(z) if scalar_z else np.asarray(z, dtype=np.float64)
        w: np.ndarray | float = self._profile(z)
        if scalar_z:
            w = float(w)
            if w == 0.0:
                return np.full(np.broadcast(x, y).shape, z - self.apex + 1.0, dtype=x.dtype)
        out = None
        for side in (-1.0, 1.0):
            cx = side * self.lung_cx
            d = _ellipse_distance(x, y, cx, self.lung_cy, self.lung_ax * w, self.lung_ay * w)
            # Diaphragm dome: the lung ends below a dome surface, higher on the right (liver).
            dome = self.dome * (1.15 if side < 0 else 1.0)
            r2 = ((x - cx) / self.lung_ax) ** 2 + ((y - self.lung_cy) / self.lung_ay) ** 2
            floor = self.base + dome * np.clip(1.0 - r2, 0.0, 1.0)
            d = np.maximum(d, floor - z)
            d = np.maximum(d, z - self.apex)
            out = d if out is None else np.minimum(out, d)
        assert out is not None
        # Mediastinum, heart, aorta and spine carve the lungs; 2 mm of pleura/fat between.
        med = _ellipse_distance(x, y, 0.0, self.med_cy, self.med_ax, self.med_ay)
        hx, hy, hz = self.heart
        hax, hay, haz = self.heart_axes
        hs = np.sqrt(np.clip(1.0 - ((z - hz) / haz) ** 2, 0.0, 1.0))
        if scalar_z:
            hs = float(hs)
        if scalar_z and hs == 0.0:
            heart: np.ndarray | np.float32 = np.float32(1e3)
        else:
            heart = np.where(hs > 0, _ellipse_distance(x, y, hx, hy, hax * hs + 1e-3, hay * hs + 1e-3), 1e3)
        ax_, ay_, ar = self.aorta
        aorta = np.sqrt((x - ax_) ** 2 + (y - ay_) ** 2) - ar
        sx, sy, sr = self.spine
        spine = np.sqrt((x - sx) ** 2 + (y - sy) ** 2) - sr * 1.25
        carve = np.minimum(np.minimum(med, heart), np.minimum(aorta, spine)) - 2.0
        return np.maximum(out, -carve)

    def lung_hu(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Parenchyma density on plane ``z`` for column coordinates ``x`` (1D) and rows ``y`` (1D):
        denser posteriorly, with a faint low-frequency texture."""
        x = np.asarray(x, dtype=np.float32)[None, :]
        y = np.asarray(y, dtype=np.float32)[:, None]
        span = 2 * self.lung_ay
        hu = LUNG + self.gradient * np.clip((y - (self.lung_cy - self.lung_ay)) / span, 0, 1) + 0 * x
        for k, phase, amp in self.texture:
            # sin(a + b) with a depending on x only and b on y only: two outer products.
            a = k[0] * x
            b = k[1] * y + k[2] * z + phase
            hu = hu + amp * (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b))
        return hu.astype(np.float32)

    # -- the rest of the chest, one axial slice at a time ----------------------------------------

    def slice_hu(self, xs: np.ndarray, ys: np.ndarray, z: float, edge: float) -> np.ndarray:
        """Noise-free HU of the structures other than vessels and nodules on plane ``z``.

        ``xs`` are the column coordinates and ``ys`` the row coordinates (1D, mm).
        """
        x = np.asarray(xs, dtype=np.float32)[None, :]
        y = np.asarray(ys, dtype=np.float32)[:, None]
        hu = np.full((y.shape[0], x.shape[1]), AIR, dtype=np.float32)

        def ramp(d: np.ndarray) -> np.ndarray:
            return np.clip(np.float32(0.5) - d * np.float32(1 / edge), 0.0, 1.0).astype(np.float32, copy=False)

        body = _ellipse_distance(x, y, 0.0, 0.0, self.body_ax, self.body_ay)
        hu += ramp(body) * (FAT - AIR)
        muscle = _ellipse_distance(x, y, 0.0, 0.0, self.body_ax * 0.9, self.body_ay * 0.88)
        hu += ramp(muscle) * (SOFT - FAT)
        # Spine: cortical ring around marrow, and the canal behind it.
        sx, sy, sr = self.spine
        vert = np.sqrt((x - sx) ** 2 + (y - sy) ** 2)
        disc = (z % 28.0) < 5.0
        core = MARROW if not disc else 80.0
        hu = np.maximum(hu, SOFT + ramp(vert - sr) * ((BONE if not disc else 80.0) - SOFT))
        hu = np.where(vert < sr - 2.5, np.float32(core), hu)
        cx, cy, cr = self.canal
        hu = np.where(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) < cr, np.float32(20.0), hu)
        # Sternum (anterior plate) in the upper two thirds.
        if z > self.base + 0.35 * self.lung_height:
            st = _ellipse_distance(x, y, 0.0, -self.body_ay * 0.86, 0.035 * self.fov, 0.012 * self.fov)
            hu = np.maximum(hu, SOFT + ramp(st) * (MARROW - SOFT))
        # Lungs.
        lung = ramp(self.lung_distance(x, y, z))
        if np.any(lung):
            hu += lung * (self.lung_hu(xs, ys, z) - hu)
        # Trachea, then the main bronchi towards each hilum.
        if z > self.carina_z:
            tr = np.sqrt(x**2 + (y - self.trachea_y) ** 2) - self.trachea_r
            hu += ramp(tr) * (AIR - hu)
        elif z > self.hilum_z:
            frac = (self.carina_z - z) / (self.carina_z - self.hilum_z)
            for side in (-1.0, 1.0):
                bx = side * frac * (self.lung_cx - self.lung_ax * 0.55)
                br = np.sqrt((x - bx) ** 2 + (y - self.trachea_y * (1 - frac)) ** 2) - self.trachea_r * 0.7
                hu += ramp(br) * (AIR - hu)
        return hu

    def rib_paths(self, rng: np.random.Generator, step: float = 3.0) -> list[np.ndarray]:
        """Centre lines (N, 3) of the ribs, in patient mm, sloping down towards the front."""
        paths = []
        spacing = self.lung_height / 11.5
        for n in range(12):
            z0 = self.apex - 0.04 * self.lung_height - n * spacing
            for side in (-1.0, 1.0):
                phis = np.linspace(0.12 * np.pi, 0.82 * np.pi, max(8, int(0.9 * self.fov / step)))
                run: list[tuple[float, float, float]] = []
                for phi in phis:
                    scale = 0.92
                    z = z0 - 0.09 * self.fov * (phi / np.pi) + rng.normal(0, 0.3)
                    for _ in range(30):
                        x = side * scale * self.body_ax * np.sin(phi)
                        y = scale * self.body_ay * np.cos(phi)
                        if self.lung_distance(np.array(x), np.array(y), z) > 9.0:
                            break
                        scale += 0.01
                    if scale < 0.985:
                        run.append((x, y, z))
                        continue
                    # No room between lung and skin here: end this piece of rib.
                    if len(run) > 2:
                        paths.append(np.array(run))
                    run = []
                if len(run) > 2:
                    paths.append(np.array(run))
        return paths
