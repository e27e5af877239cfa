"""The CLI in an 80-column terminal: every command's help without a type label on its flags,
and a `dicom-node jobs` table that wraps instead of cutting values off with an ellipsis, with
ids as short as they can be while staying unique (and usable as `dicom-node jobs PREFIX`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.cli.jobs import short_ids
from dicom_node.state import Job, Study, open_database

WIDTH = 80
REASON = "quality control: the lung volume is outside the model's validated range (0.8-9 l)"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    base.update({"COLUMNS": str(WIDTH), "NO_COLOR": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command `dicom-node` has (plug-ins included)."""
    import typer
    from typer.core import TyperGroup

    from dicom_node.cli import _register_commands, app

    _register_commands()
    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    paths: list[tuple[str, ...]] = []

    def walk(group: TyperGroup, prefix: tuple[str, ...]) -> None:
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            paths.append((*prefix, name))
            if isinstance(sub, TyperGroup):
                walk(sub, (*prefix, name))

    walk(root, ())
    return paths


def test_every_commands_help_fits_80_columns_without_bool_metavars() -> None:
    paths = _command_paths()
    assert {("jobs",), ("serve",), ("send",), ("db", "upgrade")} <= set(paths)
    for path in [(), *paths]:
        result = _cli(*path, "--help")
        where = " ".join(("dicom-node", *path, "--help"))
        assert result.returncode == 0, (where, result.stderr)
        assert "<bool>" not in result.stdout, (where, result.stdout)
        assert "--help" in result.stdout, where
        too_wide = [line for line in result.stdout.splitlines() if len(line) > WIDTH]
        assert not too_wide, (where, too_wide)
    jobs_help = _cli("jobs", "--help").stdout
    for flag in ("--json", "--retry", "--cancel", "--study", "--accession", "--patient"):
        assert flag in jobs_help


def test_short_ids_are_unique_prefixes_of_at_least_8() -> None:
    assert short_ids([]) == 8
    assert short_ids(["0a1b2c3d-1111", "9f9f9f9f-2222"]) == 8
    assert short_ids(["0a1b2c3d-1111", "0a1b2c3d-1222", "0a1b2c3d-2222"]) == 11
    assert short_ids(["abc"]) == 8  # shorter than the minimum: printed whole


def _seed(url: str) -> tuple[list[str], list[str]]:
    """Three jobs on two studies; two job ids share their first group (8 characters)."""
    db = open_database(url)
    now = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
    study_uids = ["1.2.826.0.1.3680043.8.498.11111111111111111111111111111111111111", "1.2.3.4"]
    job_ids = [
        "0a1b2c3d-1111-5aaa-8bbb-000000000001",
        "0a1b2c3d-2222-5aaa-8bbb-000000000002",
        "7e7e7e7e-3333-5aaa-8bbb-000000000003",
    ]
    try:
        with db.session() as s:
            studies = [
                Study(
                    study_key=key,
                    study_instance_uid=uid,
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=4,
                    total_bytes=1,
                    dirty=False,
                    version=1,
                )
                for key, uid in zip(("c0ffee0000aa", "c0ffee0000bb"), study_uids, strict=True)
            ]
            s.add_all(studies)
            s.flush()
            for n, (job_id, study) in enumerate(
                zip(job_ids, [studies[0], studies[0], studies[1]], strict=True)
            ):
                s.add(
                    Job(
                        id=job_id,
                        study_id=study.id,
                        study_version=1,
                        rule="ct",
                        model="lung-nodules",
                        model_version="2026.11",
                        state=["done", "skipped", "queued"][n],
                        reason=REASON if n == 1 else None,
                        input_hash=f"{n:064x}",
                        input_count=4,
                        series_uids=[],
                        destinations=[],
                        created_at=now + timedelta(minutes=n),
                        updated_at=now + timedelta(minutes=n),
                        timings={"detect": 12.5} if n == 0 else {},
                        summary={"finding_count": 2} if n == 0 else {},
                    )
                )
    finally:
        db.dispose()
    return job_ids, study_uids


def test_jobs_table_reads_well_at_80_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'state.sqlite'}"
    job_ids, study_uids = _seed(url)
    env = {"DICOM_NODE_DATABASE_URL": url, "DICOM_NODE_DATA_DIR": str(tmp_path / "var")}
    result = _cli("jobs", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), out
    assert "…" not in out and "..." not in out, out
    # The columns that matter first, their names whole.
    header = next(line for line in lines if line.lstrip().startswith("state"))
    names = ["state", "job", "model", "created", "findings", "study"]
    positions = [header.find(name) for name in names]
    assert -1 not in positions and positions == sorted(positions), header
    # Ids: the shortest unique prefix (10 here: the first two jobs share 8, and "-"), whole.
    for job_id in job_ids[:2]:
        assert job_id[:10] in out and job_id[:11] not in out, out
    assert job_ids[2][:10] in out
    # Values wrap rather than being cut: every word of the long reason is there.
    assert all(word in out for word in REASON.split()), out
    # The Study Instance UIDs are listed under the table, by short study key.
    assert "c0ffee0000aa" not in out and "c0ffee00" in out
    joined = out.replace("\n", "").replace(" ", "")
    assert all(uid in joined for uid in study_uids), out
    # The short id is enough to show a job.
    shown = _cli("jobs", job_ids[1][:10], env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == job_ids[1]
    ambiguous = _cli("jobs", job_ids[0][:8], env=env)
    assert ambiguous.returncode == 1 and "not unique" in ambiguous.stderr
    # The JSON list carries the Study Instance UID too.
    listed = json.loads(_cli("jobs", "--json", env=env).stdout)
    assert {j["study"]["study_instance_uid"] for j in listed} == set(study_uids)


@pytest.mark.parametrize("args", [("--study", "1.2", "--patient", "x"), ("--accession", " ")])
def test_jobs_lookup_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    env = {"DICOM_NODE_DATA_DIR": str(tmp_path / "var")}
    result = _cli("jobs", *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
