"""``PUT /api/jobs/{job_id}/results/{name}``: a worker on another machine puts a result file in
the node's central result store (:mod:`dicom_node.results_store`).

The worker names itself with ``X-Lease-Owner`` and the file with ``X-Content-SHA256``. Only the
worker that holds the job's lease while it runs may store (409 otherwise: a worker presumed dead
changes nothing), and the file is kept only if its bytes match the checksum (400). Bodies may be
as large as ``http.max_stow_bytes`` (:mod:`dicom_node.api.limits`). It needs the ``worker`` role
(``admin`` stands in for it: a plain token, as before roles, is an admin token).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_node import jobs
from dicom_node.api.deps import Principal, require_role
from dicom_node.logs import log_context
from dicom_node.results_store import ResultStore, ResultStoreError, check_job_id, check_name
from dicom_node.state import Database, JobState

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["results"])

Worker = Annotated[Principal, Depends(require_role("worker"))]
"""A remote worker's token (``worker.node_token`` on the worker, ``role = "worker"`` here)."""


def _chunks(fh: Any) -> Iterator[bytes]:
    fh.seek(0)
    yield from iter(lambda: fh.read(1 << 20), b"")


@router.put("/jobs/{job_id}/results/{name}", status_code=201)
async def put_result(
    job_id: str,
    name: str,
    request: Request,
    user: Worker,
    lease_owner: Annotated[str, Header(alias="X-Lease-Owner", max_length=128)],
    content_sha256: Annotated[str, Header(alias="X-Content-SHA256", pattern=r"^[0-9a-fA-F]{64}$")],
) -> dict[str, Any]:
    """Store one result file of a running job held by ``X-Lease-Owner``."""
    try:
        job_id, name = check_job_id(job_id), check_name(name)
    except ResultStoreError as exc:
        raise HTTPException(400, str(exc)) from None
    db: Database = request.app.state.db
    settings = request.app.state.settings
    with log_context(job_id=job_id):
        held = await run_in_threadpool(
            jobs.holds, db, job_id, lease_owner, (JobState.RUNNING.value,)
        )
        if held is None:
            raise HTTPException(404, "no such job")
        if not held:
            raise HTTPException(409, "this worker does not hold the job's lease")
        limit = settings.http.max_stow_bytes
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as buffer:
            try:
                async for chunk in request.stream():
                    buffer.write(chunk)
            except ClientDisconnect:
                raise HTTPException(400, "the client went away before the file was sent") from None
            store = ResultStore(settings.results_dir)
            try:
                stored = await run_in_threadpool(
                    store.put,
                    job_id,
                    name,
                    _chunks(buffer),
                    max_bytes=limit,
                    expected_sha256=content_sha256,
                )
            except ResultStoreError as exc:
                raise HTTPException(400, str(exc)) from None
        LOGGER.info("result file %s stored for worker %s (%d bytes)", name, user, stored.size)
    return {"name": stored.name, "path": stored.path, "size": stored.size, "sha256": stored.sha256}
