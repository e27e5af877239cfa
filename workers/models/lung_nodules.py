"""The built-in ``lung-nodules`` detector: a reference detector for pulmonary nodules on chest CT.

**This is a reference detector, not a cleared medical device.** It exists so that the node
works end to end out of the box and so that plug-in models have a baseline to beat. It was
trained on synthetic phantoms (``dicom-node synth``) with its last stage fine-tuned on two
patients' real chest CT with simulated nodules inserted, and measured on one further real scan
(its card, ``weights/lung_nodules_fp.json``, ``real_scans``; docs/detection.md, "Real chest
CT"); it has not been validated on clinical data and must not be used for diagnosis.

How it works (all on the CPU in about 10 s for a 300 x 512² CT on 2 cores; CUDA when present):

1. **Grid.** Unevenly spaced series are resampled along the normal
   (:func:`workers.grid.uniform_grid`); results are mapped back to source slice indices.
   In-plane, the image is mean-pooled to about 1.4 mm pixels.
2. **Lungs** from HU and morphology (:func:`workers.models.lungs.lung_mask`): air inside the
   body, closed per slice and per component so that juxtapleural nodules are inside the mask.
   Outside the mask the image is set to the lung's median HU, so the chest wall, mediastinum
   and bone give no response and a nodule on the pleura becomes a free-standing blob.
   **Input quality control** (:mod:`workers.models.quality`) then measures noise, calibration,
   lung volume and field of view against the range the weights' card declares as validated:
   outside it the job ends skipped with the reason (option ``outside_range = "qualify"``:
   findings are written, with the reason as ``extra['qualifier']``). After stage 5, more
   findings above the threshold than a chest holds is the same kind of signal, never cut short.
3. **Blob enhancement**: densities clipped at -500 HU (so ground glass next to a vessel keeps its
   own peak), then the scale-normalised Laplacian of Gaussian at 7 scales (1-8 mm) through the
   FFT in torch, maximum over scales.
4. **Candidates**: local maxima of the response inside the lung mask, refined to sub-voxel.
5. **False-positive reduction**: per candidate, 32 features — Hessian eigenvalue ratios
   (blob vs vessel), the response across scales, densities at the centre (unclipped too) and on
   spherical shells at 1.25, 1.75 and 2.5 radii (an isolated nodule has an empty shell; a vessel
   crosses it twice, a branch point three times), and the share of each shell outside the lung
   (pleura) — ranked by an MLP; the best 500 are re-scored by small 3D CNNs over a
   scale-normalised patch, the shipped ones by two (one also sees a cube twice as wide), with
   their logits averaged (:mod:`workers.models.nodule_classifier`; weights in
   ``weights/lung_nodules_fp.pt``, produced by ``python -m training.train_fp_reduction``).
   Candidates within a better one's radius, or on a better one's segmented object (the rim
   peaks of a large nodule; see :func:`merge_objects`), are dropped.
6. **Per nodule**: a mask by region growing at a threshold halfway between the nodule's centre
   density and the lung (so ground glass is segmented too), cut to the lung mask and to a
   sphere around the centre; then centre, long-axis diameter on the key slice, volume, and
   the type (solid / part-solid / ground-glass) from the share of solid voxels.
7. **Masses** of about 3 cm and more that lie mostly in aerated lung, or about half in it with
   lung above and below, including those at the mediastinum that the lung mask leaves out
   (:mod:`workers.models.lung_masses`): reported as
   :data:`workers.findings.MASS`; nodule findings on a mass are dropped in its favour. Options
   ``masses`` (default true) and ``mass_threshold`` (the lung-surround share, default 0.6).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from dicom_node.errors import ModelLoadError
from workers.findings import LUNG, MASS, NODULE, CodedConcept, DetectionResult, Finding
from workers.grid import UniformGrid, uniform_grid
from workers.models import lung_masses, lungs
from workers.models import nodule_ops as ops
from workers.models import quality as qc
from workers.models.base import InputRequirements, ModelInfo
from workers.models.measure import finding_from_mask
from workers.models.nodule_classifier import FpReducer, sample_patches
from workers.volume import Volume, VolumeError

LOGGER = logging.getLogger(__name__)

NAME = "lung-nodules"
VERSION = "0.4.1"
"""The algorithm's version (goes into the model version and so into the output UIDs): 0.2.0 merges
the rim peaks of large nodules (:func:`merge_objects`); 0.3.0 adds the mass stage
(:mod:`workers.models.lung_masses`); 0.4.0 finds a mass half embedded in the mediastinum that has
lung above and below it; 0.4.1 searches for masses on two grids half a voxel apart, so that a
mass is found or not independently of where one grid falls."""
WEIGHTS = Path(__file__).with_name("weights") / "lung_nodules_fp.json"
"""Card of the FP-reduction weights (the .pt file it names sits beside it)."""

SIGMAS_MM = (1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0)
"""LoG scales; a blob of radius r responds most near sigma = r / sqrt(3): 3-28 mm nodules."""
SHELL_FACTORS = (1.25, 1.75, 2.5)
DETECTION_PIXEL_MM = 1.4
COARSE_PIXEL_MM = 2.8
MIN_RESPONSE = 30.0
CLIP_HU = -500.0
"""Densities above this are clipped before filtering. Vessels and solid nodules then stand out
from the lung by the same ~350 HU as ground glass does, so a faint ground-glass nodule next to
a vessel keeps its own response peak instead of being swamped by the vessel's."""
DEFAULT_THRESHOLD = 0.5
MAX_FINDINGS = 20
"""More findings above the threshold than this (when the card declares no other number) is
a failure signal (:func:`workers.models.quality.check_findings`), never a list cut short."""
FROC_FLOOR = 0.01
"""Candidates scoring at least this go into ``DetectionResult.extra['candidates']`` (FROC)."""

