"""``dicom-node serve`` as a process: clean stop on SIGTERM/SIGINT (also mid-transfer), no
partial file under a final name, temporary files swept, one node per data directory and port,
and settings errors that name the setting and its environment variable (exit code 2)."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dicomgen import ct_series
from tests.peers import NodeProcess, free_port, wait_until
from tests.scp_support import instance_rows, spool_files, store_files, temp_files

LIGHT = {"DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0", "DICOM_NODE_SCP__MIN_FREE_BYTES": "0"}


@pytest.fixture
def node(tmp_path: Path, database_url: str) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path / "var", {**LIGHT, "DICOM_NODE_DATABASE_URL": database_url})
    try:
        yield proc
    finally:
        proc.kill()


def _assert_consistent(node: NodeProcess, db_url: str, expected: int) -> None:
    """Final names hold exactly the indexed instances, complete; no temporary file is left."""
    rows = instance_rows(db_url)
    assert len(rows) == expected
    spool = node.data_dir / "spool"
    assert {spool / r.path for r in rows} == set(spool_files(node.data_dir))
    for r in rows:
        assert (spool / r.path).stat().st_size == r.size
    assert temp_files(node.data_dir) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_signal(node: NodeProcess, database_url: str, tmp_path: Path, sig: int) -> None:
    node.start()
    paths = ct_series(tmp_path / "s", slices=5, size=64)
    assert store_files(node.dicom_port, paths) == [0] * 5
    assert node.proc is not None
    node.proc.send_signal(sig)
    assert node.proc.wait(timeout=60) == 0, node.log()
    _assert_consistent(node, database_url, 5)
    assert "Traceback" not in node.log()


class ThrottlingProxy:
    """A loopback TCP proxy that forwards the client's bytes at ``rate`` bytes/s (a slow link)."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port = target_port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttle: bool) -> None:
        chunk = 16384
        try:
            while data := src.recv(chunk):
                dst.sendall(data)
                if throttle:
                    self.forwarded += len(data)
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            # shutdown wakes the other pipe's thread; close (not only shutdown) makes the kernel
            # answer the client's further data with a reset. A socket that is only shut down
            # keeps accepting data into a buffer nobody reads, so a client blocked in send
            # (its window full, as under this throttle) would wait for ever.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            for s in (src, dst):
                s.close()


@pytest.mark.slow
def test_sigterm_while_a_large_transfer_is_in_flight(node: NodeProcess, database_url: str, tmp_path: Path) -> None:
    """The in-flight instance is aborted and never appears under a final name; its partial
    temporary file is swept; earlier instances that got success stay; the node exits 0.

    The big instance (50 MB at 1 MB/s) spills to disk after 8 MB, so SIGTERM comes about 8 s
    into it and the 10 s grace ends about 20 s before its last byte could arrive. The client's
    own timeouts are longer than all of that: the node's abort, not the client giving up, ends
    the transfer.
    """
    node.start()
    small = ct_series(tmp_path / "small", slices=2, size=64)
    big = ct_series(tmp_path / "big", slices=1, size=5000)
    proxy = ThrottlingProxy(node.dicom_port, rate=1_000_000)
    statuses: list[Any] = []
    sender = threading.Thread(
        target=store_files, args=(proxy.port, small + big), kwargs={"timeout": 120, "statuses": statuses}, daemon=True
    )
    sender.start()
    # wait until the big instance is well under way (spilled to a temporary file)
    wait_until(
        lambda: any(p.suffix == ".part" for p in temp_files(node.data_dir)), 60, message="big transfer spilled to disk"
    )
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=60) == 0, node.log()
    sender.join(60)
    assert not sender.is_alive(), "the client did not notice the aborted association"
    assert statuses[:2] == [0, 0]
    assert statuses[2:] in ([], [None])  # no response for the aborted instance
    assert proxy.forwarded < 45_000_000, "the big instance went through before the grace ended"
    _assert_consistent(node, database_url, 2)


def test_second_serve_on_the_same_data_dir_or_port_refuses_to_start(node: NodeProcess, tmp_path: Path, database_url: str) -> None:
    node.start()
    same_dir = NodeProcess(node.data_dir, {**LIGHT, "DICOM_NODE_DATABASE_URL": database_url})
    same_dir.data_dir = node.data_dir
    result = same_dir.run("serve", timeout=60)
    assert result.returncode == 2
    assert "already running with data directory" in result.stderr
    same_port = NodeProcess(tmp_path / "other", {**LIGHT, "DICOM_NODE_DICOM_PORT": str(node.dicom_port)})
    same_port.data_dir.mkdir()
    result = same_port.run("serve", timeout=60)
    assert result.returncode == 2
    assert f"DICOM port 127.0.0.1:{node.dicom_port} is already in use" in result.stderr
    # the first node is unaffected
    assert store_files(node.dicom_port, ct_series(tmp_path / "s", slices=1, size=16)) == [0]


def _serve_with(tmp_path: Path, env: dict[str, str], config: Path | None = None) -> Any:
    proc = NodeProcess(tmp_path / "var", env, config=config)
    return proc.run("serve", timeout=60)


def test_bad_environment_variable_names_the_setting(tmp_path: Path) -> None:
    result = _serve_with(tmp_path, {"DICOM_NODE_DICOM_PORT": "not-a-port"})
    assert result.returncode == 2
    assert "dicom_port" in result.stderr and "DICOM_NODE_DICOM_PORT" in result.stderr
    result = _serve_with(tmp_path, {"DICOM_NODE_SCP__MAX_ASSOCIATIONS": "0"})
    assert result.returncode == 2
    assert "scp.max_associations" in result.stderr and "DICOM_NODE_SCP__MAX_ASSOCIATIONS" in result.stderr


def test_bad_toml_gives_a_clear_message(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[scp\nmax_associations = 3\n")
    result = _serve_with(tmp_path, {}, config=broken)
    assert result.returncode == 2
    assert str(broken) in result.stderr and "not valid TOML" in result.stderr
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('ae_title = "THIS-AE-TITLE-IS-TOO-LONG"\n[scp]\nduplicate_policy = "sometimes"\n')
    result = _serve_with(tmp_path, {}, config=wrong)
    assert result.returncode == 2
    for needle in ("ae_title", "DICOM_NODE_AE_TITLE", "scp.duplicate_policy", "DICOM_NODE_SCP__DUPLICATE_POLICY"):
        assert needle in result.stderr
    missing = _serve_with(tmp_path, {}, config=tmp_path / "absent.toml")
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr


def test_serve_listens_on_loopback_only_by_default_port_given(tmp_path: Path, database_url: str) -> None:
    from tests.peers import listeners_of

    node = NodeProcess(tmp_path / "var", {**LIGHT, "DICOM_NODE_DATABASE_URL": database_url})
    node.env.pop("DICOM_NODE_BIND")
    try:
        node.start()
        assert node.proc is not None
        children = [int(c) for c in Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text().split()]
        addrs = [a for pid in [node.proc.pid, *children] for a in listeners_of(pid)]
        assert f"127.0.0.1:{node.dicom_port}" in addrs
        assert all(a.startswith("127.0.0.1:") for a in addrs), addrs
    finally:
        assert node.stop() == 0
    assert free_port()
