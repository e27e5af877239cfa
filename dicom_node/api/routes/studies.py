"""``/api/studies``: find a study's jobs by Study Instance UID, accession number or patient ID;
without a lookup parameter, the studies still being received.

Identifiers are patient data. They arrive in the query string, which the node's access log
never writes (:mod:`dicom_node.logs` drops query strings), are compared as keyed hashes
(:mod:`dicom_node.study_lookup`), and every lookup is audited without them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from dicom_node.api import job_views
from dicom_node.api.deps import DatabaseDep, User, require_role
from dicom_node.study_lookup import LookupKind

router = APIRouter(prefix="/api", tags=["jobs"])

MAX_IDENTIFIER_LENGTH = 64
"""Longest identifier a lookup accepts: a UI or LO value is at most 64 characters (PS3.5)."""


def lookup_of(
    study_instance_uid: str | None,
    accession_number: str | None,
    patient_id: str | None,
) -> tuple[LookupKind, str] | None:
    """The one lookup the parameters ask for; None when they ask for none.

    Raises HTTP 400 for two or more, an empty or an over-long value (its text never echoes the
    value)."""
    given = [
        (kind, value)
        for kind, value in (
            (LookupKind.STUDY_INSTANCE_UID, study_instance_uid),
            (LookupKind.ACCESSION_NUMBER, accession_number),
            (LookupKind.PATIENT_ID, patient_id),
        )
        if value is not None
    ]
    if not given:
        return None
    if len(given) > 1:
        raise HTTPException(
            400,
            "give exactly one of study_instance_uid (study_uid), accession_number (accession) "
            "and patient_id",
        )
    kind, value = given[0]
    if not value.strip(" \x00"):
        raise HTTPException(400, f"{kind.value} is empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise HTTPException(400, f"{kind.value} is longer than {MAX_IDENTIFIER_LENGTH} characters")
    return kind, value


@router.get(
    "/studies",
    summary="Find a study's jobs, or list the studies being received",
    responses={400: {"description": "More than one identifier, or an empty one."}},
)
def studies(
    request: Request,
    user: User,
    db: DatabaseDep,
    study_instance_uid: Annotated[
        str | None, Query(description="Study Instance UID (exact match)")
    ] = None,
    study_uid: Annotated[str | None, Query(description="the same as study_instance_uid")] = None,
    accession_number: Annotated[
        str | None, Query(description="Accession Number (exact match)")
    ] = None,
    accession: Annotated[str | None, Query(description="the same as accession_number")] = None,
    patient_id: Annotated[str | None, Query(description="Patient ID (exact match)")] = None,
) -> dict[str, Any]:
    """With one identifier: ``{"by", "studies" (study keys), "jobs", "count"}``, the jobs of
    the matching studies newest first, each with id, state, model and version, study (key,
    Study Instance UID, version), created_at, findings. Audited, without the identifier.

    Without one: ``{"receiving": [...]}``, the studies still in their quiet period (instances
    arriving, no job yet), newest first."""
    lookup = lookup_of(
        _one_of(study_instance_uid, study_uid),
        _one_of(accession_number, accession),
        patient_id,
    )
    if lookup is None:
        with db.session() as s:
            return {"receiving": job_views.receiving_studies(s)}
    # Searching by identifier is for those who may see identifiers (403, audited, otherwise).
    require_role(job_views.IDENTIFIER_ROLE)(request)
    kind, value = lookup
    return job_views.find_study_jobs(db, kind, value, actor=str(user), via="api")


def _one_of(name: str | None, alias: str | None) -> str | None:
    """A parameter given under its name or its alias (both at once is refused, as two)."""
    if name is not None and alias is not None:
        raise HTTPException(400, "give exactly one identifier (a parameter and its alias)")
    return name if name is not None else alias
