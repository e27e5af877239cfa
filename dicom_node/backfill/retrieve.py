"""Pull one study: WADO-RS into the node's ingest, or C-MOVE to the node's own AE title.

WADO-RS (PS3.18 10.4) asks for each series as ``multipart/related; type="application/dicom";
transfer-syntax=*`` (the stored transfer syntax, no transcoding) and hands every part, as the
Part 10 bytes received, to :meth:`~dicom_node.ingest.Ingestor.ingest_bytes`: the checks, spool
placement, index rows and duplicate handling of a C-STORE or STOW-RS. Series made of the node's
own results (written back to that PACS) are not pulled.

C-MOVE (PS3.4 C.4.2) asks the PACS to send the study to this node's AE title: the PACS must
know that AE title (host and port), and the node's C-STORE receiver (``dicom-node serve``)
takes the instances.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import requests
from sqlalchemy import select

from dicom_node import metrics
from dicom_node.backfill.query import SourceUnreachable, remote_series
from dicom_node.backfill.source import describe
from dicom_node.delivery.destinations import CStoreDestination, StowDestination
from dicom_node.dimse_status import STATUS_COERCION, STATUS_SUCCESS
from dicom_node.ingest import Ingestor
from dicom_node.state import Database, Output

LOGGER = logging.getLogger(__name__)

ACCEPT_PART10 = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SOURCE_LABEL = "backfill"
"""``instances.source`` of what a WADO-RS pull stored, and its label in the metrics."""


@dataclass
class Pulled:
    """What one study's pull brought (counts only)."""

    received: int = 0
    stored: int = 0
    """New at the node (a copy it already had is received, not stored)."""
    refused: int = 0
    """Refused by the ingest checks (or, for C-MOVE, sub-operations that failed)."""

    @property
    def ok(self) -> bool:
        return self.refused == 0 and self.received > 0


def pull_wado(
    source: StowDestination, study_instance_uid: str, ingestor: Ingestor, db: Database
) -> Pulled:
    """Retrieve every series of the study that is not the node's own output, and ingest it."""
    pulled = Pulled()
    ours = _own_series(db, study_instance_uid)
    client = None
    session = source.session()
    try:
        client = source.client(session)
        for series_uid in remote_series(source, study_instance_uid):
            if series_uid in ours:
                continue
            url = f"{source.base_url}/studies/{study_instance_uid}/series/{series_uid}"
            try:
                rsp = session.get(
                    url, headers={"Accept": ACCEPT_PART10}, stream=True, timeout=source.timeouts
                )
            except requests.RequestException as exc:
                raise SourceUnreachable(
                    f"source {describe(source)} did not answer WADO-RS: {type(exc).__name__}"
                ) from None
            if rsp.status_code != 200:
                rsp.close()
                raise SourceUnreachable(
                    f"source {describe(source)} answered WADO-RS with HTTP {rsp.status_code}"
                )
            try:
                parts = client._decode_multipart_message(rsp, stream=True)
                for part in parts:
                    _ingest(ingestor, bytes(part), pulled)
            except requests.RequestException as exc:
                raise SourceUnreachable(
                    f"source {describe(source)}: WADO-RS response cut short: {type(exc).__name__}"
                ) from None
            except ValueError as exc:  # not multipart/related
                raise SourceUnreachable(
                    f"source {describe(source)}: WADO-RS answer: {exc}"
                ) from None
    finally:
        session.close()
    return pulled


def _ingest(ingestor: Ingestor, data: bytes, pulled: Pulled) -> None:
    result = ingestor.ingest_bytes(data, calling_ae_title=None, source=SOURCE_LABEL)
    metrics.observe_instance(SOURCE_LABEL, result.status, len(data) if result.ok else 0)
    pulled.received += 1
    if not result.ok:
        pulled.refused += 1
    elif result.duplicate is None:
        pulled.stored += 1


def _own_series(db: Database, study_instance_uid: str) -> set[str]:
    from dicom_node.state import Job, Study

    with db.session() as s:
        return {
            uid
            for uid in s.scalars(
                select(Output.series_instance_uid)
                .join(Job, Output.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .where(Study.study_instance_uid == study_instance_uid)
            )
            if uid
        }


def pull_cmove(source: CStoreDestination, study_instance_uid: str, move_to: str) -> Pulled:
    """C-MOVE the study from ``source`` to the AE title ``move_to`` (this node)."""
    from pydicom.dataset import Dataset

    from dicom_node.scu import move

    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study_instance_uid
    outcome = move(source.peer(), ident, move_to)
    if outcome.stage:
        raise SourceUnreachable(f"source {describe(source)}: C-MOVE {outcome.detail}")
    pulled = Pulled(
        received=outcome.completed + outcome.warning,
        stored=outcome.completed + outcome.warning,
        refused=outcome.failed,
    )
    # 0xB000 on a C-MOVE: sub-operations failed (counted); a failure status may come without
    if outcome.status not in (STATUS_SUCCESS, STATUS_COERCION) and not pulled.refused:
        pulled.refused = 1  # a failure status with no counts: the study did not come
    return pulled
