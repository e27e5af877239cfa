"""What the workers run now: the ``model_versions`` table, written by workers, read by the edge.

A worker publishes the identity of each model it can run (name, version, SHA-256 of the
weights) when it starts and whenever it loads one (``workers/celery_app.py``,
``workers/runtime.py``): one row per model and worker, updated in place. The edge never loads a
model; it learns a model's current version here (:func:`current_versions`), so a model version
deployed on the workers is known before any job has run it (:mod:`dicom_node.backfill.plan`,
:func:`dicom_node.completion.rerun_study`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from dicom_node.state.database import Database
from dicom_node.state.models import Job, ModelVersion, utcnow


def publish(
    db: Database,
    worker: str,
    model: str,
    version: str,
    weights_sha256: str | None = None,
    *,
    now: datetime | None = None,
) -> None:
    """Record that ``worker`` runs ``model`` at ``version`` (insert or update its row; two
    processes of one worker publishing at once both end in one row)."""
    now = now or utcnow()
    for attempt in range(2):
        try:
            with db.session() as s:
                row = s.scalar(
                    select(ModelVersion)
                    .where(ModelVersion.model == model, ModelVersion.worker == worker)
                    .with_for_update()
                )
                if row is None:
                    s.add(
                        ModelVersion(
                            model=model,
                            version=version,
                            weights_sha256=weights_sha256,
                            worker=worker,
                            seen_at=now,
                        )
                    )
                else:
                    row.version = version
                    row.weights_sha256 = weights_sha256
                    row.seen_at = now
            return
        except IntegrityError:
            if attempt:
                raise  # the row exists now: the second pass updates it


def current_versions(db: Database) -> dict[str, str]:
    """Model -> the version the workers run now: the most recently published one.

    A model no worker has published (workers older than revision 0006) falls back to the
    version of its most recently finished job."""
    with db.session() as s:
        finished = s.execute(
            select(Job.model, Job.model_version)
            .where(Job.model_version.is_not(None), Job.finished_at.is_not(None))
            .order_by(Job.finished_at)
        ).all()
        published = s.execute(
            select(ModelVersion.model, ModelVersion.version).order_by(
                ModelVersion.seen_at, ModelVersion.id
            )
        ).all()
    current = {model: version for model, version in finished if version is not None}
    current.update({model: version for model, version in published})
    return current


def published(db: Database) -> dict[str, list[dict[str, str | None]]]:
    """Model -> what each worker published for it (worker, version, weights SHA-256, when),
    newest first: ``dicom-node models`` shows it next to the configuration."""
    with db.session() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.seen_at.desc(), ModelVersion.id)).all()
        out: dict[str, list[dict[str, str | None]]] = {}
        for row in rows:
            out.setdefault(row.model, []).append(
                {
                    "worker": row.worker,
                    "version": row.version,
                    "weights_sha256": row.weights_sha256,
                    "seen_at": row.seen_at.isoformat() if row.seen_at else None,
                }
            )
        return out
