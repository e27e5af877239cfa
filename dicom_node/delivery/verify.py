"""Read-back verification and duplicate checks: is our object really there, and is it ours?

* After a successful send, with verification on, every object is looked up -- by QIDO-RS for a
  STOW-RS destination, by C-FIND (Study Root, IMAGE level) for a C-STORE destination -- and must
  be found with our identifying attributes. A PACS that answered success but silently kept an
  older, different object under the same SOP Instance UID (Orthanc does, with
  ``OverwriteInstances: false``) is caught here.
* When a peer answers "duplicate" (STOW-RS 409 / FailureReason 0111, C-STORE 0111), the object
  already there is fetched (WADO-RS metadata, or C-FIND) and compared with ours: the same SOP
  Instance UID with our algorithm, series and content fields counts as delivered; anything else is
  a permanent error -- we never overwrite someone else's object.

Missing after a success answer is transient (some archives index asynchronously; a resend of the
same bytes is harmless); present but not ours is permanent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import requests
from pydicom.dataset import Dataset

from dicom_node.delivery import stow
from dicom_node.delivery.destinations import CStoreDestination, StowDestination
from dicom_node.delivery.objects import (
    IDENTITY_KEYWORDS,
    UID_KEYWORDS,
    StoredObject,
    identity_from_json,
    identity_of,
    ownership_problem,
)
from dicom_node.delivery.report import InstanceOutcome
from dicom_node.dimse_status import (
    STATUS_SUCCESS,
    Verdict,
    classify_http,
    classify_status,
    describe,
)
from dicom_node.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from dicom_node.scu import STAGE_ASSOCIATE, STAGE_CONTEXT, FindOutcome, find

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

_RETURN_KEYS = [*UID_KEYWORDS, *IDENTITY_KEYWORDS]


def _by_series(objects: Iterable[StoredObject]) -> dict[tuple[str, str], list[StoredObject]]:
    groups: dict[tuple[str, str], list[StoredObject]] = defaultdict(list)
    for obj in objects:
        groups[(obj.study_instance_uid, obj.series_instance_uid)].append(obj)
    return groups


def _judge(
    where: str, objects: list[StoredObject], found: dict[str, dict[str, str]], how: str
) -> None:
    """Raise for objects missing from ``found`` (transient) or present but not ours (permanent)."""
    foreign = []
    missing = []
    for obj in objects:
        theirs = found.get(obj.sop_instance_uid)
        if theirs is None:
            missing.append(obj)
            continue
        problem = ownership_problem(obj, theirs)
        if problem:
            foreign.append(f"{obj.label}: {problem}")
    if foreign:
        raise PermanentDeliveryError(f"{where}: read-back by {how}: " + "; ".join(foreign[:4]))
    if missing:
        names = ", ".join(o.label for o in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise TransientDeliveryError(
            f"{where}: read-back by {how}: {len(missing)} object(s) answered as stored but not "
            f"found ({names})"
        )


# -- DICOMweb ------------------------------------------------------------------------------------


def _http_error(
    dest: StowDestination, what: str, exc: requests.exceptions.RequestException
) -> DeliveryError:
    response = getattr(exc, "response", None)
    if isinstance(exc, requests.exceptions.HTTPError) and response is not None:
        code = response.status_code
        message = f"{dest.display}: {what} answered HTTP {code}"
        if classify_http(code) is Verdict.TRANSIENT:
            return TransientDeliveryError(message, code)
        return PermanentDeliveryError(message, code)
    return stow.transport_error(dest, what, exc)


def _qido(
    dest: StowDestination, client: DICOMwebClient, study: str, series: str, sop: str | None = None
) -> list[dict[str, Any]]:
    try:
        return list(
            client.search_for_instances(
                study_instance_uid=study,
                series_instance_uid=series,
                fields=_RETURN_KEYS,
                search_filters={"SOPInstanceUID": sop} if sop else None,
            )
            or []
        )
    except requests.exceptions.RequestException as exc:
        raise _http_error(dest, "QIDO-RS", exc) from None


def verify_stow(dest: StowDestination, client: DICOMwebClient, objects: list[StoredObject]) -> None:
    """QIDO-RS every object back (one query per series, then one per object not listed, in case
    the server pages its answers); raise unless all are there and ours."""
    for (study, series), group in _by_series(objects).items():
        found = {}
        for item in _qido(dest, client, study, series):
            ident = identity_from_json(item)
            if "SOPInstanceUID" in ident:
                found[ident["SOPInstanceUID"]] = ident
        for obj in group:
            if obj.sop_instance_uid not in found:
                for item in _qido(dest, client, study, series, obj.sop_instance_uid):
                    ident = identity_from_json(item)
                    if ident.get("SOPInstanceUID") == obj.sop_instance_uid:
                        found[obj.sop_instance_uid] = ident
        _judge(dest.display, group, found, "QIDO-RS")


def check_existing_stow(
    dest: StowDestination, client: DICOMwebClient, outcome: InstanceOutcome, obj: StoredObject
) -> InstanceOutcome:
    """Resolve a duplicate/conflict answer: fetch the stored object's metadata (WADO-RS) and
    compare it with ours. Returns a DUPLICATE (delivered) or PERMANENT outcome."""
    try:
        items = client.retrieve_instance_metadata(
            obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid
        )
    except requests.exceptions.RequestException as exc:
        response = getattr(exc, "response", None)
        if response is not None and response.status_code == 404:
            return _not_there(outcome)
        err = _http_error(dest, "WADO-RS metadata", exc)
        verdict = (
            Verdict.TRANSIENT if isinstance(err, TransientDeliveryError) else Verdict.PERMANENT
        )
        return InstanceOutcome(
            outcome.path,
            outcome.sop_instance_uid,
            verdict,
            outcome.status,
            f"{outcome.detail}; checking the existing object failed: {str(err).split(': ', 1)[-1]}",
        )
    theirs = identity_from_json(items if isinstance(items, dict) else (items[0] if items else {}))
    return _resolve(outcome, obj, theirs if theirs else None)


# -- DIMSE ---------------------------------------------------------------------------------------


def _find_error(dest: CStoreDestination, result: FindOutcome) -> DeliveryError:
    where = f"{dest.display}: read-back by C-FIND"
    if result.stage == STAGE_CONTEXT:
        return PermanentDeliveryError(
            f"{where}: the peer does not support C-FIND; turn read_back off for this destination"
        )
    if result.stage == STAGE_ASSOCIATE:
        if result.rejection is not None and result.rejection[0] == 2:
            return TransientDeliveryError(f"{where}: association rejected (transient)")
        if result.rejection is not None or "aborted" in result.detail:
            return PermanentDeliveryError(
                f"{where}: the peer does not accept C-FIND from us ({result.detail}); register the "
                "node's AE title there with query permission, or turn read_back off"
            )
        return TransientDeliveryError(f"{where}: {result.detail}")
    if result.stage:
        return TransientDeliveryError(
            f"{where}: {result.detail} (a peer that does not allow our AE title to query may "
            "also abort like this)"
        )
    verdict = classify_status(result.status)
    message = f"{where}: C-FIND failed with {describe(result.status)}"
    if verdict is Verdict.TRANSIENT:
        return TransientDeliveryError(message, result.status)
    return PermanentDeliveryError(message, result.status)


def _c_find(dest: CStoreDestination, study: str, series: str, sop: str = "") -> list[Dataset]:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    for keyword in _RETURN_KEYS:
        setattr(query, keyword, "")
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series
    query.SOPInstanceUID = sop
    result = find(dest.peer(), query)
    if result.stage or result.status != STATUS_SUCCESS:
        raise _find_error(dest, result)
    return result.matches


def verify_cstore(dest: CStoreDestination, objects: list[StoredObject]) -> None:
    """C-FIND every object back (one query per series); raise unless all are there and ours."""
    for (study, series), group in _by_series(objects).items():
        found = {}
        for match in _c_find(dest, study, series):
            ident = identity_of(match)
            if "SOPInstanceUID" in ident:
                found[ident["SOPInstanceUID"]] = ident
        _judge(dest.display, group, found, "C-FIND")


def check_existing_cstore(
    dest: CStoreDestination, outcome: InstanceOutcome, obj: StoredObject
) -> InstanceOutcome:
    """Resolve a C-STORE duplicate (0111): C-FIND the stored object and compare it with ours."""
    try:
        matches = _c_find(
            dest, obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid
        )
    except DeliveryError as exc:
        verdict = (
            Verdict.TRANSIENT if isinstance(exc, TransientDeliveryError) else Verdict.PERMANENT
        )
        return InstanceOutcome(
            outcome.path,
            outcome.sop_instance_uid,
            verdict,
            outcome.status,
            f"{outcome.detail}; checking the existing object failed: {str(exc).split(': ', 2)[-1]}",
        )
    theirs = next(
        (
            identity_of(m)
            for m in matches
            if str(m.get("SOPInstanceUID", "")) == obj.sop_instance_uid
        ),
        None,
    )
    return _resolve(outcome, obj, theirs)


# -- shared --------------------------------------------------------------------------------------


def _not_there(outcome: InstanceOutcome) -> InstanceOutcome:
    return InstanceOutcome(
        outcome.path,
        outcome.sop_instance_uid,
        Verdict.PERMANENT,
        outcome.status,
        f"{outcome.detail}, but no object with this SOP Instance UID is there",
    )


def _resolve(
    outcome: InstanceOutcome, obj: StoredObject, theirs: dict[str, str] | None
) -> InstanceOutcome:
    if theirs is None:
        return _not_there(outcome)
    problem = ownership_problem(obj, theirs)
    if problem:
        return InstanceOutcome(
            outcome.path,
            outcome.sop_instance_uid,
            Verdict.PERMANENT,
            outcome.status,
            f"{outcome.detail}: {problem}",
        )
    return InstanceOutcome(
        outcome.path,
        outcome.sop_instance_uid,
        Verdict.DUPLICATE,
        outcome.status,
        f"{outcome.detail}: the object already there is ours",
    )
