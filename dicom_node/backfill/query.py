"""Which studies a PACS holds for a Study Date window: QIDO-RS or C-FIND (Study Root).

Each answer becomes a :class:`RemoteStudy` (UIDs, date, modalities, counts: nothing that names
a patient is kept). Both walk the whole window, page by page for QIDO-RS (``limit``/``offset``,
PS3.18 8.3.4.4), up to :data:`MAX_MATCHES` studies: the per-run limit is applied to what is
*pulled* (:mod:`dicom_node.backfill.plan`), so a second run gets past studies already done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

import requests
from pydicom.dataset import Dataset

from dicom_node.backfill.source import describe
from dicom_node.delivery.destinations import CStoreDestination, Destination, StowDestination
from dicom_node.errors import DicomNodeError

LOGGER = logging.getLogger(__name__)

PAGE = 500
"""Studies asked for per QIDO-RS request."""
MAX_MATCHES = 20_000
"""Studies looked at per run at most (a window wider than this is narrowed by the operator)."""

STUDY_UID = "0020000D"
STUDY_DATE = "00080020"
MODALITIES_IN_STUDY = "00080061"
STUDY_INSTANCES = "00201208"
SERIES_UID = "0020000E"
SOP_INSTANCE_UID = "00080018"


class SourceUnreachable(DicomNodeError):
    """The source did not answer, refused us, or answered with an error (exit code 3)."""


@dataclass(frozen=True)
class DateWindow:
    """Study Dates from ``since`` to ``until``, both included (PS3.4 C.2.2.2.5 range)."""

    since: date
    until: date

    @property
    def dicom_range(self) -> str:
        return f"{self.since:%Y%m%d}-{self.until:%Y%m%d}"


@dataclass(frozen=True)
class RemoteStudy:
    """One study at the source."""

    study_instance_uid: str
    study_date: str | None
    modalities: tuple[str, ...]
    instances: int | None
    """NumberOfStudyRelatedInstances when the source gives it."""


def find_studies(
    source: Destination, window: DateWindow, modality: str | None = None
) -> list[RemoteStudy]:
    """The source's studies in ``window`` (with ``modality`` among ModalitiesInStudy)."""
    if isinstance(source, StowDestination):
        studies = _qido_studies(source, window, modality)
    else:
        studies = _cfind_studies(source, window, modality)
    if modality:
        # ModalitiesInStudy matching is optional for a QIDO-RS origin server (PS3.18 8.3.4.1):
        # check what came back; a study that does not say its modalities is kept.
        studies = [s for s in studies if not s.modalities or modality in s.modalities]
    return studies


def remote_instances(source: Destination, study_instance_uid: str) -> set[str]:
    """SOP Instance UIDs of one study at the source (to compare with what the node holds)."""
    if isinstance(source, StowDestination):
        path = f"/studies/{study_instance_uid}/instances"
        found = _qido(source, path, {"includefield": SOP_INSTANCE_UID})
        return {uid for item in found if (uid := _first(item, SOP_INSTANCE_UID))}
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.StudyInstanceUID = study_instance_uid
    ident.SeriesInstanceUID = ""
    ident.SOPInstanceUID = ""
    return {str(m.SOPInstanceUID) for m in _cfind(source, ident) if m.get("SOPInstanceUID")}


def remote_series(source: StowDestination, study_instance_uid: str) -> list[str]:
    """Series Instance UIDs of one study (QIDO-RS)."""
    found = _qido(source, f"/studies/{study_instance_uid}/series", {"includefield": SERIES_UID})
    return [uid for item in found if (uid := _first(item, SERIES_UID))]


# -- QIDO-RS -------------------------------------------------------------------------------------


def _qido_studies(
    source: StowDestination, window: DateWindow, modality: str | None
) -> list[RemoteStudy]:
    params: dict[str, Any] = {
        "StudyDate": window.dicom_range,
        "includefield": f"{STUDY_DATE},{MODALITIES_IN_STUDY},{STUDY_INSTANCES}",
    }
    if modality:
        params["ModalitiesInStudy"] = modality
    studies: list[RemoteStudy] = []
    offset = 0
    while len(studies) < MAX_MATCHES:
        page = _qido(source, "/studies", {**params, "limit": PAGE, "offset": offset})
        for item in page:
            uid = _first(item, STUDY_UID)
            if uid:
                studies.append(_remote_study(uid, item))
        if len(page) < PAGE:
            break
        offset += len(page)
    return studies[:MAX_MATCHES]


def _qido(source: StowDestination, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    session = source.session()
    try:
        rsp = session.get(
            source.base_url + path,
            params=params,
            headers={"Accept": "application/dicom+json"},
            timeout=source.timeouts,
        )
    except requests.RequestException as exc:
        raise SourceUnreachable(
            f"source {describe(source)} did not answer: {type(exc).__name__}"
        ) from None
    finally:
        session.close()
    if rsp.status_code == 204 or not rsp.content:
        return []
    if rsp.status_code != 200:
        raise SourceUnreachable(
            f"source {describe(source)} answered QIDO-RS with HTTP {rsp.status_code}"
        )
    try:
        found = rsp.json()
    except ValueError:
        raise SourceUnreachable(
            f"source {describe(source)} answered QIDO-RS with no JSON"
        ) from None
    return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []


def _first(item: dict[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _remote_study(uid: str, item: dict[str, Any]) -> RemoteStudy:
    modalities = tuple(str(v) for v in (item.get(MODALITIES_IN_STUDY) or {}).get("Value") or [])
    count = _first(item, STUDY_INSTANCES)
    return RemoteStudy(
        study_instance_uid=uid,
        study_date=_first(item, STUDY_DATE),
        modalities=modalities,
        instances=int(count) if count and count.isdigit() else None,
    )


# -- C-FIND --------------------------------------------------------------------------------------


def _cfind_studies(
    source: CStoreDestination, window: DateWindow, modality: str | None
) -> list[RemoteStudy]:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    ident.StudyDate = window.dicom_range
    ident.ModalitiesInStudy = modality or ""
    ident.NumberOfStudyRelatedInstances = ""
    studies = []
    for match in _cfind(source, ident)[:MAX_MATCHES]:
        uid = str(match.get("StudyInstanceUID", "") or "")
        if not uid:
            continue
        raw = match.get("ModalitiesInStudy", "")
        values = [raw] if isinstance(raw, str) else list(raw or [])  # VM 1 reads as a str
        count = match.get("NumberOfStudyRelatedInstances", None)
        studies.append(
            RemoteStudy(
                study_instance_uid=uid,
                study_date=str(match.get("StudyDate", "") or "") or None,
                modalities=tuple(str(v) for v in values if v),
                instances=int(count) if count not in (None, "") else None,
            )
        )
    return studies


def _cfind(source: CStoreDestination, ident: Dataset) -> list[Dataset]:
    from dicom_node.dimse_status import STATUS_SUCCESS
    from dicom_node.scu import find

    outcome = find(source.peer(), ident)
    if outcome.stage:
        raise SourceUnreachable(f"source {describe(source)}: C-FIND {outcome.detail}")
    if outcome.status != STATUS_SUCCESS:
        raise SourceUnreachable(
            f"source {describe(source)} answered C-FIND with status 0x{outcome.status:04X}"
        )
    return outcome.matches
