"""Delivery entry points: :func:`deliver` (one attempt; what the job pipeline calls, scheduling
its own retries with :func:`~dicom_node.delivery.backoff.next_delay`), :func:`deliver_with_retry`
(a blocking retry loop) and :func:`echo_destination` (is the destination there?).

``deliver`` makes one attempt and is idempotent: it sends the stored bytes as they are, so a
resend after a lost answer, a crash or a retry carries the same SOP Instance UIDs and the same
content, which PACS keep as one copy (and which the duplicate check recognises as ours).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node.delivery import cstore, stow
from dicom_node.delivery import verify as readback
from dicom_node.delivery.backoff import next_delay
from dicom_node.delivery.destinations import CStoreDestination, Destination, StowDestination
from dicom_node.delivery.objects import load_objects
from dicom_node.delivery.report import DeliveryReport, InstanceOutcome
from dicom_node.dimse_status import STATUS_SUCCESS, Verdict
from dicom_node.errors import PermanentDeliveryError, TransientDeliveryError

LOGGER = logging.getLogger(__name__)


def deliver(
    destination: Destination,
    files: Sequence[Path],
    *,
    verify: bool | None = None,
) -> DeliveryReport:
    """Send the result files to ``destination`` once, and check the answer for every object.

    ``verify`` (default: the destination's ``read_back`` setting) reads every object back
    (QIDO-RS / C-FIND) and checks it is ours before the delivery counts as done.

    Returns the report when every object is delivered (stored, stored with a warning, or already
    there and ours). Raises :class:`~dicom_node.errors.PermanentDeliveryError` when any object
    cannot be delivered by retrying (rejected content, refused SOP class, auth, a foreign object
    under our UID...), else :class:`~dicom_node.errors.TransientDeliveryError` when some failed
    in a way worth retrying (refused connection, timeouts, 5xx, 408/429, A7xx, abort). The raised
    error carries the report as ``.report`` (in-process only; it is not pickled).
    """
    started = time.monotonic()
    objects = load_objects(files)
    by_path = {obj.path: obj for obj in objects}
    want_verify = destination.read_back if verify is None else verify
    report = DeliveryReport(destination=destination.name, kind=destination.kind)
    if not objects:
        report.verified = want_verify
        return report

    if isinstance(destination, StowDestination):
        with destination.session() as session:
            client = destination.client(session)
            outcomes = stow.store(destination, session, objects)
            outcomes = [
                readback.check_existing_stow(destination, client, o, by_path[o.path])
                if o.verdict is Verdict.DUPLICATE
                else o
                for o in outcomes
            ]
            report.outcomes = outcomes
            _raise_if_failed(report, destination, started)
            if want_verify:
                readback.verify_stow(destination, client, _sent(outcomes, by_path))
                report.verified = True
    elif isinstance(destination, CStoreDestination):
        outcomes = cstore.store(destination, objects)
        outcomes = [
            readback.check_existing_cstore(destination, o, by_path[o.path])
            if o.verdict is Verdict.DUPLICATE
            else o
            for o in outcomes
        ]
        report.outcomes = outcomes
        _raise_if_failed(report, destination, started)
        if want_verify:
            readback.verify_cstore(destination, _sent(outcomes, by_path))
            report.verified = True
    else:  # pragma: no cover - the type union is closed
        raise TypeError(f"not a destination: {destination!r}")

    report.seconds = time.monotonic() - started
    LOGGER.info(
        "%s: delivered %d object(s) (%d already there)%s in %.2f s",
        destination.display,
        len(report.outcomes),
        report.count(Verdict.DUPLICATE),
        ", verified" if report.verified else "",
        report.seconds,
    )
    return report


def _sent(outcomes: list[InstanceOutcome], by_path: dict) -> list:
    # Duplicates were already compared with the peer's copy; verify what we just stored.
    return [by_path[o.path] for o in outcomes if o.verdict in (Verdict.STORED, Verdict.WARNING)]


def _raise_if_failed(report: DeliveryReport, destination: Destination, started: float) -> None:
    report.seconds = time.monotonic() - started
    error = report.error(destination.display)
    if error is not None:
        LOGGER.warning("%s", error)
        raise error


def deliver_with_retry(
    destination: Destination,
    files: Sequence[Path],
    *,
    verify: bool | None = None,
    max_attempts: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, float, TransientDeliveryError], None] | None = None,
) -> DeliveryReport:
    """:func:`deliver`, retrying transient failures with capped exponential backoff and jitter.

    For a caller that can block until the destination answers (the delivery tests use it); the
    job pipeline does not: it records each attempt in the state database and schedules the next
    with :func:`~dicom_node.delivery.backoff.next_delay`. ``max_attempts``
    defaults to the destination's; after the last, the last transient error is raised.
    Permanent errors are raised at once.
    """
    policy = destination.retry
    attempts = max_attempts or policy.max_attempts
    for attempt in range(1, attempts + 1):
        try:
            return deliver(destination, files, verify=verify)
        except TransientDeliveryError as exc:
            if attempt >= attempts:
                raise
            delay = next_delay(attempt, policy.initial, policy.maximum)
            if on_retry is not None:
                on_retry(attempt, delay, exc)
            LOGGER.info("attempt %d failed, next in %.1f s", attempt, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def echo_destination(destination: Destination) -> float:
    """Check that ``destination`` answers (C-ECHO, or an authenticated QIDO-RS request) and
    return the round trip in seconds. Raises the same transient / permanent errors as
    :func:`deliver` (bad credentials and untrusted certificates are permanent)."""
    started = time.monotonic()
    if isinstance(destination, StowDestination):
        with destination.session() as session:
            stow.ping(destination, session)
    else:
        try:
            status = cstore.ping(destination)
        except ConnectionError as exc:
            problem = cstore.tls_problem(destination) if destination.tls is not None else None
            if problem:
                raise PermanentDeliveryError(f"{destination.display}: C-ECHO: {problem}") from None
            raise TransientDeliveryError(f"{destination.display}: C-ECHO: {exc}") from None
        if status != STATUS_SUCCESS:
            raise TransientDeliveryError(
                f"{destination.display}: C-ECHO answered status 0x{status & 0xFFFF:04X}", status
            )
    return time.monotonic() - started
