"""Duplicates: the same SOP Instance UID again — identical bytes are a no-op success; different
bytes keep the first by default and are recorded; ``overwrite`` and ``reject`` do what they say.
Also the same instance on several associations at once (reliability.md A9-A11)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tests.dicomgen import ct_series
from tests.scp_support import (
    dataset_part,
    index_summary,
    instance_rows,
    read_stored,
    running_receiver,
    spool_files,
    store_files,
    temp_files,
)


@pytest.fixture
def settings_for(make_settings: Callable[..., Any], database_url: str) -> Callable[..., Any]:
    def build(**scp: Any) -> Any:
        return make_settings(database_url=database_url, scp={"receivers": 1, "min_free_bytes": 0, **scp})

    return build


def _port(rcv: Any) -> int:
    return int(rcv.server.server_address[1])


def _two_versions(tmp_path: Path, study: str | None = None, series: str | None = None) -> tuple[Path, Path]:
    """Two files with the same Study/Series/SOP Instance UIDs and different pixel data."""
    study, series, sop = study or generate_uid(), series or generate_uid(), generate_uid()
    (a,) = ct_series(tmp_path / "a", slices=1, size=32, study_uid=study, series_uid=series, sop_uids=[sop], seed=1)
    (b,) = ct_series(tmp_path / "b", slices=1, size=32, study_uid=study, series_uid=series, sop_uids=[sop], seed=2)
    assert dataset_part(a) != dataset_part(b)
    return a, b


def _stored(rcv: Any) -> tuple[Any, bytes]:
    (row,) = instance_rows(rcv.settings.resolved_database_url)
    (final,) = spool_files(rcv.settings.data_dir)
    assert final == rcv.settings.spool_dir / row.path
    return row, dataset_part(final)


def test_identical_resend_is_success_with_one_copy_one_row_and_a_duplicate_event(
    settings_for: Any, tmp_path: Path
) -> None:
    (path,) = ct_series(tmp_path / "s", slices=1, size=32)
    with running_receiver(settings_for()) as rcv:
        assert store_files(_port(rcv), [path]) == [0x0000]
        first_row, _ = _stored(rcv)
        assert store_files(_port(rcv), [path, path]) == [0x0000, 0x0000]
        row, data = _stored(rcv)
        assert data == dataset_part(path)
        assert row.id == first_row.id and row.received_at == first_row.received_at
        summary = index_summary(rcv.settings.resolved_database_url)
        assert summary["duplicates"] == [
            {"identical": True, "action": "ignored", "instance_id": row.id},
            {"identical": True, "action": "ignored", "instance_id": row.id},
        ]
        (counts,) = summary["study_counts"].values()
        assert counts == (1, row.size)  # not counted twice
        assert temp_files(rcv.settings.data_dir) == []


def test_different_bytes_keep_the_first_by_default_and_are_recorded(settings_for: Any, tmp_path: Path) -> None:
    a, b = _two_versions(tmp_path)
    with running_receiver(settings_for()) as rcv:
        assert store_files(_port(rcv), [a, b]) == [0x0000, 0x0000]
        row, data = _stored(rcv)
        assert data == dataset_part(a)
        events = index_summary(rcv.settings.resolved_database_url)["duplicates"]
        assert events == [{"identical": False, "action": "kept-first", "instance_id": row.id}]
        assert temp_files(rcv.settings.data_dir) == []


def test_overwrite_policy_replaces_the_stored_instance(settings_for: Any, tmp_path: Path) -> None:
    a, b = _two_versions(tmp_path)
    with running_receiver(settings_for(duplicate_policy="overwrite")) as rcv:
        assert store_files(_port(rcv), [a]) == [0x0000]
        first, _ = _stored(rcv)
        assert store_files(_port(rcv), [b]) == [0x0000]
        row, data = _stored(rcv)
        assert data == dataset_part(b)
        assert row.id == first.id and row.sha256 != first.sha256
        events = index_summary(rcv.settings.resolved_database_url)["duplicates"]
        assert events == [{"identical": False, "action": "overwritten", "instance_id": row.id}]
        # identical bytes are still not rewritten
        assert store_files(_port(rcv), [b]) == [0x0000]
        assert index_summary(rcv.settings.resolved_database_url)["duplicates"][-1]["action"] == "ignored"


def test_reject_policy_answers_a_failure_and_keeps_the_first(settings_for: Any, tmp_path: Path) -> None:
    a, b = _two_versions(tmp_path)
    with running_receiver(settings_for(duplicate_policy="reject")) as rcv:
        assert store_files(_port(rcv), [a, b]) == [0x0000, 0x0111]
        row, data = _stored(rcv)
        assert data == dataset_part(a)
        events = index_summary(rcv.settings.resolved_database_url)["duplicates"]
        assert events == [{"identical": False, "action": "rejected", "instance_id": row.id}]
        # an identical resend is not a conflict, even under "reject"
        assert store_files(_port(rcv), [a]) == [0x0000]


def test_same_instance_moved_to_another_series_is_not_silently_overwritten(settings_for: Any, tmp_path: Path) -> None:
    """dcm4chee's "relational mismatch" (Google adapter #153): same SOP Instance UID, other series."""
    sop = generate_uid()
    (a,) = ct_series(tmp_path / "a", slices=1, size=32, sop_uids=[sop], seed=1)
    (b,) = ct_series(tmp_path / "b", slices=1, size=32, sop_uids=[sop], seed=1)  # new study and series
    with running_receiver(settings_for()) as rcv:
        assert store_files(_port(rcv), [a, b]) == [0x0000, 0x0000]
        _, data = _stored(rcv)  # exactly one file: the first
        assert data == dataset_part(a)
        (event,) = index_summary(rcv.settings.resolved_database_url)["duplicates"]
        assert event["action"] == "kept-first" and not event["identical"]


