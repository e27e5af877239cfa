"""The evaluation report: ``report.json`` (FROC, CPM with bootstrap 95 % intervals, operating
point, breakdowns, runtime, and per scan every false finding with its score and LPS position and
every miss) and ``froc.png``. Scans are named by series UID (a synth study by its folder name);
nothing else about the patient is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.evaluate.metrics import (
    FALSE,
    FP_RATES,
    IGNORED,
    SUBSETS,
    ScanResult,
    bootstrap_froc,
    breakdown,
    froc,
    match,
    operating_point,
)


def _point(c: Sequence[float]) -> list[float]:
    return [round(float(v), 1) for v in c]


def scan_details(s: ScanResult) -> dict[str, Any]:
    """One scan's line in the report: counts, and each false finding and miss at the
    operating point (with the name of its picture, when pictures were drawn)."""
    hits = match(s, "findings")
    pics = s.extra.get("pictures", {})
    false = [f for f, h in zip(s.findings, hits, strict=True) if h == FALSE]
    found = {int(h) for h in hits if h >= 0}
    misses = [n for k, n in enumerate(s.nodules) if k not in found]
    return {
        "index": s.extra.get("index"),
        "name": s.name,
        "kind": s.extra.get("kind", "synth"),
        "shape": list(s.shape) if s.shape else None,
        "nodules": len(s.nodules),
        "ignore_regions": len(s.ignore),
        "findings": len(s.findings),
        "true_positives": len(found),
        "false_positives": len(false),
        "ignored_findings": int(np.sum(hits == IGNORED)),
        "false_findings": [
            {
                "score": round(f.score, 4),
                "center_mm": _point(f.center_mm),
                **({"picture": pics["false"][n]} if pics.get("false") else {}),
            }
            for n, f in enumerate(false)
        ],
        "misses": [
            {
                "center_mm": _point(m["center_mm"]),
                "diameter_mm": round(float(m["diameter_mm"]), 1),
                **({"picture": pics["miss"][n]} if pics.get("miss") else {}),
            }
            for n, m in enumerate(misses)
        ],
        **({"refused_by_model": s.extra["refused"]} if "refused" in s.extra else {}),
        "detector_seconds": round(s.detector_seconds, 3),
        "load_seconds": round(s.load_seconds, 3),
        "peak_rss_mb": round(s.peak_rss_mb, 1) if s.peak_rss_mb else None,
        **({"timings": s.extra["timings"]} if "timings" in s.extra else {}),
    }


@dataclass
class Report:
    """Everything ``dicom-node evaluate`` writes to ``report.json``."""

    model: str
    model_version: str
    threshold: float | None
    scans: list[ScanResult]
    skipped: list[dict[str, str]] = field(default_factory=list)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    load_average: tuple[float, float, float] | None = None
    bootstrap_rounds: int = 1000

    def summary(self) -> dict[str, Any]:
        scans = self.scans
        det = np.array([s.detector_seconds for s in scans]) if scans else np.zeros(0)
        rss = [s.peak_rss_mb for s in scans if s.peak_rss_mb is not None]
        frocs = {}
        for name, sel in SUBSETS.items():
            f = {k: v for k, v in froc(scans, sel).items() if k != "curve"}
            f["cpm"] = f.pop("mean_sensitivity")
            f["interval_95"] = bootstrap_froc(scans, sel, rounds=self.bootstrap_rounds)
            frocs[name] = f
        return {
            "model": self.model,
            "model_version": self.model_version,
            "threshold": self.threshold,
            "created": self.created,
            "load_average_at_start": self.load_average,
            "scans": len(scans),
            "skipped": self.skipped,
            "hit_rule": (
                "LUNA16: a finding hits a positive within its radius (or inside its boxes); "
                "findings in ignore regions count neither way; all others are false"
            ),
            "froc": frocs,
            "operating_point": {name: operating_point(scans, sel) for name, sel in SUBSETS.items()},
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
            "per_study": [scan_details(s) for s in scans],
        }


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
    """FROC curves (all positives, >= 4 mm, solid >= 5 mm) on a log FP axis, as a PNG."""
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
