"""The durable spool: received instances on disk, written atomically.

Every instance is first written to a temporary file inside the spool (same file system), fsynced,
then linked under its final name. ``os.link`` fails if the final name exists, which makes
placement an atomic create-if-absent even across receiver processes. A final name therefore
always holds a complete, fsynced file; a partial file only ever exists under ``.tmp/``.

Final names are built only from opaque keys (:func:`dicom_node.uids.storage_key`), never from a
UID or any other received value.

Temporary names carry their owner (``<pid>-<spool instance>-<random>.part``; instance ``0`` for
code that names files without a :class:`Spool`, see :func:`process_temp_name`), so that a
process stopping removes its own in-flight files only, never those of a receiver still running
beside it; files of processes that are gone are anyone's to remove. Names without an owner
(pynetdicom's own) are removed only by age or by the node-wide sweeps at start and stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dicom_node.errors import StorageError

TEMP_DIR_NAME = ".tmp"
_ZERO_PREAMBLE = bytes(128)
_datasync = getattr(os, "fdatasync", os.fsync)
_KEY_RE = re.compile(r"^[0-9a-f]{8,64}$")
_TEMP_OWNER_RE = re.compile(r"^(\d+)-[0-9a-f]+-")
_instances = itertools.count(1)

CLAIM_TIMEOUT = 60.0
"""How long a second copy of an object waits for the first one's writer to commit or give up."""


class Spool:
    """Files of received instances under ``root``."""

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self._root_prefix = str(self.root) + os.sep
        self.tmp = self.root / TEMP_DIR_NAME
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self._known_dirs: set[Path] = set()
        # Who wrote a temporary file: this process, and this Spool within it (the HTTP API and
        # the background loop share a process but not their in-flight files).
        self.owner = f"{os.getpid()}-{next(_instances):x}"

    def prepare(self) -> None:
        """Create the spool directories (raises :class:`StorageError` when impossible)."""
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"spool directory cannot be created: {exc.strerror}") from exc

    def new_temp_path(self, suffix: str = ".part") -> Path:
        """A fresh temporary file name inside the spool, tagged with this spool's owner."""
        return self.tmp / f"{self.owner}-{uuid.uuid4().hex}{suffix}"

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

    @contextlib.contextmanager
    def claim(self, temp: Path, relative: str, timeout: float = CLAIM_TIMEOUT) -> Iterator[bool]:
        """Place ``temp`` like :meth:`place`, and hold the object at ``relative`` while inside.

        Yields ``True`` when ``temp`` got the name. Yields ``False`` when another object holds
        it, but only once that object's writer has left its own ``claim`` block: a copy that
        arrives while the first one is still being indexed waits, so it never mistakes the
        first for a file left by a crash (and overwrites it). The hold is an ``flock`` on the
        object's inode (the writer holds its temporary file's, which becomes the final name),
        so it works across receiver processes and ends when a writer dies.
        """
        fds = [os.open(temp, os.O_RDONLY | os.O_CLOEXEC)]
        try:
            fcntl.flock(fds[0], fcntl.LOCK_EX)  # a fresh file nobody else knows: never waits
            final = self.path(relative)
            deadline = time.monotonic() + timeout
            while True:
                if time.monotonic() >= deadline:
                    raise StorageError("another copy of this instance is still being stored")
                if self.place(temp, relative):
                    yield True
                    return
                try:
                    fd = os.open(final, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # its writer gave up and removed it: try again
                fds.append(fd)
                _flock_until(fd, deadline)
                try:
                    current = os.stat(final).st_ino
                except FileNotFoundError:
                    current = None
                if current == os.fstat(fd).st_ino:
                    yield False
                    return
                # replaced or removed while we waited: look again
                fds.pop()
                os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)  # releases the locks

    def sweep_temp(
        self, older_than: float | None = None, *, process: bool = False, everyone: bool = False
    ) -> int:
        """Remove temporary files this spool may remove; returns how many.

        Always: this spool's own files, and those of processes that no longer exist (a
        receiver that crashed). With ``process``: every file of this process (it is ending).
        With ``older_than``: also anyone's file older than that many seconds (an upload that
        cannot still be running). With ``everyone``: all of them, only for when nothing else
        can be writing (start-up and stop of the node, with the data directory locked).
        """
        removed = 0
        if not self.tmp.is_dir():
            return 0
        cutoff = None if older_than is None else time.time() - older_than
        own = f"{os.getpid()}-" if process else self.owner + "-"
        for entry in os.scandir(self.tmp):
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if not (
                    everyone
                    or entry.name.startswith(own)
                    or _owner_gone(entry.name)
                    or (cutoff is not None and entry.stat().st_mtime <= cutoff)
                ):
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed


def process_temp_name(directory: str | os.PathLike[str], suffix: str = ".part") -> str:
    """A temporary file name in ``directory`` owned by this process (for code with no Spool)."""
    return os.path.join(directory, f"{os.getpid()}-0-{uuid.uuid4().hex}{suffix}")


def _owner_gone(name: str) -> bool:
    """Whether the process that wrote temporary file ``name`` has ended (unknown: no)."""
    match = _TEMP_OWNER_RE.match(name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, under another user
        return False
    return False


def _flock_until(fd: int, deadline: float) -> None:
    """Take an exclusive ``flock`` on ``fd``, waiting until ``deadline`` at most."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StorageError("another copy of this instance is still being stored") from None
            time.sleep(0.005)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