def test_same_instance_on_concurrent_associations_is_stored_once(settings_for: Any, tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=5, size=64)
    results: list[list[int | None]] = [[] for _ in range(6)]
    with running_receiver(settings_for(max_associations=8)) as rcv:
        def send(i: int) -> None:
            results[i] = store_files(_port(rcv), paths, calling=f"SCU{i}")

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [[0x0000] * 5] * 6
        rows = instance_rows(rcv.settings.resolved_database_url)
        assert len(rows) == 5 and len(spool_files(rcv.settings.data_dir)) == 5
        summary = index_summary(rcv.settings.resolved_database_url)
        assert len(summary["duplicates"]) == 25
        assert all(d["identical"] and d["action"] == "ignored" for d in summary["duplicates"])
        (counts,) = summary["study_counts"].values()
        assert counts[0] == 5
        assert temp_files(rcv.settings.data_dir) == []


def test_different_copies_on_concurrent_associations_keep_exactly_one(settings_for: Any, tmp_path: Path) -> None:
    """Two different copies of one SOP Instance UID sent at the same moment on two associations:
    both get the keep-first answer a sequential resend gets (success), and the spool file and
    the index row are the same one copy, with one recorded "kept-first" event. Repeated, since a
    race shows only sometimes. The series is known beforehand (as for every instance but a
    series' first): the copies then meet only at the spool and the instance row."""
    rounds = 8
    study, series = generate_uid(), generate_uid()
    (first,) = ct_series(tmp_path / "first", slices=1, size=32, study_uid=study, series_uid=series)
    pairs = [_two_versions(tmp_path / f"r{i}", study, series) for i in range(rounds)]
    with running_receiver(settings_for(max_associations=8)) as rcv:
        port = _port(rcv)
        assert store_files(port, [first]) == [0x0000]
        for a, b in pairs:
            # Each association is opened first, then both send at once (the barrier).
            barrier = threading.Barrier(2)
            results: dict[int, int | None] = {}
            threads = [
                threading.Thread(target=_send_at_barrier, args=(port, p, barrier, results, i))
                for i, p in enumerate((a, b))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert results == {0: 0x0000, 1: 0x0000}
        db_url = rcv.settings.resolved_database_url
        rows = {r.sop_instance_uid: r for r in instance_rows(db_url)}
        assert len(rows) == rounds + 1 and len(spool_files(rcv.settings.data_dir)) == rounds + 1
        for a, b in pairs:
            row = rows[read_stored(a).SOPInstanceUID]
            on_disk = dataset_part(rcv.settings.spool_dir / row.path)
            assert on_disk in (dataset_part(a), dataset_part(b))
            assert hashlib.sha256(on_disk).hexdigest() == row.sha256, "index and spool disagree"
        events = index_summary(db_url)["duplicates"]
        paired = [rows[read_stored(a).SOPInstanceUID].id for a, _ in pairs]
        assert sorted(e["instance_id"] for e in events) == sorted(paired)
        assert all(not e["identical"] and e["action"] == "kept-first" for e in events)
        assert temp_files(rcv.settings.data_dir) == []


def _send_at_barrier(port: int, path: Path, barrier: threading.Barrier, results: dict[int, int | None], i: int) -> None:
    from pynetdicom import AE

    ae = AE(ae_title=f"SCU{i}")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    barrier.wait(30)
    rsp = assoc.send_c_store(path)
    results[i] = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    assoc.release()
