"""The central result store: the files of each job's results, on the node's host.

Results are stored here before a job counts as encoded, and delivered only from here, so a
delivery (or a retry of one, days later) never depends on the machine that ran the model. A
worker that shares the node's data directory writes into the store directly; a worker on another
machine puts each file through the node's API (``PUT /api/jobs/{job_id}/results/{name}``, see
:mod:`dicom_node.api.routes.results`), which lands here the same way.

Layout: ``<results_dir>/<job id>/<name>``. Names come from the output kind (``sr.dcm``,
``seg.dcm``, ``summary.json``), never from a UID or anything received, and the job id is a UUID,
so no path can leave the results directory. Each file is written to a temporary name, checked
against the SHA-256 its producer computed, synced and renamed into place: a reader sees the whole
file or none.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import DicomNodeError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,31}\.(dcm|json|png)$")
"""Allowed result file names: a lower-case kind and one of our extensions."""


class ResultStoreError(DicomNodeError):
    """A result file cannot be stored (bad name, size, checksum) or read back."""


class ResultMissingError(ResultStoreError):
    """A recorded result file is not in the store, or not with the recorded bytes."""


@dataclass(frozen=True)
class StoredFile:
    """One file in the store."""

    name: str
    path: str
    """Relative to the results directory (what an ``Output`` row records)."""
    size: int
    sha256: str


def check_job_id(job_id: str) -> str:
    """``job_id`` in its canonical UUID form, or :class:`ResultStoreError`."""
    try:
        return str(uuid.UUID(job_id))
    except (ValueError, TypeError, AttributeError):
        raise ResultStoreError("not a job id") from None


def check_name(name: str) -> str:
    """``name`` if it is an allowed result file name, else :class:`ResultStoreError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise ResultStoreError("not a result file name (lower-case kind, .dcm/.json/.png)")
    return name


class ResultStore:
    """The result files under one results directory."""

    def __init__(self, results_dir: Path) -> None:
        self.root = Path(results_dir)

    def relative_path(self, job_id: str, name: str) -> str:
        return f"{check_job_id(job_id)}/{check_name(name)}"

    def path(self, relative: str) -> Path:
        """The absolute path of a recorded relative path (checked to stay in the store)."""
        job_id, _, name = relative.partition("/")
        return self.root / self.relative_path(job_id, name)

    def put(
        self,
        job_id: str,
        name: str,
        chunks: Iterable[bytes],
        *,
        max_bytes: int,
        expected_sha256: str | None = None,
    ) -> StoredFile:
        """Store one result file from ``chunks``; refuse more than ``max_bytes`` or bytes whose
        SHA-256 is not ``expected_sha256``. Storing the same bytes again is harmless."""
        relative = self.relative_path(job_id, name)
        size, sha = write_atomically(
            self.root / relative, chunks, max_bytes=max_bytes, expected_sha256=expected_sha256
        )
        return StoredFile(name=name, path=relative, size=size, sha256=sha)

    def put_bytes(self, job_id: str, name: str, data: bytes) -> StoredFile:
        """Store ``data`` (a worker that shares the node's data directory)."""
        return self.put(job_id, name, [data], max_bytes=len(data))

    def verified(self, relative: str, size: int, sha256: str) -> Path:
        """The path of a recorded file, checked to exist with the recorded size and SHA-256
        (:class:`ResultMissingError` otherwise)."""
        path = self.path(relative)
        try:
            if path.stat().st_size != size:
                raise ResultMissingError(f"result file {path.name} differs from the recorded one")
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            raise ResultMissingError(
                f"result file {path.name} is not in the result store"
            ) from None
        if digest.hexdigest() != sha256:
            raise ResultMissingError(f"result file {path.name} differs from the recorded one")
        return path


def write_atomically(
    target: Path,
    chunks: Iterable[bytes],
    *,
    max_bytes: int,
    expected_sha256: str | None = None,
) -> tuple[int, str]:
    """Write ``chunks`` to ``target``: a temporary file beside it, synced, checked (size, and
    SHA-256 when given), renamed into place, the folder synced. Returns (size, SHA-256)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise ResultStoreError(f"result file larger than {max_bytes} bytes")
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        sha = digest.hexdigest()
        if expected_sha256 is not None and sha != expected_sha256.lower():
            raise ResultStoreError("result file does not match its SHA-256 (damaged in transit)")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_dir(target.parent)
    return size, sha


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
