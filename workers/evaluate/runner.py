"""Finding the scans to evaluate, loading each as the model would see it, running the detector.

Input kinds, recognised per folder (the first that applies; sub-folders are searched when none
does):

* ``truth.json`` beside a DICOM series: a ``dicom-node synth`` study or a real chest CT
  reference file (:mod:`.truth`);
* ``annotations.csv``: a LUNA16 tree (``.mhd``/``.raw`` volumes anywhere below it,
  ``annotations_excluded.csv`` anywhere below it) (:mod:`.luna16`);
* an LIDC XML reading (``LidcReadMessage``) beside a DICOM series (:mod:`.lidc`).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dicom_node.errors import NoInputError
from workers.evaluate.lidc import is_lidc_xml, read_lidc
from workers.evaluate.luna16 import is_luna16, read_luna16
from workers.evaluate.metrics import FALSE, Candidate, ScanResult, match
from workers.evaluate.pictures import draw_scan
from workers.evaluate.references import Reference, SkipScan
from workers.evaluate.report import Report
from workers.evaluate.truth import TRUTH_FILE, read_truth
from workers.findings import DetectionResult
from workers.volume import VolumeError


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


def _references_in(folder: Path, seen: set[Path]) -> list[Reference]:
    key = folder.resolve()
    if key in seen:
        return []
    seen.add(key)
    if (folder / TRUTH_FILE).is_file():
        return [read_truth(folder)]
    if is_luna16(folder):
        return read_luna16(folder)
    if any(is_lidc_xml(x) for x in folder.glob("*.xml")):
        return read_lidc(folder)
    refs: list[Reference] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        refs.extend(_references_in(sub, seen))
    return refs


def find_references(paths: Iterable[str | os.PathLike[str]]) -> list[Reference]:
    """Every scan with a reference under ``paths`` (input kind recognised per folder; a folder
    given twice, or inside another one given, is read once)."""
    refs: list[Reference] = []
    seen: set[Path] = set()
    for p in paths:
        if Path(p).is_dir():
            refs.extend(_references_in(Path(p), seen))
    return refs


def load_study(folder: Path, requirements: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The volume of the series in ``folder`` that a model with ``requirements`` would choose,
    and the positives of its ``truth.json``."""
    ref = read_truth(folder)
    try:
        return ref.load(requirements), ref.positives
    except SkipScan as exc:
        raise ValueError(f"{folder.name}: {exc}") from exc


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (False where it cannot be)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since the last reset, MiB (None if unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_study(
    study: Path | Reference,
    detector: Any,
    *,
    pictures: Path | None = None,
    index: int = 1,
) -> ScanResult:
    """Load the scan (the series the detector would choose) and run the detector on it; with
    ``pictures``, write the crops of its false findings and misses there. Raises
    :class:`SkipScan` when the model refuses the scan."""
    ref = read_truth(study) if isinstance(study, Path) else study
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    volume = ref.load(detector.requirements)
    load_s = time.perf_counter() - t0
    try:
        result = detector.predict(volume)
    except NoInputError as exc:
        # The model's own input check refused the scan: at a site it yields no findings, so it
        # is scored as a scan without findings (its positives missed), not left out.
        info = detector.info
        result = DetectionResult(info.name, info.version, volume.series_instance_uid, [])
        result.extra["refused"] = str(exc)
    cands = result.extra.get("candidates")
    if cands is None:
        candidates = [Candidate(tuple(f.center_mm), float(f.confidence)) for f in result.findings]
    else:
        candidates = [Candidate(tuple(c["center_mm"]), float(c["score"])) for c in cands]
    scan = ScanResult(
        name=ref.name,
        nodules=ref.positives,
        candidates=candidates,
        findings=[Candidate(tuple(f.center_mm), float(f.confidence)) for f in result.findings],
        detector_seconds=result.runtime_seconds,
        load_seconds=load_s,
        peak_rss_mb=peak_rss_mb() if reset else None,
        shape=volume.shape,
        device=result.device,
        extra={
            "kind": ref.kind,
            **{
                k: v
                for k, v in result.extra.items()
                if k in ("timings", "candidate_count", "refused")
            },
        },
        ignore=ref.ignore,
    )
    if pictures is not None:
        hits = match(scan, "findings")
        false = [
            (f.center_mm, f.score) for f, h in zip(scan.findings, hits, strict=True) if h == FALSE
        ]
        misses = [n for k, n in enumerate(scan.nodules) if k not in set(hits.tolist())]
        scan.extra["pictures"] = draw_scan(volume, index, false, misses, pictures)
    del volume, result
    return scan


def evaluate(
    studies: Sequence[Path | Reference],
    detector: Any,
    *,
    progress: Callable[[int, int, ScanResult], None] | None = None,
    pictures: Path | None = None,
) -> Report:
    """Run ``detector`` on every study (folder with ``truth.json``, or :class:`Reference`) and
    collect the results; scans the model refuses, or that cannot be read, are listed as skipped
    with the reason."""
    scans: list[ScanResult] = []
    skipped: list[dict[str, str]] = []
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    for n, study in enumerate(studies, start=1):
        try:
            scan = run_study(study, detector, pictures=pictures, index=n)
        except (SkipScan, VolumeError) as exc:  # refused, or unreadable: say why, go on
            name = study.name if isinstance(study, Reference | Path) else str(n)
            skipped.append({"index": str(n), "name": name, "reason": str(exc)})
            continue
        scan.extra["index"] = n
        scans.append(scan)
        if progress:
            progress(n, len(studies), scan)
    info = detector.info
    return Report(
        model=info.name,
        model_version=info.version,
        threshold=getattr(detector, "threshold", None),
        scans=scans,
        skipped=skipped,
        load_average=(round(load[0], 2), round(load[1], 2), round(load[2], 2)) if load else None,
    )
