"""Key Object Selection "Of Interest" (highdicom ``ko``): which images a reader should look at.

A PACS that shows no SR and no SEG usually still honours key image notes (IHE Key Image Note
profile): it marks the flagged images or opens the study on them. One Key Object Selection
document (PS3.3 A.35.4, TID 2010) per result flags:

* the source image of each finding's key slice (the image the SR draws it on), once each;
* the Secondary Capture key images and the presentation state, when they were made.

**Which title.** (DCM 113000, "Of Interest") from PS3.16 CID 7010 "Key Object Selection Document
Title": the general flag for images worth a reader's attention. Not (113001 ...) and its
siblings from CID 7011, which are rejection notes: a PACS that implements IHE IOCM would hide
the flagged source images, which is what ``workers.results.kos`` does to superseded results.

The internal kind is ``key-images``, not ``kos``: ``kos`` is that rejection note. The observer
is the algorithm (its Device UID, as in the SR), the description says the selection is AI
output not verified, and the identity is every result's.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset

from workers.findings import DetectionResult
from workers.results.identity import (
    JobContext,
    OutputIdentity,
    contributing_equipment,
    display_version,
    stamp_dates,
)
from workers.results.key_slices import key_slices
from workers.results.sources import source_images
from workers.results.sr import algorithm_observer
from workers.volume import Volume

OF_INTEREST = ("113000", "DCM", "Of Interest")
"""PS3.16 CID 7010 title of the key image note (see the module doc for why this one)."""


def build_key_image_note(
    volume: Volume,
    result: DetectionResult,
    job: JobContext,
    identity: OutputIdentity,
    derived: list[Dataset] | None = None,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """The key image note for ``result``, also flagging ``derived`` (the Secondary Capture
    images and the presentation state made for it); ``None`` without findings."""
    if not result.findings:
        return None
    sources = source_images(volume)
    flagged: dict[str, Dataset] = {}
    for key in key_slices(result, sources):
        flagged.setdefault(str(key.image.SOPInstanceUID), key.image)
    referenced = [*flagged.values(), *(derived or [])]
    model = job.model
    content = hd.ko.KeyObjectSelection(
        document_title=hd.sr.CodedConcept(*OF_INTEREST),
        referenced_objects=referenced,
        observer_device_context=algorithm_observer(job),
        description=(
            f"Key images of {len(result.findings)} finding(s) of the AI algorithm {model.name} "
            f"{display_version(model.version)}; AI result, not verified by a physician."
        )[:1024],
    )
    node = job.node
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=model.manufacturer[:64],
        institution_name=node.institution_name,
    )
    note.SeriesDescription = identity.series_description
    note.ManufacturerModelName = model.name[:64]
    note.SoftwareVersions = model.version[:64]
    note.StationName = node.ae_title[:16]
    note.ContributingEquipmentSequence = contributing_equipment(job)  # type: ignore[assignment]
    stamp_dates(note, job)
    return note
