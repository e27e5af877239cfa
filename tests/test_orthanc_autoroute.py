"""The shipped Orthanc configuration and its auto-route scripts, run for real: Orthanc started from
``orthanc/orthanc.json`` with ``orthanc/autoroute.lua`` next to it, or from
``orthanc/orthanc-python.json`` with the Python plugin loading ``orthanc/autoroute.py`` (only
paths, ports and users replaced), and ``dicom-node serve`` as the registered modality ``ainode``.

What stays for the job pipeline's end-to-end test: that the node's results, once written back,
land in the same study in Orthanc (here the results are uploaded by the test instead).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.delivery_peers import result_objects
from tests.dicomgen import CANARY_NAME, ct_series
from tests.peers import ORTHANC_PYTHON_PLUGIN, REPO, NodeProcess, Orthanc, wait_until

CONFIG = REPO / "orthanc" / "orthanc.json"
SCRIPT = REPO / "orthanc" / "autoroute.lua"
PYTHON_CONFIG = REPO / "orthanc" / "orthanc-python.json"
PYTHON_SCRIPT = REPO / "orthanc" / "autoroute.py"
STABLE_AGE = 2
# What differs between the shipped file and a test run on loopback; everything else is kept.
MACHINE_SPECIFIC = {
    "StorageDirectory",
    "IndexDirectory",
    "Plugins",
    "HttpPort",
    "DicomPort",
    "RegisteredUsers",
    "PythonScript",
}
# Where the Lua and the Python variants of the configuration differ: how the script is loaded.
SCRIPT_LOADING = {"Plugins", "LuaScripts", "LuaHeartBeatPeriod", "PythonScript"}


def shipped_config(kind: str = "lua") -> dict[str, Any]:
    return json.loads((CONFIG if kind == "lua" else PYTHON_CONFIG).read_text())


def script_settings(kind: str) -> dict[str, str]:
    """The settings block at the top of a script, as name -> the text of its value."""
    if kind == "lua":
        pattern = r"^local ([A-Z_]+) = (.+?)\s*(?:--.*)?$"
        text = SCRIPT.read_text()
    else:
        pattern = r"^([A-Z_]+)(?:: [^=]+)? = (.+?)\s*(?:#.*)?$"
        text = PYTHON_SCRIPT.read_text()
    return dict(re.findall(pattern, text, flags=re.M))


def test_shipped_configuration_is_safe_and_complete() -> None:
    cfg = shipped_config()
    assert (
        cfg["AuthenticationEnabled"] is True and cfg["RegisteredUsers"] == {}
    )  # users in a separate file
    assert cfg["ExecuteLuaEnabled"] is False and cfg["RestApiWriteToFileSystemEnabled"] is False
    assert cfg["DicomAlwaysAllowFind"] is False and cfg["DicomAlwaysAllowMove"] is False
    assert cfg["DicomWeb"]["Enable"] is True
    node = cfg["DicomModalities"]["ainode"]
    assert (node["AET"], node["Port"], node["AllowStore"], node["AllowFind"]) == (
        "AINODE",
        11112,
        True,
        True,
    )
    assert cfg["LuaScripts"] == ["autoroute.lua"] and (CONFIG.parent / "autoroute.lua").is_file()
    assert "AiNodeRouted" in cfg["UserMetadata"] and "AiNodePending" in cfg["UserMetadata"]
    assert cfg["LuaHeartBeatPeriod"] > 0  # the retry timer on Orthanc >= 1.11.1
    # The Python variant is the same configuration; only the way the script is loaded differs.
    python = shipped_config("python")
    assert {k: v for k, v in python.items() if k not in SCRIPT_LOADING} == {
        k: v for k, v in cfg.items() if k not in SCRIPT_LOADING
    }
    assert "LuaScripts" not in python  # both scripts at once would send every study twice
    assert python["Plugins"] == [*cfg["Plugins"], str(ORTHANC_PYTHON_PLUGIN)]
    # The Python plugin resolves a relative PythonScript against its working directory, not
    # against the configuration: the path is absolute, the folder the README installs into.
    assert python["PythonScript"] == "/etc/orthanc-ainode/autoroute.py" and PYTHON_SCRIPT.is_file()
    # Both scripts route the same way and share their metadata, so a site can switch.
    lua, py = script_settings("lua"), script_settings("python")
    for name in ("TARGET", "ROUTED", "PENDING"):
        assert lua[name].strip("'") == py[name].strip('"'), name
    assert (lua["TARGET"], lua["ROUTED"], lua["PENDING"]) == (
        "'ainode'",
        "'AiNodeRouted'",
        "'AiNodePending'",
    )
    assert set(cfg["UserMetadata"]) == {"AiNodeRouted", "AiNodePending"}
    for name in ("MIN_INSTANCES", "RETRY_FIRST", "RETRY_MAX"):
        assert lua[name] == py[name], name
    assert set(re.findall(r"(\w+) = true", lua["NEVER_ROUTE"])) == set(
        re.findall(r'"(\w+)"', py["NEVER_ROUTE"])
    )
    assert set(re.findall(r"(\w+) = true", lua["MODALITIES"])) == set(
        re.findall(r'"(\w+)"', py["MODALITIES"])
    )
    example = json.loads((CONFIG.parent / "credentials.json.example").read_text())
    assert example["RegisteredUsers"]


def node_instances(node: NodeProcess, study_uid: str) -> list[tuple[str, str]]:
    """(SOP Class UID, Series Instance UID) of what the node received for a study."""
    db = node.data_dir / "state.sqlite"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT i.sop_class_uid, se.series_instance_uid FROM instances i "
            "JOIN studies s ON i.study_id = s.id JOIN series se ON i.series_id = se.id "
            "WHERE s.study_instance_uid = ?",
            (study_uid,),
        ).fetchall()


def instance_count_is(node: NodeProcess, study_uid: str, count: int) -> bool:
    return len(node_instances(node, study_uid)) == count


def node_duplicates(node: NodeProcess) -> int:
    with sqlite3.connect(node.data_dir / "state.sqlite") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM duplicate_events").fetchone()[0])


def store_jobs(orthanc: Orthanc) -> list[dict[str, Any]]:
    jobs = orthanc.get("/jobs", params={"expand": ""}).json()
    return [j for j in jobs if j.get("Type") == "DicomModalityStore"]


def routed_count(orthanc: Orthanc, study_uid: str) -> dict[str, str]:
    """Series (by Orthanc ID) of a study with their AiNodeRouted metadata."""
    found = orthanc.post("/tools/lookup", data=study_uid).json()
    out = {}
    for series in orthanc.get(f"/studies/{found[0]['ID']}/series").json():
        names = orthanc.get(f"/series/{series['ID']}/metadata").json()
        if "AiNodeRouted" in names:
            out[series["ID"]] = orthanc.get(f"/series/{series['ID']}/metadata/AiNodeRouted").text
    return out


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    proc = NodeProcess(
        tmp_path / "node",
        env={
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",  # receiving is what is tested here
            "DICOM_NODE_STABLE_SECONDS": "3600",
        },
    ).start()
    yield proc
    proc.stop()


def script_orthanc(workdir: Path, node: NodeProcess, kind: str, **settings: int) -> Orthanc:
    """An Orthanc (not started) configured like the shipped ``kind`` ("lua" or "python"), its
    script copied next to the configuration with ``settings`` replaced at the top."""
    if kind == "python" and not ORTHANC_PYTHON_PLUGIN.exists():
        pytest.skip("Orthanc's Python plugin is not installed (apt-get install orthanc-python)")
    workdir.mkdir(parents=True)
    source = SCRIPT if kind == "lua" else PYTHON_SCRIPT
    script = source.read_text()
    prefix = "local " if kind == "lua" else ""
    for name, value in settings.items():
        script, replaced = re.subn(
            rf"^{prefix}{name} = \d+", f"{prefix}{name} = {value}", script, flags=re.M
        )
        assert replaced == 1, name
    (workdir / source.name).write_text(script)  # the shipped layout: script next to the config
    extra = {k: v for k, v in shipped_config(kind).items() if k not in MACHINE_SPECIFIC}
    extra["DicomModalities"]["ainode"]["Port"] = node.dicom_port
    extra["StableAge"] = STABLE_AGE
    extra["SaveJobs"] = False
    python_script = workdir / source.name if kind == "python" else None
    return Orthanc(workdir, extra=extra, python_script=python_script)


@pytest.fixture(params=["lua", "python"])
def routing_orthanc(
    request: pytest.FixtureRequest, tmp_path: Path, node: NodeProcess
) -> Iterator[Orthanc]:
    server = script_orthanc(tmp_path / "orthanc", node, request.param).start()
    yield server
    server.stop()


def orthanc_log(orthanc: Orthanc) -> str:
    return (orthanc.workdir / "orthanc.log").read_text(errors="replace")[-4000:]


def test_stable_ct_study_is_routed_to_the_node_and_results_are_not(
    tmp_path: Path, routing_orthanc: Orthanc, node: NodeProcess
) -> None:
    orthanc = routing_orthanc
    ct = ct_series(tmp_path / "ct-a", slices=6)
    study_a = str(pydicom.dcmread(ct[0]).StudyInstanceUID)

    orthanc.upload(ct)

    wait_until(lambda: len(node_instances(node, study_a)) == 6, 60, message="CT study at the node")
    wait_until(
        lambda: list(routed_count(orthanc, study_a).values()) == ["6"],
        30,
        message="series marked routed",
    )

    # A late slice makes the study stable again: the series is sent again (the node keeps one
    # copy of each instance it already had).
    late = ct_series(
        tmp_path / "ct-late",
        slices=7,
        study_uid=study_a,
        series_uid=str(pydicom.dcmread(ct[0]).SeriesInstanceUID),
    )[-1]
    orthanc.upload([late])
    wait_until(
        lambda: len(node_instances(node, study_a)) == 7, 60, message="late slice at the node"
    )
    wait_until(
        lambda: list(routed_count(orthanc, study_a).values()) == ["7"],
        30,
        message="new count recorded",
    )
    jobs_before_results = len(store_jobs(orthanc))
    duplicates_before_results = node_duplicates(node)

    # The node's results come back into the same study (uploaded here; the pipeline does it for
    # real): a SEG, an SR, and an "AI:" image series that passes the CT filter but is ours.
    seg, sr = result_objects(tmp_path / "results", study_uid=study_a)
    ai_images = ct_series(
        tmp_path / "ai-images", slices=2, study_uid=study_a, description="AI: nodule heatmap"
    )
    orthanc.upload([seg, sr, *ai_images])
    # A different CT study afterwards: once it has arrived, the earlier stable event was handled.
    control = ct_series(tmp_path / "ct-b", slices=3)
    study_b = str(pydicom.dcmread(control[0]).StudyInstanceUID)
    orthanc.upload(control)
    wait_until(
        lambda: len(node_instances(node, study_b)) == 3, 60, message="control study at the node"
    )
    wait_until(lambda: len(routed_count(orthanc, study_b)) == 1, 30, message="control marked")

    at_node = node_instances(node, study_a)
    result_series = {str(pydicom.dcmread(p).SeriesInstanceUID) for p in (seg, sr, ai_images[0])}
    assert len(at_node) == 7, orthanc_log(orthanc)
    assert not result_series & {series for _, series in at_node}, (
        "the node's own output was routed back to it"
    )
    assert len(store_jobs(orthanc)) == jobs_before_results + 1  # only the control study's job
    assert node_duplicates(node) == duplicates_before_results  # the CT was not sent a third time
    assert all(j["State"] == "Success" for j in store_jobs(orthanc))


def test_studies_routed_while_the_node_is_down_reach_it_after_an_orthanc_restart(
    tmp_path: Path,
) -> None:
    """Node down -> studies stored -> Orthanc restarted (node still down) -> node started -> the
    next study arrives: every study reaches the node with nobody touching anything (the PENDING
    queue in autoroute.lua). Orthanc 1.10 has no Lua timer, so the retry rides on the next event;
    from 1.11.1 OnHeartBeat also retries on time."""
    node = NodeProcess(
        tmp_path / "node",
        env={"DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0", "DICOM_NODE_STABLE_SECONDS": "3600"},
    )  # ports chosen, not started
    orthanc = script_orthanc(tmp_path / "orthanc", node, "lua", RETRY_FIRST=1, RETRY_MAX=2).start()
    try:
        studies = []
        for name in ("a", "b", "c"):
            ct = ct_series(tmp_path / f"ct-{name}", slices=3)
            studies.append(str(pydicom.dcmread(ct[0]).StudyInstanceUID))
            orthanc.upload(ct)
        wait_until(
            lambda: (
                len(pending_studies(orthanc)) == 3
                and sum(j["State"] == "Failure" for j in store_jobs(orthanc)) >= 3
            ),
            60,
            message="three studies pending after failed store jobs",
        )
        orthanc.stop()
        orthanc.start()  # same database, same ports: the queue comes back from the metadata
        assert len(pending_studies(orthanc)) == 3
        wait_until(
            lambda: any(j["State"] == "Failure" for j in store_jobs(orthanc)),
            30,
            message="a retry after the restart (node still down)",
        )
        node.start()
        late = ct_series(tmp_path / "ct-late", slices=3)
        studies.append(str(pydicom.dcmread(late[0]).StudyInstanceUID))
        orthanc.upload(late)  # ordinary traffic: its stable event flushes the queue
        for study in studies:
            wait_until(
                partial(instance_count_is, node, study, 3),
                60,
                message="study at the node",
            )
        wait_until(lambda: not pending_studies(orthanc), 30, message="queue empty")
        assert all(list(routed_count(orthanc, s).values()) == ["3"] for s in studies)
        log = (orthanc.workdir / "orthanc.log").read_text(errors="replace")
        assert "not yet accepted" in log and CANARY_NAME not in log  # Orthanc IDs only
    finally:
        node.stop()
        orthanc.stop()


def pending_studies(orthanc: Orthanc) -> list[str]:
    return [
        study
        for study in orthanc.get("/studies").json()
        if "AiNodePending" in orthanc.get(f"/studies/{study}/metadata").json()
    ]


def test_python_plugin_retries_on_its_timer_after_an_orthanc_restart(tmp_path: Path) -> None:
    """Node down -> studies stored -> Orthanc restarted (node still down) -> node started ->
    every study reaches the node with nothing else happening in Orthanc: the Python plugin's own
    thread retries the PENDING queue on time, on Orthanc 1.10 as well. The node's results, when
    they come back into a study, are not routed back to it."""
    node = NodeProcess(
        tmp_path / "node",
        env={"DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0", "DICOM_NODE_STABLE_SECONDS": "3600"},
    )  # ports chosen, not started
    orthanc = script_orthanc(
        tmp_path / "orthanc", node, "python", RETRY_FIRST=1, RETRY_MAX=2, TICK=1
    ).start()
    try:
        studies = []
        for name in ("a", "b", "c"):
            ct = ct_series(tmp_path / f"ct-{name}", slices=3)
            studies.append(str(pydicom.dcmread(ct[0]).StudyInstanceUID))
            orthanc.upload(ct)
        wait_until(
            lambda: (
                len(pending_studies(orthanc)) == 3
                and sum(j["State"] == "Failure" for j in store_jobs(orthanc)) >= 3
            ),
            60,
            message="three studies pending after failed store jobs",
        )
        orthanc.stop()
        orthanc.start()  # same database, same ports: the queue comes back from the metadata
        assert len(pending_studies(orthanc)) == 3
        wait_until(
            lambda: sum(j["State"] == "Failure" for j in store_jobs(orthanc)) >= 3,
            30,
            message="retries after the restart (node still down)",
        )
        studies_in_orthanc = sorted(orthanc.get("/studies").json())

        node.start()  # and nothing else: no new study, no REST call that changes anything
        for study in studies:
            wait_until(
                partial(instance_count_is, node, study, 3),
                30,
                message="study at the node, retried on the plugin's timer",
            )
        wait_until(lambda: not pending_studies(orthanc), 30, message="queue empty")
        assert sorted(orthanc.get("/studies").json()) == studies_in_orthanc
        assert all(list(routed_count(orthanc, s).values()) == ["3"] for s in studies)
        log = (orthanc.workdir / "orthanc.log").read_text(errors="replace")
        assert "not yet accepted" in log and CANARY_NAME not in log  # Orthanc IDs only

        # The node's results come back into the first study: a SEG, an SR and an "AI:" image
        # series that passes the CT filter but is the node's own. None of it goes to the node.
        jobs_before_results = {j["ID"] for j in store_jobs(orthanc)}
        seg, sr = result_objects(tmp_path / "results", study_uid=studies[0])
        ai_images = ct_series(
            tmp_path / "ai-images", slices=2, study_uid=studies[0], description="AI: heatmap"
        )
        orthanc.upload([seg, sr, *ai_images])
        # A different CT study afterwards: once it has arrived, the earlier stable event was
        # handled (the plugin's thread takes stable studies in order).
        control = ct_series(tmp_path / "ct-control", slices=3)
        control_uid = str(pydicom.dcmread(control[0]).StudyInstanceUID)
        orthanc.upload(control)
        wait_until(lambda: len(node_instances(node, control_uid)) == 3, 60, message="control study")
        wait_until(lambda: len(routed_count(orthanc, control_uid)) == 1, 30, message="marked")
        result_series = {str(pydicom.dcmread(p).SeriesInstanceUID) for p in (seg, sr, ai_images[0])}
        at_node = node_instances(node, studies[0])
        assert len(at_node) == 3, orthanc_log(orthanc)
        assert not result_series & {series for _, series in at_node}, (
            "the node's own output was routed back to it"
        )
        new_jobs = [j for j in store_jobs(orthanc) if j["ID"] not in jobs_before_results]
        assert len(new_jobs) == 1 and new_jobs[0]["State"] == "Success"  # the control study's
        assert not pending_studies(orthanc)
    finally:
        node.stop()
        orthanc.stop()
