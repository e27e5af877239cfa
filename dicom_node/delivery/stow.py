"""STOW-RS (PS3.18 10.5): send stored Part 10 files, byte for byte, and read the answer per instance.

Why requests and not dicomweb-client's ``store_instances``: that method takes pydicom Datasets
and re-encodes them (``dcmwrite``), so the bytes sent are not the stored bytes; it raises on any
4xx before the FailedSOPSequence of a 409 can be read; and it retries on its own, which would
multiply with our backoff. QIDO-RS and WADO-RS (verification, duplicate checks) do use
dicomweb-client (:mod:`dicom_node.delivery.verify`).
"""

from __future__ import annotations

import json
import logging
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

import requests
from pydicom.dataset import Dataset

from dicom_node.delivery.destinations import StowDestination
from dicom_node.delivery.objects import StoredObject
from dicom_node.delivery.report import InstanceOutcome
from dicom_node.dimse_status import (
    HTTP_HINTS,
    Verdict,
    classify_http,
    classify_status,
    describe,
)
from dicom_node.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError

LOGGER = logging.getLogger(__name__)

ACCEPT = "application/dicom+json"


def batches(objects: list[StoredObject], max_bytes: int) -> Iterator[list[StoredObject]]:
    """Group objects into requests of at most ``max_bytes`` (a larger object goes alone)."""
    current: list[StoredObject] = []
    size = 0
    for obj in objects:
        if current and size + obj.size > max_bytes:
            yield current
            current, size = [], 0
        current.append(obj)
        size += obj.size
    if current:
        yield current


def multipart(objects: list[StoredObject]) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body of the files' exact bytes."""
    contents = [obj.path.read_bytes() for obj in objects]
    while True:
        boundary = uuid.uuid4().hex
        marker = boundary.encode()
        if not any(marker in data for data in contents):
            break
    parts = []
    for data in contents:
        parts.append(
            b"--" + marker + b"\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
        )
    parts.append(b"--" + marker + b"--\r\n")
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(parts), content_type


def transport_error(dest: StowDestination, what: str, exc: BaseException) -> DeliveryError:
    """Map a requests exception to a transient or permanent delivery error."""
    where = f"{dest.display}: {what}" if what else dest.display
    if isinstance(exc, requests.exceptions.SSLError):
        if _certificate_problem(exc):
            return PermanentDeliveryError(
                f"{where}: the server's TLS certificate is not trusted; configure verify_tls with "
                "the CA bundle that signed it"
            )
        return TransientDeliveryError(f"{where}: TLS handshake failed ({type(exc).__name__})")
    if isinstance(exc, requests.exceptions.Timeout):
        return TransientDeliveryError(f"{where}: no answer within {dest.timeout:g} s")
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "Connection refused" in text:
            reason = "connection refused"
        elif "RemoteDisconnected" in text or "Connection aborted" in text or "reset" in text:
            reason = "connection closed without an answer"
        elif "Name or service not known" in text or "NameResolutionError" in text:
            reason = "host name not resolved"
        else:
            reason = "cannot connect"
        return TransientDeliveryError(f"{where}: {reason}")
    if isinstance(
        exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
    ):
        return TransientDeliveryError(f"{where}: answer cut off")
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
        return PermanentDeliveryError(f"{where}: invalid URL")
    return TransientDeliveryError(f"{where}: {type(exc).__name__}")


def _certificate_problem(exc: BaseException) -> bool:
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return True
        if isinstance(item, BaseException):
            stack.extend([item.__cause__, item.__context__, *item.args])
    return "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc)


def parse_response(response: requests.Response) -> Dataset | None:
    """The PS3.18 Store Instances Response Module of ``response``, or ``None`` if there is none
    or it cannot be read. Accepts DICOM JSON (asked for) and DICOM XML (the PS3.18 default);
    some servers (Orthanc's 409) omit the Content-Type, so JSON is tried on any body."""
    body = response.content
    if not body:
        return None
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype.endswith("xml"):
        try:
            from xml.etree.ElementTree import fromstring

            from dicomweb_client.web import _load_xml_dataset  # the library's own XML reader

            return _load_xml_dataset(fromstring(body))
        except Exception:
            return None
    try:
        data = json.loads(body)
        return Dataset.from_json(data) if isinstance(data, dict) else None
    except Exception:
        return None


