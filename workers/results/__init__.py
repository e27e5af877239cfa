"""Result encoding: a detection result becomes DICOM objects the PACS and the viewer accept.

The job pipeline (``workers/pipeline.py``) calls::

    objects = encode_results(volume, result, job, options)  # SR (+ SEG), checked by the gate
    store_outputs(settings, job_id, owner, objects, summary)  # into the central result store

Every (re)send then ships those stored files as they are (``dicom_node.delivery.phase``), so a
resend is byte-identical to the first. :func:`write_results` / :func:`load_results` write and
read a folder of them for callers outside a job (tests, tools).

* ``"sr"``: the TID 1500 Comprehensive 3D SR for viewers (always one; says "without findings"
  when there are none).
* ``"seg"``: the Segmentation (when at least one finding has a non-empty mask).
* ``"sr-volumetric"``: only with ``EncodeOptions(volumetric_sr=True)`` and a SEG.
* ``"sc"``, ``"gsps"``, ``"key-images"``: only when asked for in
  ``EncodeOptions(extra_outputs=...)`` (the job's destinations' ``outputs``) and there are
  findings: Secondary Capture key images with the box and an "AI result - not verified" banner
  burned in (``sc``, one per finding, several instances of one series), a Grayscale Softcopy
  Presentation State drawing the boxes on the source images (``gsps``) and a Key Object
  Selection "Of Interest" flagging the key source images and those objects (``key_images``).
* ``"kos"``: when the job supersedes an earlier result set (``JobContext.superseded``), the
  IHE IOCM rejection note that withdraws it (``kos``); sent where a destination's
  ``supersede`` policy is ``kos``.

UIDs are derived from (study, input-set hash, model name/version/weights, kind, encoding
profile), and every date and time comes from ``job.content_datetime``, so the same job
encoded twice gives the same bytes. See ``identity``, ``seg``, ``sr`` and ``conformance``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from dicom_node.errors import DicomNodeError, JobError
from dicom_node.phi import describe_exception
from workers.findings import CodedConcept, DetectionResult
from workers.results.conformance import (
    ConformanceError,
    DciodvfyReport,
    SourceFacts,
    check_object,
    dciodvfy_errors,
    object_problems,
    run_dciodvfy,
)
from workers.results.gsps import build_presentation_state
from workers.results.identity import (
    KIND_GSPS,
    KIND_KEY_IMAGES,
    KIND_KOS,
    KIND_SC,
    KIND_SEG,
    KIND_SR,
    KIND_SR_VOLUMETRIC,
    JobContext,
    NodeIdentity,
    OutputIdentity,
    output_identity,
)
from workers.results.key_images import build_key_image_note
from workers.results.kos import build_rejection_note
from workers.results.objects import EncodedObject, load_results, write_results
from workers.results.sc import build_key_images
from workers.results.seg import BINARY, FRACTIONAL, SEGMENTATION_TYPES, build_segmentation
from workers.results.sources import check_result_matches
from workers.results.sr import ROI_SHAPES, build_viewer_sr, build_volumetric_sr
from workers.volume import Volume

__all__ = [
    "BINARY",
    "EXTRA_OUTPUTS",
    "FRACTIONAL",
    "KIND_GSPS",
    "KIND_KEY_IMAGES",
    "KIND_KOS",
    "KIND_SC",
    "KIND_SEG",
    "KIND_SR",
    "KIND_SR_VOLUMETRIC",
    "ConformanceError",
    "DciodvfyReport",
    "EncodeOptions",
    "EncodedObject",
    "JobContext",
    "NodeIdentity",
    "OutputIdentity",
    "SourceFacts",
    "check_object",
    "dciodvfy_errors",
    "encode_results",
    "expected_identities",
    "load_results",
    "object_problems",
    "run_dciodvfy",
    "write_results",
]


EXTRA_OUTPUTS = frozenset({KIND_SC, KIND_GSPS, KIND_KEY_IMAGES})
"""Kinds made only on request (``EncodeOptions.extra_outputs``), for viewers beyond OHIF."""


@dataclass(frozen=True)
class EncodeOptions:
    """How results are encoded. Options that change the content also change the UIDs."""

    segmentation_type: str = BINARY
    """BINARY (default; what OHIF displays) or FRACTIONAL (from ``Finding.probability``)."""
    roi_shape: str = "box"
    """2D SCOORD in the viewer SR: ``"box"`` (closed POLYLINE), ``"ellipse"`` or ``"point"``."""
    volumetric_sr: bool = False
    """Also write the SEG-referencing volumetric SR (a separate series; OHIF cannot show it)."""
    series_numbers: tuple[tuple[str, int], ...] = ()
    """Overrides of the default series numbers, e.g. ``(("sr", 901), ("seg", 902))``."""
    procedure_reported: CodedConcept | None = None
    """TID 1500 Procedure Reported; default from the modality (CID 100)."""
    check: bool = True
    """Run the conformance gate on every object (raise ConformanceError on failure)."""
    dciodvfy: bool = False
    """Also require zero dciodvfy errors at run time, when dciodvfy is installed."""
    extra_outputs: frozenset[str] = frozenset()
    """Which of :data:`EXTRA_OUTPUTS` to make as well (``"sc"``, ``"gsps"``, ``"key-images"``)."""

    def profile(self, kind: str) -> str:
        """The part of the options that shapes ``kind``'s content (goes into its UIDs)."""
        if kind == KIND_SEG:
            return f"seg={self.segmentation_type}"
        if kind == KIND_SR:
            return f"roi={self.roi_shape}"
        if kind in (KIND_KOS, KIND_SC, KIND_GSPS):
            return ""
        if kind == KIND_KEY_IMAGES:
            # The note also flags the SC images and the GSPS when they are made.
            return "with=" + ",".join(sorted(self.extra_outputs & {KIND_SC, KIND_GSPS}))
        return f"seg={self.segmentation_type}"


