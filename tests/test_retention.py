"""Retention and disk watermarks (dicom_node/retention): a real `dicom-node serve` receives
studies over DICOM (DCMTK storescu), runs them on an embedded worker and delivers to a DCMTK
storescp; then

* `dicom-node cleanup --dry-run` / `cleanup` remove, by age, the files of finished studies and
  delivered results, and nothing of a study whose job is unfinished or a result not delivered;
  the rows stay, marked purged_at; a late instance of a purged study still makes a new version;
* on a small filesystem (tmpfs) under the spool, filled past the high watermark by received
  studies, the background sweep frees space before the C-STORE floor refuses ingest: every
  C-STORE succeeds and nothing undelivered is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dicom_node.state import (
    AuditEvent,
    Delivery,
    DuplicateEvent,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    Study,
)
from tests.dicomgen import ct_series
from tests.peers import StoreSCP, free_port, storescu, wait_until
from tests.pipeline_env import NodeEnv, wait_seconds

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKEN = "retention-test-token"

# One route per fate: delivered (done), delivery given up (failed, result not delivered),
# delivery still retrying (not terminal), never picked up (queue no worker serves).
CONFIG = """
[destinations.up]
url = "dicom://STORESCP@127.0.0.1:{up_port}"

[destinations.gone]
url = "dicom://GONE@127.0.0.1:{closed_port}"
max_attempts = 1

[destinations.later]
url = "dicom://LATER@127.0.0.1:{closed_port}"
max_attempts = 50
backoff_initial = 600
backoff_max = 600

[[routes]]
name = "delivered"
series_description = "^DELIVER"
models = ["test-slow"]
destinations = ["up"]

[[routes]]
name = "gone"
series_description = "^GONE"
models = ["test-slow"]
destinations = ["gone"]

[[routes]]
name = "later"
series_description = "^LATER"
models = ["test-slow"]
destinations = ["later"]

[[routes]]
name = "waiting"
series_description = "^WAITING"
models = ["test-gpu"]

[models.test-slow]
plugin = "tests.plugins.detectors:SlowDetector"

[models.test-gpu]
plugin = "tests.plugins.detectors:SlowDetector"
queue = "gpu"

