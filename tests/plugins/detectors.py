"""Detectors for pipeline and fault tests, loaded through the ``plugin = "module:attr"`` setting.

They are real detectors as far as the pipeline is concerned (they get a real Volume and return a
real DetectionResult that is encoded and delivered); they only make timing and failure modes
controllable: ``SlowDetector`` takes a configurable time, ``CrashingDetector`` kills its own
process (a segfault or OOM kill, as far as Celery can tell).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np

from workers.findings import LUNG, NODULE, CodedConcept, DetectionResult, Finding
from workers.models.base import InputRequirements, ModelInfo
from workers.volume import Volume

ARTIFICIAL_INTELLIGENCE = CodedConcept("123109", "DCM", "Artificial Intelligence")


class SlowDetector:
    """Finds one 'nodule' at the volume centre after sleeping ``options.seconds``."""

    def __init__(self, cfg: Any = None) -> None:
        options = dict(getattr(cfg, "options", {}) or {})
        self.seconds = float(options.get("seconds", 0.0))
        self.version = str(options.get("version", "1.0.0"))
        self.findings = int(options.get("findings", 1))

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="test-slow", version=self.version, family=ARTIFICIAL_INTELLIGENCE, description="test detector")

    @property
    def requirements(self) -> InputRequirements:
        return InputRequirements(min_slices=4, max_slice_thickness_mm=None)

    def predict(self, volume: Volume) -> DetectionResult:
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
        k, j, i = volume.shape
        findings = []
        if self.findings:
            ck, cj, ci = k // 2, j // 2, i // 2
            zz, yy, xx = np.ogrid[:k, :j, :i]
            r = max(2, min(j, i) // 10)
            mask = ((zz - ck) ** 2 * 4 + (yy - cj) ** 2 + (xx - ci) ** 2) <= r * r
            findings.append(
                Finding(
                    label=NODULE,
                    site=LUNG,
                    confidence=0.9,
                    center_ijk=(float(ck), float(cj), float(ci)),
                    center_mm=volume.index_to_patient(ck, cj, ci),
                    key_slice=ck,
                    bbox_2d=(ci - r, cj - r, ci + r, cj + r),
                    diameter_mm=2 * r * volume.pixel_spacing[0],
                    volume_mm3=float(mask.sum()) * float(np.prod(volume.spacing)),
                    mask=mask,
                    kind="solid",
                )
            )
        return DetectionResult(
            model_name=self.info.name,
            model_version=self.info.version,
            series_instance_uid=volume.series_instance_uid,
            findings=findings,
            runtime_seconds=self.seconds,
        )


class CrashingDetector(SlowDetector):
    """Kills the process that runs it: a poison study, every time."""

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="test-crash", version="1.0.0", family=ARTIFICIAL_INTELLIGENCE)

    def predict(self, volume: Volume) -> DetectionResult:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")
