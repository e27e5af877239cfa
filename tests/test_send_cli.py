"""``dicom-node send`` and ``dicom-node echo`` as a user runs them: subprocesses against a real
listener, checking exit codes, the per-status summary and what arrived."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydicom import dcmread

from tests.dicomgen import ct_series
from tests.peers import REPO, free_port
from tests.scp_support import instance_rows, running_receiver


def dicom_node(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _target(receiver: Any) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(receiver.server.server_address[1]), "--aet", "AINODE"]


def _sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_send_files_and_folders_recursively_over_one_association(receiver: Any, tmp_path: Path) -> None:
    nested = ct_series(tmp_path / "study" / "series1" / "deeper", slices=5, size=32)
    more = ct_series(tmp_path / "study" / "series2", slices=4, size=32)
    single = ct_series(tmp_path / "single", slices=1, size=32)
    (tmp_path / "study" / "README.txt").write_text("not dicom")
    result = dicom_node("send", *_target(receiver), "--json", str(tmp_path / "study"), str(single[0]))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sent"] == 10
    assert summary["skipped_not_dicom"] == 1
    assert summary["by_category"] == {"success": 10}
    assert summary["by_status"] == {"0x0000 Success": 10}
    assert summary["failures"] == []
    stored = {r.sop_instance_uid for r in instance_rows(receiver.settings.resolved_database_url)}
    assert stored == {_sop(p) for p in nested + more + single}
    assert receiver.associations["accepted"] == 1


def test_send_exits_non_zero_when_any_instance_fails_and_says_which(receiver: Any, tmp_path: Path) -> None:
    good = ct_series(tmp_path / "in" / "good", slices=3, size=32)
    bad_ds = dcmread(ct_series(tmp_path / "src", slices=1, size=32)[0])
    bad_ds.StudyInstanceUID = "1.2.3.abc"  # not a UID: the node answers C002
    bad = tmp_path / "in" / "bad.dcm"
    bad_ds.save_as(bad)
    result = dicom_node("send", *_target(receiver), "--json", str(tmp_path / "in"))
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["by_category"] == {"success": 3, "failure": 1}
    assert summary["by_status"]["0xC002 Cannot understand: invalid UID"] == 1
    (failure,) = summary["failures"]
    assert failure["path"] == str(bad)
    assert "abc" not in failure["detail"]  # the reason does not echo the hostile value back
    stored = {r.sop_instance_uid for r in instance_rows(receiver.settings.resolved_database_url)}
    assert stored == {_sop(p) for p in good}


def test_send_prints_a_per_status_table(receiver: Any, tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=3, size=32)
    result = dicom_node("send", *_target(receiver), "--no-progress", *map(str, paths))
    assert result.returncode == 0, result.stderr
    assert "0x0000 Success" in result.stdout
    assert "│ 3" in result.stdout or " 3 " in result.stdout


def test_send_to_nobody_exits_3(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=1, size=32)
    result = dicom_node("send", "--host", "127.0.0.1", "--port", str(free_port()), "--json", str(paths[0]))
    assert result.returncode == 3
    summary = json.loads(result.stdout)
    assert summary["by_category"] == {"failure": 1}


def test_send_missing_path_or_no_dicom_is_a_usage_error(tmp_path: Path) -> None:
    assert dicom_node("send", str(tmp_path / "nope")).returncode == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    result = dicom_node("send", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert "no DICOM files" in result.stderr


def test_echo_answers_and_reports_failures(receiver: Any, make_settings: Any, sqlite_url: str) -> None:
    result = dicom_node("echo", *_target(receiver))
    assert result.returncode == 0, result.stderr
    assert "0x0000 Success" in result.stdout
    # nobody listening
    result = dicom_node("echo", "--host", "127.0.0.1", "--port", str(free_port()))
    assert result.returncode == 3
    # refused by the allow-list: unreachable for the user, with the reason
    settings = make_settings(database_url=sqlite_url, data_dir=Path(receiver.settings.data_dir).parent / "var2",
                             scp={"receivers": 1, "allowed_callers": [{"ae_title": "OTHER"}]})
    with running_receiver(settings) as strict:
        result = dicom_node("echo", "--host", "127.0.0.1", "--port", str(strict.server.server_address[1]))
        assert result.returncode == 3
        assert "rejected" in result.stderr


def test_help_on_send_and_echo() -> None:
    for command in ("send", "echo"):
        result = dicom_node(command, "--help")
        assert result.returncode == 0
        assert "Usage" in result.stdout and "--port" in result.stdout
