"""One backfill run: query the source, plan, pull (bounded), audit.

Used by ``dicom-node backfill`` and by the ``[[pull]]`` schedules of ``serve``
(:mod:`dicom_node.backfill.schedule`). Nothing here logs a patient attribute; Study Instance
UIDs appear only in the report the operator asked for, never in the log or the audit trail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_node import audit
from dicom_node.backfill.plan import Action, PlannedStudy, plan_studies
from dicom_node.backfill.query import DateWindow, SourceUnreachable, find_studies, remote_instances
from dicom_node.backfill.retrieve import Pulled, pull_cmove, pull_wado
from dicom_node.backfill.source import describe, resolve_source
from dicom_node.completion import rerun_study
from dicom_node.delivery.destinations import StowDestination
from dicom_node.settings import Settings
from dicom_node.state import Database
from dicom_node.state.model_versions import current_versions

LOGGER = logging.getLogger(__name__)


@dataclass
class BackfillReport:
    """What one run found, would pull (dry run) or pulled."""

    source: str
    """The source as displayed (no credentials)."""
    window: DateWindow
    modality: str | None
    dry_run: bool
    limit: int
    planned: list[PlannedStudy] = field(default_factory=list)
    pulled: dict[str, Pulled] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Study Instance UID -> why its pull failed (patient-free)."""
    reran: dict[str, list[str]] = field(default_factory=dict)
    """Study Instance UID -> the ids of the jobs its re-run created."""
    unreachable: str | None = None
    """Set when the source stopped answering during the pulls (the rest were not tried)."""
    seconds: float = 0.0

    def by_action(self) -> dict[str, int]:
        counts = {a.value: 0 for a in Action}
        for p in self.planned:
            counts[p.action.value] += 1
        return counts

    @property
    def to_do(self) -> list[PlannedStudy]:
        """The studies this run pulls or re-runs: the first ``limit`` of them, in the order
        the source listed them."""
        return [p for p in self.planned if p.action in (Action.PULL, Action.RERUN)][: self.limit]

    @property
    def to_pull(self) -> list[PlannedStudy]:
        return [p for p in self.to_do if p.action is Action.PULL]

    @property
    def to_rerun(self) -> list[PlannedStudy]:
        return [p for p in self.to_do if p.action is Action.RERUN]

    @property
    def deferred(self) -> int:
        """Studies to pull or re-run beyond the per-run limit (left for the next run)."""
        counts = self.by_action()
        return max(0, counts[Action.PULL.value] + counts[Action.RERUN.value] - self.limit)

    @property
    def instances(self) -> int:
        return sum(p.received for p in self.pulled.values())

    @property
    def ok(self) -> bool:
        return not self.failed and self.unreachable is None

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "since": self.window.since.isoformat(),
            "until": self.window.until.isoformat(),
            "modality": self.modality,
            "dry_run": self.dry_run,
            "limit": self.limit,
            "found": len(self.planned),
            "by_action": self.by_action(),
            "deferred": self.deferred,
            "pulled": len([uid for uid, p in self.pulled.items() if uid not in self.failed]),
            "instances": self.instances,
            "failed": len(self.failed),
            "rerun": len(self.reran),
            "rerun_jobs": sum(len(jobs) for jobs in self.reran.values()),
            "unreachable": self.unreachable,
            "seconds": round(self.seconds, 3),
            "studies": [
                {
                    "study_instance_uid": p.remote.study_instance_uid,
                    "study_date": p.remote.study_date,
                    "modalities": list(p.remote.modalities),
                    "action": p.action.value,
                    "reason": p.reason,
                    **(
                        {"instances": self.pulled[p.remote.study_instance_uid].received}
                        if p.remote.study_instance_uid in self.pulled
                        else {}
                    ),
                    **(
                        {"jobs": self.reran[p.remote.study_instance_uid]}
                        if p.remote.study_instance_uid in self.reran
                        else {}
                    ),
                    **(
                        {"error": self.failed[p.remote.study_instance_uid]}
                        if p.remote.study_instance_uid in self.failed
                        else {}
                    ),
                }
                for p in self.planned
            ],
        }