AI_FAMILY = CodedConcept("123110", "DCM", "Artificial Intelligence")
"""CID 7162 Algorithm Family: image filtering with a learned (MLP) false-positive classifier."""


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(theta), np.sin(phi) * np.cos(theta)], axis=1)


DIRECTIONS = _fibonacci_sphere(32)

FEATURE_NAMES: tuple[str, ...] = (
    "log_response",
    "log_sigma",
    "l2_over_l1",
    "l3_over_l1",
    "l1_norm",
    *(f"scale_profile_{i}" for i in range(len(SIGMAS_MM))),
    "centre_hu_fine",
    "centre_hu_scale",
    *(f"shell{f}_{stat}" for f in SHELL_FACTORS for stat in ("mean", "max", "frac500", "frac650", "outside")),
    "raw_centre_hu",
    "raw_mean3_hu",
    "raw_max5_hu",
)


@dataclass
class Candidates:
    """Candidate blobs of one volume, on the detection grid, with their features."""

    points: np.ndarray
    """(N, 3) integer (m, r, c) on the pooled detection grid."""
    features: np.ndarray
    """(N, len(FEATURE_NAMES)) float32."""
    radius_mm: np.ndarray
    """(N,) radius estimate from the best scale."""
    offsets: np.ndarray
    """(N, 3) sub-voxel position of each peak relative to ``points`` (grid voxels)."""
    centre_hu: np.ndarray
    grid: UniformGrid
    factor: int
    spacing: tuple[float, float, float]
    """Detection grid spacing (mm)."""
    mask: np.ndarray
    """Lung mask on the detection grid."""
    lung_level: float
    timings: dict[str, float]
    image: np.ndarray | None = None
    """The detection grid's HU (unclipped), for shape-aware suppression."""

    def source_ijk(self, points: np.ndarray | None = None) -> np.ndarray:
        """(N, 3) fractional (k, j, i) in the source volume of detection-grid points."""
        p = (self.points + self.offsets) if points is None else points
        k = np.asarray(self.grid.to_source_index(p[:, 0].astype(np.float64)), dtype=np.float64)
        j = p[:, 1] * self.factor + (self.factor - 1) / 2
        i = p[:, 2] * self.factor + (self.factor - 1) / 2
        return np.stack([k, j, i], axis=1)


@dataclass
class Ranking:
    """What stage 5 made of a volume's candidates (indices into :class:`Candidates`)."""

    scored: np.ndarray
    """Candidates re-scored by stage 2 (stage 1's best), with ``stage2`` their scores."""
    stage2: np.ndarray
    kept: np.ndarray
    """``scored`` left after suppression within a better candidate's radius."""
    final: np.ndarray
    """``kept`` left after suppression on a better candidate's object, best first."""
    scores: np.ndarray
    """(N,) the score of every candidate (0 where not scored), as merged onto the survivors."""


