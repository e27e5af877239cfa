"""Probes: is each write-back destination up, and how fast does it answer?

A probe is one :func:`~dicom_node.delivery.writeback.echo_destination` call: C-ECHO for a
``dicom://`` destination (over DICOM TLS when it is configured), an authenticated QIDO-RS
``/studies?limit=1`` for a DICOMweb one (its credentials and CA bundle). ``dicom-node probe``
runs it on demand; :class:`Prober` runs it every ``probes.interval_s`` seconds inside
``dicom-node serve`` and keeps the last ``probes.history`` results of each destination in the
``probe_results`` table, which the dashboard's Destinations page reads.

Results hold the destination's name, the time, up or down, the round trip and the error
message, which names the destination by its URL without credentials (never patient data).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, func, select

from dicom_node.background import BackgroundThread
from dicom_node.delivery.destinations import build_destination
from dicom_node.delivery.writeback import echo_destination
from dicom_node.phi import reason_text
from dicom_node.settings import DestinationSettings, Settings
from dicom_node.state import Database, ProbeResult, utcnow

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeOutcome:
    """The result of probing one destination."""

    destination: str
    method: str
    """``C-ECHO`` or ``QIDO-RS``."""
    target: str
    """Where the probe went, without credentials (``AET@host:port`` or the DICOMweb root)."""
    ok: bool
    latency_ms: float | None
    error: str | None
    at: datetime

    def as_json(self) -> dict[str, Any]:
        """The outcome as a JSON-ready mapping (``dicom-node probe --json``)."""
        return {
            "destination": self.destination,
            "method": self.method,
            "target": self.target,
            "up": self.ok,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
            "error": self.error,
            "at": self.at.isoformat(),
        }


def describe_target(settings: DestinationSettings) -> tuple[str, str]:
    """(method, target) of a destination's probe, from its settings, without credentials."""
    from dicom_node.settings import parse_destination_url

    kind, parts = parse_destination_url(settings.url)
    if kind == "cstore":
        return "C-ECHO", f"{parts['ae_title']}@{parts['host']}:{parts['port']}"
    return "QIDO-RS", mask_url(settings.url)


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (the user name stays: it is not secret).

    >>> mask_url("https://ai:s3cret@pacs:8443/dicom-web")
    'https://ai:***@pacs:8443/dicom-web'
    >>> mask_url("dicom://PACS@10.0.0.5:104")
    'dicom://PACS@10.0.0.5:104'
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def probe_destination(name: str, cfg: DestinationSettings, settings: Settings) -> ProbeOutcome:
    """Probe one destination; a destination that is down (or misconfigured) is an outcome
    with ``ok=False`` and the reason, never an exception."""
    method, target = describe_target(cfg)
    at = utcnow()
    prefix = ""
    try:
        destination = build_destination(name, cfg, calling_ae_title=settings.ae_title)
        prefix = f"{destination.display}: "
        seconds = echo_destination(destination)
    except Exception as exc:  # every failure is an answer here: down, with why
        # The delivery errors start with "C-STORE to 'name' (...)": the page and the command
        # already say which destination, and a probe is not a C-STORE.
        error = reason_text((str(exc) or type(exc).__name__).removeprefix(prefix), 500)
        return ProbeOutcome(name, method, target, False, None, error, at)
    return ProbeOutcome(name, method, target, True, seconds * 1000.0, None, at)


def probe_all(settings: Settings, names: list[str] | None = None) -> list[ProbeOutcome]:
    """Probe the destinations ``names`` (default: every configured one), in name order.

    Raises :class:`KeyError` naming the first unknown destination."""
    configured = settings.all_destinations()
    wanted = sorted(configured) if names is None else names
    unknown = [n for n in wanted if n not in configured]
    if unknown:
        raise KeyError(unknown[0])
    return [probe_destination(n, configured[n], settings) for n in wanted]


def record_probes(db: Database, outcomes: list[ProbeOutcome], keep: int) -> None:
    """Store ``outcomes`` and delete all but the newest ``keep`` results of each destination."""
    with db.session() as s:
        for o in outcomes:
            s.add(
                ProbeResult(
                    destination=o.destination,
                    at=o.at,
                    ok=o.ok,
                    latency_ms=o.latency_ms,
                    error=o.error,
                )
            )
        s.flush()
        for o in outcomes:
            cutoff = s.scalar(
                select(ProbeResult.id)
                .where(ProbeResult.destination == o.destination)
                .order_by(ProbeResult.id.desc())
                .offset(keep)
                .limit(1)
            )
            if cutoff is not None:
                s.execute(
                    delete(ProbeResult).where(
                        ProbeResult.destination == o.destination, ProbeResult.id <= cutoff
                    )
                )


def last_probes(db: Database) -> dict[str, dict[str, Any]]:
    """Per destination name: its newest probe result (``up``, ``at``, ``latency_ms``,
    ``error``) and ``checks``/``failures`` over the kept history."""
    with db.session() as s:
        newest = (
            select(ProbeResult.destination, func.max(ProbeResult.id).label("id"))
            .group_by(ProbeResult.destination)
            .subquery()
        )
        rows = s.execute(select(ProbeResult).join(newest, newest.c.id == ProbeResult.id)).scalars()
        out: dict[str, dict[str, Any]] = {
            r.destination: {
                "up": r.ok,
                "at": r.at.isoformat(),
                "latency_ms": r.latency_ms,
                "error": r.error,
            }
            for r in rows
        }
        counts = s.execute(
            select(
                ProbeResult.destination,
                func.count(),
                func.sum(case((ProbeResult.ok.is_(False), 1), else_=0)),
            ).group_by(ProbeResult.destination)
        ).all()
    for name, checks, failures in counts:
        if name in out:
            out[name]["checks"] = int(checks)
            out[name]["failures"] = int(failures or 0)
    return out


class Prober(BackgroundThread):
    """Component of ``dicom-node serve``: probes every destination each ``probes.interval_s``
    seconds (the first round one interval after start, so a restart does not hammer the
    PACS), in its own thread — a slow destination never holds up dispatch."""

    thread_name = "destination-probes"

    def __init__(self, settings: Settings, db: Database) -> None:
        super().__init__()
        self.settings = settings
        self.db = db

    def run_once(self) -> list[ProbeOutcome]:
        """One round: probe every destination and record the results."""
        outcomes = probe_all(self.settings)
        record_probes(self.db, outcomes, self.settings.probes.history)
        for o in outcomes:
            if not o.ok:
                LOGGER.warning("destination %r is down: %s", o.destination, o.error)
        return outcomes

    def _run(self) -> None:
        interval = self.settings.probes.interval_s
        while not self._stop.wait(interval):
            started = time.monotonic()
            try:
                self.run_once()
            except Exception:
                LOGGER.exception("probing the destinations failed; trying again next round")
            LOGGER.debug("probe round took %.1f s", time.monotonic() - started)
