"""Backfill: pull from a PACS the studies the node missed, through the node's own ingest.

* :mod:`~dicom_node.backfill.source` resolves ``--from`` (a DICOMweb URL, ``dicom://AET@host:port``
  or a configured destination's name) to a :class:`~dicom_node.delivery.destinations.Destination`;
* :mod:`~dicom_node.backfill.query` finds the studies of a Study Date window: QIDO-RS (PS3.18
  10.6) or C-FIND, Study Root (PS3.4 C.6.2);
* :mod:`~dicom_node.backfill.plan` decides, per study, whether the node already has it and
  processed it with the model versions the workers run now, is still working on it, must
  re-run it (:func:`dicom_node.completion.rerun_study`: a new model version, or a rule added
  since) or must pull it;
* :mod:`~dicom_node.backfill.retrieve` pulls: WADO-RS (PS3.18 10.4) into
  :class:`~dicom_node.ingest.Ingestor`, the path C-STORE and STOW-RS take, or C-MOVE to the
  node's own AE title (PS3.4 C.4.2), which the node's C-STORE receiver takes;
* :mod:`~dicom_node.backfill.run` ties them together for ``dicom-node backfill``;
* :mod:`~dicom_node.backfill.schedule` runs the ``[[pull]]`` schedules inside ``serve``.

A pulled study then completes and routes exactly as if it had been sent: the completion timer
lives in the state database, so the running node picks it up (or the next one started).
"""

from dicom_node.backfill.plan import Action, PlannedStudy, plan_studies
from dicom_node.backfill.query import DateWindow, RemoteStudy, SourceUnreachable, find_studies
from dicom_node.backfill.run import BackfillReport, run_backfill
from dicom_node.backfill.source import resolve_source

__all__ = [
    "Action",
    "BackfillReport",
    "DateWindow",
    "PlannedStudy",
    "RemoteStudy",
    "SourceUnreachable",
    "find_studies",
    "plan_studies",
    "resolve_source",
    "run_backfill",
]
