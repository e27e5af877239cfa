"""``dicom-node backfill`` and ``[[pull]]`` schedules against a real Orthanc and a real node.

The scenario of issue 16: studies reached the PACS while the node was down (or the PACS's
auto-route gave up), and nothing sent them on. The node, back, pulls them from the PACS
(QIDO-RS + WADO-RS, or C-FIND + C-MOVE), they complete and route as if sent, and a second
run finds nothing left to do. Once the workers run a new model version, the studies done by the
old one are re-run from the node's copy, and their new results supersede the old.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from sqlalchemy import func, select

from dicom_node.jobs import result_lineage
from dicom_node.state import AuditEvent, Instance, JobState, Study
from dicom_node.state.model_versions import current_versions
from tests.dicomgen import CANARY_NAME, ct_series
from tests.peers import NodeProcess, Orthanc, free_port, wait_until
from tests.pipeline_env import DEFAULT_CONFIG, NodeEnv

pytestmark = pytest.mark.slow

NOTHING_TO_DO = {"pull": 0, "done": 3, "in-progress": 0, "rerun": 0, "stale": 0}

STUDY_DATE = date(2026, 11, 29)  # what tests/dicomgen.py writes
SINCE = (STUDY_DATE - timedelta(days=1)).isoformat()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "pacs").start()
    yield server
    server.stop()


def node_env(tmp_path: Path, sqlite_url: str, pacs: Orthanc, extra: str = "") -> NodeEnv:
    config = DEFAULT_CONFIG.format(seconds=0.0) + (
        f'\n[destinations.pacs]\nurl = "{pacs.dicomweb_url_with_credentials}"\n' + extra
    )
    return NodeEnv(
        tmp_path / "node",
        sqlite_url,
        broker_url=None,
        embedded_workers=1,
        config_text=config,
    )


def studies_in_pacs(tmp_path: Path, pacs: Orthanc) -> dict[str, str]:
    """Two CT studies and one MR study uploaded to the PACS: Study UID -> modality."""
    made = {}
    for name, modality in (("ct1", "CT"), ("ct2", "CT"), ("mr", "MR")):
        files = ct_series(tmp_path / name, slices=5, modality=modality)
        made[str(pydicom.dcmread(files[0]).StudyInstanceUID)] = modality
        pacs.upload(files)
    return made


def backfill(node: NodeProcess, *args: str) -> tuple[int, dict[str, Any], str]:
    run = node.run("backfill", "--since", SINCE, "--json", *args, timeout=180)
    out = json.loads(run.stdout) if run.stdout.strip().startswith("{") else {}
    return run.returncode, out, run.stdout + run.stderr


def node_instances(env: NodeEnv) -> int:
    with env.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def test_backfill_pulls_what_the_node_missed_and_a_second_run_skips_it(
    tmp_path: Path, sqlite_url: str, pacs: Orthanc
) -> None:
    made = studies_in_pacs(tmp_path, pacs)  # arrived at the PACS while the node was down
    env = node_env(tmp_path, sqlite_url, pacs).start()
    try:
        node = env.node
        rc, dry, text = backfill(node, "--from", pacs.dicomweb_url_with_credentials, "--dry-run")
        assert rc == 0, text
        assert dry["found"] == 3 and dry["by_action"]["pull"] == 3 and dry["dry_run"], text
        assert {s["study_instance_uid"] for s in dry["studies"]} == set(made)
        assert "orthanc-test" not in text  # the source is shown without its password
        assert node_instances(env) == 0 and env.jobs() == []  # a dry run pulls nothing

        rc, ct_only, text = backfill(node, "--from", "pacs", "--dry-run", "--modality", "ct")
        assert rc == 0 and ct_only["found"] == 2, text
        assert {s["study_instance_uid"] for s in ct_only["studies"]} == {
            uid for uid, modality in made.items() if modality == "CT"
        }

        rc, first, text = backfill(node, "--from", "pacs")  # a configured destination's name
        assert rc == 0, text
        assert first["pulled"] == 3 and first["instances"] == 15 and first["failed"] == 0, text
        assert node_instances(env) == 15
        jobs = env.wait_all_terminal(3)
        by_study = {j.study_id: j for j in jobs}
        assert len(by_study) == 3
        assert sorted(j.state for j in jobs) == [
            JobState.DONE.value,
            JobState.DONE.value,
            JobState.SKIPPED.value,  # the MR study: no routing rule for it, as if it was sent
        ], env.diagnostics()
        with env.db.session() as s:
            assert {st.source for st in s.scalars(select(Study))} == {"backfill"}
        # The CT results went back into the PACS (SR + SEG in each CT study) ...
        wait_until(
            lambda: all(
                len(pacs.instances_in_study(uid)) == 7 for uid, m in made.items() if m == "CT"
            ),
            60,
            message="results in the PACS",
        )

        # ... and the next run finds nothing to do, those results included.
        rc, second, text = backfill(node, "--from", "pacs")
        assert rc == 0, text
        assert second["by_action"] == NOTHING_TO_DO, text
        assert second["pulled"] == 0
        assert len(env.jobs()) == 3 and node_instances(env) == 15

        # Human output: counts and UIDs, never a patient's name; the audit trail has counts.
        plain = node.run("backfill", "--from", "pacs", "--since", SINCE, "--dry-run")
        assert plain.returncode == 0 and "already done 3" in plain.stdout, plain.stdout
        assert CANARY_NAME not in plain.stdout + plain.stderr + node.log()
        with env.db.session() as s:
            runs = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "backfill-run")))
        assert len(runs) == 5 and all(r.actor == "cli" for r in runs)
        assert not any(uid in json.dumps(r.detail) for r in runs for uid in made)

        # A new model version: once the workers run it (they publish it when they start),
        # the CT studies done by the old one are re-run from the node's copy, nothing pulled,
        # and their new results supersede the old ones in the PACS.
        old_jobs = {j.study_id: j for j in jobs if j.state == JobState.DONE.value}
        env.node.stop()
        env.config.write_text(
            env.config.read_text().replace("seconds = 0.0", 'seconds = 0.0\nversion = "2.0.0"')
        )
        env.node.start()
        wait_until(
            lambda: current_versions(env.db).get("test-slow") == "2.0.0",
            60,
            message="the worker publishes test-slow 2.0.0",
        )
        rc, listed, text = backfill(node, "--from", "pacs", "--dry-run", "--no-rerun")
        assert rc == 0 and listed["by_action"] == {**NOTHING_TO_DO, "done": 1, "stale": 2}, text
        rc, dry, text = backfill(node, "--from", "pacs", "--dry-run")
        assert rc == 0 and dry["by_action"] == {**NOTHING_TO_DO, "done": 1, "rerun": 2}, text
        assert {s["study_instance_uid"] for s in dry["studies"] if s["action"] == "rerun"} == {
            uid for uid, m in made.items() if m == "CT"
        }
        assert len(env.jobs()) == 3  # a dry run re-runs nothing
        rc, third, text = backfill(node, "--from", "pacs", "--limit", "1")  # re-runs count
        assert rc == 0 and third["rerun"] == 1 and third["deferred"] == 1, text
        assert third["pulled"] == 0 and third["rerun_jobs"] == 1, text
        rc, fourth, text = backfill(node, "--from", "pacs")
        assert rc == 0 and fourth["rerun"] == 1 and fourth["pulled"] == 0, text
        # the MR study, and the first re-run's study (done, or its job still running)
        assert fourth["by_action"]["in-progress"] + fourth["by_action"]["done"] == 2, text

        jobs = env.wait_all_terminal(5)
        reruns = [j for j in jobs if j.generation == 1]
        assert len(reruns) == 2, env.diagnostics()
        for job in reruns:
            old = old_jobs[job.study_id]
            assert (job.state, job.model_version) == (JobState.DONE.value, "2.0.0")
            assert (job.supersedes_id, job.input_hash) == (old.id, old.input_hash)
            assert result_lineage(env.db, job.id).superseded_job_id == old.id
        assert node_instances(env) == 15  # nothing pulled again
        # The new SR + SEG and an IOCM rejection note withdrawing the old ones (supersede =
        # "kos", the default) in each CT study.
        wait_until(
            lambda: all(
                len(pacs.instances_in_study(uid)) == 10 for uid, m in made.items() if m == "CT"
            ),
            60,
            message="new results and rejection notes in the PACS",
        )
        env.assert_every_complete_study_terminal()  # one job per (version, rule, model, re-run)
        models = {m["name"]: m for m in json.loads(node.run("models", "--json").stdout)}
        assert {w["version"] for w in models["test-slow"]["workers"]} == {"2.0.0"}, models
        shown = json.loads(node.run("jobs", "--json").stdout)
        assert sorted(j["rerun"] for j in shown) == [0, 0, 0, 1, 1], shown
        rc, last, text = backfill(node, "--from", "pacs", "--dry-run")
        assert rc == 0 and last["by_action"] == {**NOTHING_TO_DO, "done": 3}, text
        plain = node.run("backfill", "--from", "pacs", "--since", SINCE, "--dry-run")
        assert "to re-run 0, already done 3" in plain.stdout, plain.stdout
    finally:
        env.stop()


def test_backfill_by_cfind_and_cmove(tmp_path: Path, sqlite_url: str, pacs: Orthanc) -> None:
    made = studies_in_pacs(tmp_path, pacs)
    env = node_env(tmp_path, sqlite_url, pacs).start()
    try:
        # The PACS must know the node's AE title to move studies to it (and to answer its C-FIND).
        pacs.add_modality("ainode", "AINODE", env.node.dicom_port)
        source = f"dicom://{pacs.aet}@127.0.0.1:{pacs.dicom_port}"
        rc, dry, text = backfill(env.node, "--from", source, "--dry-run", "--modality", "CT")
        assert rc == 0 and dry["found"] == 2 and dry["by_action"]["pull"] == 2, text

        rc, first, text = backfill(env.node, "--from", source)
        assert rc == 0 and first["pulled"] == 3, text
        wait_until(lambda: node_instances(env) == 15, 60, message="moved instances at the node")
        env.wait_all_terminal(3)
        with env.db.session() as s:
            assert {st.source for st in s.scalars(select(Study))} == {"dimse"}  # via C-STORE

        rc, second, text = backfill(env.node, "--from", source)
        assert rc == 0 and second["by_action"]["pull"] == 0 and second["pulled"] == 0, text
        assert len(made) == 3
    finally:
        env.stop()


def test_an_unreachable_or_unknown_source_is_one_clear_line(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node")  # not started: backfill needs only the state database
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    for source in (dead, f"dicom://PACS@127.0.0.1:{free_port()}"):
        run = node.run("backfill", "--from", source, "--since", SINCE, timeout=60)
        assert run.returncode == 3, run.stdout + run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    run = node.run("backfill", "--from", "nowhere", "--since", SINCE)
    assert run.returncode == 2 and "unknown source 'nowhere'" in run.stderr, run.stderr
    run = node.run("backfill", "--from", dead, "--since", "yesterday")
    assert run.returncode == 2 and "not a date" in run.stderr, run.stderr


def test_a_pull_schedule_brings_missed_studies_without_anyone_asking(
    tmp_path: Path, sqlite_url: str, pacs: Orthanc
) -> None:
    made = studies_in_pacs(tmp_path, pacs)
    schedule = (
        '\n[[pull]]\nname = "pacs-catch-up"\nsource = "pacs"\ninterval_s = 10\n'
        f'lookback_hours = {((date.today() - STUDY_DATE).days + 2) * 24}\nmodality = "CT"\n'
    )
    env = node_env(tmp_path, sqlite_url, pacs, extra=schedule)
    env.node.env["DICOM_NODE_HTTP__USERS"] = json.dumps({"admin": "admin-password-1"})
    env.start()
    try:
        jobs = env.wait_all_terminal(2, timeout=120)
        assert all(j.state == JobState.DONE.value for j in jobs), env.diagnostics()
        assert node_instances(env) == 10  # the CT studies only
        time.sleep(12)  # a second run: nothing more to pull
        assert len(env.jobs()) == 2
        with env.db.session() as s:
            runs = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "backfill-run")))
        assert len(runs) >= 2 and {r.actor for r in runs} == {"pull:pacs-catch-up"}
        text = requests.get(
            f"http://127.0.0.1:{env.node.http_port}/metrics",
            auth=("admin", "admin-password-1"),
            timeout=10,
        ).text
        assert 'dicom_node_pull_runs_total{outcome="success",pull="pacs-catch-up"}' in text, text
        assert 'dicom_node_pull_studies_total{pull="pacs-catch-up"} 2.0' in text
        assert len(made) == 3
    finally:
        env.stop()
