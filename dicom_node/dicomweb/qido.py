"""QIDO-RS (PS3.18 10.6), minimal: studies, series and instances the node holds.

Matching is by UID (and Modality for series) only. Study attributes that the patient-free index
does not keep (patient name and ID, study date, accession number) are read from one spooled
instance of each study returned, so a query costs one header read per study on the page.
"""

from __future__ import annotations

from typing import Any

from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.dicomweb.wado import StoredInstance
from dicom_node.spool import Spool
from dicom_node.state import Database, Instance, Series, Study

STUDY_HEADER_KEYWORDS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDescription",
)


def _attr(tag: str, vr: str, value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {tag: {"vr": vr}}
    return {tag: {"vr": vr, "Value": [value]}}


def _study_header(spool: Spool, path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        ds = dcmread(
            spool.path(path), stop_before_pixels=True, specific_tags=list(STUDY_HEADER_KEYWORDS)
        )
        out: dict[str, Any] = {}
        for keyword in STUDY_HEADER_KEYWORDS:
            if keyword in ds:
                element = ds[keyword]
                out[f"{element.tag:08X}"] = element.to_json_dict(None, 1024)
        return out
    except Exception:
        return {}


def search_studies(
    db: Database,
    spool: Spool,
    *,
    study_instance_uid: str | None,
    base_url: str,
    limit: int,
    offset: int,
) -> list[dict[str, Any]]:
    """Study-level QIDO-RS results, newest first."""
    query = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc())
    if study_instance_uid:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    query = query.offset(offset).limit(limit)
    out = []
    with db.session() as s:
        studies = list(s.scalars(query))
        for study in studies:
            modalities = sorted(
                m
                for m in s.scalars(
                    select(Series.modality).where(Series.study_id == study.id).distinct()
                )
                if m
            )
            series_count = s.scalar(select(func.count()).where(Series.study_id == study.id))
            first_path = s.scalar(
                select(Instance.path).where(Instance.study_id == study.id).order_by(Instance.id).limit(1)
            )
            result: dict[str, Any] = _study_header(spool, first_path)
            result.update(_attr("0020000D", "UI", study.study_instance_uid))
            result["00080061"] = {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
            result.update(_attr("00201206", "IS", series_count or 0))
            result.update(_attr("00201208", "IS", study.instance_count))
            result.update(_attr("00081190", "UR", f"{base_url}/studies/{study.study_instance_uid}"))
            out.append(result)
    return out


def search_series(
    db: Database,
    study_instance_uid: str,
    *,
    series_instance_uid: str | None,
    modality: str | None,
    base_url: str,
) -> list[dict[str, Any]]:
    """Series-level QIDO-RS results of one study."""
    query = (
        select(Series)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(Series.id)
    )
    if series_instance_uid:
        query = query.where(Series.series_instance_uid == series_instance_uid)
    if modality:
        query = query.where(Series.modality == modality)
    out = []
    with db.session() as s:
        for series in s.scalars(query):
            result: dict[str, Any] = {}
            result.update(_attr("0020000D", "UI", study_instance_uid))
            result.update(_attr("0020000E", "UI", series.series_instance_uid))
            result.update(_attr("00080060", "CS", series.modality))
            result.update(_attr("0008103E", "LO", series.series_description))
            result.update(_attr("00180015", "CS", series.body_part))
            result.update(_attr("00201209", "IS", series.instance_count))
            result.update(
                _attr(
                    "00081190",
                    "UR",
                    f"{base_url}/studies/{study_instance_uid}/series/{series.series_instance_uid}",
                )
            )
            out.append(result)
    return out


def instance_result(item: StoredInstance, base_url: str) -> dict[str, Any]:
    """Instance-level QIDO-RS result from the index."""
    result: dict[str, Any] = {}
    result.update(_attr("0020000D", "UI", item.study_instance_uid))
    result.update(_attr("0020000E", "UI", item.series_instance_uid))
    result.update(_attr("00080016", "UI", item.sop_class_uid))
    result.update(_attr("00080018", "UI", item.sop_instance_uid))
    result.update(_attr("00083002", "UI", item.transfer_syntax_uid))
    if item.number_of_frames is not None:
        result.update(_attr("00280008", "IS", item.number_of_frames))
    result.update(
        _attr(
            "00081190",
            "UR",
            f"{base_url}/studies/{item.study_instance_uid}/series/{item.series_instance_uid}"
            f"/instances/{item.sop_instance_uid}",
        )
    )
    return result
