"""End to end with a real Orthanc as the PACS: a study goes in, the job runs on a real worker,
and exactly one SR and one SEG come back into the same study — also after a re-run, a worker
killed during delivery, Orthanc being down during delivery, and over both delivery paths. The
shipped auto-route script closes the loop from the PACS side.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.state import JobState
from tests.delivery_peers import DicomwebProxy
from tests.dicomgen import ct_series
from tests.peers import Orthanc, RedisServer, wait_until
from tests.pipeline_env import DEFAULT_CONFIG, NodeEnv

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _config(destinations: dict[str, dict[str, Any]], seconds: float = 0.0) -> str:
    text = DEFAULT_CONFIG.format(seconds=seconds)
    for name, values in destinations.items():
        text += f"\n[destinations.{name}]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in values.items()
        )
    return text


def _results_in_orthanc(orthanc: Orthanc, study_uid: str) -> Counter[str]:
    """SOP classes of the instances in the study (QIDO-RS), counted."""
    return Counter(
        i["00080016"]["Value"][0] for i in orthanc.instances_in_study(study_uid) if "00080016" in i
    )


def _result_datasets(orthanc: Orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    out = {}
    for inst in orthanc.instances_in_study(study_uid):
        sop_class = inst["00080016"]["Value"][0]
        if sop_class in (SR_CLASS, SEG_CLASS):
            found = orthanc.post("/tools/lookup", data=inst["00080018"]["Value"][0]).json()
            raw = orthanc.get(f"/instances/{found[0]['ID']}/file").content
            import io

            out[sop_class] = pydicom.dcmread(io.BytesIO(raw))
    return out


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """A dedicated Orthanc (tests stop and restart it)."""
    server = Orthanc(tmp_path / "pacs").start()
    yield server
    server.stop()


def _env(tmp: Path, database_url: str, redis: RedisServer, config: str) -> NodeEnv:
    return NodeEnv(tmp / "node", database_url, broker_url=redis.url, config_text=config)


def test_results_come_back_once_and_a_rerun_keeps_one_copy(
    tmp_path: Path, database_url: str, redis_server: RedisServer, pacs: Orthanc
) -> None:
    config = _config({"pacs": {"url": pacs.dicomweb_url_with_credentials, "read_back": True}})
    env = _env(tmp_path, database_url, redis_server, config).start()
    try:
        env.add_worker()
        study = ct_series(tmp_path / "ct", slices=8, size=64)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        series_uid = str(pydicom.dcmread(study[0]).SeriesInstanceUID)
        pacs.upload(study)  # the PACS has the images, as in the auto-route case
        env.send(study)
        (job,) = env.wait_all_terminal(1)
        assert job.state == JobState.DONE.value, env.diagnostics()
        assert _results_in_orthanc(pacs, study_uid) == Counter(
            {"1.2.840.10008.5.1.4.1.1.2": 8, SR_CLASS: 1, SEG_CLASS: 1}
        )

        found = _result_datasets(pacs, study_uid)
        seg, sr = found[SEG_CLASS], found[SR_CLASS]
        assert seg.StudyInstanceUID == sr.StudyInstanceUID == study_uid
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        evidence = {
            s.SeriesInstanceUID
            for e in sr.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence
        }
        assert evidence == {series_uid}
        first_uids = {seg.SOPInstanceUID, sr.SOPInstanceUID}

        # Re-run the same job by hand: same objects, still one copy of each.
        assert env.node.run("jobs", job.id, "--retry").returncode == 0
        rerun = wait_until(
            lambda: (
                (j := env.job(job.id)).state == JobState.DONE.value
                and j.attempts == 1
                and j.finished_at != job.finished_at
                and j
            ),
            120,
            0.5,
            "re-run done",
        )
        assert rerun.state == JobState.DONE.value
        assert _results_in_orthanc(pacs, study_uid)[SR_CLASS] == 1
        assert _results_in_orthanc(pacs, study_uid)[SEG_CLASS] == 1
        again = _result_datasets(pacs, study_uid)
        assert {again[SEG_CLASS].SOPInstanceUID, again[SR_CLASS].SOPInstanceUID} == first_uids
        env.assert_every_complete_study_terminal()
    finally:
        env.stop()


def test_worker_killed_during_delivery_leaves_one_copy(
    tmp_path: Path, database_url: str, redis_server: RedisServer, pacs: Orthanc
) -> None:
    proxy = DicomwebProxy(pacs).start()
    proxy.stow_faults = [("delay", 8.0)]  # the first STOW hangs long enough to kill the worker
    config = _config(
        {
            "pacs": {
                "url": proxy.url.replace("http://", f"http://{pacs.auth[0]}:{pacs.auth[1]}@"),
                "backoff_initial": 1.0,
                "backoff_max": 2.0,
            }
        }
    )
    env = _env(tmp_path, database_url, redis_server, config).start()
    try:
        worker = env.add_worker("w1")
        study = ct_series(tmp_path / "ct", slices=8, size=64)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        env.send(study)
        (job,) = env.wait_for_jobs(1)
        env.wait_for_state(job.id, JobState.DELIVERING)
        wait_until(
            lambda: any(s["method"] == "POST" for s in proxy.seen), 30, message="STOW in flight"
        )
        worker.kill()
        time.sleep(9)  # the proxy forwards the first request after its delay: Orthanc stores it
        env.add_worker("w2")
        (job,) = env.wait_all_terminal(1, timeout=120)
        assert job.state == JobState.DONE.value, env.diagnostics()
        counts = _results_in_orthanc(pacs, study_uid)
        assert (counts[SR_CLASS], counts[SEG_CLASS]) == (1, 1)
        assert len([s for s in proxy.seen if s["method"] == "POST"]) >= 2, (
            "the delivery was sent again"
        )
        env.assert_every_complete_study_terminal()
    finally:
        env.stop()
        proxy.stop()


def test_pacs_down_during_delivery_results_arrive_once_it_is_back(
    tmp_path: Path, database_url: str, redis_server: RedisServer, pacs: Orthanc
) -> None:
    config = _config(
        {
            "pacs": {
                "url": pacs.dicomweb_url_with_credentials,
                "backoff_initial": 1.0,
                "backoff_max": 3.0,
                "max_attempts": 50,
            }
        }
    )
    env = _env(tmp_path, database_url, redis_server, config).start()
    try:
        env.add_worker()
        pacs.stop()
        study = ct_series(tmp_path / "ct", slices=8, size=64)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        env.send(study)
        (job,) = env.wait_for_jobs(1)
        wait_until(
            lambda: _delivery_attempts(env, job.id) >= 2,
            90,
            0.5,
            "delivery retries while the PACS is down",
        )
        assert env.job(job.id).state == JobState.DELIVERING.value
        pacs.start()
        (job,) = env.wait_all_terminal(1, timeout=120)
        assert job.state == JobState.DONE.value, env.diagnostics()
        counts = _results_in_orthanc(pacs, study_uid)
        assert (counts[SR_CLASS], counts[SEG_CLASS]) == (1, 1)
        env.assert_every_complete_study_terminal()
    finally:
        env.stop()


def _delivery_attempts(env: NodeEnv, job_id: str) -> int:
    from sqlalchemy import select

    from dicom_node.state import Delivery

    with env.db.session() as s:
        return sum(d.attempts for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id)))


def test_c_store_destination_into_orthanc(
    tmp_path: Path, database_url: str, redis_server: RedisServer, pacs: Orthanc
) -> None:
    config = _config({"pacs": {"url": f"dicom://{pacs.aet}@127.0.0.1:{pacs.dicom_port}"}})
    env = _env(tmp_path, database_url, redis_server, config).start()
    try:
        env.add_worker()
        study = ct_series(tmp_path / "ct", slices=8, size=64)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        env.send(study)
        (job,) = env.wait_all_terminal(1)
        assert job.state == JobState.DONE.value, env.diagnostics()
        counts = _results_in_orthanc(pacs, study_uid)
        assert (counts[SR_CLASS], counts[SEG_CLASS]) == (1, 1)
    finally:
        env.stop()


def test_orthanc_auto_route_sends_the_study_and_results_come_back(
    tmp_path: Path, redis_server: RedisServer, sqlite_url: str
) -> None:
    from tests.test_orthanc_autoroute import MACHINE_SPECIFIC, SCRIPT, shipped_config

    # The node first (its DICOM port goes into Orthanc's modality list), then Orthanc.
    env = NodeEnv(tmp_path / "node", sqlite_url, broker_url=redis_server.url, config_text="")
    workdir = tmp_path / "orthanc"
    workdir.mkdir()
    shutil.copy(SCRIPT, workdir / "autoroute.lua")
    extra = {k: v for k, v in shipped_config().items() if k not in MACHINE_SPECIFIC}
    extra["DicomModalities"]["ainode"]["Port"] = env.node.dicom_port
    extra["StableAge"] = 2
    extra["SaveJobs"] = False
    orthanc = Orthanc(workdir, extra=extra).start()
    env.config.write_text(_config({"pacs": {"url": orthanc.dicomweb_url_with_credentials}}))
    env.start()
    try:
        env.add_worker()
        study = ct_series(tmp_path / "ct", slices=8, size=64)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        orthanc.upload(study)  # the scanner sends to the PACS; the PACS routes to the node
        (job,) = env.wait_all_terminal(1, timeout=120)
        assert job.state == JobState.DONE.value, env.diagnostics()
        counts = wait_until(
            lambda: (c := _results_in_orthanc(orthanc, study_uid))[SR_CLASS] == 1 and c,
            30,
            message="results in Orthanc",
        )
        assert counts[SEG_CLASS] == 1 and counts["1.2.840.10008.5.1.4.1.1.2"] == 8
        # The results made the study stable again in Orthanc; the script must not send them
        # (or the CT again) back to the node: no new instance, no new job.
        time.sleep(6)
        assert len(env.jobs()) == 1
        with env.db.session() as s:
            from sqlalchemy import func, select

            from dicom_node.state import Instance

            assert s.scalar(select(func.count()).select_from(Instance)) == 8
    finally:
        env.stop()
        orthanc.stop()