def _per_instance(answer: Dataset | None) -> dict[str, tuple[str, int | None]]:
    """SOP Instance UID -> ("stored", WarningReason or None) / ("failed", FailureReason or None)."""
    out: dict[str, tuple[str, int | None]] = {}
    if answer is None:
        return out
    for item in answer.get("ReferencedSOPSequence", None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        warning = item.get("WarningReason", None)
        out[uid] = ("stored", int(warning) if warning is not None else None)
    for item in answer.get("FailedSOPSequence", None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        reason = item.get("FailureReason", None)
        out[uid] = ("failed", int(reason) if reason is not None else None)
    return out


def store(
    dest: StowDestination, session: requests.Session, objects: list[StoredObject]
) -> list[InstanceOutcome]:
    """POST the objects to ``{base}/studies``; one outcome per object.

    Instances the peer calls duplicates come back with verdict DUPLICATE; the caller checks they
    are ours. After a failure of a whole request (connection, 5xx, 401...), the remaining
    requests are not attempted: they would meet the same fate.
    """
    outcomes: list[InstanceOutcome] = []
    pending = list(batches(objects, dest.max_request_bytes))
    while pending:
        batch = pending.pop(0)
        body, content_type = multipart(batch)
        try:
            response = session.post(
                dest.studies_url,
                data=body,
                headers={"Content-Type": content_type, "Accept": ACCEPT},
                timeout=dest.timeouts,
                allow_redirects=False,  # a redirected POST would silently become a GET
            )
        except requests.exceptions.RequestException as exc:
            err = transport_error(dest, "", exc)
            verdict = (
                Verdict.PERMANENT if isinstance(err, PermanentDeliveryError) else Verdict.TRANSIENT
            )
            detail = str(err).removeprefix(f"{dest.display}: ")
            rest = batch + [o for b in pending for o in b]
            outcomes += [
                InstanceOutcome(o.path, o.sop_instance_uid, verdict, None, detail) for o in rest
            ]
            break
        batch_outcomes, whole_request_failed = _outcomes_for(response, batch)
        outcomes += batch_outcomes
        if whole_request_failed:
            verdict = batch_outcomes[0].verdict
            detail = f"not attempted after: {batch_outcomes[0].detail}"
            outcomes += [
                InstanceOutcome(o.path, o.sop_instance_uid, verdict, None, detail)
                for b in pending
                for o in b
            ]
            break
    return outcomes


def _outcomes_for(
    response: requests.Response, batch: list[StoredObject]
) -> tuple[list[InstanceOutcome], bool]:
    code = response.status_code
    http_verdict = classify_http(code)
    if http_verdict in (Verdict.TRANSIENT, Verdict.PERMANENT):
        hint = HTTP_HINTS.get(code, response.reason or "")
        if 300 <= code < 400:
            hint = "redirected; configure the final URL"
        detail = f"HTTP {code}" + (f" {hint}" if hint else "")
        return [
            InstanceOutcome(o.path, o.sop_instance_uid, http_verdict, code, detail) for o in batch
        ], True

    per_instance = _per_instance(parse_response(response))
    outcomes = []
    for obj in batch:
        state, reason = per_instance.get(obj.sop_instance_uid, (None, None))
        if state == "stored":
            if reason is None or classify_status(reason) is Verdict.STORED:
                outcomes.append(
                    InstanceOutcome(
                        obj.path, obj.sop_instance_uid, Verdict.STORED, code, f"HTTP {code}"
                    )
                )
            else:
                outcomes.append(
                    InstanceOutcome(
                        obj.path,
                        obj.sop_instance_uid,
                        Verdict.WARNING,
                        reason,
                        f"stored with warning {describe(reason)}",
                    )
                )
        elif state == "failed":
            if reason is None:
                verdict = Verdict.DUPLICATE if code == 409 else Verdict.PERMANENT
                detail = f"HTTP {code}, failed without a reason"
            else:
                verdict = classify_status(reason)
                if verdict in (Verdict.STORED, Verdict.WARNING):  # a "failure" with a success code
                    verdict = Verdict.PERMANENT
                detail = f"HTTP {code}, failure reason {describe(reason)}"
            outcomes.append(
                InstanceOutcome(obj.path, obj.sop_instance_uid, verdict, reason, detail)
            )
        elif code == 409:
            # A conflict that does not say which instance: maybe this one is already there.
            outcomes.append(
                InstanceOutcome(
                    obj.path, obj.sop_instance_uid, Verdict.DUPLICATE, code, "HTTP 409 conflict"
                )
            )
        elif code == 200:
            # PS3.18: 200 means every instance was stored, listed or not.
            outcomes.append(
                InstanceOutcome(obj.path, obj.sop_instance_uid, Verdict.STORED, code, "HTTP 200")
            )
        else:
            outcomes.append(
                InstanceOutcome(
                    obj.path,
                    obj.sop_instance_uid,
                    Verdict.TRANSIENT,
                    code,
                    f"HTTP {code} without an answer for this object",
                )
            )
    return outcomes, False


def ping(dest: StowDestination, session: requests.Session) -> None:
    """A cheap authenticated QIDO-RS request (``/studies?limit=1``); raises a delivery error."""
    try:
        response = session.get(
            dest.studies_url,
            params={"limit": "1"},
            headers={"Accept": ACCEPT},
            timeout=dest.timeouts,
            allow_redirects=False,
        )
    except requests.exceptions.RequestException as exc:
        raise transport_error(dest, "QIDO-RS ping", exc) from None
    if response.status_code in (200, 204):
        return
    verdict = classify_http(response.status_code)
    hint = HTTP_HINTS.get(response.status_code, response.reason or "")
    message = f"{dest.display}: QIDO-RS ping answered HTTP {response.status_code} {hint}".rstrip()
    if verdict is Verdict.TRANSIENT:
        raise TransientDeliveryError(message, response.status_code)
    raise PermanentDeliveryError(message, response.status_code)
