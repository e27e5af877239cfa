"""DICOMweb on the node: STOW-RS ingest, WADO-RS retrieve and a minimal QIDO-RS, all behind auth.

* ``POST /dicom-web/studies[/{study}]`` — STOW-RS into the same spool and index as C-STORE;
* ``GET /dicom-web/studies/{study}[/series/{series}[/instances/{sop}]]`` — WADO-RS, the bytes
  as stored (``multipart/related; type="application/dicom"``), and ``.../metadata``;
* ``GET /dicom-web/studies``, ``.../series``, ``.../instances`` — QIDO-RS by UID.

Responses and errors never quote a UID from the request; logs carry counts and study keys only.

Roles (:func:`dicom_node.api.auth.require_role`): reads need ``operator`` (or ``worker``, a remote
worker's token); STOW-RS needs ``operator`` or ``sender`` (a PACS or scanner given a token that
may store and nothing else). Every read of patient data is audited (``phi-read``, with the
study key and the reader's name; never a UID).
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_node import audit, metrics
from dicom_node.api.deps import DatabaseDep, Principal, actor_of, require_role
from dicom_node.api.limits import BodyTimeout, BodyTooLarge
from dicom_node.dicomweb import qido, wado
from dicom_node.dicomweb import stow_receiver as stow
from dicom_node.dicomweb.media import (
    DICOM,
    DICOM_JSON,
    MULTIPART_RELATED,
    acceptable_transfer_syntaxes,
    accepts,
    parse_media_type,
    transfer_syntax_allowed,
)
from dicom_node.errors import StorageError
from dicom_node.ingest import Ingestor
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database, Study
from dicom_node.uids import uid_problem

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

FEED_BYTES = 1024 * 1024
"""Body bytes gathered before one hop to the worker thread that parses and stores them."""

Reader = Annotated[Principal, Depends(require_role("operator", "worker"))]
"""WADO-RS and QIDO-RS: people with a role, and remote workers."""
Storer = Annotated[Principal, Depends(require_role("operator", "sender"))]
"""STOW-RS: operators and admins, and senders (PACS, scanners)."""


class DicomWebBackend:
    """The spool and ingest path the DICOMweb routes share (created on first use)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.spool = Spool(
            settings.spool_dir,
            fsync=settings.scp.fsync,
            min_free_bytes=settings.scp.min_free_bytes,
        )
        self._ingestor: Ingestor | None = None
        self._lock = threading.Lock()

    def ingestor(self) -> Ingestor:
        with self._lock:
            if self._ingestor is None:
                self.spool.prepare()
                self._ingestor = Ingestor(self.settings, self.db, self.spool)
            return self._ingestor


def setup(app: FastAPI) -> None:
    app.state.dicomweb = DicomWebBackend(app.state.settings, app.state.db)


def _backend(request: Request) -> DicomWebBackend:
    backend: DicomWebBackend = request.app.state.dicomweb
    return backend


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/") + router.prefix


def _check_uid(value: str, what: str) -> None:
    if uid_problem(value) is not None:
        raise HTTPException(400, f"{what} in the URL is not a valid UID")


