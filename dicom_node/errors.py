"""The node's operational errors: one small hierarchy.

Programmer mistakes raise built-in ``TypeError``/``ValueError``. Everything an operator may see
derives from :class:`DicomNodeError`::

    DicomNodeError
    ├── ConfigError                 settings invalid; the message names the setting and why
    ├── IngestError                 an incoming instance is refused (carries a DIMSE status)
    │   ├── InvalidInstanceError    cannot be parsed, lacks or has malformed UIDs (Cxxx / A900)
    │   └── StorageError            spool unwritable, full or over a size cap (A700)
    ├── JobError                    a job cannot run; the job fails with this reason
    │   ├── NoInputError            nothing in the study qualifies for the model
    │   ├── ModelError              a model cannot be loaded or fails
    │   │   └── ModelLoadError
    │   └── ConformanceError        an output object fails the conformance gate
    └── DeliveryError               write-back failed
        ├── TransientDeliveryError  worth retrying (refused, timeout, 5xx, 408/429, A7xx)
        └── PermanentDeliveryError  not worth retrying (other 4xx, A9xx, Cxxx)

Messages never contain patient data: they name internal keys (study key, job id), not
names, IDs or UIDs. Every class is picklable (Celery may carry them between processes).
"""

from __future__ import annotations

from dicom_node.dimse_status import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES


class DicomNodeError(Exception):
    """Root of the node's operational errors."""

    transient = False
    """True when retrying the same operation later may succeed."""


class ConfigError(DicomNodeError):
    """The settings are invalid."""


class IngestError(DicomNodeError):
    """An incoming instance is refused; ``status`` is the DIMSE status to return."""

    status = STATUS_CANNOT_UNDERSTAND

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (str(self), self.status))


class InvalidInstanceError(IngestError):
    """The dataset cannot be understood (C000 family) or disagrees with the command (A900)."""

    status = STATUS_CANNOT_UNDERSTAND


class StorageError(IngestError):
    """The instance cannot be stored now: out of resources (A700). Transient for the sender."""

    status = STATUS_OUT_OF_RESOURCES
    transient = True


class JobError(DicomNodeError):
    """A job cannot complete; the message becomes the job's recorded reason."""


class NoInputError(JobError):
    """No series in the study qualifies for the model."""


class ModelError(JobError):
    """A model failed."""


class ModelLoadError(ModelError):
    """A model cannot be loaded (missing file, bad card, weights hash mismatch)."""


class ConformanceError(JobError):
    """An output object failed the conformance gate and was not sent."""


class DeliveryError(DicomNodeError):
    """Write-back to a destination failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (str(self), self.status))


class TransientDeliveryError(DeliveryError):
    """Retry later with backoff."""

    transient = True


class PermanentDeliveryError(DeliveryError):
    """Retrying will not help; the delivery fails with this reason."""
