"""A detector whose result depends on every input voxel, for "same input, same output" tests.

It reports one finding at the brightest voxel, with a confidence derived from a hash of the
whole volume: two workers report the same finding only if they loaded the same pixels, the
same geometry and the same slice order.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from tests.plugins.detectors import ARTIFICIAL_INTELLIGENCE, SlowDetector
from workers.findings import LUNG, NODULE, DetectionResult, Finding
from workers.models.base import ModelInfo
from workers.volume import Volume


class FingerprintDetector(SlowDetector):
    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name="test-fingerprint",
            version=self.version,
            family=ARTIFICIAL_INTELLIGENCE,
            description="test detector: finding at the brightest voxel",
        )

    def predict(self, volume: Volume) -> DetectionResult:
        data = np.ascontiguousarray(volume.array, dtype=np.float32)
        digest = hashlib.sha256(data.tobytes() + volume.positions.tobytes()).digest()
        confidence = 0.5 + 0.49 * int.from_bytes(digest[:4], "big") / 2**32
        k, j, i = (int(v) for v in np.unravel_index(int(np.argmax(data)), data.shape))
        r = 2
        zz, yy, xx = np.ogrid[: data.shape[0], : data.shape[1], : data.shape[2]]
        mask = ((zz - k) ** 2 * 4 + (yy - j) ** 2 + (xx - i) ** 2) <= r * r
        finding = Finding(
            label=NODULE,
            site=LUNG,
            confidence=confidence,
            center_ijk=(float(k), float(j), float(i)),
            center_mm=volume.index_to_patient(k, j, i),
            key_slice=k,
            bbox_2d=(i - r, j - r, i + r, j + r),
            diameter_mm=2 * r * volume.pixel_spacing[0],
            volume_mm3=float(mask.sum()) * float(np.prod(volume.spacing)),
            mask=mask,
            kind="solid",
        )
        return DetectionResult(
            model_name=self.info.name,
            model_version=self.info.version,
            series_instance_uid=volume.series_instance_uid,
            findings=[finding],
        )
