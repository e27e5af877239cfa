"""Retention: removing received instances and result files the node no longer needs.

The node is not an archive (the PACS is), yet every study it receives is patient data on its
disk. A sweep removes, by the ``[retention]`` settings:

* by age: the spool files of a study some days after its last job finished (the number of days
  depends on how its latest jobs ended: ``done``, ``failed``, ``skipped``), and a job's result
  files some days after it finished;
* under disk pressure: when the spool's file system is fuller than the high watermark (or its
  free space comes within ``floor_margin_bytes`` of the C-STORE floor, ``scp.min_free_bytes``),
  whatever is allowed, oldest first, before its age limit, until the file system is down to the
  low watermark. The floor refuses C-STORE (A700); the sweep acts before it does.

What is allowed, checked again under a lock in the transaction that marks the rows:

* the instances of a study whose jobs are all terminal (done, failed, skipped, cancelled) and
  that has no instance a job has not seen yet (``studies.dirty``);
* the result files of a terminal job delivered to every destination it names (a ``done``
  ``deliveries`` row per destination): a result still to be delivered, or one whose delivery
  failed, stays.

Rows are kept: they are patient-free, and the study's history, jobs and deliveries stay
readable. ``instances.purged_at`` / ``outputs.purged_at`` say when the file went. A late
instance of a purged study is received as usual and makes a new job version, over the instances
still on disk. Each sweep that removed something, or found the disk under pressure, is one audit
record with counts (never identifiers); ``/metrics`` reports the spool's bytes and what was
purged (:func:`metric_families`).

``dicom-node cleanup`` runs one sweep (``--dry-run`` says what it would remove); ``dicom-node
serve`` runs :class:`RetentionSweeper`.
"""

from __future__ import annotations

from dicom_node.retention.policy import Candidate, DiskState, disk_state
from dicom_node.retention.sweep import SweepReport, sweep
from dicom_node.retention.sweeper import RetentionSweeper, metric_families

__all__ = [
    "Candidate",
    "DiskState",
    "RetentionSweeper",
    "SweepReport",
    "disk_state",
    "metric_families",
    "sweep",
]