def _dicom_json(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(content, status_code=status_code, media_type=DICOM_JSON, headers=headers)


def _require_json(request: Request) -> None:
    accept = request.headers.get("accept")
    if not any(accepts(accept, t) for t in (DICOM_JSON, "application/json")):
        raise HTTPException(406, "this node answers in application/dicom+json only")


def _audit_read(
    request: Request,
    user: Principal,
    db: Database,
    what: str,
    study: str | None = None,
    **detail: Any,
) -> None:
    """Record a read of patient data: who, what kind of read, which study (by its key)."""
    study_key = None
    if study is not None:
        with db.session() as s:
            study_key = s.scalar(select(Study.study_key).where(Study.study_instance_uid == study))
    audit.record(
        db, audit.PHI_READ, actor=actor_of(user, request), study_key=study_key, what=what, **detail
    )


# -- STOW-RS ----------------------------------------------------------------------------------


@router.post("/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request, user: Storer) -> Response:
    """Store the ``application/dicom`` parts of a ``multipart/related`` body (PS3.18 10.5)."""
    return await _store(request, user, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study_instances(study: str, request: Request, user: Storer) -> Response:
    """As ``POST /dicom-web/studies``; instances of another study fail with A900 (409 if none
    was stored)."""
    _check_uid(study, "the study UID")
    return await _store(request, user, study)


async def _store(request: Request, user: Principal, study: str | None) -> Response:
    _require_json(request)
    content_type = parse_media_type(request.headers.get("content-type", ""))
    if content_type.type != MULTIPART_RELATED:
        raise HTTPException(415, 'STOW-RS needs multipart/related; type="application/dicom"')
    root = content_type.params.get("type", DICOM).lower()
    if root != DICOM:
        # application/dicom+json / +xml metadata with bulk data is not supported.
        raise HTTPException(415, 'only multipart/related; type="application/dicom" is supported')
    boundary = content_type.params.get("boundary")
    if not boundary or len(boundary) > 70:
        raise HTTPException(400, "the multipart boundary is missing or invalid")

    backend = _backend(request)
    try:
        ingestor = await run_in_threadpool(backend.ingestor)
    except StorageError as exc:
        raise HTTPException(503, f"the spool is unavailable: {exc}") from None
    settings = backend.settings
    actor = actor_of(user, request)
    new_studies: list[str] = []

    def on_stored(part: stow.PartOutcome) -> None:
        if part.new_study and part.study_key:
            new_studies.append(part.study_key)

    session = stow.StowSession(
        ingestor,
        backend.spool,
        boundary=boundary,
        max_part_bytes=settings.scp.max_instance_bytes,
        study_instance_uid=study,
        on_stored=on_stored,
    )

    async def finish() -> stow.StowResult:
        """Close the session, audit each study it created and count its parts in /metrics."""
        result = await run_in_threadpool(session.close)
        for study_key in new_studies:
            audit.record(
                backend.db, audit.STUDY_RECEIVED, actor=actor, study_key=study_key, via="stow-rs"
            )
        _count(result)
        return result

    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= FEED_BYTES:
                data, buffer = bytes(buffer), bytearray()
                await run_in_threadpool(session.feed, data)
        if buffer:
            await run_in_threadpool(session.feed, bytes(buffer))
    except ClientDisconnect:
        # What was stored before the client went away is received like any other instance:
        # audited and counted.
        result = await finish()
        LOGGER.warning(
            "STOW-RS client went away mid-request: %(stored)d stored before, %(failed)d failed",
            stow.summary(result),
        )
        return Response(status_code=400)
    except (BodyTooLarge, BodyTimeout) as exc:
        # Parts completed before the limit stay stored and indexed; the part cut off is
        # discarded. LimitBody answers 413 / 408 and closes the connection.
        if buffer:  # bytes within the limit not yet parsed: they may complete a part
            await run_in_threadpool(session.feed, bytes(buffer))
        counts = stow.summary(await finish())
        LOGGER.warning(
            "STOW-RS body refused (%s): %d stored before, %d failed",
            "too large" if isinstance(exc, BodyTooLarge) else "client too slow",
            counts["stored"],
            counts["failed"],
        )
        raise
    result = await finish()
    counts = stow.summary(result)
    status = stow.http_status(result)
    LOGGER.info(
        "STOW-RS request answered %d: %d stored, %d failed %s",
        status,
        counts["stored"],
        counts["failed"],
        counts["statuses"] or "",
    )
    base = _base_url(request)
    study_uids = {p.study_instance_uid for p in result.stored if p.study_instance_uid}
    study_url = None
    if study is not None:
        study_url = f"{base}/studies/{study}"
    elif len(study_uids) == 1:
        study_url = f"{base}/studies/{next(iter(study_uids))}"

    def instance_url(part: stow.PartOutcome) -> str | None:
        if not (part.study_instance_uid and part.series_instance_uid and part.sop_instance_uid):
            return None
        return (
            f"{base}/studies/{part.study_instance_uid}/series/{part.series_instance_uid}"
            f"/instances/{part.sop_instance_uid}"
        )

    body = stow.response_dataset(result, instance_url=instance_url, study_url=study_url)
    headers = {}
    if result.problem:
        headers["Warning"] = f'299 dicom-node "{result.problem}"'
    return _dicom_json(body.to_json_dict(), status, headers)


def _count(result: stow.StowResult) -> None:
    """Instances and bytes received by STOW-RS, next to C-STORE's, in /metrics."""
    try:
        for part in result.parts:
            metrics.observe_instance("stow", part.status, part.size if part.stored else 0)
    except Exception:  # metrics must never fail a store
        LOGGER.debug("STOW-RS metrics update failed", exc_info=True)


# -- WADO-RS ----------------------------------------------------------------------------------


def _retrieve(
    request: Request,
    user: Principal,
    db: Database,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> Response:
    wanted = acceptable_transfer_syntaxes(request.headers.get("accept"))
    if wanted is None:
        raise HTTPException(
            406, 'this node serves instances as multipart/related; type="application/dicom"'
        )
    items = _instances_or_404(db, study, series, sop)
    _audit_read(request, user, db, "wado-rs", study, instances=len(items))
    if not all(transfer_syntax_allowed(i.transfer_syntax_uid, wanted) for i in items):
        raise HTTPException(
            406,
            "an instance is stored in a transfer syntax the request does not accept, and the "
            "node does not transcode (ask for transfer-syntax=*)",
        )
    boundary = wado.new_boundary()
    return StreamingResponse(
        wado.multipart_body(_backend(request).spool, items, boundary),
        media_type=wado.multipart_content_type(boundary),
    )


def _instances_or_404(
    db: Database, study: str, series: str | None, sop: str | None
) -> list[wado.StoredInstance]:
    _check_uid(study, "the study UID")
    if series is not None:
        _check_uid(series, "the series UID")
    if sop is not None:
        _check_uid(sop, "the SOP instance UID")
    items = wado.find_instances(db, study, series, sop)
    if not items:
        raise HTTPException(404, "no such instance on this node")
    return items


def _metadata(
    request: Request,
    user: Principal,
    db: Database,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> Response:
    _require_json(request)
    items = _instances_or_404(db, study, series, sop)
    _audit_read(request, user, db, "wado-rs-metadata", study, instances=len(items))
    backend = _backend(request)
    limit = backend.settings.scp.max_decoded_bytes
    out = [
        m
        for m in (wado.instance_metadata(backend.spool, i, limit=limit) for i in items)
        if m is not None
    ]
    return _dicom_json(out)


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study")
def retrieve_study(study: str, request: Request, user: Reader, db: DatabaseDep) -> Response:
    """All instances of a study, as stored."""
    return _retrieve(request, user, db, study)


@router.get("/studies/{study}/metadata", summary="WADO-RS: study metadata")
def retrieve_study_metadata(
    study: str, request: Request, user: Reader, db: DatabaseDep
) -> Response:
    """The DICOM JSON headers (without pixel data) of all instances of a study."""
    return _metadata(request, user, db, study)


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
def retrieve_series(
    study: str, series: str, request: Request, user: Reader, db: DatabaseDep
) -> Response:
    """All instances of a series, as stored."""
    return _retrieve(request, user, db, study, series)


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: series metadata")
def retrieve_series_metadata(
    study: str, series: str, request: Request, user: Reader, db: DatabaseDep
) -> Response:
    """The DICOM JSON headers of all instances of a series."""
    return _metadata(request, user, db, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: retrieve an instance"
)
def retrieve_instance(
    study: str, series: str, sop: str, request: Request, user: Reader, db: DatabaseDep
) -> Response:
    """One instance, byte for byte as stored."""
    return _retrieve(request, user, db, study, series, sop)


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/metadata",
    summary="WADO-RS: instance metadata",
)
def retrieve_instance_metadata(
    study: str, series: str, sop: str, request: Request, user: Reader, db: DatabaseDep
) -> Response:
    """The DICOM JSON header of one instance."""
    return _metadata(request, user, db, study, series, sop)


# -- QIDO-RS ----------------------------------------------------------------------------------


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(
    request: Request,
    user: Reader,
    db: DatabaseDep,
    study_instance_uid: Annotated[str | None, Query(alias="StudyInstanceUID")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Studies on the node, newest first (matching on StudyInstanceUID only)."""
    _require_json(request)
    results = qido.search_studies(
        db,
        _backend(request).spool,
        study_instance_uid=study_instance_uid,
        base_url=_base_url(request),
        limit=limit,
        offset=offset,
    )
    _audit_read(
        request, user, db, "qido-rs", study_instance_uid, level="study", results=len(results)
    )
    return _dicom_json(results)


@router.get("/studies/{study}/series", summary="QIDO-RS: search for series of a study")
def search_series(
    study: str,
    request: Request,
    user: Reader,
    db: DatabaseDep,
    series_instance_uid: Annotated[str | None, Query(alias="SeriesInstanceUID")] = None,
    modality: Annotated[str | None, Query(alias="Modality")] = None,
) -> Response:
    """Series of a study (matching on SeriesInstanceUID and Modality)."""
    _require_json(request)
    _check_uid(study, "the study UID")
    results = qido.search_series(
        db,
        study,
        series_instance_uid=series_instance_uid,
        modality=modality,
        base_url=_base_url(request),
    )
    _audit_read(request, user, db, "qido-rs", study, level="series", results=len(results))
    return _dicom_json(results)


def _search_instances(
    request: Request,
    user: Principal,
    db: Database,
    study: str,
    series: str | None,
    sop: str | None,
    limit: int,
    offset: int,
) -> Response:
    _require_json(request)
    _check_uid(study, "the study UID")
    items = wado.find_instances(db, study, series, sop, limit=limit, offset=offset)
    _audit_read(request, user, db, "qido-rs", study, level="instance", results=len(items))
    base = _base_url(request)
    return _dicom_json([qido.instance_result(i, base) for i in items])


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for instances of a study")
def search_study_instances(
    study: str,
    request: Request,
    user: Reader,
    db: DatabaseDep,
    series_instance_uid: Annotated[str | None, Query(alias="SeriesInstanceUID")] = None,
    sop_instance_uid: Annotated[str | None, Query(alias="SOPInstanceUID")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Instances of a study (matching on SeriesInstanceUID and SOPInstanceUID)."""
    return _search_instances(
        request, user, db, study, series_instance_uid, sop_instance_uid, limit, offset
    )


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="QIDO-RS: search for instances of a series",
)
def search_series_instances(
    study: str,
    series: str,
    request: Request,
    user: Reader,
    db: DatabaseDep,
    sop_instance_uid: Annotated[str | None, Query(alias="SOPInstanceUID")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Instances of a series (matching on SOPInstanceUID)."""
    _check_uid(series, "the series UID")
    return _search_instances(request, user, db, study, series, sop_instance_uid, limit, offset)
