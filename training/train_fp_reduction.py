"""Train the false-positive reduction of the built-in ``lung-nodules`` detector on phantoms.

This script produced ``workers/models/weights/lung_nodules_fp.pt`` and its card
``lung_nodules_fp.json`` (which records the command line, the seeds, the data counts and the
validation figures). Run it again to reproduce or retrain::

    python -m training.train_fp_reduction \\
        --train-seeds 1000-1039 --val-seeds 1040-1047 --cache /tmp/fp-cache \\
        --out workers/models/weights

(The shipped card records its command as ``python -m workers.models.train_fp_reduction``: the
script lived in the worker package then. It is kept out of the package now, since the worker
only loads the weights.)

What it does:

1. For each seed, a phantom (``dicom_node.synth``; 200-300 slices of 512², 0.6-0.8 mm pixels,
   1 or 1.25 mm slices, 12 nodules of all four kinds, 3-30 mm) is generated, or read from the
   cache, and the detector's candidates and their features are computed (stages 1-4 of
   :mod:`workers.models.lung_nodules`). A candidate is positive when it hits a nodule by the
   LUNA16 criterion (centre within the nodule's radius).
2. Stage 1 (an MLP over the features) is trained on all candidates of the training seeds.
3. Stage 2 (a small 3D CNN over patches + features) is trained on the ``top_k`` candidates
   stage 1 keeps per scan, with flips and in-plane transposes as augmentation; with
   ``--jitter N``, each positive candidate adds N more patches sampled around a centre moved by
   up to ``JITTER_SHIFT`` of its radius per axis and at a scale off by up to ``JITTER_SCALE``
   (the detector's peak on a nodule beside a vessel is often off-centre and at the wrong scale);
   with ``--ensemble N``, N such CNNs from different random seeds, whose logits are averaged;
   with ``--context F``, the patches get two more channels from a cube F times wider (the
   vessel a candidate sits on, and where it runs on to), and ``--plain-members N`` keeps the
   first N ensemble members to the candidate-scale channels (a mixed ensemble); with
   ``--hard-negatives N``, each false candidate whose sphere reaches a branch point or free end
   of a vessel at least ``--hard-min-radius`` thick (the phantom generator lists them) adds N
   more moved patches as negatives, since those spots are what the CNN most often takes for a
   nodule on a normal chest.
4. The whole detector is run on the validation seeds; the FROC and the threshold giving about
   half a false positive per scan (``--target-fp``) are written to the card. The threshold is
   raised, if need be, to just above the highest score the detector gives on a few nodule-free
   validation chests (``--clean-seeds``), so that a normal chest like them gets no finding; with
   ``--clean-rate R`` and many such chests, to just above the score that leaves at most a share
   R of them with a finding (the single highest score over many chests is an outlier that
   grows with their number).

Seeds 9000 and above are reserved for the benchmark (``benchmarks/bench_detect.py``) and are
refused here, so that the benchmark always measures on phantoms the weights never saw.
On this project's 2-core machine a run takes about 40 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.synth import PhantomSpec, make_phantom
from workers.evaluate import SUBSETS, Candidate, ScanResult, _assign, froc
from workers.grid import uniform_grid
from workers.models import nodule_ops as ops
from workers.models.lung_nodules import FEATURE_NAMES, WEIGHTS, Candidates, LungNoduleDetector
from workers.models.nodule_classifier import FeatureMlp, FpReducer, PatchCnn
from workers.volume import SourceSlice, Volume

RESERVED_SEEDS = 9000
"""Seeds from here on belong to the benchmark."""

JITTER_SHIFT = 0.2
"""Largest centre shift of a jittered positive patch, per axis, as a share of its radius."""
JITTER_SCALE = 0.2
"""Largest log-scale change of a jittered positive patch's radius (exp(0.2) = 1.22)."""


def phantom_spec(seed: int, nodules: int = 12, juxtavascular: float = 0.0) -> PhantomSpec:
    """The training/validation phantom of ``seed`` (geometry drawn in the benchmark's ranges;
    ``juxtavascular``: share of nodules placed against a vessel, as hard examples)."""
    rng = np.random.default_rng(20_000 + seed)
    return PhantomSpec(
        seed=seed,
        slices=int(rng.integers(200, 301)),
        nodules=nodules,
        pixel_spacing=float(np.round(rng.uniform(0.6, 0.8), 3)),
        slice_thickness=float(rng.choice([1.0, 1.25])),
        juxtavascular=juxtavascular,
    )