[retention]
{retention}
"""


def make_env(tmp_path: Path, database_url: str, storescp: StoreSCP, retention: str, **extra_env: str) -> NodeEnv:
    (tmp_path / "var").mkdir(exist_ok=True)  # the SQLite fixture's folder
    return NodeEnv(
        tmp_path / "node",
        database_url,
        broker_url=None,
        embedded_workers=1,
        config_text=CONFIG.format(up_port=storescp.port, closed_port=free_port(), retention=retention),
        extra_env={
            "DICOM_NODE_WORKER__QUEUED_TIMEOUT": "600",  # the gpu job stays queued
            "DICOM_NODE_WORKER__DCIODVFY": "false",  # conformance has its own tests
            "DICOM_NODE_HTTP__TOKENS": TOKEN,
            **extra_env,
        },
    )


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    if shutil.which("storescp") is None or shutil.which("storescu") is None:
        pytest.skip("DCMTK (storescp, storescu) not installed")
    scp = StoreSCP(tmp_path / "pacs").start()
    try:
        yield scp
    finally:
        scp.stop()


def study_of(env: NodeEnv, description: str) -> Study:
    with env.db.session() as s:
        study = s.scalars(
            select(Study).join(Series, Series.study_id == Study.id).where(Series.series_description == description)
        ).first()
    assert study is not None, f"no study {description!r}"
    return study


def instances(env: NodeEnv, study_id: int) -> list[Instance]:
    with env.db.session() as s:
        return list(s.scalars(select(Instance).where(Instance.study_id == study_id).order_by(Instance.id)))


def jobs_of(env: NodeEnv, study_id: int) -> list[Job]:
    with env.db.session() as s:
        return list(s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.created_at)))


def outputs_of(env: NodeEnv, job_id: str) -> list[Output]:
    with env.db.session() as s:
        return list(s.scalars(select(Output).where(Output.job_id == job_id)))


def spool_file(env: NodeEnv, instance: Instance) -> Path:
    return env.node.data_dir / "spool" / instance.path


def result_file(env: NodeEnv, output: Output) -> Path:
    return env.node.data_dir / "results" / output.path


def wait_job(env: NodeEnv, study_id: int, *states: JobState, timeout: float = 120) -> Job:
    wanted = {s.value for s in states}

    def reached() -> Job | None:
        jobs = jobs_of(env, study_id)
        return jobs[-1] if jobs and jobs[-1].state in wanted else None

    try:
        return wait_until(reached, timeout, 0.3, f"job in {sorted(wanted)}")
    except TimeoutError:
        raise TimeoutError(env.diagnostics()) from None


def send(env: NodeEnv, paths: list[Path]) -> None:
    run = storescu(env.node.dicom_port, paths)
    assert run.returncode == 0, run.stdout + run.stderr


def cleanup(env: NodeEnv, *args: str) -> dict[str, object]:
    run = env.node.run("cleanup", "--json", *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_cleanup_by_age_keeps_what_is_unfinished_or_undelivered(
    tmp_path: Path, database_url: str, storescp: StoreSCP
) -> None:
    # Every age limit 0.86 s; watermarks out of the way (no disk pressure on
    # the test machine's disk whatever its fill); no background sweep: the command does it.
    retention = "\n".join(
        [
            "instances_days_done = 0.00001",
            "instances_days_failed = 0.00001",
            "instances_days_skipped = 0.00001",
            "results_days = 0.00001",
            "high_watermark_percent = 100",
            "low_watermark_percent = 99",
            "floor_margin_bytes = 0",
            "interval_s = 0",
        ]
    )
    env = make_env(tmp_path, database_url, storescp, retention, DICOM_NODE_SCP__MIN_FREE_BYTES="0")
    env.start()
    try:
        series = {
            name: ct_series(tmp_path / name, slices=6, size=64, description=name, seed=i)
            for i, name in enumerate(["DELIVER", "GONE", "LATER", "WAITING"])
        }
        for paths in series.values():
            send(env, paths)
        delivered = study_of(env, "DELIVER")
        gone = study_of(env, "GONE")
        later = study_of(env, "LATER")
        waiting = study_of(env, "WAITING")
        done_job = wait_job(env, delivered.id, JobState.DONE)
        failed_job = wait_job(env, gone.id, JobState.FAILED)
        later_job = wait_job(env, later.id, JobState.DELIVERING)
        wait_job(env, waiting.id, JobState.QUEUED, JobState.WAITING)
        assert outputs_of(env, done_job.id) and outputs_of(env, failed_job.id) and outputs_of(env, later_job.id)
        assert len(storescp.received) >= 2, "the delivered study's results did not reach the PACS"

        wait_seconds(1.0)  # past the age limits of the jobs that just ended

        # Dry run: says what would go, removes nothing.
        dry = cleanup(env, "--dry-run")
        assert dry["dry_run"] is True
        assert (dry["studies"], dry["instances"], dry["jobs"]) == (2, 12, 1), dry
        assert dry["instance_bytes"] == sum(i.size for i in instances(env, delivered.id) + instances(env, gone.id))
        assert all(spool_file(env, i).is_file() and i.purged_at is None for i in instances(env, delivered.id))
        assert all(result_file(env, o).is_file() for o in outputs_of(env, done_job.id))
        assert not {"study_key", "study_instance_uid", "patient_id"} & set(dry)

        real = cleanup(env)
        assert (real["studies"], real["instances"], real["jobs"], real["errors"]) == (2, 12, 1, 0), real
        assert real["by_state"] == {"done": 1, "failed": 1}

        # Finished studies: files gone, rows kept and marked.
        for study in (delivered, gone):
            rows = instances(env, study.id)
            assert len(rows) == 6
            assert all(r.purged_at is not None and not spool_file(env, r).exists() for r in rows)
        # The delivered job's results are gone; the failed job's (never delivered) stay.
        done_outputs = outputs_of(env, done_job.id)
        assert done_outputs and all(o.purged_at is not None and not result_file(env, o).exists() for o in done_outputs)
        assert all(o.purged_at is None and result_file(env, o).is_file() for o in outputs_of(env, failed_job.id))
        # Unfinished jobs: the study's instances and the results still to deliver stay.
        for study in (later, waiting):
            assert all(r.purged_at is None and spool_file(env, r).is_file() for r in instances(env, study.id))
        assert all(o.purged_at is None and result_file(env, o).is_file() for o in outputs_of(env, later_job.id))
        with env.db.session() as s:
            assert s.scalar(select(Delivery.state).where(Delivery.job_id == later_job.id)) == "retry"
            sweeps = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "retention-sweep")))
        assert len(sweeps) == 1 and sweeps[0].detail["instances"] == 12
        assert not ({"study_instance_uid", "patient_id"} & set(sweeps[0].detail))

        # A second sweep has nothing left to do.
        again = cleanup(env)
        assert (again["studies"], again["jobs"]) == (0, 0)

        # Under disk pressure (watermarks below the disk's fill) still nothing unfinished or
        # undelivered goes: the command says the disk stayed full (exit 1), audited as a warning.
        pressed = subprocess.run(
            env.node.command("cleanup", "--json"),
            env={
                **env.node.full_env(),
                "DICOM_NODE_RETENTION__HIGH_WATERMARK_PERCENT": "0.02",
                "DICOM_NODE_RETENTION__LOW_WATERMARK_PERCENT": "0.01",
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pressed.returncode == 1, pressed.stdout + pressed.stderr
        report = json.loads(pressed.stdout)
        assert report["pressure"] is True and report["relieved"] is False
        assert (report["studies"], report["jobs"]) == (0, 0)
        for study in (later, waiting):
            assert all(r.purged_at is None and spool_file(env, r).is_file() for r in instances(env, study.id))
        assert all(o.purged_at is None and result_file(env, o).is_file() for o in outputs_of(env, failed_job.id))
        with env.db.session() as s:
            outcomes = list(s.scalars(select(AuditEvent.outcome).where(AuditEvent.event == "retention-sweep")))
        assert outcomes == ["success", "warning"]

        # Metrics: what is kept and what was removed.
        base = f"http://127.0.0.1:{env.node.http_port}"
        text = requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        purged_bytes = sum(i.size for i in instances(env, delivered.id) + instances(env, gone.id))
        assert samples[("dicom_node_purged_items_total", (("kind", "instances"),))] == 12
        assert samples[("dicom_node_purged_bytes_total", (("kind", "instances"),))] == purged_bytes
        assert samples[("dicom_node_purged_items_total", (("kind", "results"),))] == len(done_outputs)
        kept = sum(i.size for i in instances(env, later.id) + instances(env, waiting.id))
        assert samples[("dicom_node_spool_bytes", ())] == kept
        assert samples[("dicom_node_spool_free_bytes", ())] > 0

        # A late instance of a purged study, and one of its removed instances sent again: both
        # stored, the removed one restored, and a new version runs over what is on disk.
        late = ct_series(
            tmp_path / "late", slices=1, size=64, description="DELIVER", seed=9,
            study_uid=delivered.study_instance_uid,
        )
        send(env, [*late, series["DELIVER"][0]])
        wait_until(lambda: len(jobs_of(env, delivered.id)) == 2, 60, 0.3, "a second version")
        second = wait_job(env, delivered.id, JobState.DONE, JobState.FAILED, JobState.SKIPPED)
        assert second.study_version == 2 and second.input_count == 2
        rows = instances(env, delivered.id)
        assert len(rows) == 7
        restored = [r for r in rows if r.purged_at is None]
        assert len(restored) == 2 and all(spool_file(env, r).is_file() for r in restored)
        with env.db.session() as s:
            actions = list(s.scalars(select(DuplicateEvent.action)))
        assert actions == ["restored"]
    finally:
        env.stop()


# -- a filled tiny filesystem ----------------------------------------------------------------------

SPOOL_MB = 64
STUDY_SLICES = 16  # 16 x 512 x 512 x 2 bytes: 8 MiB a study


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted where the node's spool goes (needs root: CAP_SYS_ADMIN)."""
    spool = tmp_path / "node" / "var" / "spool"
    spool.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem for the spool needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SPOOL_MB}m,mode=0750", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        # Not CI_ALLOWED_SKIPS's "cannot mount a tmpfs here": this test has no other path, so
        # under CI=true a refused mount is a failure.
        pytest.skip(f"mount of the spool's tmpfs refused: {mount.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_sweep_on_a_filled_tiny_filesystem_keeps_ingest_working(
    tmp_path: Path, sqlite_url: str, storescp: StoreSCP, tiny_spool: Path
) -> None:
    # No age limits: only disk pressure removes anything. Floor 8 MiB (C-STORE refused below
    # it); the sweep starts above 70 % used (19.2 MiB free) and goes down to 40 %.
    retention = "\n".join(
        [
            "instances_days_done = 0",
            "instances_days_failed = 0",
            "instances_days_skipped = 0",
            "results_days = 0",
            "high_watermark_percent = 70",
            "low_watermark_percent = 40",
            f"floor_margin_bytes = {2 * 2**20}",
            "interval_s = 3600",
        ]
    )
    env = make_env(
        tmp_path, sqlite_url, storescp, retention,
        DICOM_NODE_SCP__MIN_FREE_BYTES=str(8 * 2**20),
    )
    env.start()
    try:
        # An undelivered study first: its delivery retries (not terminal), so its 8 MiB
        # must survive every sweep.
        undelivered = ct_series(tmp_path / "later", slices=STUDY_SLICES, size=512, description="LATER", seed=100)
        send(env, undelivered)
        later = study_of(env, "LATER")
        later_job = wait_job(env, later.id, JobState.DELIVERING)

        # Then ten delivered studies, 80 MiB in all, more than the whole filesystem: each one
        # is stored (every C-STORE succeeds) because the sweep makes room before the floor.
        capacity = shutil.disk_usage(tiny_spool).total
        assert capacity < (1 + 10) * STUDY_SLICES * 512 * 512 * 2
        for n in range(10):
            paths = ct_series(tmp_path / f"s{n}", slices=STUDY_SLICES, size=512, description=f"DELIVER {n}", seed=n)
            send(env, paths)
            study = study_of(env, f"DELIVER {n}")
            assert len(instances(env, study.id)) == STUDY_SLICES, "an instance was not stored"
            wait_job(env, study.id, JobState.DONE)
            # The sweep looks every 10 s; wait for it before the next study if it is due.
            wait_until(
                lambda: 100.0 * (capacity - shutil.disk_usage(tiny_spool).free) / capacity < 70,
                40, 0.5, "the sweep to bring the spool below its high watermark",
            )
            for path in paths:
                path.unlink()  # the test's own copies live on the ordinary disk; keep it tidy

        # Nothing undelivered lost: the retrying study's files and results are all there.
        rows = instances(env, later.id)
        assert len(rows) == STUDY_SLICES
        assert all(r.purged_at is None and spool_file(env, r).is_file() for r in rows)
        assert all(o.purged_at is None and result_file(env, o).is_file() for o in outputs_of(env, later_job.id))
        # Delivered studies were removed oldest first, rows kept; the newest is still there.
        with env.db.session() as s:
            studies = list(s.scalars(select(Study).order_by(Study.id)))
            purged = {
                sid
                for (sid,) in s.execute(select(Instance.study_id).where(Instance.purged_at.is_not(None))).all()
            }
            sweeps = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "retention-sweep")))
        delivered_ids = [st.id for st in studies if st.id != later.id]
        assert purged and later.id not in purged
        assert delivered_ids[-1] not in purged
        assert purged == set(delivered_ids[: len(purged)]), "not removed oldest first"
        assert sweeps and all(e.detail["pressure"] for e in sweeps if e.detail["studies"])
        assert sum(e.detail["by_pressure"] for e in sweeps) == len(purged)
        assert all(e.detail["by_age"] == 0 for e in sweeps)
    finally:
        env.stop()


def test_documented_defaults_match_the_settings() -> None:
    """docs/deployment.md's Retention table names every [retention] setting with its default."""
    from dicom_node.settings import RetentionSettings

    text = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    section = text[text.index("### Retention") :]
    section = section[: section.index("\n## ")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0].strip("`")] = cells[1].strip("`")
    defaults = RetentionSettings()
    assert set(rows) == set(RetentionSettings.model_fields)
    units = {"GiB": 2**30}
    for name, shown in rows.items():
        number, _, unit = shown.partition(" ")
        assert float(number) * units.get(unit, 1) == getattr(defaults, name), name
