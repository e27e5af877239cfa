"""Versions of a study's results: which earlier result set a job's results supersede.

A late instance completes the study again with a new input set, and routing creates a new job
for the same rule and model that links the previous one (``Job.supersedes_id``, set by
:mod:`dicom_node.completion`). Following those links gives each job its *result version* (1 for
the first job of a rule and model on a study, 2 for the next, ...) and the result set it
replaces: the DICOM objects recorded by the nearest earlier job that recorded any (a job that
was skipped or failed before encoding has none, and is passed over).

Both are fixed when the job is created (the links never change), so encoding the job again
gives the same objects. The model phase writes them into the results (series number and
description, the SR's Predecessor Documents Sequence, the IOCM rejection note); the delivery
phase reads :func:`result_lineage` again to withdraw the superseded objects by deletion where a
destination asks for that.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from dicom_node.state import Database, Job, Output

NOT_RESULTS = frozenset({"summary", "kos"})
"""Recorded outputs that are not part of a result set: the job summary, and a rejection note
(withdrawing a rejection note would bring back what it withdrew)."""

MAX_CHAIN = 10_000
"""Bound on the links followed (a cycle cannot be created, but a bad row must not hang us)."""


@dataclass(frozen=True)
class ResultRef:
    """One DICOM object of an earlier result set, as recorded (same study as the job)."""

    kind: str
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Lineage:
    """Where a job's results stand among the versions of its study's results."""

    version: int
    """1 for a job that supersedes nothing, else one more than the job it supersedes."""
    superseded_job_id: str | None = None
    """The nearest earlier job that recorded result objects (``None``: nothing to withdraw)."""
    superseded: tuple[ResultRef, ...] = ()
    """That job's result objects, in the order they were recorded."""


def result_lineage(db: Database, job_id: str) -> Lineage:
    """The result version of ``job_id`` and the result set it supersedes (see module doc)."""
    with db.session() as s:
        chain: list[str] = []
        current = s.get(Job, job_id)
        seen = {job_id}
        while current is not None and current.supersedes_id and len(chain) < MAX_CHAIN:
            if current.supersedes_id in seen:
                break
            seen.add(current.supersedes_id)
            chain.append(current.supersedes_id)
            current = s.get(Job, current.supersedes_id)
        for earlier in chain:
            rows = s.scalars(
                select(Output).where(Output.job_id == earlier).order_by(Output.id)
            ).all()
            refs = tuple(
                ResultRef(o.kind, o.sop_class_uid, o.series_instance_uid, o.sop_instance_uid)
                for o in rows
                if o.kind not in NOT_RESULTS
                and o.sop_class_uid
                and o.series_instance_uid
                and o.sop_instance_uid
            )
            if refs:
                return Lineage(version=len(chain) + 1, superseded_job_id=earlier, superseded=refs)
        return Lineage(version=len(chain) + 1)
