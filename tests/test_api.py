"""The HTTP API served by a real `dicom-node serve`: jobs JSON, health, access control."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.dicomgen import ct_series
from tests.peers import NodeProcess, storescu, wait_until


def test_jobs_api_and_healthz(tmp_path: Path, database_url: str) -> None:
    node = NodeProcess(
        tmp_path / "var",
        {
            "DICOM_NODE_DATABASE_URL": database_url,
            "DICOM_NODE_STABLE_SECONDS": "1",
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
            "DICOM_NODE_HTTP__TOKENS": '["s3cret-token"]',
        },
    ).start()
    try:
        base = f"http://127.0.0.1:{node.http_port}"
        wait_until(
            lambda: requests.get(base + "/healthz", timeout=5).status_code == 200,
            30,
            message="healthz",
        )
        health = requests.get(base + "/healthz", timeout=5).json()
        assert health["checks"]["database"] == "ok" and health["checks"]["broker"] == "ok"
        assert requests.get(base + "/api/jobs", timeout=5).status_code == 401
        auth = {"Authorization": "Bearer s3cret-token"}
        assert requests.get(base + "/api/jobs", headers=auth, timeout=5).json()["jobs"] == []
        assert (
            storescu(node.dicom_port, ct_series(tmp_path / "s", slices=4, size=32)).returncode == 0
        )
        jobs = wait_until(
            lambda: [
                j
                for j in requests.get(base + "/api/jobs", headers=auth, timeout=5).json()["jobs"]
                if j["state"] == "queued"
            ],
            30,
            message="a queued job (dispatched to the embedded broker; no worker runs)",
        )
        (job,) = jobs
        assert job["model"] == "lung-nodules" and job["study"]["instances"] == 4
        detail = requests.get(f"{base}/api/jobs/{job['id']}", headers=auth, timeout=5).json()
        assert detail["id"] == job["id"] and detail["outputs"] == [] and detail["attempts"] == 0
        assert requests.get(f"{base}/api/jobs/nope", headers=auth, timeout=5).status_code == 404
        # The CLI reads the same database.
        out = node.run("jobs", "--json")
        assert out.returncode == 0 and job["id"] in out.stdout
    finally:
        node.stop()
