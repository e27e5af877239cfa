"""Evaluating a detector on studies with ground truth: FROC, operating point, breakdowns.

Hit criterion (LUNA16): a candidate hits a nodule when its centre lies within the nodule's
radius (half its diameter) of the nodule's centre. Per scan, each nodule counts once (its best
candidate); candidates that hit no nodule are false positives; candidates that hit a nodule
outside the subset being scored (for example a 3 mm nodule when scoring nodules >= 4 mm) are
ignored, neither true nor false.

The FROC curve sweeps the score threshold over all candidates of all scans; the sensitivity at
``r`` false positives per scan is the best sensitivity reached while the false positives per
scan stay at or below ``r`` (a step function, no interpolation, so never optimistic).

Ground truth is the JSON written by ``dicom-node synth`` (``truth.json`` beside the series):
``{"nodules": [{"center_mm": [x, y, z], "diameter_mm": d, "type": "solid", ...}]}``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger(__name__)

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SIZE_BINS = ((3.0, 4.0), (4.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.01))
TRUTH_FILE = "truth.json"

Select = Callable[[dict[str, Any]], bool]

SUBSETS: dict[str, Select] = {
    "all": lambda n: True,
    "all_ge_4mm": lambda n: float(n["diameter_mm"]) >= 4.0,
    "solid_ge_5mm": lambda n: (
        float(n["diameter_mm"]) >= 5.0 and n.get("type") in ("solid", "juxtapleural")
    ),
}
"""The nodule subsets the FROC is reported for (issue 5's targets use the last two)."""


@dataclass
class Candidate:
    """One scored detection (centre in patient mm)."""

    center_mm: tuple[float, float, float]
    score: float


@dataclass
class ScanResult:
    """A detector's output on one study, next to its ground truth."""

    name: str
    nodules: list[dict[str, Any]]
    """Ground-truth nodules (``center_mm``, ``diameter_mm``, ``type``...)."""
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


def _assign(points: np.ndarray, nodules: Sequence[dict[str, Any]]) -> np.ndarray:
    """Index of the nodule each point hits (nearest relative to its radius), -1 for none."""
    if len(points) == 0 or not nodules:
        return np.full(len(points), -1, dtype=int)
    centres = np.array([n["center_mm"] for n in nodules], dtype=np.float64)
    radii = np.array([max(float(n["diameter_mm"]) / 2, 1e-6) for n in nodules])
    d = np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=2) / radii[None, :]
    best = np.argmin(d, axis=1)
    return np.where(d[np.arange(len(points)), best] <= 1.0, best, -1)


def match(scan: ScanResult, which: str = "candidates") -> np.ndarray:
    """For each candidate (or finding), the index of the nodule it hits, or -1."""
    items = scan.candidates if which == "candidates" else scan.findings
    pts = np.array([c.center_mm for c in items], dtype=np.float64).reshape(-1, 3)
    return _assign(pts, scan.nodules)


