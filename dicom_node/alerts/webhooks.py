"""Outgoing webhooks: signed JSON events, sent from one background thread.

Signature scheme (what a receiver checks; ``docs/deployment.md`` "Alerts"):

* ``X-Dicom-Node-Timestamp``: the send time, whole seconds since the Unix epoch;
* ``X-Dicom-Node-Signature``: ``sha256=`` and the lower-case hex HMAC-SHA256, keyed with the
  webhook's ``secret`` (UTF-8), of the timestamp, one ``.``, and the raw request body:
  ``HMAC(secret, f"{timestamp}.".encode() + body)``.

A receiver recomputes the HMAC over the body bytes it got, compares in constant time, and
rejects a timestamp more than a few minutes from its clock (:func:`verify`, 300 s): a captured
request cannot be replayed later, and the timestamp cannot be changed without the secret.
A retry is signed again with a fresh timestamp; the body, and its ``id``, stay the same, so a
receiver can also drop duplicates.

Sending never blocks the caller: :meth:`WebhookSender.emit` puts the event on a bounded queue
and returns; when the queue is full the event is dropped. Failed sends are retried with
exponential back-off up to the webhook's ``max_attempts``. Drops and failures are counted in
``dicom_node_webhooks_total{outcome}`` and logged with the receiver's host, never its secret.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from dicom_node.delivery.backoff import next_delay
from dicom_node.settings import AlertSettings, WebhookSettings

LOGGER = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Dicom-Node-Signature"
TIMESTAMP_HEADER = "X-Dicom-Node-Timestamp"
EVENT_HEADER = "X-Dicom-Node-Event"
REPLAY_TOLERANCE = 300
"""Seconds a receiver accepts between the signed timestamp and its own clock."""

OUTCOMES = ("sent", "retried", "failed", "dropped")
"""``dicom_node_webhooks_total`` outcomes: delivered; one failed try that will be retried;
given up after the last try; not queued because the queue was full."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Dicom-Node-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance: float = REPLAY_TOLERANCE,
) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp`` and the timestamp is recent: what a
    receiver runs (a reference implementation, also used by the tests)."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def safe_target(url: str) -> str:
    """A webhook URL as it may be logged: scheme, host, port and path (no credentials, query)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def _counter() -> Any:
    from prometheus_client import Counter

    return Counter(
        "dicom_node_webhooks",
        "Outgoing webhook sends by outcome (sent, retried, failed, dropped).",
        ["outcome"],
    )


_COUNTER: Any = None
_COUNTER_LOCK = threading.Lock()


def webhook_counter() -> Any:
    """``dicom_node_webhooks_total``, created on first use in the process that sends (so that
    multiprocess mode picks it up), with every outcome at 0."""
    global _COUNTER
    with _COUNTER_LOCK:
        if _COUNTER is None:
            _COUNTER = _counter()
            for name in OUTCOMES:
                _COUNTER.labels(outcome=name)
        return _COUNTER


def count(outcome: str) -> None:
    """Count a webhook outcome in ``dicom_node_webhooks_total``."""
    webhook_counter().labels(outcome=outcome).inc()


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    hook: WebhookSettings
    event: str
    body: bytes
    attempts: int = 0


class WebhookSender:
    """One thread that sends queued events to the configured webhooks (``start``/``stop``)."""

    def __init__(self, settings: AlertSettings, *, session: requests.Session | None = None) -> None:
        self.settings = settings
        self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=settings.queue_size)
        self._retry: list[_Pending] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = session or requests.Session()

    def start(self) -> None:
        webhook_counter()  # the series exist (at 0) before the first event
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending; events still queued are dropped (they are about the past)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self._http.close()

    def emit(self, event: str, payload: dict[str, Any]) -> int:
        """Queue ``payload`` (already patient-free) for every webhook that wants ``event``;
        returns how many were queued. Never blocks, never raises."""
        queued = 0
        for hook in self.settings.webhooks:
            if event not in hook.events or not _wanted(hook, event, payload):
                continue
            body = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()
            item = _Pending(time.monotonic(), next(self._seq), hook, event, body)
            try:
                self._queue.put_nowait(item)
                queued += 1
            except queue.Full:
                count("dropped")
                LOGGER.warning(
                    "webhook queue full; %s event for %s dropped", event, safe_target(hook.url)
                )
        return queued

    def pending(self) -> int:
        """Events queued or waiting for a retry (approximate; for tests and diagnostics)."""
        return self._queue.qsize() + len(self._retry)

    # -- the sending thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = 0.5
            if self._retry:
                wait = min(wait, max(0.0, self._retry[0].due - time.monotonic()))
            try:
                item: _Pending | None = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is None and self._retry and self._retry[0].due <= time.monotonic():
                item = heapq.heappop(self._retry)
            if item is not None:
                try:
                    self._attempt(item)
                except Exception:  # a bug here must not end the thread: later events still go
                    LOGGER.exception("webhook sender step failed")

    def _attempt(self, item: _Pending) -> None:
        item.attempts += 1
        hook = item.hook
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: item.event,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(hook.secret.get_secret_value(), timestamp, item.body),
        }
        error: str
        try:
            r = self._http.post(hook.url, data=item.body, headers=headers, timeout=hook.timeout)
        except requests.RequestException as exc:
            error = type(exc).__name__
        else:
            if 200 <= r.status_code < 300:
                count("sent")
                return
            error = f"HTTP {r.status_code}"
        target = safe_target(hook.url)
        if item.attempts >= hook.max_attempts or len(self._retry) >= self.settings.queue_size:
            count("failed")
            LOGGER.warning(
                "webhook %s event to %s failed after %d attempts (%s); dropped",
                item.event,
                target,
                item.attempts,
                error,
            )
            return
        count("retried")
        delay = next_delay(item.attempts, self.settings.backoff_initial, self.settings.backoff_max)
        LOGGER.info(
            "webhook %s event to %s failed (%s); retry in %.1f s", item.event, target, error, delay
        )
        item.due = time.monotonic() + delay
        heapq.heappush(self._retry, item)


def _wanted(hook: WebhookSettings, event: str, payload: dict[str, Any]) -> bool:
    """A ``finding`` event goes only to webhooks whose size rule it meets."""
    if event != "finding" or hook.min_finding_mm is None:
        return True
    largest = payload.get("largest_finding_mm")
    return isinstance(largest, int | float) and largest >= hook.min_finding_mm
