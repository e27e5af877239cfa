"""The model runtime's contract: a :class:`Detector` turns a volume into findings.

Detectors come from Python entry points (group ``dicom_node.models``) or from a model folder
(TorchScript file + model card); ``workers.models.registry.get_detector`` finds and loads them,
once per worker process, lazily after fork.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from workers.findings import CodedConcept, DetectionResult
from workers.volume import Volume


@dataclass(frozen=True)
class InputRequirements:
    """What series a model accepts; used by series selection (reasons recorded on rejection)."""

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 16
    max_slice_thickness_mm: float | None = 3.0
    """Thinner is preferred when several series qualify."""
    axial_only: bool = True
    preferred_kernels: tuple[str, ...] = ()
    """ConvolutionKernel values (regex, case-insensitive) preferred when several qualify."""
    max_voxels: int = 1024 * 1024 * 1024
    """Refuse larger volumes before allocating (pixel bombs)."""


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model, as written into outputs (algorithm identification, IHE AIR)."""

    name: str
    version: str
    family: CodedConcept
    """Algorithm family (CID 7162), e.g. Artificial Intelligence."""
    description: str = ""
    manufacturer: str = "dicom-node"
    weights_sha256: str | None = None
    labels: tuple[CodedConcept, ...] = field(default_factory=tuple)
    queue: str = "cpu"
    """Celery queue: jobs of this model go to workers consuming it (e.g. "gpu")."""


@runtime_checkable
class Detector(Protocol):
    """A detection model."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def requirements(self) -> InputRequirements: ...

    def predict(self, volume: Volume) -> DetectionResult:
        """Find objects in ``volume``. Must not keep references to it after returning."""
        ...
