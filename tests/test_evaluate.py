"""Evaluation: FROC with the LUNA16 hit criterion, operating point, breakdowns, and the
``dicom-node evaluate`` command end to end on generated studies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.evaluate import Candidate, ScanResult, breakdown, froc, match, operating_point


def nodule(x: float, d: float, kind: str = "solid") -> dict:
    return {"center_mm": [x, 0.0, 0.0], "diameter_mm": d, "type": kind}


def cand(x: float, score: float) -> Candidate:
    return Candidate((x, 0.0, 0.0), score)


def test_hit_criterion_is_the_nodule_radius() -> None:
    scan = ScanResult("s", [nodule(0, 10)], [cand(4.9, 0.9), cand(5.1, 0.8), cand(-5.0, 0.7)], [])
    # 4.9 mm and exactly 5.0 mm from the centre of a 10 mm nodule hit; 5.1 mm does not.
    assert list(match(scan)) == [0, -1, 0]


def test_froc_counts_each_nodule_once_and_every_miss_as_fp() -> None:
    scans = [
        ScanResult(
            "a",
            [nodule(0, 10), nodule(100, 6)],
            # two hits on the first nodule (count once, neither is a false positive), one FP
            [cand(1, 0.95), cand(-2, 0.9), cand(50, 0.8), cand(101, 0.4)],
            [],
        ),
        ScanResult("b", [nodule(0, 8)], [cand(30, 0.85), cand(60, 0.5), cand(0.5, 0.3)], []),
    ]
    f = froc(scans)
    assert f["nodules"] == 3 and f["scans"] == 2
    at = f["sensitivity_at"]
    # Sweep: 0.95 TP(1/3) 0.9 dup 0.85 FP(0.5/scan) 0.8 FP(1.0) 0.5 FP(1.5) 0.4 TP(2/3) 0.3 TP(3/3)
    assert at["0.125"] == pytest.approx(1 / 3, abs=1e-4)
    assert at["0.5"] == pytest.approx(1 / 3, abs=1e-4)
    assert at["1.0"] == pytest.approx(1 / 3, abs=1e-4)
    assert at["2.0"] == pytest.approx(1.0)
    assert at["8.0"] == pytest.approx(1.0)


def test_froc_subset_ignores_hits_on_other_nodules() -> None:
    scans = [
        ScanResult(
            "a",
            [nodule(0, 10, "solid"), nodule(50, 3.5, "ground-glass")],
            [cand(50, 0.99), cand(0, 0.5)],
            [],
        )
    ]
    big = froc(scans, lambda n: n["diameter_mm"] >= 4)
    # The hit on the 3.5 mm nodule is neither a TP nor an FP for the >= 4 mm subset.
    assert big["nodules"] == 1
    assert big["sensitivity_at"]["0.125"] == 1.0
    everything = froc(scans)
    assert everything["sensitivity_at"]["0.125"] == 1.0


def test_froc_is_a_step_function_not_interpolated() -> None:
    # 4 scans, one nodule each; three FPs ranked above the TPs of scans 2-4.
    scans = [
        ScanResult(str(i), [nodule(0, 10)], [cand(0, 0.9 - i * 0.1), cand(40, 0.95 - i * 0.01)], [])
        for i in range(4)
    ]
    f = froc(scans)
    # All 4 FPs (0.95..0.92) come first: 1 FP/scan is reached before any TP.
    assert f["sensitivity_at"]["0.5"] == 0.0
    assert f["sensitivity_at"]["1.0"] == 1.0


def test_operating_point_precision_recall_f1() -> None:
    scans = [
        ScanResult(
            "a", [nodule(0, 10), nodule(100, 10)], [], [cand(0, 0.9), cand(1, 0.8), cand(60, 0.7)]
        ),
        ScanResult("b", [nodule(0, 6)], [], []),
    ]
    op = operating_point(scans)
    # TP: nodule a/0 (the duplicate finding is not an FP); FP: the finding at 60; FN: a/100, b/0.
    assert (op["tp"], op["fp"], op["fn"]) == (1, 1, 2)
    assert op["precision"] == 0.5
    assert op["recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert op["f1"] == pytest.approx(0.4, abs=1e-4)
    assert op["fp_per_scan"] == 0.5


def test_breakdown_by_size_and_type() -> None:
    scans = [
        ScanResult(
            "a",
            [nodule(0, 5, "solid"), nodule(100, 12, "ground-glass"), nodule(200, 25, "part-solid")],
            [cand(0, 0.9), cand(200, 0.8)],
            [cand(0, 0.9)],
        )
    ]
    b = breakdown(scans)
    assert b["by_size_mm"]["4-6"]["sensitivity_operating_point"] == 1.0
    assert b["by_size_mm"]["10-20"]["sensitivity_at_1_fp"] == 0.0
    assert b["by_size_mm"]["20-30"]["sensitivity_at_1_fp"] == 1.0
    assert b["by_size_mm"]["20-30"]["sensitivity_operating_point"] == 0.0
    assert set(b["by_type"]) == {"solid", "ground-glass", "part-solid"}
    assert b["by_type"]["ground-glass"]["nodules"] == 1


def _synth(out: Path, *args: str) -> None:
    from dicom_node.cli import main

    assert main(["synth", str(out), "--no-progress", *args]) == 0


def test_evaluate_command_writes_report_and_plot(tmp_path: Path) -> None:
    """``dicom-node evaluate`` over generated studies: JSON report with the FROC at every listed
    rate, the operating point, the breakdowns, runtime and memory per study, and a PNG plot."""
    from dicom_node.cli import main

    common = [
        "--slices",
        "200",
        "--matrix",
        "512",
        "--pixel-size",
        "0.7",
        "--thickness",
        "1.25",
        "--noise",
        "20",
    ]
    _synth(
        tmp_path / "data" / "a",
        "--seed",
        "11",
        "--nodules",
        "3",
        "--nodule-types",
        "solid",
        "--min-size",
        "7",
        "--max-size",
        "12",
        *common,
    )
    _synth(tmp_path / "data" / "b", "--seed", "12", "--no-nodules", *common)
    out = tmp_path / "report"
    assert main(["evaluate", str(tmp_path / "data"), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scans"] == 2
    assert report["model"] == "lung-nodules"
    assert set(report["froc"]["all"]["sensitivity_at"]) == {
        "0.125",
        "0.25",
        "0.5",
        "1.0",
        "2.0",
        "4.0",
        "8.0",
    }
    assert report["froc"]["all"]["nodules"] == 3
    assert report["froc"]["all"]["sensitivity_at"]["8.0"] >= 2 / 3
    assert {"precision", "recall", "f1"} <= set(report["operating_point"]["all"])
    assert report["breakdown"]["by_type"]["solid"]["nodules"] == 3
    assert all(s["detector_seconds"] > 0 for s in report["per_study"])
    assert report["runtime"]["peak_rss_mb_max"] > 0
    png = (out / "froc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_evaluate_without_studies_is_a_usage_error(tmp_path: Path) -> None:
    from dicom_node.cli import main

    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
