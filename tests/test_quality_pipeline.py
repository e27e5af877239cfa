"""Input quality control of the built-in lung-nodule detector through the whole node: a chest CT
with lung noise above the card's validated range (workers/models/weights/lung_nodules_fp.json)
is received by a real `dicom-node serve` (embedded broker, real Celery worker) and its job ends
skipped with a patient-free reason and nothing delivered; with ``outside_range = "qualify"`` the
job ends done and the delivered TID 1500 SR says, in a "Comment" (121106, DCM) under "Qualitative
Evaluations", that the model's published figures do not apply. The detector-level checks are in
tests/test_input_quality.py."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.state import Delivery, JobState
from tests.dicomgen import CANARY_ID, CANARY_NAME
from tests.peers import StoreSCP
from tests.pipeline_env import NodeEnv
from workers.results.conformance import dciodvfy_errors

pytestmark = pytest.mark.slow

# The geometry of tests/test_input_quality.py (inside the card's 0.6-0.8 mm pixels and <= 1.25 mm
# slices), with fewer slices (120 x 1.25 mm still holds whole lungs) and twice its 20 HU noise:
# 40 HU, above the card's 35 HU. Two solid nodules, so the qualified SR has findings.
NOISY_CHEST = [
    "--slices", "120", "--matrix", "512", "--pixel-size", "0.7", "--thickness", "1.25",
    "--noise", "40", "--seed", "33", "--nodules", "2", "--nodule-types", "solid",
    "--min-size", "8", "--max-size", "12", "--no-progress",
    "--patient-name", CANARY_NAME, "--patient-id", CANARY_ID,
]  # fmt: skip

NOISE_REASON = re.compile(r"lung noise ([\d.]+) HU > 35 HU")
CANARIES = ("PHICANARY", CANARY_ID, CANARY_NAME.split("^")[0])
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
COMMENT = ("121106", "DCM")
# One model run on 120 x 512 x 512 voxels on a shared 2-core machine, plus worker start-up.
JOB_TIMEOUT = 360.0


def _require(tool: str) -> None:
    """Skip without ``tool`` (conftest turns the skip into a failure under CI=true)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian: dcmtk / dicom3tools)")


@pytest.fixture(scope="module")
def noisy_chest(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("noisy") / "chest"
    assert main(["synth", str(out), *NOISY_CHEST]) == 0
    return sorted(out.glob("slice_*.dcm"))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    """DCMTK storescp as the write-back destination: what it received is what was delivered."""
    _require("storescp")
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


def _node(tmp_path: Path, sqlite_url: str, pacs: StoreSCP, config: str) -> NodeEnv:
    """A node with one embedded worker (no Redis needed) and the default route (CT ->
    lung-nodules), delivering to ``pacs``."""
    _require("storescu")
    return NodeEnv(
        tmp_path / "node",
        sqlite_url,
        broker_url=None,
        embedded_workers=1,
        config_text=config,
        extra_env={"DICOM_NODE_DESTINATION": f"dicom://{pacs.aet}@127.0.0.1:{pacs.port}"},
    ).start()


def _items(ds: Dataset, concept: tuple[str, str]) -> list[Dataset]:
    """Content items with concept name ``concept`` (code, scheme), anywhere in the SR tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and (name[0].CodeValue, name[0].CodingSchemeDesignator) == concept:
            found.append(item)
        found.extend(_items(item, concept))
    return found


def test_noise_above_the_validated_range_is_skipped_with_a_patient_free_reason(
    tmp_path: Path, sqlite_url: str, pacs: StoreSCP, noisy_chest: list[Path]
) -> None:
    env = _node(tmp_path, sqlite_url, pacs, config="")
    try:
        env.send(noisy_chest)
        (job,) = env.wait_all_terminal(1, timeout=JOB_TIMEOUT)
        assert job.state == JobState.SKIPPED.value, env.diagnostics()
        reason = job.reason or ""
        assert reason.startswith("input outside the validated range: "), reason
        match = NOISE_REASON.search(reason)
        assert match and 35 < float(match.group(1)) <= 45, reason
        study_uid = str(pydicom.dcmread(noisy_chest[0], stop_before_pixels=True).StudyInstanceUID)
        for private in (*CANARIES, study_uid):
            assert private not in reason
            assert private not in env.node.log()
        # Nothing was made, so nothing was delivered.
        assert [o.kind for o in env.outputs(job.id) if o.kind != "summary"] == []
        with env.db.session() as s:
            assert list(s.scalars(select(Delivery).where(Delivery.job_id == job.id))) == []
        assert pacs.received == []
    finally:
        env.stop()


def test_qualify_delivers_an_sr_that_says_the_input_was_outside_the_range(
    tmp_path: Path, sqlite_url: str, pacs: StoreSCP, noisy_chest: list[Path]
) -> None:
    _require("dciodvfy")
    config = '[models.lung-nodules]\noptions = {outside_range = "qualify"}\n'
    env = _node(tmp_path, sqlite_url, pacs, config=config)
    try:
        env.send(noisy_chest)
        (job,) = env.wait_all_terminal(1, timeout=JOB_TIMEOUT)
        assert job.state == JobState.DONE.value, env.diagnostics()
        qualifier = job.summary.get("qualifier") or ""
        assert NOISE_REASON.search(qualifier), job.summary
        assert job.summary["finding_count"] >= 1, job.summary

        delivered = {p: pydicom.dcmread(p) for p in pacs.received}
        srs = [p for p, ds in delivered.items() if ds.Modality == "SR"]
        assert len(srs) == 1, f"delivered: {sorted(ds.Modality for ds in delivered.values())}"
        sr_path, sr = srs[0], delivered[srs[0]]
        evaluations = _items(sr, QUALITATIVE_EVALUATIONS)
        assert len(evaluations) == 1, "the SR has no (or more than one) Qualitative Evaluations"
        comments = _items(evaluations[0], COMMENT)
        assert len(comments) == 1, "the SR's Qualitative Evaluations hold no Comment on the input"
        comment = comments[0]
        assert comment.ValueType == "TEXT" and comment.RelationshipType == "CONTAINS"
        assert comment.TextValue == (
            "Input outside the range this model was validated on: "
            f"{qualifier.removeprefix('input outside the validated range: ')}. "
            "The model's published figures do not apply to these findings."
        )
        assert not any(c in comment.TextValue for c in CANARIES)
        assert dciodvfy_errors(sr_path) == []
    finally:
        env.stop()
