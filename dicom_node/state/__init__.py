"""The state database (SQLAlchemy): index of received instances, jobs, deliveries, audit."""

from dicom_node.state.database import Database, open_database
from dicom_node.state.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    DuplicateEvent,
    Instance,
    Job,
    JobState,
    ModelVersion,
    Outbox,
    Output,
    ProbeResult,
    Series,
    Study,
    utcnow,
)

__all__ = [
    "AuditEvent",
    "Database",
    "Delivery",
    "DeliveryState",
    "DuplicateEvent",
    "Instance",
    "Job",
    "JobState",
    "ModelVersion",
    "Outbox",
    "Output",
    "ProbeResult",
    "Series",
    "Study",
    "open_database",
    "utcnow",
]
