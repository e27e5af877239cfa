"""Detection benchmark: the built-in ``lung-nodules`` detector against a plain multi-scale LoG
peak detector (its own stages 1-4 without false-positive reduction), in the same run, on 20
phantoms from seeds no development step used.

Phantoms: ``dicom-node synth`` with seeds 9001-9020 (training uses seeds below 9000 and the
training script refuses these), 300 slices of 512 x 512, pixel size drawn from 0.6-0.8 mm and
slice thickness from {1.0, 1.25} mm per seed, 4-8 nodules of all four kinds, 3-30 mm. They are
written as DICOM (cached under ``benchmarks/.cache/detect``) and read back through the
project's loader, exactly as ``dicom-node evaluate`` does.

Also checked: 10 nodule-free chests (seeds 9501-9510, same geometry; ``--clean``), of which
none should get a finding at the operating point.

Printed, for both detectors: the FROC (sensitivity at 0.125-8 FP/scan, LUNA16 hit criterion)
for all nodules, for all types >= 4 mm and for solid (incl. juxtapleural) >= 5 mm; precision,
recall and F1 at the operating point; detector seconds per study (median, max); peak resident
memory of the process per study (the loaded series included); and the 1-minute load average
before and after, since the machine is shared.

Targets (issue 5): sensitivity >= 0.95 for solid >= 5 mm at <= 1 FP/scan; >= 0.85 for all
types >= 4 mm at <= 2 FP/scan; <= 15 s detector time per 300 x 512² study on the 2-core CPU;
peak memory <= 3 GiB per worker.

    .venv/bin/python benchmarks/bench_detect.py            # generate (once) and measure
    .venv/bin/python benchmarks/bench_detect.py --count 5  # a quicker look
    .venv/bin/python benchmarks/bench_detect.py --no-baseline --weights /tmp/w/lung_nodules_fp.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CACHE = REPO / "benchmarks" / ".cache" / "detect"
FIRST_SEED = 9001
CLEAN_FIRST_SEED = 9501


class LogPeaksBaseline:
    """The peer: the detector's own candidates ranked by their LoG response alone (what a
    blob filter without false-positive reduction gives; ``performance.md`` §5's method)."""

    def __init__(self, detector: object) -> None:
        self.inner = detector

    @property
    def info(self):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        return replace(self.inner.info, name="log-peaks-baseline", version="stage1-4")  # type: ignore[attr-defined]

    @property
    def requirements(self):  # type: ignore[no-untyped-def]
        return self.inner.requirements  # type: ignore[attr-defined]

    def predict(self, volume):  # type: ignore[no-untyped-def]
        from workers.findings import DetectionResult
        from workers.models.lung_nodules import FEATURE_NAMES, _suppress

        started = time.perf_counter()
        cands = self.inner.candidates(volume)  # type: ignore[attr-defined]
        log_response = cands.features[:, FEATURE_NAMES.index("log_response")].astype(np.float64)
        which = np.arange(len(log_response))
        # Scores in 0..1 that keep the order of the response (for a comparable FROC).
        scores = 1.0 - np.exp(-np.exp(log_response) / 300.0)
        kept = _suppress(cands, which, scores)
        order = kept[np.argsort(-scores[kept])][:500]
        src = cands.source_ijk(cands.points[order] + cands.offsets[order])
        candidates = [
            {"center_mm": list(volume.index_to_patient(*p)), "score": float(s)} for p, s in zip(src, scores[order], strict=True)
        ]
        return DetectionResult(
            model_name=self.info.name,
            model_version=self.info.version,
            series_instance_uid=volume.series_instance_uid,
            findings=[],
            runtime_seconds=time.perf_counter() - started,
            extra={"candidates": candidates, "timings": cands.timings},
        )


