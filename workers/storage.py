"""Putting a job's encoded results in the central result store.

A worker that shares the node's data directory writes into the store directly; a worker on
another machine (``worker.results = "node"``, the default when it reads its inputs over WADO-RS)
puts each file through the node's API, ``PUT /api/jobs/{job_id}/results/{name}``, with its lease
owner id and the file's SHA-256: the node refuses a worker that no longer holds the job (409) and
a file damaged in transit (400). Either way the store has every file, checked, before the job is
recorded as encoded (:func:`dicom_node.jobs.record_outputs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import requests

from dicom_node.errors import JobError
from dicom_node.jobs import LeaseLost, OutputRecord
from dicom_node.results_store import ResultStore, ResultStoreError, StoredFile
from dicom_node.settings import Settings
from workers.results.objects import EncodedObject

LOGGER = logging.getLogger(__name__)

UPLOAD_TRIES = 4
"""Tries per file against the node (connection errors and 5xx), 1, 2, 4 s apart."""
UPLOAD_TIMEOUT = 120.0


def results_mode(settings: Settings) -> str:
    """``"local"`` (write into this data directory's store) or ``"node"`` (PUT to the node).

    ``auto`` follows an explicit ``worker.source = "dicomweb"`` only: a worker on the node's host
    may start before the node has made its spool, and must not mistake itself for a remote one.
    """
    mode = settings.worker.results
    if mode != "auto":
        return mode
    return "node" if settings.worker.source == "dicomweb" else "local"


def store_outputs(
    settings: Settings,
    job_id: str,
    owner: str,
    objects: list[EncodedObject],
    summary: dict[str, Any],
) -> list[OutputRecord]:
    """Store ``objects`` and the summary; the records to pass to ``record_outputs``."""
    files: list[tuple[str, bytes]] = [(obj.filename, obj.data) for obj in objects]
    files.append(("summary.json", json.dumps(summary, indent=2, sort_keys=True).encode()))
    if results_mode(settings) == "node":
        stored = [_put_to_node(settings, job_id, owner, name, data) for name, data in files]
    else:
        store = ResultStore(settings.results_dir)
        stored = [store.put_bytes(job_id, name, data) for name, data in files]
    records = [
        OutputRecord(
            kind=obj.kind,
            path=f.path,
            size=f.size,
            sha256=f.sha256,
            sop_class_uid=obj.sop_class_uid,
            sop_instance_uid=obj.sop_instance_uid,
            series_instance_uid=obj.series_instance_uid,
        )
        for obj, f in zip(objects, stored, strict=False)
    ]
    summary_file = stored[-1]
    records.append(
        OutputRecord("summary", summary_file.path, summary_file.size, summary_file.sha256)
    )
    return records


def _put_to_node(settings: Settings, job_id: str, owner: str, name: str, data: bytes) -> StoredFile:
    if not settings.worker.node_url:
        raise JobError("worker.results is node but worker.node_url is not set")
    url = f"{settings.worker.node_url.rstrip('/')}/api/jobs/{job_id}/results/{name}"
    sha = hashlib.sha256(data).hexdigest()
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Lease-Owner": owner,
        "X-Content-SHA256": sha,
    }
    if settings.worker.node_token:
        headers["Authorization"] = f"Bearer {settings.worker.node_token.get_secret_value()}"
    problem = ""
    for attempt in range(UPLOAD_TRIES):
        if attempt:
            time.sleep(2 ** (attempt - 1))
        try:
            response = requests.put(url, data=data, headers=headers, timeout=UPLOAD_TIMEOUT)
        except requests.RequestException as exc:
            problem = type(exc).__name__
            continue
        if response.status_code == 409:
            raise LeaseLost()
        if response.status_code >= 500:
            problem = f"HTTP {response.status_code}"
            continue
        if response.status_code not in (200, 201):
            # Our own request was refused (token, size, checksum): retrying will not help now,
            # but the attempt is retried later like any transient failure.
            raise ResultStoreError(
                f"the node refused result file {name}: HTTP {response.status_code}"
            )
        body = response.json()
        if body.get("sha256") != sha:
            raise ResultStoreError(f"the node stored result file {name} with other bytes")
        return StoredFile(name=name, path=str(body["path"]), size=len(data), sha256=sha)
    raise ResultStoreError(f"putting result file {name} to the node failed: {problem}")
