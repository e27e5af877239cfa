"""Write-back of results to PACS: STOW-RS and C-STORE destinations, retries and verification.

The job pipeline calls::

    dest = build_destination(name, settings.all_destinations()[name], calling_ae_title=settings.ae_title)
    report = deliver(dest, [sr_path, seg_path], verify=cfg.read_back)   # one attempt
    # TransientDeliveryError -> retry after next_delay(attempt, cfg.backoff_initial, cfg.backoff_max)
    # PermanentDeliveryError -> the delivery fails with str(exc) as its reason

A newer result version withdraws the one it supersedes: by an IHE IOCM rejection note, one more
result object sent like the others, or by deletion through Orthanc's REST API after the new one
is delivered (:mod:`dicom_node.delivery.withdraw`), per destination (``supersede``).

This package is on the edge: it imports neither torch nor highdicom.
"""

from dicom_node.delivery.backoff import backoff_ceiling, next_delay
from dicom_node.delivery.destinations import (
    CStoreDestination,
    Destination,
    DestinationConfigError,
    RetryPolicy,
    StowDestination,
    build_destination,
    destinations_from_settings,
)
from dicom_node.delivery.objects import IDENTITY_KEYWORDS, StoredObject, load_objects
from dicom_node.delivery.report import DeliveryReport, InstanceOutcome
from dicom_node.delivery.writeback import deliver, deliver_with_retry, echo_destination
from dicom_node.dimse_status import Verdict, classify_http, classify_status
from dicom_node.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError

__all__ = [
    "IDENTITY_KEYWORDS",
    "CStoreDestination",
    "DeliveryError",
    "DeliveryReport",
    "Destination",
    "DestinationConfigError",
    "InstanceOutcome",
    "PermanentDeliveryError",
    "RetryPolicy",
    "StoredObject",
    "StowDestination",
    "TransientDeliveryError",
    "Verdict",
    "backoff_ceiling",
    "build_destination",
    "classify_http",
    "classify_status",
    "deliver",
    "deliver_with_retry",
    "destinations_from_settings",
    "echo_destination",
    "load_objects",
    "next_delay",
]
