"""Where a worker reads a study's instances from.

Workers may run on other machines, so they never assume the edge's disk. A source yields local
Part 10 files for the instances of the selected series:

* :class:`SpoolSource` — the node's spool, when the worker shares it (same machine or a shared
  file system);
* :class:`DicomWebSource` — WADO-RS from the node's own DICOMweb endpoint, cached per job in
  the worker's data directory.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.dataset_io import DEFAULT_MAX_DECODED_BYTES, open_part10
from dicom_node.errors import IngestError, JobError
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database, Instance, Series

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceRef:
    sop_instance_uid: str
    series_instance_uid: str
    spool_path: str
    sha256: str


class Source(Protocol):
    name: str

    def fetch(self, series: dict[str, list[InstanceRef]]) -> dict[str, list[Path]]:
        """Local files per series UID (same order as given)."""
        ...

    def cleanup(self) -> None: ...


def instance_refs(
    db: Database, study_id: int, series_uids: list[str]
) -> dict[str, list[InstanceRef]]:
    """The indexed instances of the given series of a study."""
    out: dict[str, list[InstanceRef]] = {uid: [] for uid in series_uids}
    with db.session() as s:
        rows = s.execute(
            select(
                Instance.sop_instance_uid,
                Series.series_instance_uid,
                Instance.path,
                Instance.sha256,
            )
            .join(Series, Series.id == Instance.series_id)
            .where(
                Instance.study_id == study_id,
                Series.series_instance_uid.in_(series_uids),
                Instance.purged_at.is_(None),  # removed by retention: not part of a new input set
            )
            .order_by(Instance.id)
        ).all()
    for sop, series, path, sha in rows:
        out[series].append(InstanceRef(sop, series, path, sha))
    return out


class SpoolSource:
    name = "spool"

    def __init__(self, settings: Settings) -> None:
        self.spool = Spool(settings.spool_dir, fsync=False)

    def fetch(self, series: dict[str, list[InstanceRef]]) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for uid, refs in series.items():
            paths = []
            for ref in refs:
                path = self.spool.path(ref.spool_path)
                if not path.is_file():
                    raise JobError(
                        "an input instance is missing from the spool (is the spool shared with this worker?)"
                    )
                paths.append(path)
            out[uid] = paths
        return out

    def cleanup(self) -> None:
        return None


class DicomWebSource:
    """WADO-RS from the node (``worker.node_url``), so no shared disk is needed."""

    name = "dicomweb"

    def __init__(self, settings: Settings, job_id: str) -> None:
        if not settings.worker.node_url:
            raise JobError("worker.source is dicomweb but worker.node_url is not set")
        self.base = settings.worker.node_url.rstrip("/") + "/dicom-web"
        self.token = (
            settings.worker.node_token.get_secret_value() if settings.worker.node_token else None
        )
        self.cache = settings.data_dir / "worker-cache" / job_id
        self.study_uid: str | None = None

    def fetch(self, series: dict[str, list[InstanceRef]]) -> dict[str, list[Path]]:
        from dicomweb_client.api import DICOMwebClient

        if self.study_uid is None:
            raise JobError("study UID not set for the DICOMweb source")
        self.cache.mkdir(parents=True, exist_ok=True)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        client = DICOMwebClient(self.base, headers=headers)
        out: dict[str, list[Path]] = {}
        for uid, refs in series.items():
            paths = []
            for i, ref in enumerate(refs):
                target = self.cache / f"{i:05d}-{ref.sha256[:16]}.dcm"
                if not target.exists():
                    try:
                        ds = client.retrieve_instance(
                            self.study_uid,
                            uid,
                            ref.sop_instance_uid,
                            media_types=(("application/dicom", "*"),),
                        )
                    except Exception as exc:  # HTTPError, connection errors
                        raise JobError(
                            f"WADO-RS from the node failed: {type(exc).__name__}"
                        ) from None
                    partial = target.with_suffix(".part")
                    ds.save_as(partial, enforce_file_format=True)
                    partial.replace(target)
                paths.append(target)
            out[uid] = paths
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)


def read_headers(paths: list[Path], *, limit: int = DEFAULT_MAX_DECODED_BYTES) -> list[Dataset]:
    """Headers without pixel data (for series selection and encoders), read within ``limit``
    inflated bytes (:func:`dicom_node.dataset_io.open_part10`)."""
    try:
        return [open_part10(p, limit=limit).dataset for p in paths]
    except IngestError as exc:
        raise JobError(f"an input instance is refused: {exc}") from None


def make_source(settings: Settings, job_id: str, study_instance_uid: str) -> Source:
    mode = settings.worker.source
    if mode == "auto":
        mode = "spool" if settings.spool_dir.is_dir() else "dicomweb"
    if mode == "spool":
        return SpoolSource(settings)
    source = DicomWebSource(settings, job_id)
    source.study_uid = study_instance_uid
    return source
