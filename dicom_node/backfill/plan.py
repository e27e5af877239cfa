"""What to do with each study found at the source.

A study is pulled unless the node can show it already has it:

* **done**: every instance the source holds is in the node's index (or is one of the node's
  own results written back there), its jobs are all terminal, and for every rule and model
  routing picks for its input set there is a job, whose newest generation ran the model version
  the workers run now (:func:`dicom_node.state.model_versions.current_versions`);
* **in-progress**: all its instances are here but it is not finished (waiting for its quiet
  period, or jobs queued or running);
* **rerun**: all its instances are here and finished, but processed by another version of a
  model than the workers run now, or not at all by a rule or model added since: it is routed
  again as it is (:func:`dicom_node.completion.rerun_study`), nothing is pulled (pulling the
  same instances again would change nothing: an identical instance is a duplicate);
* **stale**: what would be a re-run when re-runs are turned off (``--no-rerun``): listed only;
* **pull**: anything else (unknown to the node, or instances missing).

The cheap test runs first: a study the index does not know is pulled without asking the source
for its instance list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import func, select

from dicom_node.backfill.query import RemoteStudy
from dicom_node.completion import reruns_due
from dicom_node.settings import Settings
from dicom_node.state import Database, Instance, Job, JobState, Output, Study
from dicom_node.state.model_versions import current_versions


class Action(str, Enum):
    PULL = "pull"
    DONE = "done"
    IN_PROGRESS = "in-progress"
    RERUN = "rerun"
    STALE = "stale"


@dataclass(frozen=True)
class PlannedStudy:
    remote: RemoteStudy
    action: Action
    reason: str
    """Patient-free, e.g. "not at the node" or "3 instances missing"."""
    study_id: int | None = None
    """The node's id of the study (``None`` when the node does not know it)."""


def plan_studies(
    db: Database,
    studies: list[RemoteStudy],
    remote_instances: Callable[[str], set[str]],
    settings: Settings,
    *,
    rerun: bool = True,
) -> list[PlannedStudy]:
    """Classify ``studies``; ``remote_instances(study_uid)`` lists one study's SOP Instance UIDs
    at the source (asked only for studies the node already knows). ``settings``: the routing
    rules a study is checked against; ``rerun=False`` lists as stale what would be re-run."""
    current = current_versions(db)
    return [_plan_one(db, settings, remote, remote_instances, current, rerun) for remote in studies]


def _plan_one(
    db: Database,
    settings: Settings,
    remote: RemoteStudy,
    remote_instances: Callable[[str], set[str]],
    current: dict[str, str],
    rerun: bool,
) -> PlannedStudy:
    uid = remote.study_instance_uid
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        if study is None:
            return PlannedStudy(remote, Action.PULL, "not at the node")
        local_count = s.scalar(
            select(func.count()).select_from(Instance).where(Instance.study_id == study.id)
        )
        study_id, version, dirty = study.id, study.version, study.dirty
    if remote.instances is not None and remote.instances <= (local_count or 0):
        missing = 0  # as many here as there (the node's results there make "there" larger)
    else:
        missing = len(_missing(db, study_id, remote_instances(uid)))
    if missing:
        return PlannedStudy(remote, Action.PULL, f"{missing} instance(s) not at the node", study_id)
    if dirty:
        return PlannedStudy(remote, Action.IN_PROGRESS, "waiting for its quiet period", study_id)
    with db.session() as s:
        states = set(
            s.scalars(
                select(Job.state).where(Job.study_id == study_id, Job.study_version == version)
            )
        )
    if not states:
        return PlannedStudy(remote, Action.IN_PROGRESS, "not yet completed", study_id)
    if any(not JobState(state).terminal for state in states):
        return PlannedStudy(remote, Action.IN_PROGRESS, "jobs not finished", study_id)
    due = reruns_due(db, settings, study_id, current)
    if due:
        action = Action.RERUN if rerun else Action.STALE
        return PlannedStudy(remote, action, "; ".join(r.describe() for r in due), study_id)
    return PlannedStudy(remote, Action.DONE, "jobs " + ", ".join(sorted(states)), study_id)


def _missing(db: Database, study_id: int, remote: set[str]) -> set[str]:
    """The source's instances the node neither received nor produced."""
    if not remote:
        return set()
    with db.session() as s:
        here = set(
            s.scalars(select(Instance.sop_instance_uid).where(Instance.study_id == study_id))
        )
        ours = set(
            s.scalars(
                select(Output.sop_instance_uid)
                .join(Job, Output.job_id == Job.id)
                .where(Job.study_id == study_id, Output.sop_instance_uid.is_not(None))
            )
        )
    return remote - here - ours
