"""Two hosts, one truth: results survive the machine that made them.

A central node (its own data directory, PostgreSQL, Redis) with a delivery worker on its host,
and a model worker "on another machine": its own data directory, no shared filesystem, inputs
over WADO-RS, consuming only the model's queue. The PACS (a real Orthanc with DICOMweb) is down
when the results are first delivered; the model worker is then killed for good. The retry must
still deliver exactly one SR and one SEG, as QIDO-RS on the PACS shows — also when the central
node and its delivery worker restart before the retry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.state import AuditEvent, Delivery, DeliveryState, JobState
from tests.dicomgen import ct_series
from tests.peers import Orthanc, RedisServer, WorkerProcess, wait_until
from tests.pipeline_env import NodeEnv
from tests.test_remote_worker import TOKEN, remote_worker

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _config(pacs: Orthanc) -> str:
    return f"""
[[routes]]
name = "ct"
modality = ["CT"]
models = ["test-fingerprint"]
destinations = ["pacs"]

[models.test-fingerprint]
plugin = "tests.plugins.fingerprint:FingerprintDetector"
queue = "gpu"

[destinations.pacs]
url = "{pacs.dicomweb_url_with_credentials}"
backoff_initial = 1.0
backoff_max = 2.0
max_attempts = 50
"""


@pytest.fixture
def central_pg() -> Iterator[str]:
    from tests.conftest import _fresh_pg_database

    with _fresh_pg_database() as url:
        yield url


def _delivery(env: NodeEnv, job_id: str) -> Delivery | None:
    with env.db.session() as s:
        return s.scalar(select(Delivery).where(Delivery.job_id == job_id))


def _pacs_instances(pacs: Orthanc, study_uid: str) -> list[dict[str, object]]:
    response = requests.get(
        f"{pacs.dicomweb_url}/studies/{study_uid}/instances",
        auth=pacs.auth,
        headers={"Accept": "application/dicom+json"},
        timeout=10,
    )
    if response.status_code == 204:
        return []
    response.raise_for_status()
    return list(response.json())


def _scenario(tmp_path: Path, database_url: str, redis: RedisServer, *, restart_central: bool) -> None:
    pacs = Orthanc(tmp_path / "pacs")  # its ports are chosen, nothing listens on them yet
    study = ct_series(tmp_path / "study", slices=8, size=64)
    study_uid = str(dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    central = NodeEnv(
        tmp_path / "central",
        database_url,
        broker_url=redis.url,
        config_text=_config(pacs),
        extra_env={"DICOM_NODE_HTTP__TOKENS": json.dumps([TOKEN])},
    )
    try:
        central.start()
        delivery_worker = WorkerProcess(central.node, queues="delivery", name="central-delivery").start()
        central.workers.append(delivery_worker)
        gpu_dir = tmp_path / "gpu-host" / "var"
        gpu = remote_worker(central, gpu_dir, queues="gpu", name="gpu-host")
        central.send(study)
        (job,) = central.wait_for_jobs(1)

        # The PACS refuses the first delivery (nothing listens): the delivery waits to retry.
        refused = wait_until(
            lambda: (d := _delivery(central, job.id)) is not None and d.attempts >= 1 and d,
            120,
            message="a first, refused delivery attempt",
        )
        assert refused.state == DeliveryState.RETRY.value and refused.last_error, central.diagnostics()
        job = central.job(job.id)
        assert job.state == JobState.DELIVERING.value and job.summary["source"] == "dicomweb"
        # The results are in the central store, recorded with their checksums; the model worker
        # kept nothing and shares nothing with the central host.
        outputs = {o.kind: o for o in central.outputs(job.id)}
        assert {"sr", "seg", "summary"} <= set(outputs)
        for o in outputs.values():
            assert (central.node.data_dir / "results" / o.path).stat().st_size == o.size
        assert not (gpu_dir / "results").exists() and not (gpu_dir / "spool").exists()
        with central.db.session() as s:
            runners = {
                e.actor
                for e in s.scalars(select(AuditEvent).where(AuditEvent.job_id == job.id))
                if e.detail.get("state") == JobState.RUNNING.value
            }
        assert runners and all(str(r).startswith("gpu-host") for r in runners), runners

        gpu.kill()  # gone for good
        central.workers.remove(gpu)

        if restart_central:
            delivery_worker.kill()
            central.workers.remove(delivery_worker)
            assert central.node.stop() == 0
            central.node.start()
            central.workers.append(
                WorkerProcess(central.node, queues="delivery", name="central-delivery-2").start()
            )

        pacs.start()
        done = central.wait_for_state(job.id, JobState.DONE, JobState.FAILED, timeout=120)
        assert done.state == JobState.DONE.value, (done.reason, central.diagnostics())
        delivery = _delivery(central, job.id)
        assert delivery is not None and delivery.state == DeliveryState.DONE.value and delivery.attempts >= 2

        # Exactly one SR and one SEG of ours in the PACS, the ones recorded.
        instances = _pacs_instances(pacs, study_uid)
        ours = [i for i in instances if i["00080016"]["Value"][0] in (SR_CLASS, SEG_CLASS)]  # type: ignore[index]
        by_class = sorted(i["00080016"]["Value"][0] for i in ours)  # type: ignore[index]
        assert by_class == sorted([SR_CLASS, SEG_CLASS]), by_class
        uids = {i["00080018"]["Value"][0] for i in ours}  # type: ignore[index]
        assert uids == {outputs["sr"].sop_instance_uid, outputs["seg"].sop_instance_uid}
        assert central.job(job.id).attempts == 1, "the model ran once: the retry did not need its host"
    finally:
        central.stop()
        pacs.stop()


def test_delivery_retry_survives_the_model_host(tmp_path: Path, central_pg: str, redis_server: RedisServer) -> None:
    _scenario(tmp_path, central_pg, redis_server, restart_central=False)


def test_delivery_retry_survives_the_model_host_and_a_central_restart(
    tmp_path: Path, central_pg: str, redis_server: RedisServer
) -> None:
    _scenario(tmp_path, central_pg, redis_server, restart_central=True)
