"""Withdrawing superseded results by deletion, for a PACS that ignores IHE IOCM rejection notes.

With ``supersede = "delete"`` on a destination, once a newer version of a study's results is
delivered there, each object of the version it supersedes is deleted through Orthanc's REST
API: ``POST /tools/lookup`` with the SOP Instance UID finds Orthanc's id of the instance, and
``DELETE /instances/{id}`` removes it. Both calls are idempotent (an instance already gone is not
found, and counts as withdrawn), so a delivery attempt that is retried simply runs them again.

Plain HTTP with ``requests`` (a dependency of the edge already) rather than
``orthanc-api-client``: two calls do not justify another runtime dependency of the edge.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import requests

from dicom_node.delivery.destinations import CABundleSession, DestinationConfigError
from dicom_node.dimse_status import HTTP_HINTS, Verdict, classify_http
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError
from dicom_node.jobs import ResultRef
from dicom_node.settings import DestinationSettings

LOGGER = logging.getLogger(__name__)


def _session(name: str, settings: DestinationSettings) -> tuple[requests.Session, str]:
    """A session with the Orthanc REST root's credentials and the destination's TLS trust, and
    the root without credentials."""
    root = settings.orthanc_rest_url
    if root is None:
        raise DestinationConfigError(f"destination {name!r}: supersede = \"delete\" needs orthanc_url")
    verify = settings.verify_tls
    if verify is False:
        raise DestinationConfigError(f"destination {name!r}: verify_tls = false is not supported")
    if isinstance(verify, Path) and not verify.is_file():
        raise DestinationConfigError(f"destination {name!r}: CA bundle {verify} does not exist")
    url = urlsplit(root)
    session = CABundleSession()
    session.verify = str(verify) if isinstance(verify, Path) else verify
    if url.username:
        session.auth = (unquote(url.username), unquote(url.password or ""))
    host = url.hostname or ""
    netloc = (host if ":" not in host else f"[{host}]") + (f":{url.port}" if url.port else "")
    return session, urlunsplit((url.scheme, netloc, url.path.rstrip("/"), "", ""))


def _check(response: requests.Response, what: str, display: str) -> None:
    if response.ok:
        return
    verdict = classify_http(response.status_code)
    hint = HTTP_HINTS.get(response.status_code, "")
    message = f"{display}: {what}: HTTP {response.status_code}" + (f" ({hint})" if hint else "")
    if verdict is Verdict.TRANSIENT:
        raise TransientDeliveryError(message, response.status_code)
    raise PermanentDeliveryError(message, response.status_code)


def delete_superseded(
    name: str, settings: DestinationSettings, refs: Iterable[ResultRef], *, timeout: float | None = None
) -> int:
    """Delete the objects ``refs`` from the Orthanc behind destination ``name``; returns how many
    were there. Raises :class:`~dicom_node.errors.TransientDeliveryError` (connection refused,
    timeouts, 5xx, 429) or :class:`~dicom_node.errors.PermanentDeliveryError` (401, 403, 404 of
    the REST root...), like a delivery."""
    session, root = _session(name, settings)
    display = f"deleting superseded results from {name!r} ({root})"
    limit = timeout or settings.timeout
    timeouts = (min(limit, 10.0), limit)
    deleted = 0
    with session:
        for ref in refs:
            try:
                found = session.post(f"{root}/tools/lookup", data=ref.sop_instance_uid, timeout=timeouts)
                _check(found, "lookup", display)
                ids = [
                    str(item["ID"])
                    for item in found.json()
                    if isinstance(item, dict) and item.get("Type") == "Instance" and "ID" in item
                ]
                for orthanc_id in ids:
                    gone = session.delete(f"{root}/instances/{orthanc_id}", timeout=timeouts)
                    if gone.status_code == 404:
                        continue  # deleted meanwhile (another attempt): withdrawn all the same
                    _check(gone, "delete", display)
                    deleted += 1
            except requests.RequestException as exc:
                raise TransientDeliveryError(f"{display}: {type(exc).__name__}") from None
            except ValueError:  # not JSON: not Orthanc's REST API at that URL
                raise PermanentDeliveryError(
                    f"{display}: the lookup answer is not Orthanc's (check orthanc_url)"
                ) from None
    LOGGER.info("%s: %d object(s) deleted", display, deleted)
    return deleted
