"""Image operations of the built-in lung-nodule detector (torch for the heavy filtering).

* :func:`pool_inplane` — mean-pooling in-plane (to about 1.4 mm pixels for detection, 2.8 mm
  for the lung mask).
* the lung mask is in :mod:`workers.models.lungs`.
* :func:`blob_response` — scale-normalised Laplacian of Gaussian over several scales through
  the FFT (one forward transform, one inverse per scale). Why the FFT:
  a separable ``conv3d`` LoG over 300x512² took 92 s and 7 GiB on 2 cores, the FFT form 3.8 s.
* :func:`local_maxima` — peaks of the response inside the mask via ``max_pool3d``.
* :func:`hessian_at` — Hessian eigenvalues of the smoothed image at given points only, by
  central differences on the per-scale smoothed volumes (no full-volume eigen-analysis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def pool_inplane(array: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """Mean-pool rows and columns by ``factor`` (crops the remainder); float32 tensor (K, R, C)."""
    t = torch.as_tensor(array)
    if factor == 1:
        return t.float()
    _, r, c = t.shape
    r2, c2 = (r // factor) * factor, (c // factor) * factor
    return F.avg_pool2d(t[:, None, :r2, :c2].float(), factor)[:, 0]


@dataclass
class BlobResponse:
    """The multi-scale response on a grid, and what is needed to look at candidates later."""

    response: torch.Tensor
    """(K, R, C) max over scales of the scale-normalised -LoG."""
    scale_index: torch.Tensor
    """(K, R, C) uint8 index of the scale that gave the maximum."""
    sigmas_mm: tuple[float, ...]
    smoothed: list[torch.Tensor]
    """Per scale, the Gaussian-smoothed image (for Hessians at candidate points)."""


def _freq_squared(n: int, spacing: float, real: bool = False) -> torch.Tensor:
    f = torch.fft.rfftfreq(n, d=spacing) if real else torch.fft.fftfreq(n, d=spacing)
    return (2 * math.pi * f) ** 2


def blob_response(
    image: torch.Tensor,
    spacing: tuple[float, float, float],
    sigmas_mm: tuple[float, ...],
    *,
    keep_smoothed: bool = True,
) -> BlobResponse:
    """Scale-normalised -LoG, maximum over ``sigmas_mm``, through the FFT (periodic boundary:
    callers pad or flatten the borders). Bright blobs of radius r peak near sigma = r / sqrt(3).
    """
    k, r, c = image.shape
    spectrum = torch.fft.rfftn(image)
    wz = _freq_squared(k, spacing[0])[:, None, None]
    wy = _freq_squared(r, spacing[1])[None, :, None]
    wx = _freq_squared(c, spacing[2], real=True)[None, None, :]
    best = torch.full(image.shape, -math.inf, dtype=torch.float32, device=image.device)
    best_idx = torch.zeros(image.shape, dtype=torch.uint8, device=image.device)
    smoothed: list[torch.Tensor] = []
    for s_i, sigma in enumerate(sigmas_mm):
        s2 = sigma * sigma
        gauss = torch.exp(-0.5 * s2 * wz) * torch.exp(-0.5 * s2 * wy) * torch.exp(-0.5 * s2 * wx)
        if keep_smoothed:
            smooth = torch.fft.irfftn(spectrum * gauss, s=image.shape)
            smoothed.append(smooth)
        # -sigma² * Laplacian in the Fourier domain: sigma² * |w|² * G.
        lap = torch.fft.irfftn(spectrum * (gauss * (s2 * (wz + wy + wx))), s=image.shape)
        better = lap > best
        best = torch.where(better, lap, best)
        best_idx[better] = s_i
        del lap, better
    return BlobResponse(best, best_idx, tuple(sigmas_mm), smoothed)


def local_maxima(
    response: torch.Tensor, mask: torch.Tensor, threshold: float, size: int = 3
) -> np.ndarray:
    """(N, 3) indices of voxels that are the maximum of their ``size``³ neighbourhood, above
    ``threshold`` and inside ``mask``."""
    pooled = F.max_pool3d(response[None, None], size, stride=1, padding=size // 2)[0, 0]
    peaks = (response >= pooled) & (response > threshold) & mask
    return torch.nonzero(peaks).numpy()


def refine_peaks(response: torch.Tensor | np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """(N, 3) sub-voxel offsets (-0.5..0.5) of peaks from a parabola through each peak and its
    two neighbours along every axis (a 4 mm nodule is under three 1.4 mm voxels across)."""
    if len(peaks) == 0:
        return np.zeros((0, 3))
    v = response.cpu().numpy() if isinstance(response, torch.Tensor) else response
    shape = np.array(v.shape)
    out = np.zeros((len(peaks), 3))
    centre = v[tuple(peaks.T)]
    for axis in range(3):
        step = np.zeros(3, dtype=int)
        step[axis] = 1
        lo = np.clip(peaks - step, 0, shape - 1)
        hi = np.clip(peaks + step, 0, shape - 1)
        a, b = v[tuple(lo.T)], v[tuple(hi.T)]
        curve = a - 2 * centre + b
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(curve < 0, 0.5 * (a - b) / curve, 0.0)
        out[:, axis] = np.clip(np.nan_to_num(delta), -0.5, 0.5)
    return out


def hessian_at(
    smoothed: torch.Tensor | np.ndarray, points: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    """(N, 3) eigenvalues (ascending) of the Hessian of ``smoothed`` at integer ``points``
    (central differences, in HU/mm²)."""
    if len(points) == 0:
        return np.zeros((0, 3))
    v = smoothed.numpy() if isinstance(smoothed, torch.Tensor) else smoothed
    shape = np.array(v.shape)
    p = np.clip(points, 1, shape - 2)
    k, j, i = p[:, 0], p[:, 1], p[:, 2]
    c = v[k, j, i]
    h = np.empty((len(p), 3, 3))
    axes = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    for a in range(3):
        da = axes[a]
        plus = v[k + da[0], j + da[1], i + da[2]]
        minus = v[k - da[0], j - da[1], i - da[2]]
        h[:, a, a] = (plus - 2 * c + minus) / spacing[a] ** 2
        for b in range(a + 1, 3):
            db = axes[b]
            pp = v[k + da[0] + db[0], j + da[1] + db[1], i + da[2] + db[2]]
            pm = v[k + da[0] - db[0], j + da[1] - db[1], i + da[2] - db[2]]
            mp = v[k - da[0] + db[0], j - da[1] + db[1], i - da[2] + db[2]]
            mm = v[k - da[0] - db[0], j - da[1] - db[1], i - da[2] - db[2]]
            h[:, a, b] = h[:, b, a] = (pp - pm - mp + mm) / (4 * spacing[a] * spacing[b])
    return np.linalg.eigvalsh(h)


def sample(volume: np.ndarray, points_ijk: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``volume`` at fractional (k, j, i) points (clamped to the grid)."""
    shape = np.array(volume.shape) - 1
    p = np.clip(points_ijk, 0, shape)
    p0 = np.minimum(np.floor(p).astype(int), shape - 1)
    p0 = np.maximum(p0, 0)
    t = p - p0
    out = np.zeros(len(p), dtype=np.float64)
    for dk in (0, 1):
        for dj in (0, 1):
            for di in (0, 1):
                w = (t[:, 0] if dk else 1 - t[:, 0]) * (t[:, 1] if dj else 1 - t[:, 1]) * (t[:, 2] if di else 1 - t[:, 2])
                kk = np.minimum(p0[:, 0] + dk, shape[0])
                jj = np.minimum(p0[:, 1] + dj, shape[1])
                ii = np.minimum(p0[:, 2] + di, shape[2])
                out += w * volume[kk, jj, ii]
    return out