def phantom_specs(count: int, slices: int, first_seed: int = FIRST_SEED, nodules: int | None = None) -> list[dict[str, object]]:
    specs: list[dict[str, object]] = []
    for n in range(count):
        seed = first_seed + n
        rng = np.random.default_rng(seed)
        specs.append(
            {
                "seed": seed,
                "slices": slices,
                "pixel_spacing": float(np.round(rng.uniform(0.6, 0.8), 3)),
                "slice_thickness": float(rng.choice([1.0, 1.25])),
                **({} if nodules is None else {"nodules": nodules}),
            }
        )
    return specs


def ensure_phantoms(count: int, slices: int, first_seed: int = FIRST_SEED, nodules: int | None = None) -> list[Path]:
    from dicom_node.synth import PhantomSpec, make_phantom, write_series

    folders = []
    for spec in phantom_specs(count, slices, first_seed, nodules):
        prefix = "clean" if nodules == 0 else "seed"
        folder = CACHE / f"{prefix}-{spec['seed']}-{spec['slices']}"
        if not (folder / "truth.json").is_file():
            t = time.perf_counter()
            phantom = make_phantom(PhantomSpec(**spec))  # type: ignore[arg-type]
            write_series(phantom, folder)
            print(f"  generated {folder.name}: {len(phantom.nodules)} nodules ({time.perf_counter() - t:.1f} s)", flush=True)
        folders.append(folder)
    return folders


