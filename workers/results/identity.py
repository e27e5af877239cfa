"""Who made a result and what it is called: deterministic UIDs, series naming, IHE AIR provenance.

Everything here is a pure function of the job (study, input instance set, model identity, output
kind, encoding profile) and never of the clock or of randomness, so that encoding the same job
twice gives the same UIDs, and the same bytes. A retried or redelivered job therefore writes the
*same* objects into the PACS again instead of a second copy.

Provenance follows IHE AI Results (AIR) §6.5.3.1: each output carries a Contributing Equipment
item for the algorithm, with Purpose of Reference ``(Newcode1, 99IHE, "Processing Algorithm")``,
Manufacturer, Manufacturer's Model Name, Software Versions and a Device UID that changes whenever
the model changes (version or weights). A second item names the node itself as Processing
Equipment (DCM 109102).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DA, DT, TM

import dicom_node
from dicom_node.jobs import ResultRef
from dicom_node.uids import derive_uid, uid_problem
from workers.models.base import ModelInfo

# Output kinds (also the Part 10 file names written by ``write_results``).
KIND_SR = "sr"
KIND_SEG = "seg"
KIND_SR_VOLUMETRIC = "sr-volumetric"
KIND_KOS = "kos"
"""The IHE IOCM rejection note that withdraws the result set this job supersedes."""
KIND_SC = "sc"
"""Secondary Capture key images, one per finding (``workers.results.sc``)."""
KIND_GSPS = "gsps"
"""Grayscale Softcopy Presentation State drawing the findings (``workers.results.gsps``)."""
KIND_KEY_IMAGES = "key-images"
"""Key Object Selection "Of Interest" flagging the key images (``workers.results.key_images``);
not ``kos``, which is the rejection note."""
OUTPUT_KINDS = (KIND_SR, KIND_SEG, KIND_SR_VOLUMETRIC, KIND_KOS, KIND_SC, KIND_GSPS, KIND_KEY_IMAGES)

DEFAULT_SERIES_NUMBERS = {
    KIND_SR: 9001,
    KIND_SEG: 9002,
    KIND_SR_VOLUMETRIC: 9003,
    KIND_KOS: 9004,
    KIND_SC: 9005,
    KIND_GSPS: 9006,
    KIND_KEY_IMAGES: 9007,
}
"""High series numbers so the AI series sort after the acquired ones in viewers (version 1)."""

VERSION_SERIES_STEP = 10
"""Series numbers of result version ``n`` are the defaults plus ``10 * (n - 1)`` (9011, 9012...
for version 2), so a version's series sort together and after the one they supersede."""

# IHE RAD TF Suppl. AIR, §6.5.3.1: "Purpose of Reference Code Sequence (0040,A170) shall be
# (Newcode1, 99IHE, 1630 "Processing Algorithm")". The supplement has not been given a final
# code value; "Newcode1" is what it prints and what MONAI Deploy's AIR writer emits, so AIR
# consumers match on it. The "1630" in the printed tuple is not part of the code.
AIR_PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")

NODE_MANUFACTURER = "dicom-node"
_UID_NAMESPACE = "dicom-node/result/v1"

_LO_MAX = 64


@dataclass(frozen=True)
class NodeIdentity:
    """The node that produced a result (written as Processing Equipment and observer name)."""

    name: str = "dicom-node"
    """``settings.node_name``."""
    ae_title: str = "AINODE"
    """``settings.ae_title``; written as Station Name."""
    software_version: str = dicom_node.__version__
    institution_name: str | None = None

    @property
    def device_uid(self) -> str:
        """A stable UID for this node installation (from its name and AE title)."""
        return derive_uid(_UID_NAMESPACE, "node", self.name, self.ae_title)


@dataclass(frozen=True)
class JobContext:
    """What the encoders need to know about the job, beyond the volume and the findings.

    ``content_datetime`` must come from the job record (for example the time the job was
    created), never from ``datetime.now()`` at encoding time: it is written into the objects,
    so re-encoding with the same value gives the same bytes.
    """

    job_id: str
    """Internal job key; not written into the objects (a re-run must give the same objects)."""
    study_instance_uid: str
    input_hash: str
    """``dicom_node.uids.input_set_hash`` of the SOP Instance UIDs the model saw."""
    model: ModelInfo
    content_datetime: dt.datetime
    node_name: str = "dicom-node"
    """``settings.node_name``."""
    ae_title: str = "AINODE"
    """``settings.ae_title``."""
    institution_name: str | None = None
    result_version: int = 1
    """Which version of the study's results for this rule and model (``dicom_node.jobs.
    result_lineage``): written into series numbers and descriptions from version 2 on."""
    superseded: tuple[ResultRef, ...] = ()
    """The objects of the result set this job's results replace (empty for the first): the new
    SR names its predecessor, and a rejection note (kind ``kos``) withdraws them all."""
    generation: int = 0
    """``Job.generation``: how many times this input set was run again for the rule and model
    (``dicom_node.completion.rerun_study``). From 1 on it goes into the UIDs, so a re-run never
    sends objects whose UIDs an earlier rejection note withdrew (e.g. after rolling back to an
    earlier model version); generation 0 keeps the UIDs of the first run."""

    @property
    def node(self) -> NodeIdentity:
        return NodeIdentity(name=self.node_name, ae_title=self.ae_title, institution_name=self.institution_name)


@dataclass(frozen=True)
class OutputIdentity:
    """UIDs and naming of one output object."""

    kind: str
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    instance_number: int = 1
    """Which instance of the series (kinds with one instance per finding, e.g. ``sc``)."""

    def instance(self, number: int) -> OutputIdentity:
        """The identity of instance ``number`` (1-based) of this series: the same series, and
        for ``number > 1`` a SOP Instance UID derived from the first one."""
        if number < 1:
            raise ValueError(f"instance number must be at least 1, got {number}")
        if number == 1:
            return dataclasses.replace(self, instance_number=1)
        return dataclasses.replace(
            self,
            sop_instance_uid=derive_uid(_UID_NAMESPACE, self.sop_instance_uid, "instance", str(number)),
            instance_number=number,
        )


