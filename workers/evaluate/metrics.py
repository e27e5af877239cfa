"""Scoring a detector against a reference: hits, FROC, CPM and their bootstrap intervals.

Hit criterion (LUNA16, Setio et al., Medical Image Analysis 42:1-13, 2017): a candidate hits a
positive when its centre lies within the positive's radius (half its diameter) of its centre, or
inside one of its boxes (a tumour outlined slice by slice). Per scan, each positive counts once
(its best candidate). A candidate that hits no positive but lies in an ignore region (a mark the
reference rule leaves out: a nodule fewer than 3 of 4 readers accepted, a < 3 mm mark, a
non-nodule), or hits a positive outside the subset being scored, is ignored: neither true nor
false. Every other candidate is a false positive.

The FROC curve sweeps the score threshold over all candidates of all scans; the sensitivity at
``r`` false positives per scan is the best sensitivity reached while the false positives per scan
stay at or below ``r`` (a step function, no interpolation, so never optimistic). CPM is the mean
sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/scan; its 95 % interval comes from resampling
the scans with replacement (a fixed seed, so a rerun gives the same interval).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SIZE_BINS = ((3.0, 4.0), (4.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.01))
FALSE = -1
""":func:`match` value of a candidate that is a false positive."""
IGNORED = -2
""":func:`match` value of a candidate inside an ignore region (neither hit nor false)."""
BOOTSTRAP_SEED = 20170701
BOOTSTRAPS = 1000

Select = Callable[[dict[str, Any]], bool]

SUBSETS: dict[str, Select] = {
    "all": lambda n: True,
    "all_ge_4mm": lambda n: float(n["diameter_mm"]) >= 4.0,
    "solid_ge_5mm": lambda n: (
        float(n["diameter_mm"]) >= 5.0 and n.get("type") in ("solid", "juxtapleural")
    ),
}
"""The positive subsets the FROC is reported for (issue 5's targets use the last two). Real
references have no ``type``: their positives fall in ``all`` and ``all_ge_4mm``."""


@dataclass
class Candidate:
    """One scored detection (centre in patient LPS mm)."""

    center_mm: tuple[float, float, float]
    score: float


@dataclass
class ScanResult:
    """A detector's output on one scan, next to its reference."""

    name: str
    nodules: list[dict[str, Any]]
    """Positives (``center_mm``, ``diameter_mm``, optional ``type`` and ``boxes_mm``)."""
    candidates: list[Candidate]
    """Everything the detector scored (for the FROC), best first or in any order."""
    findings: list[Candidate]
    """What the detector reported at its operating point."""
    detector_seconds: float = 0.0
    load_seconds: float = 0.0
    peak_rss_mb: float | None = None
    shape: tuple[int, int, int] | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    ignore: list[dict[str, Any]] = field(default_factory=list)
    """Ignore regions (``center_mm``, ``radius_mm``, ``why``)."""


def _inside_boxes(points: np.ndarray, boxes: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    inside = np.zeros(len(points), dtype=bool)
    for lo, hi in boxes:
        a, b = np.minimum(lo, hi), np.maximum(lo, hi)
        inside |= np.all((points >= a - 1e-6) & (points <= b + 1e-6), axis=1)
    return inside


def _assign(points: np.ndarray, nodules: Sequence[dict[str, Any]]) -> np.ndarray:
    """Index of the positive each point hits (nearest relative to its radius), -1 for none."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0 or not nodules:
        return np.full(len(points), FALSE, dtype=int)
    d = np.empty((len(points), len(nodules)))
    for n_i, n in enumerate(nodules):
        if n.get("boxes_mm"):
            # Inside a box: as good as the centre of a sphere; outside all boxes: no hit.
            d[:, n_i] = np.where(_inside_boxes(points, n["boxes_mm"]), 0.0, np.inf)
        else:
            radius = max(float(n["diameter_mm"]) / 2, 1e-6)
            d[:, n_i] = np.linalg.norm(points - np.asarray(n["center_mm"]), axis=1) / radius
    best = np.argmin(d, axis=1)
    return np.where(d[np.arange(len(points)), best] <= 1.0, best, FALSE)


def ignored(points: np.ndarray, regions: Sequence[dict[str, Any]]) -> np.ndarray:
    """Whether each point lies in one of the ignore ``regions`` (centre and radius, mm)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.zeros(len(points), dtype=bool)
    for r in regions:
        out |= np.linalg.norm(points - np.asarray(r["center_mm"]), axis=1) <= r["radius_mm"]
    return out


def match(scan: ScanResult, which: str = "candidates") -> np.ndarray:
    """Per candidate (or finding): the index of the positive it hits, :data:`FALSE` (a false
    positive) or :data:`IGNORED` (in an ignore region)."""
    items = scan.candidates if which == "candidates" else scan.findings
    pts = np.array([c.center_mm for c in items], dtype=np.float64).reshape(-1, 3)
    hits = _assign(pts, scan.nodules)
    if scan.ignore:
        hits = np.where((hits == FALSE) & ignored(pts, scan.ignore), IGNORED, hits)
    return hits


@dataclass(frozen=True)
class _Tally:
    """One scan reduced to what the FROC needs: each selected positive's best score (-inf when
    no candidate hits it) and the scores of the false positives."""

    best: np.ndarray
    fp: np.ndarray
    hits: np.ndarray
    """Scores of every candidate on a selected positive (the curve has a point at each)."""


def _tally(scan: ScanResult, select: Select) -> _Tally:
    chosen = [select(n) for n in scan.nodules]
    best = np.full(len(scan.nodules), -np.inf)
    fps: list[float] = []
    hits: list[float] = []
    for cand, hit in zip(scan.candidates, match(scan), strict=True):
        if hit == FALSE:
            fps.append(cand.score)
        elif hit >= 0 and chosen[hit]:
            best[hit] = max(best[hit], cand.score)
            hits.append(cand.score)
    return _Tally(
        best[np.array(chosen, dtype=bool)], np.array(fps, dtype=np.float64), np.array(hits)
    )


def _curve(tallies: Sequence[_Tally]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(thresholds falling, FP/scan, sensitivity, positives) with one point per distinct score;
    a threshold admits every candidate scored at or above it, so ties enter together."""
    best = np.concatenate([t.best for t in tallies]) if tallies else np.zeros(0)
    fp = np.sort(np.concatenate([t.fp for t in tallies])) if tallies else np.zeros(0)
    total = len(best)
    hit_scores = np.sort(best[np.isfinite(best)])
    every_hit = np.concatenate([t.hits for t in tallies]) if tallies else np.zeros(0)
    thresholds = np.unique(np.concatenate([fp, every_hit]))[::-1]
    n_fp = len(fp) - np.searchsorted(fp, thresholds, side="left")
    n_tp = len(hit_scores) - np.searchsorted(hit_scores, thresholds, side="left")
    n_scans = max(len(tallies), 1)
    fps = np.concatenate([[0.0], n_fp / n_scans])
    sens = np.concatenate([[0.0], n_tp / total if total else np.zeros(len(thresholds))])
    return np.concatenate([[np.inf], thresholds]), fps, sens, total


def _sensitivity_at(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    return np.array([float(sens[fps <= r + 1e-12].max()) for r in rates])


def froc(
    scans: Sequence[ScanResult], select: Select | None = None, rates: Sequence[float] = FP_RATES
) -> dict[str, Any]:
    """FROC over ``scans`` for the positives ``select`` accepts (all when None)."""
    tallies = [_tally(s, select or (lambda n: True)) for s in scans]
    thresholds, fps, sens, total = _curve(tallies)
    values = _sensitivity_at(fps, sens, rates)
    at = {str(r): round(float(v), 4) for r, v in zip(rates, values, strict=True)}
    return {
        "nodules": total,
        "scans": len(scans),
        "sensitivity_at": at,
        "mean_sensitivity": round(float(values.mean()), 4) if len(values) else 0.0,
        "curve": {
            "fps_per_scan": fps.tolist(),
            "sensitivity": sens.tolist(),
            "threshold": [float(t) for t in thresholds],
        },
    }


def cpm(scans: Sequence[ScanResult], select: Select | None = None) -> float:
    """Competition performance metric: mean sensitivity at 1/8..8 FP/scan (LUNA16)."""
    return float(froc(scans, select)["mean_sensitivity"])


def bootstrap_froc(
    scans: Sequence[ScanResult],
    select: Select | None = None,
    *,
    rounds: int = BOOTSTRAPS,
    seed: int = BOOTSTRAP_SEED,
    rates: Sequence[float] = FP_RATES,
) -> dict[str, Any]:
    """95 % intervals (2.5th and 97.5th percentiles) of the sensitivity at each rate and of the
    CPM, over ``rounds`` resamplings of the scans with replacement."""
    tallies = [_tally(s, select or (lambda n: True)) for s in scans]
    if not tallies or rounds < 1:
        return {"rounds": 0, "seed": seed, "sensitivity_at": {}, "cpm": None}
    rng = np.random.default_rng(seed)
    values = np.empty((rounds, len(rates)))
    for b in range(rounds):
        pick = rng.integers(0, len(tallies), size=len(tallies))
        _, fps, sens, _ = _curve([tallies[i] for i in pick])
        values[b] = _sensitivity_at(fps, sens, rates)
    lo, hi = np.percentile(values, [2.5, 97.5], axis=0)
    cpm_lo, cpm_hi = np.percentile(values.mean(axis=1), [2.5, 97.5])
    return {
        "rounds": rounds,
        "seed": seed,
        "sensitivity_at": {
            str(r): [round(float(a), 4), round(float(b), 4)]
            for r, a, b in zip(rates, lo, hi, strict=True)
        },
        "cpm": [round(float(cpm_lo), 4), round(float(cpm_hi), 4)],
    }


def operating_point(scans: Sequence[ScanResult], select: Select | None = None) -> dict[str, Any]:
    """Precision, recall and F1 of the reported findings (LUNA16 hits; one TP per positive;
    findings in ignore regions or on unselected positives count neither way)."""
    select = select or (lambda n: True)
    tp = fp = fn = 0
    for scan in scans:
        hits = match(scan, "findings")
        chosen = [select(n) for n in scan.nodules]
        found = {int(h) for h in hits if h >= 0 and chosen[h]}
        fp += int(np.sum(hits == FALSE))
        tp += len(found)
        fn += sum(chosen) - len(found)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "fp_per_scan": round(fp / max(len(scans), 1), 4),
    }


def _size_band(lo: float, hi: float) -> Select:
    return lambda n: lo <= float(n["diameter_mm"]) < hi


def _of_type(t: str) -> Select:
    return lambda n: str(n.get("type", "unknown")) == t


def breakdown(scans: Sequence[ScanResult]) -> dict[str, Any]:
    """Sensitivity by size band and by type: at the operating point, at 1 and 2 FP/scan."""
    out: dict[str, Any] = {"by_size_mm": {}, "by_type": {}}
    groups: list[tuple[str, str, Select]] = [
        ("by_size_mm", f"{lo:g}-{min(hi, 30):g}", _size_band(lo, hi)) for lo, hi in SIZE_BINS
    ]
    types = sorted({str(n.get("type", "unknown")) for s in scans for n in s.nodules})
    groups += [("by_type", t, _of_type(t)) for t in types]
    for section, name, sel in groups:
        f = froc(scans, sel, rates=(1.0, 2.0))
        if f["nodules"] == 0:
            continue
        op = operating_point(scans, sel)
        out[section][name] = {
            "nodules": f["nodules"],
            "sensitivity_operating_point": op["recall"],
            "sensitivity_at_1_fp": f["sensitivity_at"]["1.0"],
            "sensitivity_at_2_fp": f["sensitivity_at"]["2.0"],
        }
    return out
