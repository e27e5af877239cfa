"""The source images behind a volume, prepared for highdicom.

Encoders copy patient and study attributes from the source images. Real scanner output is often
slightly non-conformant (the GE series in the test data lacks the Type 2 PatientBirthDate and
PatientSex, and says its identity was removed without naming the method); copied verbatim, those
defects would make every SEG and SR we send fail validation. So the encoders work on *copies* of
the headers with such inherited defects repaired in the least inventive way: a missing Type 2
attribute becomes present and empty, a malformed patient or study value is emptied or left out
(``workers.results.carry``), and an unnamed de-identification method is stated as unknown. The
caller's volume is never modified.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.errors import JobError
from workers.findings import DetectionResult
from workers.results.carry import TYPE2_FROM_SOURCE, carry_safely
from workers.volume import Volume

DEIDENTIFICATION_UNKNOWN = "Not stated in the source images"

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceImages:
    """The volume's source instances, repaired copies, and where each slice comes from."""

    datasets: list[Dataset]
    """Distinct source instances in slice order (one per slice for single-frame series)."""
    slice_image: list[Dataset]
    """For slice ``k``: its source instance (an element of ``datasets``)."""
    slice_frame: list[int | None]
    """For slice ``k``: its 1-based frame number in a multi-frame instance, else None."""

    @property
    def multiframe(self) -> bool:
        return any(f is not None for f in self.slice_frame)


def _repaired(header: Dataset, changed: set[str]) -> Dataset:
    ds = copy.deepcopy(header)
    # highdicom reads geometry from the headers only; without pixel data the copies stay small.
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    changed.update(carry_safely(ds))
    for keyword in TYPE2_FROM_SOURCE:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if (
        str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not ds.get("DeidentificationMethod")
        and not ds.get("DeidentificationMethodCodeSequence")
    ):
        ds.DeidentificationMethod = DEIDENTIFICATION_UNKNOWN
    return ds


def source_images(volume: Volume) -> SourceImages:
    """Repaired copies of the volume's source instances, mapped to its slices.

    Raises :class:`~dicom_node.errors.JobError` when the headers do not line up with the
    volume (masks and key slices are indexed by source slice), or when slices come from
    several multi-frame instances (one SEG cannot reference frames of several of them).
    """
    headers = list(volume.headers)
    if len(headers) != volume.shape[0] or len(volume.slices) != volume.shape[0]:
        raise JobError(
            f"volume has {volume.shape[0]} slices but {len(headers)} headers and "
            f"{len(volume.slices)} slice records; cannot map results to source images"
        )
    by_uid: dict[str, Dataset] = {}
    changed: set[str] = set()
    slice_image: list[Dataset] = []
    slice_frame: list[int | None] = []
    for k, (header, src) in enumerate(zip(headers, volume.slices, strict=True)):
        if str(getattr(header, "SOPInstanceUID", "")) != src.sop_instance_uid:
            raise JobError(f"header {k} does not belong to source slice {k}")
        if src.sop_instance_uid not in by_uid:
            by_uid[src.sop_instance_uid] = _repaired(header, changed)
        slice_image.append(by_uid[src.sop_instance_uid])
        slice_frame.append(src.frame_number)
    if changed:
        LOGGER.info(
            "malformed source values not carried into the results: %s", ", ".join(sorted(changed))
        )
    images = SourceImages(datasets=list(by_uid.values()), slice_image=slice_image, slice_frame=slice_frame)
    if images.multiframe and (len(images.datasets) != 1 or None in slice_frame):
        raise JobError("slices from several multi-frame instances (or mixed with single frames) cannot be encoded")
    return images


def check_result_matches(volume: Volume, result: DetectionResult) -> None:
    """Refuse findings that cannot belong to ``volume`` (wrong series, shapes, key slices)."""
    if result.series_instance_uid != volume.series_instance_uid:
        raise JobError("detection result is for a different series than the volume")
    k_max = volume.shape[0]
    for n, finding in enumerate(result.findings, start=1):
        if not 0 <= int(finding.key_slice) < k_max:
            raise JobError(f"finding {n}: key slice {finding.key_slice} outside the volume (0..{k_max - 1})")
        for name in ("mask", "probability"):
            arr = getattr(finding, name)
            if arr is not None and tuple(arr.shape) != volume.shape:
                raise JobError(f"finding {n}: {name} shape {tuple(arr.shape)} differs from volume {volume.shape}")
