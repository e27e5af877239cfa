"""The durable spool: received instances on disk, written atomically.

Every instance is first written to a temporary file inside the spool (same file system), fsynced,
then linked under its final name. ``os.link`` fails if the final name exists, which makes
placement an atomic create-if-absent even across receiver processes. A final name therefore
always holds a complete, fsynced file; a partial file only ever exists under ``.tmp/``.

Final names are built only from opaque keys (:func:`dicom_node.uids.storage_key`), never from a
UID or any other received value.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from dicom_node.errors import StorageError

TEMP_DIR_NAME = ".tmp"
_ZERO_PREAMBLE = bytes(128)
_datasync = getattr(os, "fdatasync", os.fsync)
_KEY_RE = re.compile(r"^[0-9a-f]{8,64}$")


class Spool:
    """Files of received instances under ``root``."""

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self._root_prefix = str(self.root) + os.sep
        self.tmp = self.root / TEMP_DIR_NAME
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self._known_dirs: set[Path] = set()

    def prepare(self) -> None:
        """Create the spool directories (raises :class:`StorageError` when impossible)."""
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"spool directory cannot be created: {exc.strerror}") from exc

    def new_temp_path(self, suffix: str = ".part") -> Path:
        """A fresh temporary file name inside the spool."""
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    def check_free_space(self, incoming_bytes: int = 0) -> None:
        """Raise :class:`StorageError` when storing ``incoming_bytes`` would go below the floor."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise StorageError(f"spool unavailable: {exc.strerror}") from exc
        if free - incoming_bytes < self.min_free_bytes:
            raise StorageError(
                f"spool below its free-space floor ({free // 2**20} MiB free, "
                f"floor {self.min_free_bytes // 2**20} MiB)"
            )

    @staticmethod
    def relative_path(*keys: str, suffix: str = ".dcm") -> str:
        """The final name for an object identified by opaque keys (validated here)."""
        for key in keys:
            if not _KEY_RE.match(key):
                raise ValueError("spool keys must be lowercase hex")
        return "/".join(keys) + suffix

    def path(self, relative: str) -> Path:
        """Absolute path of a spooled object; refuses anything that leaves the spool.

        Checked lexically (``..``, absolute paths): the spool's own tree holds no links, and
        ``Path.resolve`` cost a ``stat`` per path component on every stored instance.
        """
        candidate = os.path.normpath(os.path.join(self.root, relative))
        if not candidate.startswith(self._root_prefix):
            raise ValueError("path escapes the spool")
        return Path(candidate)

    def sync_file(self, path: Path) -> None:
        """Make the file's content durable (fdatasync: data and size, not timestamps)."""
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            _datasync(fd)
        finally:
            os.close(fd)

    def write_temp(self, data: bytes | bytearray | memoryview) -> Path:
        """Write a Part 10 file held in memory to a new temporary file, fsynced.

        The 128-byte preamble is written as zeros whatever ``data`` holds (a preamble can carry
        an executable header, CVE-2019-11687). A failed write removes the partial file and
        raises ``OSError``.
        """
        temp = self.new_temp_path()
        view = memoryview(data)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, _ZERO_PREAMBLE)
            _write_all(fd, view[128:])
            if self.fsync:
                _datasync(fd)
        except BaseException:
            os.close(fd)
            self.discard(temp)
            raise
        os.close(fd)
        return temp

    def _sync_dir(self, directory: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created:
            # Make the new directory entries themselves durable.
            for d in (directory, *directory.parents):
                self._sync_dir(d)
                if d == self.root:
                    break
        self._known_dirs.add(directory)

    def place(self, temp: Path, relative: str) -> bool:
        """Atomically give ``temp`` its final name unless that name exists.

        Returns ``True`` when placed, ``False`` when an object already has the name (``temp`` is
        left in place for the caller to compare or discard). The caller has already synced
        ``temp`` with :meth:`sync_file`.
        """
        final = self.path(relative)
        try:
            self._ensure_dir(final.parent)
            os.link(temp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot store instance: {exc.strerror}") from exc
        self._sync_dir(final.parent)
        self.discard(temp)
        return True

    def replace(self, temp: Path, relative: str) -> None:
        """Atomically replace the object at ``relative`` with ``temp``."""
        final = self.path(relative)
        try:
            self._ensure_dir(final.parent)
            os.replace(temp, final)
        except OSError as exc:
            raise StorageError(f"cannot store instance: {exc.strerror}") from exc
        self._sync_dir(final.parent)

    def remove(self, relative: str) -> None:
        """Remove a placed object (used when its index row could not be committed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(relative))

    @staticmethod
    def discard(temp: Path) -> None:
        """Remove a temporary file if it exists; never raises (it runs on error paths)."""
        with contextlib.suppress(OSError):
            os.unlink(temp)

    def sweep_temp(self, older_than: float = 0.0) -> int:
        """Remove leftover temporary files (from aborted transfers or a crash)."""
        removed = 0
        if not self.tmp.is_dir():
            return 0
        cutoff = time.time() - older_than
        for entry in os.scandir(self.tmp):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