def phantom_volume(hu: np.ndarray, truth: dict[str, Any]) -> Volume:
    """A :class:`Volume` straight from a phantom's array (no DICOM round trip), sorted like the
    loader sorts (ascending along the normal, so the phantom's superior-first order flips)."""
    g = truth["geometry"]
    px, dz = float(g["pixel_spacing_mm"]), float(g["slice_thickness_mm"])
    x0, y0, z_top = g["first_position_mm"]
    k_count = hu.shape[0]
    array = np.ascontiguousarray(hu[::-1], dtype=np.float32)
    positions = np.array([[x0, y0, z_top - (k_count - 1 - k) * dz] for k in range(k_count)])
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, dz)
    affine[:3, 1] = (0, px, 0)
    affine[:3, 2] = (px, 0, 0)
    affine[:3, 3] = positions[0]
    return Volume(
        array=array,
        slices=[
            SourceSlice(f"phantom-{k}", "1.2.840.10008.5.1.4.1.1.2", None, None)
            for k in range(k_count)
        ],
        positions=positions,
        orientation=np.array([1.0, 0, 0, 0, 1, 0]),
        pixel_spacing=(px, px),
        slice_spacing=dz,
        affine=affine,
        study_instance_uid="",
        series_instance_uid="",
        frame_of_reference_uid=None,
        modality="CT",
    )