def froc(
    scans: Sequence[ScanResult], select: Select | None = None, rates: Sequence[float] = FP_RATES
) -> dict[str, Any]:
    """FROC over ``scans`` for the nodules ``select`` accepts (all when None)."""
    select = select or (lambda n: True)
    events: list[tuple[float, int, tuple[int, int] | None]] = []  # (score, is_fp, nodule key)
    total = 0
    for s_i, scan in enumerate(scans):
        chosen = [select(n) for n in scan.nodules]
        total += sum(chosen)
        hits = match(scan)
        for cand, hit in zip(scan.candidates, hits, strict=True):
            if hit < 0:
                events.append((cand.score, 1, None))
            elif chosen[hit]:
                events.append((cand.score, 0, (s_i, int(hit))))
            # a hit on an unselected nodule is ignored
    events.sort(key=lambda e: -e[0])
    n_scans = max(len(scans), 1)
    fps_curve: list[float] = [0.0]
    sens_curve: list[float] = [0.0]
    thresholds: list[float] = [float("inf")]
    found: set[tuple[int, int]] = set()
    fp = 0
    i = 0
    while i < len(events):
        score = events[i][0]
        # Handle ties together: one threshold admits all candidates with the same score.
        while i < len(events) and events[i][0] == score:
            _, is_fp, key = events[i]
            if is_fp:
                fp += 1
            elif key is not None:
                found.add(key)
            i += 1
        fps_curve.append(fp / n_scans)
        sens_curve.append(len(found) / total if total else 0.0)
        thresholds.append(score)
    at = {}
    for r in rates:
        ok = [s for f, s in zip(fps_curve, sens_curve, strict=True) if f <= r + 1e-12]
        at[str(r)] = round(max(ok), 4) if ok else 0.0
    return {
        "nodules": total,
        "scans": len(scans),
        "sensitivity_at": at,
        "mean_sensitivity": round(float(np.mean(list(at.values()))), 4) if at else 0.0,
        "curve": {"fps_per_scan": fps_curve, "sensitivity": sens_curve, "threshold": thresholds},
    }


def operating_point(scans: Sequence[ScanResult], select: Select | None = None) -> dict[str, Any]:
    """Precision, recall and F1 of the reported findings (LUNA16 hits; one TP per nodule)."""
    select = select or (lambda n: True)
    tp = fp = fn = 0
    for scan in scans:
        hits = match(scan, "findings")
        chosen = [select(n) for n in scan.nodules]
        found = {int(h) for h in hits if h >= 0 and chosen[h]}
        fp += int(sum(1 for h in hits if h < 0))
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


# -- running a detector over folders -------------------------------------------------------------


