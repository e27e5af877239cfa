"""Out of resources is answered A700 — disk full, a write error, below the free-space floor,
over the size cap — with no partial file left anywhere, and the listener keeps serving."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.dicomgen import ct_series
from tests.scp_support import (
    associate,
    instance_rows,
    running_receiver,
    spool_files,
    store_files,
    temp_files,
)

A700 = 0xA700


@pytest.fixture
def settings_for(make_settings: Callable[..., Any], database_url: str) -> Callable[..., Any]:
    def build(**scp: Any) -> Any:
        return make_settings(database_url=database_url, scp={"receivers": 1, **scp})

    return build


def _port(rcv: Any) -> int:
    return int(rcv.server.server_address[1])


def _assert_no_partial_files(rcv: Any, stored: int) -> None:
    """Final names hold exactly the acknowledged instances; the temporary area is empty."""
    rows = instance_rows(rcv.settings.resolved_database_url)
    assert len(rows) == stored
    finals = spool_files(rcv.settings.data_dir)
    assert len(finals) == stored
    assert {rcv.settings.spool_dir / r.path for r in rows} == set(finals)
    for row in rows:
        assert (rcv.settings.spool_dir / row.path).stat().st_size == row.size
    assert temp_files(rcv.settings.data_dir) == []


def _echo_ok(rcv: Any) -> None:
    assoc = associate(_port(rcv))
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """The spool on a 4 MiB tmpfs (root only)."""
    spool = tmp_path / "var" / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(spool)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
            "test_write_error_is_a700 and test_below_free_space_floor_is_a700 cover A700 without one"
        )
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_disk_full_is_a700_without_partial_files_and_the_listener_keeps_serving(
    tiny_spool: Path, settings_for: Any, tmp_path: Path
) -> None:
    big = ct_series(tmp_path / "big", slices=1, size=2100)  # 8.8 MB: spilled to disk while arriving
    slices = ct_series(tmp_path / "slices", slices=12, size=512)  # 525 KB each
    small = ct_series(tmp_path / "small", slices=1, size=16)
    with running_receiver(settings_for(min_free_bytes=0)) as rcv:
        # the file system fills up while the big instance arrives: a write error, not a check
        assert store_files(_port(rcv), big) == [A700]
        _assert_no_partial_files(rcv, 0)
        statuses = store_files(_port(rcv), slices)
        assert A700 in statuses, statuses
        first_failure = statuses.index(A700)
        assert first_failure >= 3 and statuses[:first_failure] == [0] * first_failure, statuses
        assert set(statuses[first_failure:]) == {A700}
        _assert_no_partial_files(rcv, first_failure)
        # still serving: echo, and a small instance still fits
        _echo_ok(rcv)
        assert store_files(_port(rcv), small) == [0x0000]
        _assert_no_partial_files(rcv, first_failure + 1)
        stored_uids = {r.sop_instance_uid for r in instance_rows(rcv.settings.resolved_database_url)}
        expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in slices[:first_failure] + small}
        assert stored_uids == expected


def test_write_error_is_a700(settings_for: Any, tmp_path: Path) -> None:
    """A real I/O error without a special file system: the spool's temporary area is replaced
    by a plain file, so every create inside it fails (ENOTDIR)."""
    small = ct_series(tmp_path / "small", slices=2, size=16)
    big = ct_series(tmp_path / "big", slices=1, size=2100)
    with running_receiver(settings_for(min_free_bytes=0)) as rcv:
        tmp = rcv.spool.tmp
        shutil.rmtree(tmp)
        tmp.write_bytes(b"not a directory")
        try:
            assert store_files(_port(rcv), small[:1] + big) == [A700, A700]
        finally:
            tmp.unlink()
            tmp.mkdir()
        assert spool_files(rcv.settings.data_dir) == []
        assert instance_rows(rcv.settings.resolved_database_url) == []
        assert store_files(_port(rcv), small[1:]) == [0x0000]
        _assert_no_partial_files(rcv, 1)


def test_below_free_space_floor_is_a700(settings_for: Any, tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=3, size=16)
    free = shutil.disk_usage(tmp_path).free
    with running_receiver(settings_for(min_free_bytes=free + 2**40)) as rcv:
        assert store_files(_port(rcv), paths) == [A700] * 3
        _assert_no_partial_files(rcv, 0)
        _echo_ok(rcv)
        assert rcv.statuses[A700] == 3


@pytest.mark.parametrize("cap", [200_000, 8_500_000], ids=["in-memory", "spilled"])
def test_over_the_size_cap_is_a700_and_the_partial_file_is_removed(
    settings_for: Any, tmp_path: Path, cap: int
) -> None:
    over = ct_series(tmp_path / "over", slices=1, size=512 if cap < 2**20 else 2100)
    under = ct_series(tmp_path / "under", slices=1, size=64)
    assert over[0].stat().st_size > cap > under[0].stat().st_size
    with running_receiver(settings_for(max_instance_bytes=cap, min_free_bytes=0)) as rcv:
        # the oversized one and then a normal one on the same association
        assert store_files(_port(rcv), over + under) == [A700, 0x0000]
        _assert_no_partial_files(rcv, 1)