def load_phantom(
    seed: int, cache: Path, nodules: int, juxtavascular: float = 0.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """The phantom of ``seed``: from the cache, or generated and cached."""
    arr_path, truth_path = cache / f"phantom-{seed}.npy", cache / f"phantom-{seed}.json"
    vessels_path = cache / f"vessels-{seed}.npy"
    if arr_path.is_file() and truth_path.is_file() and vessels_path.is_file():
        return np.load(arr_path), json.loads(truth_path.read_text())
    phantom = make_phantom(phantom_spec(seed, nodules, juxtavascular))
    truth = phantom.truth()
    np.save(arr_path, phantom.hu)
    np.save(vessels_path, phantom.vessel_landmarks)
    truth_path.write_text(json.dumps(truth))
    return phantom.hu, truth


def vessel_landmarks(seed: int, cache: Path) -> np.ndarray:
    """The vessel branch points, bends and ends of a phantom :func:`load_phantom` cached."""
    return np.load(cache / f"vessels-{seed}.npy")


@dataclass
class ScanData:
    seed: int
    features: np.ndarray
    hit: np.ndarray
    """Index of the nodule each candidate hits, -1 for none."""
    centres_mm: np.ndarray
    truth: dict[str, Any]
    cands_path: Path


def collect(
    seed: int, cache: Path, detector: LungNoduleDetector, nodules: int, juxtavascular: float = 0.0
) -> ScanData:
    """Candidates and features of one phantom (cached as ``cands-<seed>.npz``)."""
    path = cache / f"cands-{seed}.npz"
    hu, truth = load_phantom(seed, cache, nodules, juxtavascular)
    if not path.is_file():
        volume = phantom_volume(hu, truth)
        c = detector.candidates(volume)
        np.savez_compressed(
            path,
            points=c.points,
            features=c.features,
            radius_mm=c.radius_mm,
            offsets=c.offsets,
            centre_hu=c.centre_hu,
            factor=c.factor,
            spacing=np.array(c.spacing),
            mask=np.packbits(c.mask),
            mask_shape=np.array(c.mask.shape),
            lung_level=c.lung_level,
        )
    data = np.load(path)
    src = _source_ijk(data["points"] + data["offsets"], int(data["factor"]))
    k_count = hu.shape[0]
    centres = np.array(
        [_index_to_patient(truth, k_count, p) for p in src], dtype=np.float64
    ).reshape(-1, 3)
    hit = _assign(centres, truth["nodules"])
    return ScanData(seed, data["features"], hit, centres, truth, path)


def _source_ijk(points: np.ndarray, factor: int) -> np.ndarray:
    p = points.astype(np.float64)
    return np.stack(
        [p[:, 0], p[:, 1] * factor + (factor - 1) / 2, p[:, 2] * factor + (factor - 1) / 2], axis=1
    )


def _index_to_patient(
    truth: dict[str, Any], k_count: int, ijk: np.ndarray
) -> tuple[float, float, float]:
    g = truth["geometry"]
    px, dz = float(g["pixel_spacing_mm"]), float(g["slice_thickness_mm"])
    x0, y0, z_top = g["first_position_mm"]
    k, j, i = ijk
    return (x0 + i * px, y0 + j * px, z_top - (k_count - 1 - k) * dz)


def rebuild_candidates(data: ScanData, volume: Volume) -> Candidates:
    """The cached candidates of a scan as a :class:`Candidates` (for patch sampling)."""
    z = np.load(data.cands_path)
    sp = z["spacing"]
    shape = tuple(int(v) for v in z["mask_shape"])
    mask = np.unpackbits(z["mask"])[: int(np.prod(shape))].reshape(shape).astype(bool)
    return Candidates(
        points=z["points"],
        features=z["features"],
        radius_mm=z["radius_mm"],
        offsets=z["offsets"],
        centre_hu=z["centre_hu"],
        grid=uniform_grid(volume),
        factor=int(z["factor"]),
        spacing=(float(sp[0]), float(sp[1]), float(sp[2])),
        mask=mask,
        lung_level=float(z["lung_level"]),
        timings={},
        image=ops.pool_inplane(torch.from_numpy(volume.array), int(z["factor"])).numpy(),
    )


def jittered_patches(
    detector: LungNoduleDetector,
    cands: Candidates,
    which: np.ndarray,
    copies: int,
    rng: np.random.Generator,
    context: float | None = None,
) -> list[torch.Tensor]:
    """``copies`` more patches of the candidates ``which``, each from a centre moved by up to
    ``JITTER_SHIFT`` radii per axis and a radius scaled by up to ``exp(±JITTER_SCALE)``."""
    out = []
    radius = cands.radius_mm[which]
    for _ in range(copies):
        shift_mm = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, (len(which), 3)) * radius[:, None]
        moved = replace(cands, offsets=cands.offsets.copy(), radius_mm=cands.radius_mm.copy())
        moved.offsets[which] += shift_mm / np.asarray(cands.spacing)
        moved.radius_mm[which] = radius * np.exp(
            rng.uniform(-JITTER_SCALE, JITTER_SCALE, len(which))
        )
        out.append(detector.patches(moved, which, context=context))
    return out


def hard_negatives(
    centres_mm: np.ndarray,
    radius_mm: np.ndarray,
    hit: np.ndarray,
    landmarks: np.ndarray,
    min_radius_mm: float,
) -> np.ndarray:
    """Indices of the candidates that hit no nodule and whose sphere (centre, ``radius_mm``)
    reaches a branch point or free end of a vessel at least ``min_radius_mm`` thick
    (``landmarks`` as :func:`dicom_node.synth.vessels.landmarks` gives them): the vessel spots a
    detector most often takes for nodules."""
    spots = landmarks[(landmarks[:, 3] >= min_radius_mm) & (landmarks[:, 4] != 1)]
    if not len(spots) or not len(centres_mm):
        return np.zeros(0, dtype=np.int64)
    dist = np.linalg.norm(centres_mm[:, None, :] - spots[None, :, :3], axis=2)
    near = (dist <= radius_mm[:, None] + spots[None, :, 3]).any(axis=1)
    return np.flatnonzero(near & (hit < 0))


def train_stage1(scans: list[ScanData], *, epochs: int = 30, seed: int = 0) -> FeatureMlp:
    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate([s.features for s in scans]).astype(np.float32))
    y = torch.from_numpy(np.concatenate([(s.hit >= 0) for s in scans]).astype(np.float32))
    model = FeatureMlp(x.shape[1])
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0) + 1e-6)
    pos = float(y.sum())
    weight = torch.tensor(min((len(y) - pos) / max(pos, 1.0), 200.0) ** 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), 4096):
            idx = order[start : start + 4096]
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx], pos_weight=weight)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"  stage 1 epoch {epoch}: loss {total / len(y):.4f}", flush=True)
    return model.eval()