def nodule_free_findings(detector: Any, folders: list[Path]) -> dict[str, Any]:
    """The detector on nodule-free chests: how many get a finding at its operating point, and
    the highest candidate score on each (what a threshold must stay above to keep them clean)."""
    from workers.evaluate import run_study

    highest, with_finding = [], []
    for n, folder in enumerate(folders, 1):
        scan = run_study(folder, detector)
        highest.append(max((c.score for c in scan.candidates), default=0.0))
        if scan.findings:
            with_finding.append(folder.name)
        print(f"  [nodule-free {n}/{len(folders)}] {folder.name}: {len(scan.findings)} findings, "
              f"highest score {highest[-1]:.3f}", flush=True)
    return {"scans": len(folders), "with_a_finding": with_finding, "highest_scores": [round(h, 5) for h in highest]}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def print_summary(summary: dict[str, object]) -> None:
    froc = summary["froc"]  # type: ignore[index]
    rates = ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0")
    print(f"\n{summary['model']} {summary['model_version']} (threshold {summary['threshold']})")
    print(f"  {'nodules':<14}{'n':>5}  " + "  ".join(f"{r + ' FP':>8}" for r in rates))
    for name, f in froc.items():  # type: ignore[union-attr]
        print(f"  {name:<14}{f['nodules']:>5}  " + "  ".join(f"{f['sensitivity_at'][r]:>8.3f}" for r in rates))
    op = summary["operating_point"]["all"]  # type: ignore[index]
    print(f"  operating point: precision {op['precision']:.3f} recall {op['recall']:.3f} F1 {op['f1']:.3f} "
          f"({op['fp_per_scan']:.2f} FP/scan)")
    rt = summary["runtime"]  # type: ignore[index]
    print(f"  detector s/study: median {rt['detector_seconds_median']} max {rt['detector_seconds_max']}; "
          f"load s/study median {rt['load_seconds_median']}; peak RSS max {rt['peak_rss_mb_max']} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=FIRST_SEED,
        help="first phantom seed (another range gives a fresh set no earlier run has judged weights on)",
    )
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=CACHE / "report")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--clean", type=int, default=10, help="nodule-free chests checked for findings")
    ap.add_argument("--clean-first-seed", type=int, default=CLEAN_FIRST_SEED, help="first nodule-free chest's seed")
    ap.add_argument("--weights", type=Path, help="FP-reduction weights card to measure instead of the shipped one")
    args = ap.parse_args()

    import torch

    from workers.evaluate import evaluate, write_report
    from workers.models.lung_nodules import LungNoduleDetector

    torch.set_num_threads(args.threads)
    if args.first_seed < FIRST_SEED or args.clean_first_seed < FIRST_SEED:
        ap.error(f"benchmark seeds start at {FIRST_SEED}; lower ones are for development and training")
    print(f"phantoms: {args.count} x {args.slices} x 512², seeds {args.first_seed}-{args.first_seed + args.count - 1}", flush=True)
    folders = ensure_phantoms(args.count, args.slices, args.first_seed)
    detector = LungNoduleDetector(device="cpu", weights=args.weights)  # None: the shipped weights
    # Warm up once (imports, allocator) so the first study is not charged for it.
    from workers.volume import load_series

    detector.predict(load_series(sorted(folders[0].glob("slice_*.dcm"))[: 40]))

    runs = [("lung-nodules", detector)]
    if not args.no_baseline:
        runs.append(("log-peaks-baseline", LogPeaksBaseline(detector)))
    results, report_paths = {}, {}
    for name, det in runs:
        before = load_average()
        t = time.perf_counter()

        def progress(n: int, total: int, scan: object, name: str = name) -> None:
            print(f"  [{name} {n}/{total}] {scan.name}: detector {scan.detector_seconds:.2f} s, "  # type: ignore[attr-defined]
                  f"peak RSS {scan.peak_rss_mb:.0f} MiB, load avg {load_average()}", flush=True)  # type: ignore[attr-defined]

        report = evaluate(folders, det, progress=progress)
        json_path, png_path = write_report(report, args.out / name)
        summary = json.loads(json_path.read_text())
        summary["load_average_1min"] = {"before": before, "after": load_average()}
        summary["wall_seconds"] = round(time.perf_counter() - t, 1)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        results[name], report_paths[name] = summary, json_path
        print_summary(summary)
        print(f"  load average (1 min) before {before}, after {summary['load_average_1min']['after']}; "
              f"report {json_path}, plot {png_path}", flush=True)

    main_summary = results["lung-nodules"]
    clean: dict[str, Any] | None = None
    if args.clean:
        last = args.clean_first_seed + args.clean - 1
        print(f"nodule-free chests: {args.clean}, seeds {args.clean_first_seed}-{last}", flush=True)
        clean = nodule_free_findings(detector, ensure_phantoms(args.clean, args.slices, args.clean_first_seed, nodules=0))
        main_summary["nodule_free"] = clean
        report_paths["lung-nodules"].write_text(json.dumps(main_summary, indent=2) + "\n")
    solid = main_summary["froc"]["solid_ge_5mm"]["sensitivity_at"]["1.0"]
    all4 = main_summary["froc"]["all_ge_4mm"]["sensitivity_at"]["2.0"]
    rt = main_summary["runtime"]
    print("\ntargets (lung-nodules):")
    print(f"  solid >= 5 mm at 1 FP/scan:    {solid:.3f} (target >= 0.95) {'OK' if solid >= 0.95 else 'MISSED'}")
    print(f"  all types >= 4 mm at 2 FP/scan: {all4:.3f} (target >= 0.85) {'OK' if all4 >= 0.85 else 'MISSED'}")
    print(f"  detector time, max per study:  {rt['detector_seconds_max']} s (target <= 15) "
          f"{'OK' if rt['detector_seconds_max'] <= 15 else 'MISSED'}")
    print(f"  peak memory, max per study:    {rt['peak_rss_mb_max']} MiB (target <= 3072) "
          f"{'OK' if rt['peak_rss_mb_max'] and rt['peak_rss_mb_max'] <= 3072 else 'MISSED'}")
    if clean is not None:
        print(f"  nodule-free chests with a finding: {len(clean['with_a_finding'])} of {clean['scans']} "
              f"(highest score {max(clean['highest_scores'], default=0.0):.3f}, threshold {detector.threshold:.3f})")
    if "log-peaks-baseline" in results:
        base = results["log-peaks-baseline"]["froc"]
        print(f"  peer (LoG peaks, no FP reduction): solid >= 5 mm at 1 FP {base['solid_ge_5mm']['sensitivity_at']['1.0']:.3f}, "
              f"all >= 4 mm at 2 FP {base['all_ge_4mm']['sensitivity_at']['2.0']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
