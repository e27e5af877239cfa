"""`dicom-node demo` runs the whole loop end to end with nothing configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO

pytestmark = pytest.mark.slow


def _demo(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "demo",
            "--data-dir",
            str(tmp_path / "demo"),
            "--slices",
            "100",
            "--matrix",
            "448",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    return run, (json.loads(run.stdout) if run.stdout.strip().startswith("{") else {})


def test_demo_with_a_local_pacs(tmp_path: Path) -> None:
    run, out = _demo(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    job = out["job"]
    assert job["state"] == "done" and job["attempts"] == 1
    assert {o["kind"] for o in job["outputs"]} >= {"sr", "summary"}
    assert [d["state"] for d in job["deliveries"]] == ["done"]
    # The results are in the PACS next to the phantom's images.
    assert out["pacs"]["CT"] == 100 and out["pacs"]["SR"] == 1
    if job["summary"]["finding_count"]:
        assert out["pacs"]["SEG"] == 1
    assert out["links"]["job"].startswith("http://127.0.0.1:") and job["id"] in out["links"]["job"]
    # Everything it started is gone again.
    left = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True
    ).stdout
    assert left.strip() == ""


def test_demo_without_a_pacs_keeps_results_in_a_folder(tmp_path: Path) -> None:
    run, out = _demo(tmp_path, "--no-orthanc")
    assert run.returncode == 0, run.stderr[-3000:]
    assert out["pacs"] is None and out["job"]["deliveries"] == []
    results = list((tmp_path / "demo" / "var" / "results").rglob("sr.dcm"))
    assert len(results) == 1