def _augment(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    for axis in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            p = p.flip(axis)
    if torch.rand(1, generator=gen).item() < 0.5:
        p = p.transpose(3, 4)
    return p


def train_stage2(
    patches: torch.Tensor,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 25,
    seed: int = 0,
) -> PatchCnn:
    torch.manual_seed(seed)
    f = torch.from_numpy(features.astype(np.float32))
    y = torch.from_numpy(labels.astype(np.float32))
    model = PatchCnn(f.shape[1], channels=patches.shape[1])
    model.mean.copy_(f.mean(0))
    model.std.copy_(f.std(0) + 1e-6)
    pos = float(y.sum())
    weight = torch.tensor(min((len(y) - pos) / max(pos, 1.0), 100.0) ** 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), 128):
            idx = order[start : start + 128]
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(
                model(_augment(patches[idx], gen), f[idx]), y[idx], pos_weight=weight
            )
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        print(f"  stage 2 epoch {epoch}: loss {total / len(y):.4f}", flush=True)
    return model.eval()


def validate(
    detector: LungNoduleDetector, reducer: FpReducer, seeds: list[int], cache: Path, nodules: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """FROC of the whole detector with ``reducer`` on the phantoms of ``seeds``: all nodules
    >= 4 mm, and solid (incl. juxtapleural) >= 5 mm."""
    detector._classifier = reducer
    scans = []
    for seed in seeds:
        hu, truth = load_phantom(seed, cache, nodules)
        result = detector.predict(phantom_volume(hu, truth))
        scans.append(
            ScanResult(
                name=str(seed),
                nodules=truth["nodules"],
                candidates=[
                    Candidate(tuple(c["center_mm"]), c["score"]) for c in result.extra["candidates"]
                ],
                findings=[],
            )
        )
    f_all = froc(scans, SUBSETS["all_ge_4mm"])
    f_solid = froc(scans, SUBSETS["solid_ge_5mm"])
    return f_all, f_solid


def clean_scores(
    detector: LungNoduleDetector, reducer: FpReducer, seeds: list[int], cache: Path
) -> list[float]:
    """The highest candidate score on each nodule-free phantom of ``seeds`` (0.0 when the
    detector lists no candidate): what the threshold must stay above to keep a normal chest
    free of findings."""
    detector._classifier = reducer
    out = []
    for seed in seeds:
        hu, truth = load_phantom(seed, cache, 0)
        if truth["nodules"]:
            # The cache is keyed by seed only: an earlier run may have used this seed with nodules.
            raise ValueError(
                f"the cached phantom of seed {seed} in {cache} has nodules; use another seed or cache"
            )
        result = detector.predict(phantom_volume(hu, truth))
        out.append(max((float(c["score"]) for c in result.extra["candidates"]), default=0.0))
    return out


CLEAN_MARGIN = 0.001
"""How far the threshold goes above the nodule-free chests' bound (:func:`clean_bound`)."""


def clean_bound(clean: Sequence[float], clean_rate: float) -> tuple[float, int] | None:
    """The score the threshold must stay above so that at most a share ``clean_rate`` of the
    nodule-free chests (``clean``: the highest score on each) get a finding, and how many may.

    ``clean_rate`` 0 keeps every chest clean (the bound is the highest score). ``None`` when
    there are no chests, or the rate lets all of them have a finding."""
    allowed = int(np.floor(clean_rate * len(clean) + 1e-9))
    if allowed >= len(clean):
        return None
    return sorted(clean, reverse=True)[allowed], allowed


def calibrate_threshold(
    curve: dict[str, list[float]],
    target_fp: float,
    clean: Sequence[float] = (),
    clean_rate: float = 0.0,
) -> tuple[float, str]:
    """The operating threshold and the rule that set it.

    The lowest threshold on the validation FROC ``curve`` whose false positives per scan stay
    at or below ``target_fp``; raised, when the highest scores on the nodule-free validation
    chests (``clean``) call for it, to just above the score that leaves at most a share
    ``clean_rate`` of those chests with a finding (0: none of them). Kept within [0.05, 0.99]."""
    threshold, rule = 0.5, f"no point at or below {target_fp} FP/scan"
    for fps, thr in zip(curve["fps_per_scan"], curve["threshold"], strict=True):
        if fps <= target_fp:
            threshold, rule = float(thr), f"{target_fp} FP/scan on the validation scans"
    bound = clean_bound(clean, clean_rate)
    if bound is not None and bound[0] + CLEAN_MARGIN > threshold:
        score, allowed = bound
        threshold = score + CLEAN_MARGIN
        if allowed:
            rule = (
                f"above the nodule-free validation chests, all but {allowed} of {len(clean)} "
                f"(at most {clean_rate:g} of them with a finding)"
            )
        else:
            rule = "above the highest score on the nodule-free validation chests"
    clamped = min(max(threshold, 0.05), 0.99)
    if clamped != threshold:
        rule += f", clamped to {clamped}"
    return float(clamped), rule


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train-seeds", default="1000-1039")
    ap.add_argument("--val-seeds", default="1040-1047")
    ap.add_argument("--nodules", type=int, default=12, help="nodules per phantom")
    ap.add_argument(
        "--juxtavascular",
        type=float,
        default=0.0,
        help="share of training nodules placed against a vessel (hard examples; validation phantoms keep natural placement)",
    )
    ap.add_argument("--cache", type=Path, required=True, help="folder for phantoms and candidates")
    ap.add_argument("--out", type=Path, default=WEIGHTS.parent)
    ap.add_argument("--top-k", type=int, default=500)
    ap.add_argument("--epochs1", type=int, default=30)
    ap.add_argument("--epochs2", type=int, default=30)
    ap.add_argument(
        "--jitter",
        type=int,
        default=0,
        help="extra patches per positive candidate, from moved centres and scales",
    )
    ap.add_argument(
        "--hard-negatives",
        type=int,
        default=0,
        help="extra (moved) patches per stage-2 candidate on a thick vessel's branch point or end, as negatives",
    )
    ap.add_argument(
        "--hard-min-radius",
        type=float,
        default=1.25,
        help="vessel radius (mm) from which its branch points and free ends count as hard",
    )
    ap.add_argument("--views", type=int, default=4, help="test-time views of each stage-2 patch")
    ap.add_argument(
        "--context",
        type=float,
        default=0.0,
        help="also give stage 2 a cube this many times wider (0: none)",
    )
    ap.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="stage-2 CNNs trained from different seeds (logits averaged)",
    )
    ap.add_argument(
        "--plain-members",
        type=int,
        default=0,
        help="with --context: how many of the --ensemble CNNs (the first ones) see no context channels",
    )
    ap.add_argument(
        "--clean-seeds",
        default="1080-1087",
        help="nodule-free validation phantoms; the threshold stays above the scores on them ('' for none)",
    )
    ap.add_argument(
        "--clean-rate",
        type=float,
        default=0.0,
        help="share of the --clean-seeds chests allowed a finding at the threshold (0: none; "
        "with many chests, their single highest score is an outlier the threshold need not clear)",
    )
    ap.add_argument(
        "--target-fp", type=float, default=0.5, help="validation FP/scan at the operating point"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_seeds, val_seeds, clean_seeds = (
        _seeds(args.train_seeds),
        _seeds(args.val_seeds),
        _seeds(args.clean_seeds),
    )
    if any(s >= RESERVED_SEEDS for s in train_seeds + val_seeds + clean_seeds):
        ap.error(f"seeds from {RESERVED_SEEDS} on are reserved for the benchmark")
    if len({*train_seeds, *val_seeds, *clean_seeds}) != len(train_seeds) + len(val_seeds) + len(
        clean_seeds
    ):
        ap.error("training, validation and nodule-free seeds overlap")
    if not 0.0 <= args.clean_rate < 1.0:
        ap.error("--clean-rate is a share from 0 up to (not including) 1")
    if args.ensemble < 1:
        ap.error("--ensemble needs at least one model")
    if args.context and args.context <= 1.0:
        ap.error("--context is a side factor above 1 (or 0 for none)")
    if args.plain_members and (not args.context or not 0 < args.plain_members < args.ensemble):
        ap.error(
            "--plain-members needs --context and leaves at least one of the --ensemble CNNs with context"
        )
    args.cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    detector = LungNoduleDetector(weights=None, threshold=0.0)
    detector._classifier = None  # candidates only; the fallback rule is not used here

    print(f"collecting candidates of {len(train_seeds) + len(val_seeds)} phantoms", flush=True)
    data: dict[int, ScanData] = {}
    for seed in train_seeds + val_seeds:
        t = time.time()
        share = args.juxtavascular if seed in train_seeds else 0.0
        data[seed] = collect(seed, args.cache, detector, args.nodules, share)
        d = data[seed]
        print(
            f"  seed {seed}: {len(d.hit)} candidates, {int((d.hit >= 0).sum())} on nodules, "
            f"{len(set(d.hit[d.hit >= 0].tolist()))}/{len(d.truth['nodules'])} nodules reachable ({time.time() - t:.1f} s)",
            flush=True,
        )

    print("stage 1", flush=True)
    stage1 = train_stage1([data[s] for s in train_seeds], epochs=args.epochs1)
    reducer = FpReducer(stage1, PatchCnn(len(FEATURE_NAMES)), FEATURE_NAMES, top_k=args.top_k)
    context = args.context or None

    print("stage 2: patches of the top candidates", flush=True)
    all_patches, all_feats, all_labels = [], [], []
    recall = []
    hard_count = 0
    rng = np.random.default_rng(0)
    for seed in train_seeds:
        d = data[seed]
        hu, truth = load_phantom(seed, args.cache, args.nodules)
        volume = phantom_volume(hu, truth)
        cands = rebuild_candidates(d, volume)
        top = np.argsort(-reducer.stage1_scores(d.features))[: args.top_k]
        recall.append(
            len(set(d.hit[top][d.hit[top] >= 0].tolist()))
            / max(1, len(set(d.hit[d.hit >= 0].tolist())))
        )
        all_patches.append(detector.patches(cands, top, context=context))
        all_feats.append(d.features[top])
        all_labels.append((d.hit[top] >= 0).astype(np.float32))
        positive = top[d.hit[top] >= 0]
        if args.jitter and len(positive):
            for extra in jittered_patches(detector, cands, positive, args.jitter, rng, context):
                all_patches.append(extra)
                all_feats.append(d.features[positive])
                all_labels.append(np.ones(len(positive), dtype=np.float32))
        hard = top[
            hard_negatives(
                d.centres_mm[top],
                cands.radius_mm[top],
                d.hit[top],
                vessel_landmarks(seed, args.cache),
                args.hard_min_radius,
            )
        ]
        hard_count += len(hard)
        if args.hard_negatives and len(hard):
            for extra in jittered_patches(detector, cands, hard, args.hard_negatives, rng, context):
                all_patches.append(extra)
                all_feats.append(d.features[hard])
                all_labels.append(np.zeros(len(hard), dtype=np.float32))
        del volume, cands
    print(
        f"  stage-1 recall of reachable nodules within top {args.top_k}: {np.mean(recall):.3f}",
        flush=True,
    )
    patches = torch.cat(all_patches)
    feats = np.concatenate(all_feats)
    labels = np.concatenate(all_labels)
    print(
        f"  {len(labels)} patches, {int(labels.sum())} positive, {hard_count} candidates on thick vessels' branch points or ends",
        flush=True,
    )
    stage2 = []
    for member in range(args.ensemble):
        t = time.time()
        member_patches = patches[:, :2] if member < args.plain_members else patches
        stage2.append(train_stage2(member_patches, feats, labels, epochs=args.epochs2, seed=member))
        print(
            f"  stage-2 model {member + 1}/{args.ensemble} trained ({time.time() - t:.0f} s)",
            flush=True,
        )
    channels = [m.channels for m in stage2]
    mixed = {"stage2_channels": channels} if len(set(channels)) > 1 else {}
    reducer = FpReducer(
        stage1,
        stage2,
        FEATURE_NAMES,
        top_k=args.top_k,
        card={"views": args.views, "context": context, **mixed},
    )

    print("validation", flush=True)
    first_model: dict[str, Any] | None = None
    if len(stage2) > 1:
        # The same scans scored by the first model alone, so the card shows what the ensemble adds.
        single = FpReducer(
            stage1,
            stage2[:1],
            FEATURE_NAMES,
            top_k=args.top_k,
            card={"views": args.views, "context": context if channels[0] == 4 else None},
        )
        single_all, single_solid = validate(detector, single, val_seeds, args.cache, args.nodules)
        print(f"  first model alone: all >= 4 mm: {single_all['sensitivity_at']}", flush=True)
        print(f"  first model alone: solid >= 5 mm: {single_solid['sensitivity_at']}", flush=True)
        first_model = {
            "all_ge_4mm": {k: v for k, v in single_all.items() if k != "curve"},
            "solid_ge_5mm": {k: v for k, v in single_solid.items() if k != "curve"},
        }
    f_all, f_solid = validate(detector, reducer, val_seeds, args.cache, args.nodules)
    curve = f_all["curve"]
    clean = clean_scores(detector, reducer, clean_seeds, args.cache) if clean_seeds else []
    threshold, rule = calibrate_threshold(curve, args.target_fp, clean, args.clean_rate)
    print(f"  all >= 4 mm: {f_all['sensitivity_at']}", flush=True)
    print(f"  solid >= 5 mm: {f_solid['sensitivity_at']}", flush=True)
    print(f"  highest scores on the nodule-free chests: {[round(c, 4) for c in clean]}", flush=True)
    print(f"  threshold {threshold:.4f} ({rule})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    pt_path = args.out / "lung_nodules_fp.pt"
    stage2_states: Any = (
        [m.state_dict() for m in stage2] if len(stage2) > 1 else stage2[0].state_dict()
    )
    torch.save({"stage1": stage1.state_dict(), "stage2": stage2_states}, pt_path)
    digest = hashlib.sha256(pt_path.read_bytes()).hexdigest()
    card = {
        "file": pt_path.name,
        "sha256": digest,
        # Date and digest: weights trained on the same day still get distinct versions (and so
        # distinct output UIDs).
        "version": f"{time.strftime('%Y%m%d')}-{digest[:8]}",
        "features": list(FEATURE_NAMES),
        "stage1_hidden": 32,
        "top_k": args.top_k,
        "views": args.views,
        **({"context": context} if context else {}),
        "stage2_models": len(stage2),
        **mixed,
        "threshold": round(threshold, 5),
        "threshold_rule": rule,
        "training": {
            "command": "python -m training.train_fp_reduction "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "train_seeds": args.train_seeds,
            "val_seeds": args.val_seeds,
            "nodules_per_phantom": args.nodules,
            "juxtavascular_share": args.juxtavascular,
            "jitter_copies": args.jitter,
            "hard_negative_copies": args.hard_negatives,
            "plain_members": args.plain_members,
            "clean_rate": args.clean_rate,
            "hard_negative_candidates": hard_count,
            "hard_min_radius_mm": args.hard_min_radius,
            "candidates": int(sum(len(data[s].hit) for s in train_seeds)),
            "positive_candidates": int(sum(int((data[s].hit >= 0).sum()) for s in train_seeds)),
            "stage2_patches": len(labels),
            "stage2_positive": int(labels.sum()),
            "torch": torch.__version__,
            "minutes": round((time.time() - started) / 60, 1),
        },
        "validation": {
            "scans": len(val_seeds),
            "all_ge_4mm": {k: v for k, v in f_all.items() if k != "curve"},
            "solid_ge_5mm": {k: v for k, v in f_solid.items() if k != "curve"},
            "nodule_free_seeds": args.clean_seeds,
            "nodule_free_max_scores": [round(c, 5) for c in clean],
        },
    }
    if first_model is not None:
        card["validation_first_model_alone"] = first_model
    (args.out / "lung_nodules_fp.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {pt_path} ({pt_path.stat().st_size} bytes, sha256 {digest[:16]}...)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