def _check_uid_part(name: str, value: str) -> None:
    problem = uid_problem(value)
    if problem:
        raise ValueError(f"{name} {problem}")


def _uid_parts(job: JobContext, kind: str, profile: str) -> tuple[str, ...]:
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {OUTPUT_KINDS}")
    _check_uid_part("study_instance_uid", job.study_instance_uid)
    if not job.input_hash:
        raise ValueError("input_hash is empty")
    parts = (
        _UID_NAMESPACE,
        job.study_instance_uid,
        job.input_hash,
        job.model.name,
        job.model.version,
        job.model.weights_sha256 or "",
        kind,
        profile,
    )
    return parts if job.generation == 0 else (*parts, f"generation={job.generation}")


def output_identity(
    job: JobContext, kind: str, *, profile: str = "", series_number: int | None = None
) -> OutputIdentity:
    """Deterministic UIDs, series number and description of the ``kind`` output of ``job``.

    ``profile`` names encoding options that change the content (e.g. FRACTIONAL instead of
    BINARY), so that different content never reuses a UID.
    """
    parts = _uid_parts(job, kind, profile)
    if job.result_version < 1:
        raise ValueError(f"result_version must be at least 1, got {job.result_version}")
    base = DEFAULT_SERIES_NUMBERS[kind] if series_number is None else series_number
    return OutputIdentity(
        kind=kind,
        series_instance_uid=derive_uid(*parts, "series"),
        sop_instance_uid=derive_uid(*parts, "instance"),
        series_number=base + VERSION_SERIES_STEP * (job.result_version - 1),
        series_description=series_description(job.model, kind, job.result_version),
    )


def tracking_uid(job: JobContext, index: int) -> str:
    """Tracking Unique Identifier of finding ``index`` (shared by its SEG segment and SR groups)."""
    parts = _uid_parts(job, KIND_SR, "")
    return derive_uid(*parts, "finding", str(index))


def algorithm_device_uid(model: ModelInfo) -> str:
    """Device UID of the algorithm: new for every model name, version or weights file (AIR)."""
    return derive_uid(_UID_NAMESPACE, "algorithm", model.name, model.version, model.weights_sha256 or "")


def display_version(version: str) -> str:
    """``1.2.0`` -> ``v1.2.0`` (no double ``v``)."""
    return version if version[:1] in ("v", "V") else f"v{version}"


_KIND_SUFFIX = {
    KIND_SR: "",
    KIND_SEG: " segmentation",
    KIND_SR_VOLUMETRIC: " volumes",
    KIND_KOS: " rejection note",
    KIND_SC: " key images, not verified",
    KIND_GSPS: " annotations, not verified",
    KIND_KEY_IMAGES: " key image note",
}


def series_description(model: ModelInfo, kind: str, result_version: int = 1) -> str:
    """Series Description that marks AI output, e.g. ``AI: lung-nodules (v1.2.0)``, and from
    the second result version on says which, e.g. ``AI: lung-nodules (v1.2.0) segmentation,
    result 2`` (version 1 keeps the plain form it always had)."""
    version = f", result {result_version}" if result_version > 1 else ""
    tail = f" ({display_version(model.version)}){_KIND_SUFFIX[kind]}{version}"
    room = _LO_MAX - len("AI: ") - len(tail)
    name = model.name if len(model.name) <= room else model.name[: max(room - 1, 1)] + "…"
    return f"AI: {name}{tail}"[:_LO_MAX]


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _lo(value: str) -> str:
    return value[:_LO_MAX]


def contributing_equipment(job: JobContext) -> DicomSequence:
    """Contributing Equipment Sequence per IHE AIR: the algorithm, then the node."""
    when = DT(_naive_or_aware(job.content_datetime))
    algorithm = Dataset()
    algorithm.Manufacturer = _lo(job.model.manufacturer)
    algorithm.ManufacturerModelName = _lo(job.model.name)
    algorithm.SoftwareVersions = _lo(job.model.version)
    algorithm.DeviceUID = algorithm_device_uid(job.model)
    algorithm.ContributionDateTime = when
    algorithm.ContributionDescription = "AI algorithm output, not verified by a physician"
    algorithm.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(AIR_PROCESSING_ALGORITHM)])

    node = Dataset()
    node.Manufacturer = NODE_MANUFACTURER
    if job.node.institution_name:
        node.InstitutionName = _lo(job.node.institution_name)
    node.StationName = job.node.ae_title[:16]
    node.ManufacturerModelName = _lo(job.node.name)
    node.SoftwareVersions = _lo(job.node.software_version)
    node.DeviceUID = job.node.device_uid
    node.ContributionDateTime = when
    node.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(PROCESSING_EQUIPMENT)])
    return DicomSequence([algorithm, node])


def _naive_or_aware(value: dt.datetime) -> dt.datetime:
    # DT keeps the UTC offset when the datetime is aware; microseconds are dropped so the
    # values are short and identical whatever the clock resolution of the job record.
    return value.replace(microsecond=0)


def stamp_dates(ds: Dataset, job: JobContext) -> None:
    """Set every date/time the encoders write from the job's content datetime (not the clock)."""
    when = _naive_or_aware(job.content_datetime)
    date, time = DA(when.date()), TM(when.time().replace(tzinfo=None))
    ds.ContentDate = date
    ds.ContentTime = time
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    offset = when.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        ds.TimezoneOffsetFromUTC = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