def run_backfill(
    settings: Settings,
    db: Database,
    *,
    source: str,
    window: DateWindow,
    modality: str | None = None,
    limit: int = 500,
    dry_run: bool = False,
    rerun: bool = True,
    actor: str = "cli",
    stop: Callable[[], bool] | None = None,
) -> BackfillReport:
    """Find the studies of ``window`` at ``source``, and pull (unless ``dry_run``) those the
    node has not got, and re-run those it processed with another model version than the
    workers run now or without a rule added since (unless ``rerun`` is false: then listed as
    stale only): at most ``limit`` pulls and re-runs together. Raises :class:`ConfigError` for a bad
    source and :class:`SourceUnreachable` when the query cannot be made; a source lost
    during the pulls is reported (``unreachable``). ``stop()`` returning true ends the pulls
    between two studies (the node shutting down)."""
    started = time.monotonic()
    peer = resolve_source(settings, source)
    report = BackfillReport(describe(peer), window, modality, dry_run, limit)
    try:
        studies = find_studies(peer, window, modality)
        report.planned = plan_studies(
            db, studies, lambda uid: remote_instances(peer, uid), settings, rerun=rerun
        )
    except SourceUnreachable as exc:
        _audit(db, report, actor, outcome="failure", error=str(exc))
        raise
    if not dry_run:
        _rerun(settings, db, report, actor)
        _pull(settings, db, peer, report, stop or (lambda: False))
    report.seconds = time.monotonic() - started
    _audit(db, report, actor, outcome="success" if report.ok else "failure")
    LOGGER.info(
        "backfill from %s: %d studies found, %d pulled (%d instances), %d re-run, %d failed, "
        "%d deferred",
        report.source,
        len(report.planned),
        len(report.pulled) - len(report.failed),
        len(report.reran),
        report.instances,
        len(report.failed),
        report.deferred,
    )
    return report


def _rerun(settings: Settings, db: Database, report: BackfillReport, actor: str) -> None:
    """Route again the studies the node holds but did not process with what runs now (their
    jobs go out through the outbox, as a completed study's)."""
    current = current_versions(db)
    for planned in report.to_rerun:
        if planned.study_id is None:
            continue
        created = rerun_study(
            db,
            settings,
            planned.study_id,
            reason=f"backfill from {report.source}",
            actor=actor,
            current=current,
        )
        report.reran[planned.remote.study_instance_uid] = created


def _pull(
    settings: Settings, db: Database, peer: Any, report: BackfillReport, stop: Callable[[], bool]
) -> None:
    ingestor = None
    if isinstance(peer, StowDestination):
        from dicom_node.ingest import Ingestor
        from dicom_node.spool import Spool

        spool = Spool(
            settings.spool_dir, fsync=settings.scp.fsync, min_free_bytes=settings.scp.min_free_bytes
        )
        spool.prepare()
        ingestor = Ingestor(settings, db, spool)
    for planned in report.to_pull:
        if stop():
            return
        uid = planned.remote.study_instance_uid
        try:
            if ingestor is not None:
                pulled = pull_wado(peer, uid, ingestor, db)
            else:
                pulled = pull_cmove(peer, uid, settings.ae_title)
        except SourceUnreachable as exc:
            report.failed[uid] = str(exc)
            report.unreachable = str(exc)
            LOGGER.warning("backfill: %s; the remaining studies wait for the next run", exc)
            return
        report.pulled[uid] = pulled
        if pulled.refused:
            report.failed[uid] = f"{pulled.refused} of {pulled.received} instance(s) refused"
        elif not pulled.received:
            report.failed[uid] = "the source sent no instance"


def _audit(db: Database, report: BackfillReport, actor: str, *, outcome: str, **extra: Any) -> None:
    counts = report.by_action()
    audit.record(
        db,
        audit.BACKFILL_RUN,
        actor=actor,
        outcome=outcome,
        source=report.source,
        since=report.window.since.isoformat(),
        until=report.window.until.isoformat(),
        modality=report.modality or "-",
        dry_run=report.dry_run,
        found=len(report.planned),
        to_pull=counts[Action.PULL.value],
        pulled=len(report.pulled) - len(report.failed),
        instances=report.instances,
        failed=len(report.failed),
        done=counts[Action.DONE.value],
        in_progress=counts[Action.IN_PROGRESS.value],
        stale=counts[Action.STALE.value],
        to_rerun=counts[Action.RERUN.value],
        rerun=len(report.reran),
        **extra,
    )
