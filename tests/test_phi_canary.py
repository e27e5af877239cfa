"""Patient data stays in the images: a run with canary patient names leaves audit and log lines
for every step, and the canary appears in no log line, audit record, job record, Redis key or
value, or exception text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.state import AuditEvent, Job, JobState
from tests.dicomgen import CANARY_ID, CANARY_NAME, ct_series
from tests.peers import Orthanc, RedisServer
from tests.pipeline_env import NodeEnv

pytestmark = pytest.mark.slow

CANARIES = ("PHICANARY", CANARY_ID, CANARY_NAME.split("^")[0])


def _redis_dump(redis_server: RedisServer) -> str:
    client = redis_server.client()
    parts = []
    for key in client.scan_iter(count=1000):
        parts.append(key.decode(errors="replace"))
        kind = client.type(key).decode()
        if kind == "string":
            parts.append(client.get(key).decode(errors="replace"))
        elif kind == "list":
            parts.extend(v.decode(errors="replace") for v in client.lrange(key, 0, -1))
        elif kind == "hash":
            parts.extend(f"{k.decode(errors='replace')}={v.decode(errors='replace')}" for k, v in client.hgetall(key).items())
        elif kind == "set":
            parts.extend(v.decode(errors="replace") for v in client.smembers(key))
        elif kind == "zset":
            parts.extend(v.decode(errors="replace") for v in client.zrange(key, 0, -1))
    return "\n".join(parts)


def test_canary_patient_data_never_leaks(
    tmp_path: Path, database_url: str, redis_server: RedisServer, clean_orthanc: Orthanc
) -> None:
    env = NodeEnv(
        tmp_path / "n",
        database_url,
        broker_url=redis_server.url,
        extra_env={
            "DICOM_NODE_DESTINATION": clean_orthanc.dicomweb_url_with_credentials,
            "DICOM_NODE_LOG__LEVEL": "DEBUG",
        },
    ).start()
    try:
        env.add_worker()
        # One study that is processed and delivered, one that crashes its worker (exception and
        # failure paths must be clean too), both with canary patient name and ID.
        env.send(ct_series(tmp_path / "ok", slices=8, size=64, patient_name=CANARY_NAME, patient_id=CANARY_ID))
        env.send(
            ct_series(
                tmp_path / "poison", slices=8, size=64, patient_name=CANARY_NAME, patient_id=CANARY_ID, description="POISON"
            )
        )
        jobs = env.wait_all_terminal(2, timeout=180)
        states = sorted(j.state for j in jobs)
        assert states == [JobState.DONE.value, JobState.FAILED.value], env.diagnostics()

        with env.db.session() as s:
            audit = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
            job_rows = list(s.scalars(select(Job)))
        events = {a.event for a in audit}
        assert {
            "node-started",
            "association-accepted",
            "study-received",
            "study-completed",
            "job-state",
            "result-delivered",
        } <= events
        done = next(j for j in job_rows if j.state == JobState.DONE.value)
        job_states = [a.detail.get("state") for a in audit if a.event == "job-state" and a.job_id == done.id]
        assert {"waiting", "running", "delivering", "done"} <= set(job_states)

        logs = env.node.log() + "".join(w.log() for w in env.workers)
        assert f"job={done.id}" in logs, "log lines carry the job id"
        texts = {
            "node and worker logs": logs,
            "audit records": json.dumps([[a.event, a.actor, a.outcome, a.study_key, a.job_id, a.detail] for a in audit]),
            "job records": json.dumps([[j.reason, j.summary, j.timings, j.rule, j.model] for j in job_rows]),
            "redis keys and values": _redis_dump(redis_server),
        }
        for where, text in texts.items():
            for canary in CANARIES:
                assert canary not in text, f"patient data ({canary!r}) leaked into {where}"
        # The canary is where it belongs: in the stored images (and the delivered results).
        spooled = list((env.node.data_dir / "spool").rglob("*.dcm"))
        assert any(CANARY_ID.encode() in p.read_bytes() for p in spooled)
    finally:
        env.stop()