class LungNoduleDetector:
    """Reference lung-nodule detector (see the module docstring). Not a medical device."""

    def __init__(
        self,
        *,
        device: str | None = None,
        threshold: float | None = None,
        options: dict[str, Any] | None = None,
        weights: Path | str | None = None,
    ) -> None:
        options = dict(options or {})
        self.device = _pick_device(device)
        self.threads = int(options.pop("threads", 0)) or None
        max_findings = options.pop("max_findings", None)
        self.outside_range = str(options.pop("outside_range", "skip"))
        if self.outside_range not in qc.OUTSIDE_RANGE:
            raise ValueError(f"{NAME}: outside_range is one of {', '.join(qc.OUTSIDE_RANGE)}")
        self.closing_mm = float(options.pop("closing_mm", 12.0))
        self.clip_hu = float(options.pop("clip_hu", CLIP_HU))
        self.min_response = float(options.pop("min_response", MIN_RESPONSE))
        self.masses = bool(options.pop("masses", True))
        self.mass_threshold = float(options.pop("mass_threshold", lung_masses.DEFAULT_THRESHOLD))
        if not 0.0 < self.mass_threshold < 1.0:
            raise ValueError(f"{NAME}: mass_threshold is a lung-surround share between 0 and 1")
        if options:
            raise ValueError(f"unknown options for {NAME}: {sorted(options)}")
        path = Path(weights) if weights else WEIGHTS
        self._classifier: FpReducer | None = None
        if path.is_file():
            self._classifier = FpReducer.load(path)
            if self._classifier.features != FEATURE_NAMES:
                raise ModelLoadError(f"{path.name}: the weights were trained on other features")
        elif weights is not None:
            raise ModelLoadError(f"FP-reduction weights card {path} does not exist")
        else:
            LOGGER.warning("no FP-reduction weights at %s: using the untrained fallback rule", path)
        self.threshold = float(threshold if threshold is not None else (self._classifier.threshold if self._classifier else DEFAULT_THRESHOLD))
        card_range = qc.ValidatedRange.from_card(self._classifier.card) if self._classifier else None
        self.validated = card_range or qc.ValidatedRange(max_findings=MAX_FINDINGS)
        """The input range the weights' card declares as validated (no bounds without one)."""
        if max_findings is not None:
            self.validated = qc.ValidatedRange(self.validated.bounds, int(max_findings))
        self._info = ModelInfo(
            name=NAME,
            version=VERSION if self._classifier is None else f"{VERSION}+fp{self._classifier.version}",
            family=AI_FAMILY,
            description="Reference lung-nodule detector (multi-scale LoG + learned false-positive "
            "reduction, fine-tuned on real lungs). Not a medical device; see its card for the real-scan "
            "figures and known failure modes.",
            labels=(NODULE, MASS) if self.masses else (NODULE,),
            weights_sha256=self._classifier.sha256 if self._classifier else None,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def requirements(self) -> InputRequirements:
        return InputRequirements(
            modalities=("CT",),
            min_slices=16,
            max_slice_thickness_mm=3.0,
            axial_only=True,
            preferred_kernels=(r"lung", r"^b[5-9]", r"^[bi]7", r"sharp", r"^yc?$", r"^l$", r"bone"),
        )

    # -- the pipeline -------------------------------------------------------------------------

    def candidates(
        self, volume: Volume, check: Callable[[np.ndarray, np.ndarray, tuple[float, float, float], int], None] | None = None
    ) -> Candidates:
        """Stages 1-4 and the features of stage 5 (used by ``predict`` and by training).
        ``check`` sees the detection image, its lung mask, spacing and cranial direction before
        the filtering (input quality control; it raises to stop)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if volume.array.ndim != 3 or min(volume.shape) < 1:
            raise VolumeError("empty volume")
        grid = uniform_grid(volume, max_gap_mm=max(3.0 * volume.slice_spacing, 6.0))
        px = float(np.mean(volume.pixel_spacing))
        factor = max(1, round(DETECTION_PIXEL_MM / px))
        coarse = max(1, round(COARSE_PIXEL_MM / (px * factor)))
        spacing = (grid.spacing, volume.pixel_spacing[0] * factor, volume.pixel_spacing[1] * factor)
        dev = torch.device(self.device)
        image = ops.pool_inplane(torch.from_numpy(np.ascontiguousarray(grid.array)), factor)
        coarse_img = ops.pool_inplane(image, coarse).numpy()
        image_np = image.numpy()
        timings["pool"] = time.perf_counter() - t0

        t = time.perf_counter()
        # The grid's k runs along the slice normal: the head is towards higher k when it points up.
        cranial = 1 if volume.normal[2] >= 0 else -1
        mask, _air = lungs.lung_mask(image_np, coarse_img, spacing, coarse, closing_mm=self.closing_mm, cranial=cranial)
        timings["lungs"] = time.perf_counter() - t
        if check is not None:
            t = time.perf_counter()
            check(image_np, mask, spacing, cranial)
            timings["quality"] = time.perf_counter() - t
        if not mask.any():
            return _empty_candidates(grid, factor, spacing, mask, timings)

        # Crop to the lungs (+ a margin for the largest scale) and flatten everything outside.
        t = time.perf_counter()
        margin = [math.ceil(2.5 * SIGMAS_MM[-1] / s) for s in spacing]
        box = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(mask.any(axis=other))
            box.append(slice(max(int(idx[0]) - margin[axis], 0), min(int(idx[-1]) + margin[axis] + 1, mask.shape[axis])))
        crop_mask = torch.from_numpy(np.ascontiguousarray(mask[tuple(box)]))
        crop = image[tuple(box)].clamp(-1000.0, self.clip_hu)
        lung_level = float(crop[crop_mask].median())
        crop = torch.where(crop_mask, crop, torch.tensor(lung_level)).to(dev)
        timings["prepare"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            blobs = ops.blob_response(crop, spacing, SIGMAS_MM)
        except torch.cuda.OutOfMemoryError:
            # The whole-crop FFT does not fit this GPU: finish this study on the CPU.
            LOGGER.warning("%s: GPU out of memory in the blob filter; running it on the CPU", NAME)
            torch.cuda.empty_cache()
            crop = crop.cpu()
            blobs = ops.blob_response(crop, spacing, SIGMAS_MM)
        timings["filter"] = time.perf_counter() - t

        t = time.perf_counter()
        peaks = ops.local_maxima(blobs.response.cpu(), crop_mask, self.min_response)
        timings["peaks"] = time.perf_counter() - t

        t = time.perf_counter()
        feats, radius, centre_hu = _features(blobs, peaks, crop_mask.numpy(), spacing, image[tuple(box)])
        offsets = ops.refine_peaks(blobs.response, peaks)
        offset = np.array([b.start for b in box])
        timings["features"] = time.perf_counter() - t
        return Candidates(
            points=peaks + offset,
            features=feats,
            radius_mm=radius,
            offsets=offsets,
            centre_hu=centre_hu,
            grid=grid,
            factor=factor,
            spacing=spacing,
            mask=mask,
            lung_level=lung_level,
            timings=timings,
            image=image_np,
        )

    def score(self, cands: Candidates) -> tuple[np.ndarray, np.ndarray]:
        """Scores of the candidates worth a second look: ``(indices, probabilities)``.

        Stage 1 ranks all candidates by their features, stage 2 re-scores the ``top_k`` best
        from patches (see :mod:`workers.models.nodule_classifier`).
        """
        f = cands.features
        if self._classifier is None:
            # Without trained weights: a transparent hand-set rule (blob-ness and contrast).
            blob = np.clip(f[:, FEATURE_NAMES.index("l3_over_l1")], 0, 1)
            contrast = np.clip((f[:, FEATURE_NAMES.index("centre_hu_scale")] + 800) / 600, 0, 1)
            return np.arange(len(f)), blob * contrast
        s1 = self._classifier.stage1_scores(f)
        top = np.argsort(-s1)[: self._classifier.top_k]
        patches = self.patches(cands, top, context=self._classifier.context)
        return top, self._classifier.stage2_scores(patches, f[top])

    def rank(self, cands: Candidates) -> Ranking:
        """Stage 5 in full: both learned stages, then the two suppressions."""
        which, stage2 = self.score(cands)
        kept = which[_suppress(cands, which, stage2)]
        full = np.zeros(len(cands.points))
        full[which] = stage2
        final = kept
        if cands.image is not None:
            final, full = merge_objects(
                cands.points, cands.radius_mm, full, kept, cands.image, cands.mask, cands.spacing, cands.lung_level
            )
        return Ranking(scored=which, stage2=stage2, kept=kept, final=final, scores=full)

    def patches(self, cands: Candidates, which: np.ndarray, context: float | None = None) -> torch.Tensor:
        """Stage-2 input patches of the candidates ``which`` (see ``sample_patches``); with
        ``context``, two more channels from a cube that many times wider."""
        f = cands.factor
        pts = cands.points[which].astype(np.float64) + cands.offsets[which]
        centres = np.stack([pts[:, 0], pts[:, 1] * f + (f - 1) / 2, pts[:, 2] * f + (f - 1) / 2], axis=1)
        px = (cands.spacing[1] / f, cands.spacing[2] / f)
        image = torch.from_numpy(np.ascontiguousarray(cands.grid.array))
        mask = torch.from_numpy(cands.mask)
        spacing = (cands.spacing[0], px[0], px[1])
        origin = (0.0, (f - 1) / 2, (f - 1) / 2)
        radius = cands.radius_mm[which]
        scales = [1.0] if not context else [1.0, context]
        cubes = [
            sample_patches(image, mask, centres, spacing, (1.0, f, f), radius, mask_origin=origin, side_scale=scale)
            for scale in scales
        ]
        return torch.cat(cubes, dim=1)

    def predict(self, volume: Volume) -> DetectionResult:
        """Find nodules in ``volume`` (see the module docstring)."""
        started = time.perf_counter()
        previous_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        quality = qc.QualityControl(volume, self.validated, self.outside_range)
        try:
            cands = self.candidates(volume, check=quality)
            t = time.perf_counter()
            ranking = self.rank(cands)
            keep = ranking.final
            scores = ranking.scores[keep]
            cands_points = cands.points[keep]
            radius = cands.radius_mm[keep]
            source = cands.source_ijk(cands_points + cands.offsets[keep])
            order = np.argsort(-scores)
            masses: list[Finding] = []
            if self.masses and cands.image is not None:
                tm = time.perf_counter()
                for mass in lung_masses.find_masses(cands.image, cands.mask, cands.spacing, threshold=self.mass_threshold):
                    found = self._mass_finding(volume, cands, mass)
                    if found is not None:
                        masses.append(found)
                cands.timings["masses"] = time.perf_counter() - tm
            # More above the threshold than a chest holds: skipped (or all written, qualified).
            quality.findings(int((scores >= self.threshold).sum()) + len(masses))
            findings: list[Finding] = list(masses)
            for n in order:
                if scores[n] < self.threshold:
                    break
                finding = self._finding(volume, cands, cands_points[n], source[n], radius[n], float(scores[n]))
                # A nodule peak on a mass is its rim or a lobule: the mass is the finding.
                if finding is not None and not _on_mass(finding, masses):
                    findings.append(finding)
            froc = [
                {
                    "center_mm": [round(v, 2) for v in volume.index_to_patient(*source[n])],
                    "score": round(float(scores[n]), 5),
                    "radius_mm": round(float(radius[n]), 2),
                }
                for n in order
                if scores[n] >= FROC_FLOOR
            ][:500]
            froc = [
                {
                    "center_mm": [round(v, 2) for v in m.center_mm],
                    "score": round(float(m.confidence), 5),
                    "radius_mm": round(m.diameter_mm / 2, 2),
                    "kind": "mass",
                }
                for m in masses
            ] + froc
            cands.timings["classify+segment"] = time.perf_counter() - t
        finally:
            torch.set_num_threads(previous_threads)
        return DetectionResult(
            model_name=self.info.name,
            model_version=self.info.version,
            series_instance_uid=volume.series_instance_uid,
            findings=findings,
            runtime_seconds=time.perf_counter() - started,
            device=self.device,
            extra={
                "candidates": froc,
                "candidate_count": len(cands.points),
                "timings": {k: round(v, 3) for k, v in cands.timings.items()},
                **quality.extra(),
                "threshold": self.threshold,
                "disclaimer": "reference detector, not a medical device",
            },
        )

    def _finding(
        self,
        volume: Volume,
        cands: Candidates,
        point: np.ndarray,
        source: np.ndarray,
        radius_mm: float,
        score: float,
    ) -> Finding | None:
        """Segment one nodule at full in-plane resolution around its candidate point."""
        centre_grid = np.array([point[0], source[1], source[2]], dtype=np.float64)
        cut_out = _patch(volume, cands, centre_grid, max(2.0 * radius_mm, 6.0))
        if cut_out is None:
            return None
        patch, lung, lo, spacing_full = cut_out
        smooth = ndimage.uniform_filter(patch, size=(1, 3, 3))
        c = np.clip(np.rint(centre_grid - lo).astype(int), 0, np.array(patch.shape) - 1)
        centre_val = float(smooth[tuple(c)])
        level = cands.lung_level
        cut = float(np.clip(0.5 * (centre_val + level), -750.0, -300.0))
        zz, yy, xx = np.meshgrid(
            *(np.arange(n) * s for n, s in zip(patch.shape, spacing_full, strict=True)), indexing="ij"
        )
        cz, cy, cx = (centre_grid - lo) * np.array(spacing_full)
        ball = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= (1.6 * radius_mm + 1.0) ** 2
        fg = (smooth > cut) & lung & ball
        labels, count = ndimage.label(fg)
        if count == 0:
            return None
        # The component at (or nearest to) the centre.
        lab = labels[tuple(c)]
        if lab == 0:
            dist = ndimage.distance_transform_edt(labels == 0, return_indices=True)[1]
            lab = labels[tuple(dist[:, c[0], c[1], c[2]])]
        obj = labels == lab
        # Detach vessels: open with a small ball if that keeps most of the object.
        opened = ndimage.binary_opening(obj, structure=ndimage.generate_binary_structure(3, 1))
        if opened.sum() >= 0.5 * obj.sum():
            lab2, n2 = ndimage.label(opened)
            if n2:
                keep = lab2[tuple(c)] or np.argmax(np.bincount(lab2.ravel())[1:]) + 1
                obj = lab2 == keep
        solid_share = float((patch[obj] > -300).mean()) if obj.any() else 0.0
        kind = "solid" if solid_share >= 0.6 else ("ground-glass" if solid_share <= 0.05 else "part-solid")
        return _measure(volume, cands, obj, lo, score, NODULE, kind, source)

    def _mass_finding(self, volume: Volume, cands: Candidates, mass: lung_masses.Mass) -> Finding | None:
        """Segment one mass (:mod:`workers.models.lung_masses`) at full in-plane resolution."""
        source = cands.source_ijk(mass.centre[None, :])[0]
        centre_grid = np.array([mass.centre[0], source[1], source[2]], dtype=np.float64)
        cut_out = _patch(volume, cands, centre_grid, 2.2 * mass.radius_mm)
        if cut_out is None:
            return None
        patch, lung, lo, spacing_full = cut_out
        obj = lung_masses.segment(patch, lung, spacing_full, centre_grid - lo, mass.radius_mm)
        # The stage's evidence on the detector's scale: just clearing its rule maps to the
        # operating point, lung all round to 1 (rank-preserving; not a calibrated probability).
        score = self.threshold + (1.0 - self.threshold) * mass.evidence
        return _measure(volume, cands, obj, lo, score, MASS, "mass", source)


def _patch(
    volume: Volume, cands: Candidates, centre_grid: np.ndarray, reach_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]] | None:
    """The uniform grid at full in-plane resolution within ``reach_mm`` of ``centre_grid``, with
    the lung mask under it: ``(patch, lung, lo, spacing)``, or None when empty."""
    grid = cands.grid
    spacing = (grid.spacing, volume.pixel_spacing[0], volume.pixel_spacing[1])
    lo = np.maximum(np.floor(centre_grid - reach_mm / np.array(spacing)).astype(int), 0)
    hi = np.minimum(np.ceil(centre_grid + reach_mm / np.array(spacing)).astype(int) + 1, np.array(grid.array.shape))
    patch = grid.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    if patch.size == 0:
        return None
    return patch, _lung_patch(cands, lo, hi, patch.shape), lo, spacing


def _lung_patch(cands: Candidates, lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The lung mask (detection grid) under the full-resolution patch ``lo:hi`` of ``shape``."""
    factor = cands.factor
    r0, c0 = lo[1] // factor, lo[2] // factor
    lung = cands.mask[lo[0] : hi[0], r0 : hi[1] // factor + 1, c0 : hi[2] // factor + 1]
    lung = np.repeat(np.repeat(lung, factor, axis=1), factor, axis=2)
    lung = lung[:, lo[1] - r0 * factor :, lo[2] - c0 * factor :][:, : shape[1], : shape[2]]
    if lung.shape != shape:
        pad = [(0, p - m) for p, m in zip(shape, lung.shape, strict=True)]
        lung = np.pad(lung, pad, mode="edge")
    return lung


def _measure(
    volume: Volume,
    cands: Candidates,
    obj: np.ndarray,
    lo: np.ndarray,
    score: float,
    label: CodedConcept,
    kind: str,
    source: np.ndarray,
) -> Finding | None:
    """A finding from ``obj`` (a mask on the uniform grid at full in-plane resolution, placed at
    ``lo``), mapped back to the source slices when the grid is not the source's."""
    grid = cands.grid
    hi = lo + np.array(obj.shape)
    src_mask = grid.mask_to_source(_embed(obj, lo, grid.array.shape)) if not grid.identity else None
    if src_mask is not None:
        k_idx = np.flatnonzero(src_mask.any(axis=(1, 2)))
        if k_idx.size == 0:
            return None
        k0 = int(k_idx[0])
        sub = src_mask[k0 : int(k_idx[-1]) + 1, lo[1] : hi[1], lo[2] : hi[2]]
        offset = (k0, int(lo[1]), int(lo[2]))
    else:
        sub, offset = obj, (int(lo[0]), int(lo[1]), int(lo[2]))
    return finding_from_mask(
        volume,
        sub,
        score,
        label=label,
        site=LUNG,
        kind=kind,
        offset=offset,
        centre_ijk=(float(source[0]), float(source[1]), float(source[2])),
    )


def _on_mass(finding: Finding, masses: list[Finding]) -> bool:
    """Whether a nodule finding lies on a mass (its rim, lobulation or spiculae)."""
    c = np.asarray(finding.center_mm)
    return any(np.linalg.norm(c - np.asarray(m.center_mm)) <= 0.6 * m.diameter_mm for m in masses)


def _embed(obj: np.ndarray, lo: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    full = np.zeros(shape, dtype=bool)
    full[lo[0] : lo[0] + obj.shape[0], lo[1] : lo[1] + obj.shape[1], lo[2] : lo[2] + obj.shape[2]] = obj
    return full


def _empty_candidates(grid: UniformGrid, factor: int, spacing: tuple[float, float, float], mask: np.ndarray, timings: dict[str, float]) -> Candidates:
    return Candidates(
        points=np.zeros((0, 3), dtype=int),
        features=np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32),
        radius_mm=np.zeros(0),
        offsets=np.zeros((0, 3)),
        centre_hu=np.zeros(0),
        grid=grid,
        factor=factor,
        spacing=spacing,
        mask=mask,
        lung_level=-850.0,
        timings=timings,
    )


def _pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return str(device)


def _features(
    blobs: ops.BlobResponse,
    peaks: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    raw: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FEATURE_NAMES of every peak; also the radius estimate and the centre density.

    ``raw`` is the unclipped (HU) image on the same grid: the filter saw densities clipped at
    CLIP_HU, so the true density (solid versus ground glass, vessel versus bone) comes from here.
    """
    n = len(peaks)
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32), np.zeros(0), np.zeros(0)
    sp = np.array(spacing)
    idx = tuple(peaks.T)
    response = blobs.response.cpu().numpy()[idx]
    s_idx = blobs.scale_index.cpu().numpy()[idx].astype(int)
    sigmas = np.array(blobs.sigmas_mm)
    sigma = sigmas[s_idx]
    radius = sigma * math.sqrt(3.0)
    smoothed = [s.cpu().numpy() for s in blobs.smoothed]
    # Hessian at every scale (for the scale profile) and its eigenvalues at the best scale.
    profile = np.zeros((n, len(sigmas)))
    lam = np.zeros((n, 3))
    for s, vol in enumerate(smoothed):
        eig = ops.hessian_at(vol, peaks, spacing)
        profile[:, s] = -(sigmas[s] ** 2) * eig.sum(axis=1)
        sel = s_idx == s
        lam[sel] = eig[sel]
    profile = profile / np.maximum(np.abs(profile).max(axis=1, keepdims=True), 1e-6)
    l1 = np.minimum(lam[:, 0], -1e-6)
    fine = smoothed[0]
    centre_fine = fine[idx]
    centre_scale = np.array([smoothed[s][tuple(p)] for s, p in zip(s_idx, peaks, strict=True)])
    shells = []
    for factor in SHELL_FACTORS:
        pts = peaks[:, None, :] + (radius[:, None, None] * factor * DIRECTIONS[None]) / sp[None, None]
        # Nearest-voxel samples: the shells are statistics over 32 directions, and nearest
        # sampling is 8 times cheaper than trilinear over ~20 000 candidates.
        flat = np.clip(np.rint(pts.reshape(-1, 3)).astype(int), 0, np.array(fine.shape) - 1)
        vals = fine[tuple(flat.T)].reshape(n, -1)
        inside = mask[tuple(flat.T)].reshape(n, -1).astype(np.float32)
        shells.append(
            np.stack(
                [
                    vals.mean(1),
                    vals.max(1),
                    (vals > -500).mean(1),
                    (vals > -650).mean(1),
                    (inside < 0.5).mean(1),
                ],
                axis=1,
            )
        )
    raw_np = raw.float().numpy()
    raw_mean3 = np.clip(_neighbourhood(raw_np, peaks, 1), -1024.0, 600.0).mean(axis=1)
    raw_max5 = np.clip(_neighbourhood(raw_np, peaks, 2), -1024.0, 600.0).max(axis=1)
    feats = np.concatenate(
        [
            np.log(np.maximum(response, 1.0))[:, None],
            np.log(sigma)[:, None],
            (lam[:, 1] / l1)[:, None],
            (lam[:, 2] / l1)[:, None],
            (sigma**2 * -l1 / np.maximum(response, 1.0))[:, None],
            profile,
            centre_fine[:, None],
            centre_scale[:, None],
            *shells,
            np.clip(raw_np[idx], -1024.0, 600.0)[:, None],
            raw_mean3[:, None],
            raw_max5[:, None],
        ],
        axis=1,
    ).astype(np.float32)
    return feats, radius, centre_scale


def _neighbourhood(volume: np.ndarray, points: np.ndarray, reach: int) -> np.ndarray:
    """(N, (2 reach + 1)^3) values of the cube around each point (clamped at the borders)."""
    d = np.arange(-reach, reach + 1)
    offsets = np.stack(np.meshgrid(d, d, d, indexing="ij"), axis=-1).reshape(-1, 3)
    idx = np.clip(points[:, None, :] + offsets[None], 0, np.array(volume.shape) - 1)
    return volume[idx[..., 0], idx[..., 1], idx[..., 2]]


def _suppress(cands: Candidates, which: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions (into ``which``) of candidates kept after suppressing those within a better
    one's radius (non-maximum suppression in mm)."""
    if len(scores) == 0:
        return np.zeros(0, dtype=int)
    pts = cands.points[which] * np.array(cands.spacing)
    radius = cands.radius_mm[which]
    order = np.argsort(-scores)
    tree = cKDTree(pts)
    suppressed = np.zeros(len(scores), dtype=bool)
    kept = []
    for n in order:
        if suppressed[n]:
            continue
        kept.append(n)
        reach = max(float(radius[n]) * 1.2, 3.0)
        suppressed[tree.query_ball_point(pts[n], reach)] = True
    return np.array(kept, dtype=int)


def merge_objects(
    points: np.ndarray,
    radius_mm: np.ndarray,
    scores: np.ndarray,
    kept: np.ndarray,
    image: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    lung_level: float,
    *,
    max_objects: int = 100,
    box_mm: float = 24.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Drop kept candidates that sit on a better candidate's object (a second, shape-aware NMS).

    A large nodule gives several small-scale peaks on its surface: on the lobulations, on a
    ground-glass rim, and on the parts of a large juxtapleural nodule that the lung mask cuts
    apart. Radius-based suppression keeps them, and those just outside the nodule's radius
    count as false positives. For each of the best ``max_objects`` kept candidates, in score
    order, the object under it is segmented on the detection grid in a box of at least
    ``box_mm`` half-side: voxels a quarter of the way from the lung to the candidate's density,
    inside the lung mask grown by one voxel, opened by a ball of 0.4 radius so that thinner
    vessels do not join it, then grown back into the foreground by the same ball (the opening
    strips lobulations and rims that belong to the nodule). Lower-scored candidates within one
    voxel of the object are dropped: anywhere on it when the object lies inside the box (a
    compact blob); otherwise (the object runs on along a vessel or the pleura, where a nodule
    further along must survive) only those within ``2 r + 4`` mm of the candidate whose radius
    estimate is not larger than its own. Of a compact object's candidates, the one nearest its
    centre of mass survives, with the best score among them (a rim peak can outscore the
    centre, and would put the finding on the nodule's edge).

    Returns the surviving entries of ``kept`` in score order, and ``scores`` with the inherited
    scores of the survivors.
    """
    merged = np.array(scores, dtype=np.float64, copy=True)
    if len(kept) == 0:
        return kept, merged
    sp = np.array(spacing)
    order = kept[np.argsort(-scores[kept])]
    alive = np.ones(len(order), dtype=bool)
    pos_mm = points[order] * sp
    done = 0
    for a in range(len(order)):
        if done >= max_objects:
            break
        if not alive[a]:
            continue
        done += 1
        n = order[a]
        r = float(radius_mm[n])
        reach = 2.0 * r + 4.0
        half = np.ceil(max(reach, box_mm) / sp).astype(int)
        p = points[n]
        lo = np.maximum(p - half, 0)
        hi = np.minimum(p + half + 1, np.array(image.shape))
        box = tuple(slice(int(a_), int(b_)) for a_, b_ in zip(lo, hi, strict=True))
        sub = image[box]
        c = p - lo
        centre = float(sub[max(c[0] - 1, 0) : c[0] + 2, max(c[1] - 1, 0) : c[1] + 2, max(c[2] - 1, 0) : c[2] + 2].mean())
        # A low cut keeps a ground-glass rim (about -600 HU) on a part-solid nodule's object.
        cut = float(np.clip(lung_level + 0.25 * (centre - lung_level), -750.0, -550.0))
        inside = ndimage.binary_dilation(mask[box], iterations=1)
        fg = (sub > cut) & inside
        ball_r = np.maximum(np.round(0.4 * r / sp).astype(int), 1)
        zz, yy, xx = np.ogrid[-ball_r[0] : ball_r[0] + 1, -ball_r[1] : ball_r[1] + 1, -ball_r[2] : ball_r[2] + 1]
        ball = (zz / max(ball_r[0], 1)) ** 2 + (yy / max(ball_r[1], 1)) ** 2 + (xx / max(ball_r[2], 1)) ** 2 <= 1.0
        opened = ndimage.binary_opening(fg, structure=ball)
        labels, _ = ndimage.label(opened)
        lab = labels[tuple(c)]
        if lab == 0:
            continue
        core = ndimage.binary_dilation(labels == lab, structure=ball) & fg
        obj = ndimage.binary_dilation(core, iterations=1)
        compact = not any(np.take(obj, edge, axis=ax).any() for ax in range(3) for edge in (0, -1))
        rel = points[order[a + 1 :]] - lo
        ok = np.all((rel >= 0) & (rel < np.array(sub.shape)), axis=1)
        hit = np.zeros(len(rel), dtype=bool)
        hit[ok] = obj[tuple(rel[ok].T)]
        if not compact:
            # Along a vessel (or the pleura) only finer-scale duplicates nearby go: a larger
            # blob beside the vessel may be a nodule touching it.
            hit &= np.linalg.norm(pos_mm[a + 1 :] - pos_mm[a], axis=1) <= reach
            hit &= radius_mm[order[a + 1 :]] <= r
        hit &= alive[a + 1 :]
        if compact and hit.any():
            # The best-scored peak may sit on the object's rim: the candidate nearest the
            # object's centre of mass stands for it, with the best score.
            members = np.concatenate([[a], a + 1 + np.flatnonzero(hit)])
            centroid = (np.argwhere(core).mean(axis=0) + lo) * sp
            best = int(members[np.argmin(np.linalg.norm(pos_mm[members] - centroid, axis=1))])
            if best != a:
                merged[order[best]] = merged[order[a]]
                order[[a, best]] = order[[best, a]]
                pos_mm[[a, best]] = pos_mm[[best, a]]
        alive[a + 1 :] &= ~hit
    return order[alive], merged
