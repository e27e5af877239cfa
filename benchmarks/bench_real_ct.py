"""Real chest CT benchmark: the built-in ``lung-nodules`` detector on every scan of the real chest
CT folder (``truth.json`` per scan, see the folder's README.md), with the phantom benchmark
beside it, for one or more sets of FP-reduction weights in one run.

Per real scan and per weights: findings at the weights' operating point, false findings, whether
the known lesion was found, the lowest confidence reported, the highest candidate score,
detector seconds and the peak resident memory of the process while loading and detecting.

* ``lidc-idri-0002`` (1.25 mm): loaded through the production series selection. It has no
  positive; a finding within max(radius, 5 mm) of an ``ignore`` mark counts neither way, every
  other finding is false.
* ``lung-pet-ct-dx-*`` (5-8 mm): production series selection refuses slices thicker than 3 mm
  (rightly). With ``--research-thick`` the selection is bypassed **for these series only, in
  this benchmark** (the series is loaded with ``workers.volume.load_series`` directly), and the
  output says so per scan; without it they are listed as refused. The tumour is found when a
  finding lies inside one of its per-slice boxes (widened along z by half the slice spacing,
  :func:`workers.evaluate.truth.tumour_positive`); a finding is false when it lies outside
  those boxes widened by ``--tumour-margin`` mm in every direction (default 15 mm: the detector
  also peaks on the rim and spiculae of a 5-6 cm mass).

The detector runs with ``outside_range="qualify"`` where it supports that option (input quality
control then writes the findings with a qualifier instead of skipping the scan), so that what
the detector itself finds is measured; the QC verdict is printed beside it (``QC``: ``ok`` or
``out``, the reasons in the JSON).

Phantoms: the same seeds, geometry and cache as ``benchmarks/bench_detect.py`` (seeds from 9001,
300 x 512², never used in training), scored by :mod:`workers.evaluate` (FROC, LUNA16 hit rule):
sensitivity for solid >= 5 mm at 1 FP/scan and for all types >= 4 mm at 2 FP/scan, and the
false findings per scan at the operating point. ``--phantoms`` bounds the count (default 10; the
full benchmark of ``bench_detect.py`` uses 20) and ``--max-minutes`` the whole run: scans left
when it runs out are listed as not run.

    .venv/bin/python benchmarks/bench_real_ct.py --research-thick
    .venv/bin/python benchmarks/bench_real_ct.py --research-thick \\
        --weights shipped --weights training/candidates/lung_nodules_fp_v2.json --json out.json
    .venv/bin/python benchmarks/bench_real_ct.py --research-thick --phantoms 0   # real scans only

``--without-masses`` adds, for each weights, a variant without the mass stage
(:mod:`workers.models.lung_masses`): the detector's output before version 0.3.0.

``--shape-filter`` adds, for each weights, a variant with the candidate filter of
:mod:`workers.models.shape_features` applied after stage 5 (what the detector would do with that
filter wired in).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "real-chest-ct"
MAX_SLICE_MM = 3.0
"""What production series selection accepts (the detector's ``max_slice_thickness_mm``)."""


@dataclass
class Variant:
    """One detector configuration the benchmark measures."""

    label: str
    weights: Path | None
    """An FP-reduction weights card; None for the shipped one."""
    shape_filter: bool = False
    masses: bool = True
    """Whether the mass stage (workers.models.lung_masses) runs; off = detector 0.2.0's output."""


@dataclass
class RealScan:
    """One real scan's reference, as this benchmark scores it."""

    name: str
    folder: Path
    thick: bool
    ignore: list[dict[str, Any]]
    lesion_boxes: list[Any]
    """The tumour's per-slice boxes (LPS mm), widened along z by half the slice spacing."""
    fp_boxes: list[Any] = field(default_factory=list)
    """The same widened by the margin: findings outside them are false."""


def real_scans(root: Path, margin_mm: float) -> list[RealScan]:
    """The scans under ``root`` (folders with ``truth.json``), with what is known about each."""
    from workers.evaluate.references import ignore_region
    from workers.evaluate.truth import tumour_positive

    scans = []
    for folder in sorted(p for p in root.iterdir() if (p / "truth.json").is_file()):
        truth = json.loads((folder / "truth.json").read_text())
        ignore = [
            ignore_region(m["center_mm"], m.get("diameter_mm"), str(m.get("why", "")))
            for m in truth.get("ignore", [])
        ]
        boxes: list[Any] = []
        wide: list[Any] = []
        if truth.get("tumour_boxes"):
            boxes = tumour_positive(truth["tumour_boxes"])["boxes_mm"]
            wide = [[[v - margin_mm for v in lo], [v + margin_mm for v in hi]] for lo, hi in boxes]
        thick = _slice_thickness(folder) > MAX_SLICE_MM
        scans.append(RealScan(folder.name, folder, thick, ignore, boxes, wide))
    return scans


def _slice_thickness(folder: Path) -> float:
    from workers.volume import read_header

    first = sorted((folder / "dicom").glob("*.dcm"))[0]
    return float(read_header(first).get("SliceThickness", 0.0) or 0.0)


def make_detector(variant: Variant, threads: int) -> Any:
    """The detector of ``variant``; with input QC set to qualify (not skip) where supported."""
    from workers.models.lung_nodules import LungNoduleDetector

    cls: Any = LungNoduleDetector
    if variant.shape_filter:
        from workers.models.shape_features import filter_ranking

        class ShapeFiltered(LungNoduleDetector):
            """The detector with the shape filter after stage 5 (as its hook would wire it)."""

            def rank(self, cands: Any) -> Any:
                return filter_ranking(cands, super().rank(cands))

        cls = ShapeFiltered
    try:
        return cls(
            device="cpu",
            weights=variant.weights,
            options={"threads": threads, "outside_range": "qualify", "masses": variant.masses},
        )
    except ValueError:  # a detector without input quality control or mass stage
        return cls(device="cpu", weights=variant.weights, options={"threads": threads})


def run_real(detector: Any, scan: RealScan) -> dict[str, Any]:
    """One real scan through ``detector``; findings scored against the scan's reference."""
    from workers.evaluate.metrics import _inside_boxes, ignored
    from workers.evaluate.runner import peak_rss_mb, reset_peak_rss
    from workers.evaluate.truth import read_truth
    from workers.volume import load_series

    reset = reset_peak_rss()
    t0 = time.perf_counter()
    if scan.thick:
        # RESEARCH ONLY: production series selection refuses > 3 mm slices; bypassed here.
        volume = load_series(sorted((scan.folder / "dicom").glob("*.dcm")))
    else:
        volume = read_truth(scan.folder).load(detector.requirements)
    load_s = time.perf_counter() - t0
    result = detector.predict(volume)
    rss = peak_rss_mb() if reset else None
    centres = np.array([f.center_mm for f in result.findings], dtype=np.float64).reshape(-1, 3)
    conf = [float(f.confidence) for f in result.findings]
    if scan.lesion_boxes:
        on_lesion = _inside_boxes(centres, scan.lesion_boxes)
        false = ~_inside_boxes(centres, scan.fp_boxes)
        lesion: bool | None = bool(on_lesion.any())
    else:
        false = ~ignored(centres, scan.ignore)
        lesion = None
    quality = result.extra.get("quality")
    return {
        "scan": scan.name,
        "slices": int(volume.shape[0]),
        "selection": "bypassed (research, > 3 mm)" if scan.thick else "production",
        "findings": len(conf),
        "false_findings": int(false.sum()),
        "lesion_found": lesion,
        "lowest_confidence": round(min(conf), 4) if conf else None,
        "highest_candidate": round(
            max((c["score"] for c in result.extra.get("candidates", [])), default=0.0), 4
        ),
        "false_scores": [round(c, 4) for c, f in zip(conf, false, strict=True) if f],
        "false_centres_mm": [[round(float(v), 1) for v in p] for p in centres[false]],
        "qc": None
        if quality is None and "qualifier" not in result.extra
        else result.extra.get("qualifier", "ok"),
        "detector_seconds": round(result.runtime_seconds, 2),
        "load_seconds": round(load_s, 2),
        "peak_rss_mb": round(rss) if rss else None,
    }


def run_inserted(detector: Any, scan: RealScan, rounds: int, per_round: int) -> dict[str, Any]:
    """Simulated nodules inserted into a held-out thin real scan (``training.insert_nodules``,
    fixed seeds, away from its ignore marks), found at the operating point or not: sensitivity on
    the scan's own real background. Evaluation only, and reported as simulated nodules."""
    from training.insert_nodules import insert
    from workers.evaluate.metrics import ignored
    from workers.evaluate.truth import read_truth

    volume = read_truth(scan.folder).load(detector.requirements)
    base = detector.candidates(volume)
    avoid = [
        (np.asarray(m["center_mm"]) - m["radius_mm"] - 5.0, np.asarray(m["center_mm"]) + m["radius_mm"] + 5.0)
        for m in scan.ignore
    ]
    found: dict[str, list[int]] = {}
    false: list[int] = []
    for rnd in range(rounds):
        rng = np.random.default_rng([90_000, rnd])
        vol, placed = insert(volume, base.mask, base.source_ijk, base.spacing, rng, per_round, avoid_mm=avoid)
        result = detector.predict(vol)
        centres = np.array([f.center_mm for f in result.findings], dtype=np.float64).reshape(-1, 3)
        on_nodule = np.zeros(len(centres), dtype=bool)
        for n in placed:
            d = np.linalg.norm(centres - np.array(n.center_mm), axis=1)
            hit = d <= max(n.diameter_mm / 2, 2.5)
            on_nodule |= hit
            size = ">=5mm" if n.diameter_mm >= 5.0 else "<5mm"
            for key in (size, n.kind if size == ">=5mm" else "<5mm"):
                found.setdefault(key, [0, 0])
                found[key][0] += int(hit.any())
                found[key][1] += 1
        false.append(int((~on_nodule & ~ignored(centres, scan.ignore)).sum()))
    return {
        "scan": scan.name,
        "rounds": rounds,
        "found": {k: f"{a}/{b}" for k, (a, b) in sorted(found.items())},
        "sensitivity_ge_5mm": round(found.get(">=5mm", [0, 1])[0] / max(found.get(">=5mm", [0, 1])[1], 1), 3),
        "false_per_round": false,
    }


def run_phantoms(detector: Any, folders: list[Path], deadline: float) -> dict[str, Any]:
    """The phantom FROC figures of ``detector`` (the scoring of ``workers.evaluate``)."""
    from workers.evaluate import SUBSETS, froc, operating_point, run_study

    scans, not_run = [], []
    for folder in folders:
        if time.monotonic() > deadline:
            not_run.append(folder.name)
            continue
        scans.append(run_study(folder, detector))
    if not scans:
        return {"scans": 0, "not_run": not_run}
    solid = froc(scans, SUBSETS["solid_ge_5mm"])
    all4 = froc(scans, SUBSETS["all_ge_4mm"])
    op = operating_point(scans)
    return {
        "scans": len(scans),
        "not_run": not_run,
        "solid_ge_5mm_nodules": solid["nodules"],
        "solid_ge_5mm_at_1fp": solid["sensitivity_at"]["1.0"],
        "all_ge_4mm_nodules": all4["nodules"],
        "all_ge_4mm_at_2fp": all4["sensitivity_at"]["2.0"],
        "cpm_all": all4["mean_sensitivity"],
        "fp_per_scan_at_threshold": op["fp_per_scan"],
        "recall_at_threshold": op["recall"],
        "detector_seconds_max": round(max(s.detector_seconds for s in scans), 2),
        "peak_rss_mb_max": round(max((s.peak_rss_mb or 0.0) for s in scans)),
    }


def print_tables(report: dict[str, Any], out: Any) -> None:
    """The report as plain-text tables."""
    w = out.write
    w(f"\nreal chest CT ({report['data']}); tumour margin {report['tumour_margin_mm']} mm\n")
    head = f"{'variant':<28}{'scan':<31}{'sl':>4}{'find':>5}{'false':>6}{'lesion':>7}{'lowest':>8}{'top':>7}{'det s':>7}{'RSS MiB':>8}  QC / selection\n"
    w(head)
    for v in report["variants"]:
        for r in v["real"]:
            if "refused" in r:
                w(f"{v['label']:<28}{r['scan']:<31}  refused: {r['refused']}\n")
                continue
            lesion = "-" if r["lesion_found"] is None else ("yes" if r["lesion_found"] else "NO")
            low = "-" if r["lowest_confidence"] is None else f"{r['lowest_confidence']:.3f}"
            qc = "n/a" if r["qc"] is None else ("ok" if r["qc"] == "ok" else "out")
            sel = "" if r["selection"] == "production" else ", selection bypassed (research)"
            w(
                f"{v['label']:<28}{r['scan']:<31}{r['slices']:>4}{r['findings']:>5}{r['false_findings']:>6}{lesion:>7}"
                f"{low:>8}{r['highest_candidate']:>7.3f}{r['detector_seconds']:>7.1f}{r['peak_rss_mb'] or 0:>8}  {qc}{sel}\n"
            )
        s = v["real_summary"]
        w(
            f"{v['label']:<28}{'= false findings per scan':<31}{'':>4}{'':>5}{s['false_per_scan']:>6.2f}"
            f"  (held-out lidc-idri-0002: {s['lidc_false']}; Lung-PET-CT-Dx mean {s['dx_false_per_scan']}; tumours found {s['tumours_found']})\n"
        )
    if any(v.get("inserted") for v in report["variants"]):
        w("\nsimulated nodules inserted into held-out thin real scans (training/insert_nodules.py)\n")
        w(f"{'variant':<28}{'scan':<20}{'rounds':>7}{'>=5 mm found':>13}  by kind; false findings per round\n")
        for v in report["variants"]:
            for r in v.get("inserted", []):
                w(
                    f"{v['label']:<28}{r['scan']:<20}{r['rounds']:>7}{r['sensitivity_ge_5mm']:>13.3f}  "
                    f"{r['found']}; {r['false_per_round']}\n"
                )
    if not any(v.get("phantoms") for v in report["variants"]):
        return
    w("\nphantoms (bench_detect.py seeds and cache; LUNA16 hit rule)\n")
    w(
        f"{'variant':<28}{'scans':>6}{'solid>=5mm n':>13}{'@1FP':>7}{'all>=4mm n':>11}{'@2FP':>7}{'CPM':>7}{'FP/scan@thr':>12}{'recall@thr':>11}{'det s max':>10}\n"
    )
    for v in report["variants"]:
        p = v.get("phantoms")
        if not p or not p.get("scans"):
            continue
        w(
            f"{v['label']:<28}{p['scans']:>6}{p['solid_ge_5mm_nodules']:>13}{p['solid_ge_5mm_at_1fp']:>7.3f}{p['all_ge_4mm_nodules']:>11}"
            f"{p['all_ge_4mm_at_2fp']:>7.3f}{p['cpm_all']:>7.3f}{p['fp_per_scan_at_threshold']:>12.2f}{p['recall_at_threshold']:>11.3f}{p['detector_seconds_max']:>10.1f}"
            + (f"  not run: {len(p['not_run'])}" if p["not_run"] else "")
            + "\n"
        )


def _variants(weights: list[str], shape_filter: bool, without_masses: bool = False) -> list[Variant]:
    out = []
    for spec in weights or ["shipped"]:
        path = None if spec == "shipped" else Path(spec)
        label = "shipped" if path is None else path.stem
        out.append(Variant(label, path))
        if without_masses:
            out.append(Variant(f"{label}-masses", path, masses=False))
        if shape_filter:
            out.append(Variant(f"{label}+shape", path, shape_filter=True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DATA, help="the real chest CT folder")
    ap.add_argument(
        "--weights",
        action="append",
        default=[],
        help="an FP-reduction weights card, or 'shipped' (repeatable)",
    )
    ap.add_argument(
        "--shape-filter",
        action="store_true",
        help="also measure each weights with workers.models.shape_features",
    )
    ap.add_argument(
        "--without-masses",
        action="store_true",
        help="also measure each weights without the mass stage (the detector before 0.3.0)",
    )
    ap.add_argument(
        "--research-thick",
        action="store_true",
        help="RESEARCH: bypass series selection for the > 3 mm series (production refuses them)",
    )
    ap.add_argument(
        "--tumour-margin",
        type=float,
        default=15.0,
        help="mm around the tumour boxes where findings are not false",
    )
    ap.add_argument(
        "--phantoms", type=int, default=10, help="phantoms from bench_detect.py's set (0: none)"
    )
    ap.add_argument(
        "--inserted",
        type=int,
        default=0,
        help="rounds of simulated nodules inserted into each held-out thin scan (0: none)",
    )
    ap.add_argument("--per-round", type=int, default=10, help="simulated nodules per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=30.0,
        help="phantoms left when this runs out are not run",
    )
    ap.add_argument(
        "--json", type=Path, help="write the report as JSON here ('-': stdout, tables to stderr)"
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes
    tables = sys.stderr if args.json == Path("-") else sys.stdout
    scans = real_scans(args.data, args.tumour_margin) if args.data.is_dir() else []
    if not scans:
        print(f"no real scans under {args.data}", file=sys.stderr)
    folders: list[Path] = []
    if args.phantoms:
        from benchmarks.bench_detect import ensure_phantoms

        folders = ensure_phantoms(args.phantoms, 300)
    report: dict[str, Any] = {
        "data": str(args.data),
        "tumour_margin_mm": args.tumour_margin,
        "research_thick": args.research_thick,
        "threads": args.threads,
        "load_average_before": round(os.getloadavg()[0], 2),
        "variants": [],
    }
    for variant in _variants(args.weights, args.shape_filter, args.without_masses):
        detector = make_detector(variant, args.threads)
        entry: dict[str, Any] = {
            "label": variant.label,
            "weights": str(variant.weights or "shipped"),
            "weights_sha256": detector.info.weights_sha256,
            "model_version": detector.info.version,
            "threshold": detector.threshold,
            "shape_filter": variant.shape_filter,
            "masses": variant.masses,
            "real": [],
        }
        for scan in scans:
            if scan.thick and not args.research_thick:
                entry["real"].append(
                    {"scan": scan.name, "refused": "slices > 3 mm (rerun with --research-thick)"}
                )
                continue
            r = run_real(detector, scan)
            entry["real"].append(r)
            print(
                f"  [{variant.label}] {scan.name}: {r['findings']} findings, {r['false_findings']} false, "
                f"{r['detector_seconds']} s",
                file=sys.stderr,
                flush=True,
            )
        ran = [r for r in entry["real"] if "refused" not in r]
        dx = [r for r in ran if r["lesion_found"] is not None]
        lidc = [r["false_findings"] for r in ran if r["lesion_found"] is None]
        entry["real_summary"] = {
            "false_per_scan": round(float(np.mean([r["false_findings"] for r in ran])), 2)
            if ran
            else 0.0,
            "lidc_false": lidc[0] if len(lidc) == 1 else lidc,
            "dx_false_per_scan": round(float(np.mean([r["false_findings"] for r in dx])), 2)
            if dx
            else None,
            "tumours_found": f"{sum(bool(r['lesion_found']) for r in dx)}/{len(dx)}",
        }
        if args.inserted:
            entry["inserted"] = [
                run_inserted(detector, scan, args.inserted, args.per_round)
                for scan in scans
                if not scan.thick and not scan.lesion_boxes
            ]
            print(f"  [{variant.label}] inserted: {entry['inserted']}", file=sys.stderr, flush=True)
        if folders:
            entry["phantoms"] = run_phantoms(detector, folders, deadline)
            print(f"  [{variant.label}] phantoms: {entry['phantoms']}", file=sys.stderr, flush=True)
        report["variants"].append(entry)
        del detector
    report["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
    report["load_average_after"] = round(os.getloadavg()[0], 2)
    print_tables(report, tables)
    tables.write(
        f"\nwall {report['wall_minutes']} min on {args.threads} threads; load average (1 min) "
        f"{report['load_average_before']} before, {report['load_average_after']} after\n"
    )
    if args.research_thick:
        tables.write(
            "NOTE: the > 3 mm Lung-PET-CT-Dx series were loaded bypassing production series selection "
            "(research option); production refuses them.\n"
        )
    if args.json == Path("-"):
        json.dump(report, sys.stdout, indent=2)
        print()
    elif args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