def find_studies(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Study folders (those holding ``truth.json``) given folders or their parents."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / TRUTH_FILE).is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q.parent for q in p.rglob(TRUTH_FILE)))
    return sorted(dict.fromkeys(found))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_study(folder: Path, requirements: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The volume of the series in ``folder`` that a model with ``requirements`` would choose
    (through the worker's selection and loader), and the ground-truth nodules."""
    from workers.selection import select_series
    from workers.volume import load_series, read_header

    truth = json.loads((folder / TRUTH_FILE).read_text())
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != TRUTH_FILE and not p.name.startswith(".")
    ]
    headers: dict[str, list[Any]] = {}
    paths: dict[str, list[Path]] = {}
    for f in files:
        try:
            ds = read_header(f)
        except Exception:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        headers.setdefault(uid, []).append(ds)
        paths.setdefault(uid, []).append(f)
    chosen = select_series(headers, requirements)
    if chosen.series_instance_uid is None:
        raise ValueError(
            f"{folder.name}: no series qualifies ({'; '.join(chosen.reasons.values())})"
        )
    return load_series(paths[chosen.series_instance_uid]), list(truth.get("nodules", []))


def run_study(folder: Path, detector: Any) -> ScanResult:
    """Load the study in ``folder`` (the series the detector would choose) and run the detector."""
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    volume, nodules = load_study(folder, detector.requirements)
    load_s = time.perf_counter() - t0
    result = detector.predict(volume)
    detector_s = result.runtime_seconds
    cands = result.extra.get("candidates")
    if cands is None:
        candidates = [Candidate(tuple(f.center_mm), float(f.confidence)) for f in result.findings]
    else:
        candidates = [Candidate(tuple(c["center_mm"]), float(c["score"])) for c in cands]
    scan = ScanResult(
        name=folder.name,
        nodules=nodules,
        candidates=candidates,
        findings=[Candidate(tuple(f.center_mm), float(f.confidence)) for f in result.findings],
        detector_seconds=detector_s,
        load_seconds=load_s,
        peak_rss_mb=_peak_rss_mb() if reset else None,
        shape=volume.shape,
        device=result.device,
        extra={k: v for k, v in result.extra.items() if k in ("timings", "candidate_count")},
    )
    del volume, result
    return scan


@dataclass
class Report:
    """Everything ``dicom-node evaluate`` writes to ``report.json``."""

    model: str
    model_version: str
    threshold: float | None
    scans: list[ScanResult]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    load_average: tuple[float, float, float] | None = None

    def summary(self) -> dict[str, Any]:
        scans = self.scans
        subsets = SUBSETS
        det = np.array([s.detector_seconds for s in scans]) if scans else np.zeros(0)
        rss = [s.peak_rss_mb for s in scans if s.peak_rss_mb is not None]
        return {
            "model": self.model,
            "model_version": self.model_version,
            "threshold": self.threshold,
            "created": self.created,
            "load_average_at_start": self.load_average,
            "scans": len(scans),
            "froc": {
                name: {k: v for k, v in froc(scans, sel).items() if k != "curve"}
                for name, sel in subsets.items()
            },
            "operating_point": {name: operating_point(scans, sel) for name, sel in subsets.items()},
            "breakdown": breakdown(scans),
            "runtime": {
                "detector_seconds_median": round(float(np.median(det)), 3) if det.size else None,
                "detector_seconds_max": round(float(det.max()), 3) if det.size else None,
                "detector_seconds_mean": round(float(det.mean()), 3) if det.size else None,
                "load_seconds_median": round(float(np.median([s.load_seconds for s in scans])), 3)
                if scans
                else None,
                "peak_rss_mb_max": round(max(rss), 1) if rss else None,
                "device": scans[0].device if scans else None,
            },
            "per_study": [
                {
                    "name": s.name,
                    "shape": list(s.shape) if s.shape else None,
                    "nodules": len(s.nodules),
                    "findings": len(s.findings),
                    "true_positives": len({int(h) for h in match(s, "findings") if h >= 0}),
                    "false_positives": int(sum(1 for h in match(s, "findings") if h < 0)),
                    "detector_seconds": round(s.detector_seconds, 3),
                    "load_seconds": round(s.load_seconds, 3),
                    "peak_rss_mb": round(s.peak_rss_mb, 1) if s.peak_rss_mb else None,
                    **({"timings": s.extra["timings"]} if "timings" in s.extra else {}),
                }
                for s in scans
            ],
        }


def evaluate(
    folders: Sequence[Path],
    detector: Any,
    *,
    progress: Callable[[int, int, ScanResult], None] | None = None,
) -> Report:
    """Run ``detector`` on every study folder and collect the results."""
    scans = []
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    for n, folder in enumerate(folders, start=1):
        scan = run_study(folder, detector)
        scans.append(scan)
        if progress:
            progress(n, len(folders), scan)
    info = detector.info
    return Report(
        model=info.name,
        model_version=info.version,
        threshold=getattr(detector, "threshold", None),
        scans=scans,
        load_average=(round(load[0], 2), round(load[1], 2), round(load[2], 2)) if load else None,
    )


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``froc.png`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = report.summary()
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    png_path = out_dir / "froc.png"
    plot_froc(report.scans, png_path, title=f"{report.model} {report.model_version}")
    return json_path, png_path


def plot_froc(scans: Sequence[ScanResult], path: Path, title: str = "") -> None:
    """FROC curves (all nodules, >= 4 mm, solid >= 5 mm) on a log FP axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, sel in (
        ("all nodules", None),
        ("all types >= 4 mm", SUBSETS["all_ge_4mm"]),
        ("solid >= 5 mm", SUBSETS["solid_ge_5mm"]),
    ):
        f = froc(scans, sel)
        if not f["nodules"]:
            continue
        x = np.maximum(np.array(f["curve"]["fps_per_scan"]), 1e-3)
        ax.step(x, f["curve"]["sensitivity"], where="post", label=f"{label} (n={f['nodules']})")
    for r in FP_RATES:
        ax.axvline(r, color="0.9", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(FP_RATES[0] / 2, FP_RATES[-1] * 2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title + f" — {len(scans)} scans (LUNA16 hit criterion)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
