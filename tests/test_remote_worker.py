"""A worker on "another machine" (no shared disk) reads its inputs over WADO-RS from the node
and produces the same results as a worker that reads the node's spool.

The same study goes to two nodes: one receives it by C-STORE and has a worker on its spool; the
other receives it by STOW-RS and has a worker with its own data directory (no spool in it) and
``worker.source = "dicomweb"``. Output UIDs are derived from the study, the input set and the
model, so both runs must name their SR and SEG identically, report the same findings (which
depend on every voxel), and emit valid objects: a study that came by STOW-RS is processed
exactly like one that came by C-STORE, and a remote worker exactly like a local one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom import dcmread

from dicom_node.state import JobState
from tests.dicomgen import ct_series
from tests.peers import NodeProcess, RedisServer, WorkerProcess
from tests.pipeline_env import NodeEnv
from tests.test_stow import MULTIPART, multipart

pytestmark = pytest.mark.slow

TOKEN = "remote-worker-token"
CONFIG = """
[[routes]]
name = "ct"
modality = ["CT"]
models = ["test-fingerprint"]

[models.test-fingerprint]
plugin = "tests.plugins.fingerprint:FingerprintDetector"
"""


@pytest.fixture
def second_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second, empty state database on the same backend (the second node's)."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'second-state.sqlite'}"
        return
    from tests.conftest import _fresh_pg_database

    with _fresh_pg_database() as url:
        yield url


def remote_worker(env: NodeEnv, data_dir: Path, *, queues: str = "cpu", name: str = "remote") -> WorkerProcess:
    """A worker with its own data directory that reads inputs from the node over WADO-RS and
    consumes only model ``queues`` (delivery runs where the node's result store is)."""
    node = env.node
    shadow = NodeProcess(
        data_dir,
        {
            **node.env,
            "DICOM_NODE_DATA_DIR": str(data_dir),
            "DICOM_NODE_WORKER__SOURCE": "dicomweb",
            "DICOM_NODE_WORKER__NODE_URL": f"http://127.0.0.1:{node.http_port}",
            "DICOM_NODE_WORKER__NODE_TOKEN": TOKEN,
        },
        config=node.config,
    )
    data_dir.mkdir(parents=True)
    worker = WorkerProcess(shadow, queues=queues, name=name).start()
    env.workers.append(worker)
    return worker


def outputs_by_kind(env: NodeEnv, job_id: str) -> dict[str, tuple[str | None, str | None, str | None]]:
    return {o.kind: (o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid) for o in env.outputs(job_id)}


def output_file(results_dir: Path, env: NodeEnv, job_id: str, kind: str) -> Path:
    (row,) = [o for o in env.outputs(job_id) if o.kind == kind]
    path = results_dir / row.path
    assert path.is_file()
    return path


def test_stow_and_remote_worker_match_cstore_and_spool_worker(
    tmp_path: Path, database_url: str, second_database_url: str, redis_server: RedisServer
) -> None:
    study = ct_series(tmp_path / "study", slices=8, size=64)
    broker = redis_server.url.rsplit("/", 1)[0]
    token_env = {"DICOM_NODE_HTTP__TOKENS": json.dumps([TOKEN])}

    local = NodeEnv(tmp_path / "local", database_url, broker_url=f"{broker}/0", config_text=CONFIG, extra_env=token_env)
    remote = NodeEnv(tmp_path / "remote", second_database_url, broker_url=f"{broker}/1", config_text=CONFIG, extra_env=token_env)
    try:
        local.start()
        local.add_worker("spool")
        local.send(study)
        (job_local,) = local.wait_all_terminal(1)
        assert job_local.state == JobState.DONE.value, local.diagnostics()

        remote.start()
        worker_dir = tmp_path / "remote-worker" / "var"
        remote_worker(remote, worker_dir)
        stow = requests.post(
            f"http://127.0.0.1:{remote.node.http_port}/dicom-web/studies",
            data=multipart([p.read_bytes() for p in study]),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": MULTIPART},
            timeout=60,
        )
        assert stow.status_code == 200, stow.text
        (job_remote,) = remote.wait_all_terminal(1)
        assert job_remote.state == JobState.DONE.value, remote.diagnostics()

        # The remote worker really had no spool and really read over WADO-RS.
        assert not (worker_dir / "spool").exists()
        assert job_local.summary["source"] == "spool"
        assert job_remote.summary["source"] == "dicomweb"
        cache = worker_dir / "worker-cache"
        assert not cache.exists() or not any(cache.iterdir()), "the WADO-RS cache is cleaned up"

        # Same input, same output: job id, output UIDs and findings.
        assert job_local.id == job_remote.id
        local_outputs = outputs_by_kind(local, job_local.id)
        assert set(local_outputs) >= {"seg", "sr"}
        assert outputs_by_kind(remote, job_remote.id) == local_outputs

        def findings(summary: dict[str, object]) -> dict[str, object]:
            return {k: v for k, v in summary.items() if k not in ("source", "runtime_seconds")}

        assert findings(job_remote.summary) == findings(job_local.summary)
        assert job_local.summary["finding_count"] == 1

        # The remote worker put its results in the node's central store and kept none itself.
        local_results = local.node.data_dir / "results"
        remote_results = remote.node.data_dir / "results"
        assert not (worker_dir / "results").exists()
        seg_l = dcmread(output_file(local_results, local, job_local.id, "seg"))
        seg_r = dcmread(output_file(remote_results, remote, job_remote.id, "seg"))
        assert np.array_equal(seg_l.pixel_array, seg_r.pixel_array)
        assert [f.SourceImageSequence[0].ReferencedSOPInstanceUID for f in seg_l.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence] == [
            f.SourceImageSequence[0].ReferencedSOPInstanceUID for f in seg_r.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
        ]
        sr_l = dcmread(output_file(local_results, local, job_local.id, "sr"))
        sr_r = dcmread(output_file(remote_results, remote, job_remote.id, "sr"))
        assert sr_l.SOPInstanceUID == sr_r.SOPInstanceUID
        assert sr_l.ContentSequence == sr_r.ContentSequence

        from workers.results.conformance import dciodvfy_errors

        for path in (
            output_file(remote_results, remote, job_remote.id, "seg"),
            output_file(remote_results, remote, job_remote.id, "sr"),
        ):
            assert dciodvfy_errors(path) == []
    finally:
        remote.stop()
        local.stop()