def expected_identities(job: JobContext, options: EncodeOptions | None = None) -> dict[str, OutputIdentity]:
    """The deterministic identity of each output kind of ``job`` (what will be / was sent)."""
    options = options or EncodeOptions()
    numbers = dict(options.series_numbers)
    return {
        kind: output_identity(job, kind, profile=options.profile(kind), series_number=numbers.get(kind))
        for kind in (KIND_SR, KIND_SEG, KIND_SR_VOLUMETRIC, KIND_KOS, KIND_SC, KIND_GSPS, KIND_KEY_IMAGES)
    }


_OBJECT_NAMES = {
    KIND_SR: "the SR",
    KIND_SEG: "the SEG",
    KIND_SR_VOLUMETRIC: "the volumetric SR",
    KIND_KOS: "the rejection note",
    KIND_SC: "the key images",
    KIND_GSPS: "the presentation state",
    KIND_KEY_IMAGES: "the key image note",
}


@contextlib.contextmanager
def _building(kind: str) -> Iterator[None]:
    """Turn a library's failure while building ``kind`` into a patient-free :class:`JobError`.

    highdicom and pydicom quote the offending dataset value in their messages, and encoding the
    same inputs again fails the same way, so the job fails now with the object and the
    exception type as its reason (the cause stays chained for the traceback in the log).
    """
    try:
        yield
    except DicomNodeError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, ArithmeticError) as exc:
        raise JobError(f"building {_OBJECT_NAMES[kind]} failed: {describe_exception(exc)}") from exc


