"""The job core: the only place that creates jobs and changes their rows.

* :mod:`dicom_node.jobs.lease` — claiming a job to run or to deliver, renewing and checking the
  lease, finishing;
* :mod:`dicom_node.jobs.records` — outputs and delivery attempts, written only by the lease
  holder;
* :mod:`dicom_node.jobs.lineage` — result versions: which earlier result set a job's results
  supersede;
* :mod:`dicom_node.jobs.lifecycle` — creating jobs, handing them back for a retry or the next
  delivery attempt, cancel and retry by an operator.

A job runs in two phases that may be on different machines: a model worker claims it, loads the
study, runs the model, encodes the results, puts them in the central result store
(:mod:`dicom_node.results_store`) and records them; a delivery worker, where the store is,
claims it again to send the results (:mod:`dicom_node.delivery.phase`). See
``docs/deployment.md`` for the layouts.
"""

from dicom_node.jobs.lease import (
    ACTIVE_STATES,
    Claim,
    ClaimOutcome,
    Lease,
    LeaseLost,
    claim,
    finish,
    held_job,
    holds,
    renew,
    update_job,
)
from dicom_node.jobs.lifecycle import (
    SUPERSEDED_UNFINISHED,
    JobSpec,
    cancel,
    cancel_unfinished_predecessor,
    create_job,
    job_id_for,
    park_for_delivery,
    release_for_retry,
    rerun_for_missing_results,
    retry,
    study_key_of,
)
from dicom_node.jobs.lineage import Lineage, ResultRef, result_lineage
from dicom_node.jobs.records import (
    DeliveryStatus,
    OpenDelivery,
    OutputRecord,
    Recorded,
    StoredOutput,
    delivery_status,
    open_deliveries,
    outputs_of,
    record_attempt,
    record_outputs,
)

__all__ = [
    "ACTIVE_STATES",
    "SUPERSEDED_UNFINISHED",
    "Claim",
    "ClaimOutcome",
    "DeliveryStatus",
    "JobSpec",
    "Lease",
    "LeaseLost",
    "Lineage",
    "OpenDelivery",
    "OutputRecord",
    "Recorded",
    "ResultRef",
    "StoredOutput",
    "cancel",
    "cancel_unfinished_predecessor",
    "claim",
    "create_job",
    "delivery_status",
    "finish",
    "held_job",
    "holds",
    "job_id_for",
    "open_deliveries",
    "outputs_of",
    "park_for_delivery",
    "record_attempt",
    "record_outputs",
    "release_for_retry",
    "renew",
    "rerun_for_missing_results",
    "result_lineage",
    "retry",
    "study_key_of",
    "update_job",
]
