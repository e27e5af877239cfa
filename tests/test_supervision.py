"""``dicom-node serve``'s child processes: they die with the main process (even SIGKILLed, so a
restart finds the port free), a receiver or embedded worker that dies alone is restarted, a
crash loop ends the node with exit code 1, and each process sweeps only its own temporary
files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicom_node.spool import Spool
from tests.dicomgen import ct_series
from tests.peers import NodeProcess, free_port, port_open, wait_until
from tests.scp_support import instance_rows, running_receiver, store_files, temp_files
from tests.test_serve import ThrottlingProxy

LIGHT = {"DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0", "DICOM_NODE_SCP__MIN_FREE_BYTES": "0"}


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for kid in _children(todo.pop()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _receivers(node: NodeProcess) -> list[int]:
    assert node.proc is not None
    return [p for p in _children(node.proc.pid) if "spawn_main" in _cmdline(p) and _alive(p)]


def _workers(node: NodeProcess) -> list[int]:
    assert node.proc is not None
    return [p for p in _children(node.proc.pid) if " worker " in _cmdline(p) and _alive(p)]


def test_spool_sweeps_only_its_own_and_dead_owners_temporary_files(tmp_path: Path) -> None:
    first, second = Spool(tmp_path / "spool"), Spool(tmp_path / "spool")
    first.prepare()
    mine, theirs = first.write_temp(bytes(200)), second.write_temp(bytes(200))
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = first.tmp / f"{dead.pid}-1-{'0' * 32}.part"  # written by a process that is gone
    orphan.write_bytes(b"x")
    assert first.sweep_temp() == 2
    assert not mine.exists() and not orphan.exists() and theirs.exists()
    # older_than: anyone's file that old; everyone: all (start-up, nothing else running)
    assert first.sweep_temp(older_than=3600) == 0 and theirs.exists()
    os.utime(theirs, (time.time() - 7200, time.time() - 7200))
    assert first.sweep_temp(older_than=3600) == 1
    second.write_temp(bytes(200))
    assert first.sweep_temp(everyone=True) == 1
    assert list(first.tmp.iterdir()) == []


def test_a_child_started_after_its_parent_died_exits_at_once() -> None:
    """The race prctl(2) leaves open: the parent died before the child asked to die with it."""
    code = "from dicom_node.supervision import die_with_parent; die_with_parent(1); print('alive')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "alive" not in result.stdout


def test_a_stopping_receiver_leaves_another_receivers_transfer_alone(
    make_settings: Callable[..., Any], sqlite_url: str, tmp_path: Path
) -> None:
    """Two receivers on one spool: while a large instance streams into the first (spilled to
    a temporary file), the second stops; the first's file survives and the store succeeds."""
    scp = {"receivers": 1, "min_free_bytes": 0}
    first_settings = make_settings(database_url=sqlite_url, scp=scp)
    second_settings = make_settings(database_url=sqlite_url, scp=scp)
    (big,) = ct_series(tmp_path / "big", slices=1, size=2400)  # 11.5 MB: spills after 8 MB
    with running_receiver(first_settings) as first:
        proxy = ThrottlingProxy(int(first.server.server_address[1]), rate=2_000_000)
        statuses: list[Any] = []
        sender = threading.Thread(
            target=store_files, args=(proxy.port, [big]), kwargs={"timeout": 60, "statuses": statuses}
        )
        with running_receiver(second_settings):
            sender.start()
            spilled = wait_until(
                lambda: [p for p in temp_files(first_settings.data_dir) if p.suffix == ".part"],
                60,
                0.05,
                message="transfer spilled to a temporary file",
            )
        # the second receiver has stopped (and swept) while the transfer is still running
        assert sender.is_alive() and all(p.exists() for p in spilled)
        sender.join(60)
        assert statuses == [0x0000]
        assert len(instance_rows(sqlite_url)) == 1


@pytest.mark.slow
def test_children_are_restarted_and_die_with_a_killed_node(tmp_path: Path, sqlite_url: str) -> None:
    """One node, two receivers and an embedded Celery worker (with its pool child):
    a SIGKILLed worker and a SIGKILLed receiver are restarted and C-STORE still succeeds;
    then the node's main process is SIGKILLed: every descendant is gone within seconds, the
    port is free, and a new ``serve`` on the same data directory and port starts."""
    env = {"DICOM_NODE_WORKER__EMBEDDED_WORKERS": "1", "DICOM_NODE_SCP__MIN_FREE_BYTES": "0"}
    node = NodeProcess(tmp_path / "var", {**env, "DICOM_NODE_SCP__RECEIVERS": "2"})
    again = NodeProcess(tmp_path / "var", LIGHT)
    again.dicom_port, again.env["DICOM_NODE_DICOM_PORT"] = node.dicom_port, str(node.dicom_port)
    try:
        node.start()
        assert node.proc is not None
        (worker,) = wait_until(lambda: _workers(node), 60, message="embedded worker")
        wait_until(lambda: _children(worker), 120, 0.5, message="embedded worker's pool child")
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: [w for w in _workers(node) if w != worker], 60, message="worker restarted")
        assert "embedded worker 0 exited (code -9); restarting it" in node.log()

        receivers = wait_until(lambda: len(_receivers(node)) == 2 and _receivers(node), 30)
        os.kill(receivers[0], signal.SIGKILL)
        wait_until(lambda: len(set(_receivers(node)) - set(receivers)) == 1, 60, message="receiver restarted")
        paths = ct_series(tmp_path / "s", slices=4, size=32)
        for i in range(4):  # both receivers (the kernel spreads connections over them) answer
            assert store_files(node.dicom_port, paths[i : i + 1]) == [0x0000]
        assert "receiver-0 exited (code -9); restarting it" in node.log()
        assert node.proc.poll() is None

        wait_until(lambda: _children(_workers(node)[0]), 120, 0.5, message="new worker's pool child")
        family = _descendants(node.proc.pid)
        assert len(family) >= 5, [_cmdline(p) for p in family]  # 2 receivers, worker + child, ...
        node.proc.kill()
        node.proc.wait(10)
        wait_until(lambda: not any(_alive(p) for p in family), 20, 0.2, message="all children gone")
        assert not port_open(node.dicom_port)
        again.start()  # same data directory (its lock was freed) and same DICOM port
        assert store_files(again.dicom_port, paths[:1]) == [0x0000]
        assert again.stop() == 0
    finally:
        node.kill()
        again.kill()


def test_a_receiver_crash_loop_stops_the_node_with_exit_code_1(tmp_path: Path, sqlite_url: str) -> None:
    node = NodeProcess(tmp_path / "var", {**LIGHT, "DICOM_NODE_SCP__RECEIVERS": "2"})
    try:
        node.start()
        assert node.proc is not None
        killed: set[int] = set()
        deadline = time.monotonic() + 120
        while node.proc.poll() is None and time.monotonic() < deadline:
            for pid in set(_receivers(node)) - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.2)
        assert node.proc.wait(60) == 1, node.log()
        # 5 restarts allowed within a minute; the 6th death ends it
        assert node.log().count("exited (code -9); restarting it") == 5
        assert len(killed) >= 6
        assert "after 5 restarts within 60 s: crash loop; stopping the node (exit code 1)" in node.log()
        assert not port_open(node.dicom_port)
        assert free_port()
    finally:
        node.kill()