def encode_results(
    volume: Volume,
    result: DetectionResult,
    job: JobContext,
    options: EncodeOptions | None = None,
) -> list[EncodedObject]:
    """Encode ``result`` (found in ``volume``) as DICOM objects, checked by the conformance gate.

    Returns the viewer SR first, then the SEG (if any finding has a mask), then the volumetric
    SR (if asked for and there is a SEG), then, when asked for and there are findings, the
    Secondary Capture key images, the presentation state and the key image note, then the
    rejection note of the superseded result set
    (if the job supersedes one; the new objects come first, so they are stored before the old
    ones are withdrawn). Raises :class:`~dicom_node.errors.JobError`
    (``ConformanceError`` among them) with a patient-free reason when the result cannot be
    encoded or an object fails the gate.
    """
    options = options or EncodeOptions()
    if (result.model_name, result.model_version) != (job.model.name, job.model.version):
        raise ValueError("the detection result was made by a different model than the job names")
    if volume.study_instance_uid != job.study_instance_uid:
        raise ValueError("the volume belongs to a different study than the job")
    check_result_matches(volume, result)
    if options.roi_shape not in ROI_SHAPES:
        raise ValueError(f"roi_shape must be one of {ROI_SHAPES}, got {options.roi_shape!r}")
    if options.segmentation_type not in SEGMENTATION_TYPES:
        raise ValueError(
            f"segmentation_type must be one of {SEGMENTATION_TYPES}, got {options.segmentation_type!r}"
        )
    unknown = set(options.extra_outputs) - EXTRA_OUTPUTS
    if unknown:
        raise ValueError(f"extra_outputs must be among {sorted(EXTRA_OUTPUTS)}, got {sorted(unknown)}")
    ids = expected_identities(job, options)

    with _building(KIND_SR):
        objects = [
            EncodedObject.from_dataset(
                KIND_SR,
                build_viewer_sr(
                    volume, result, job, ids[KIND_SR],
                    roi_shape=options.roi_shape, procedure=options.procedure_reported,
                ),
            )
        ]
    with _building(KIND_SEG):
        built = build_segmentation(
            volume, result, job, ids[KIND_SEG], segmentation_type=options.segmentation_type
        )
        seg_obj = None if built is None else EncodedObject.from_dataset(KIND_SEG, built[0])
    if built is not None and seg_obj is not None:
        segments = built[1]
        objects.append(seg_obj)
        if options.volumetric_sr:
            with _building(KIND_SR_VOLUMETRIC):
                objects.append(
                    EncodedObject.from_dataset(
                        KIND_SR_VOLUMETRIC,
                        build_volumetric_sr(
                            volume, result, job, ids[KIND_SR_VOLUMETRIC], seg_obj.dataset, segments,
                            procedure=options.procedure_reported,
                        ),
                    )
                )

    if result.findings:
        objects += _viewer_outputs(volume, result, job, options, ids)

    if job.superseded:
        with _building(KIND_KOS):
            objects.append(
                EncodedObject.from_dataset(KIND_KOS, build_rejection_note(volume, job, ids[KIND_KOS]))
            )

    if options.check:
        facts = SourceFacts.from_volume(volume, job)
        for obj in objects:
            check_object(
                obj, facts, job,
                expected=ids[obj.kind].instance(obj.number),
                finding_count=len(result.findings) if obj.kind == KIND_SR else None,
                dciodvfy=options.dciodvfy,
            )
    return objects


def _viewer_outputs(
    volume: Volume,
    result: DetectionResult,
    job: JobContext,
    options: EncodeOptions,
    ids: dict[str, OutputIdentity],
) -> list[EncodedObject]:
    """The asked-for outputs for viewers beyond OHIF: SC key images, GSPS, key image note."""
    made: list[EncodedObject] = []
    if KIND_SC in options.extra_outputs:
        with _building(KIND_SC):
            made += [
                EncodedObject.from_dataset(KIND_SC, image, number)
                for number, image in enumerate(build_key_images(volume, result, job, ids[KIND_SC]), start=1)
            ]
    if KIND_GSPS in options.extra_outputs:
        with _building(KIND_GSPS):
            gsps = build_presentation_state(volume, result, job, ids[KIND_GSPS])
            if gsps is not None:
                made.append(EncodedObject.from_dataset(KIND_GSPS, gsps))
    if KIND_KEY_IMAGES in options.extra_outputs:
        with _building(KIND_KEY_IMAGES):
            note = build_key_image_note(
                volume, result, job, ids[KIND_KEY_IMAGES], [obj.dataset for obj in made]
            )
            if note is not None:
                made.append(EncodedObject.from_dataset(KIND_KEY_IMAGES, note))
    return made
