"""Deflate bombs and pixel bombs against the real edge: C-STORE over a pynetdicom association and
STOW-RS over HTTP to a running ``dicom-node serve``, plus the worker's volume loader and the
preview. Each is refused with the right status, the spool keeps nothing of it, and the peak
resident memory of every node process (VmHWM, reset through /proc/PID/clear_refs before each
bomb) stays far below what the bomb would inflate or decode to (4 GiB and up).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from dicom_node.dataset_io import open_part10
from dicom_node.errors import StorageError
from dicom_node.preview import PreviewUnavailable, render_preview
from dicom_node.scu import Peer, collect_files, send_files
from tests.bombs import (
    MIB,
    base_dataset,
    deflate_bomb,
    encode,
    good_instance,
    part10,
    pixel_bomb,
    write,
)
from tests.peers import NodeProcess, wait_until
from tests.scp_support import spool_files, temp_files

TOKEN = "decode-bounds-token"
BOUNDARY = "decode-bounds-boundary-51c2"
MEMORY_BOUND_MIB = 96
"""Most a node process may grow while refusing a bomb (the inflater holds ~2 MiB; pydicom,
pynetdicom and the HTTP stack churn some). Without the bounds each bomb costs >= 4 GiB."""

FIGURES: dict[str, int] = {}


# -- resident memory of a process tree ----------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        p = queue.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):  # the task ended meanwhile
                queue += [int(c) for c in (task / "children").read_text().split()]
    return pids


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else 0


class PeakMemory:
    """Growth of VmHWM over VmRSS at the start, per process, in MiB (the largest one)."""

    def __init__(self, pid: int) -> None:
        self.pids = _tree(pid)
        self.start: dict[int, int] = {}
        for p in self.pids:
            Path(f"/proc/{p}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start[p] = _status_kib(p, "VmRSS")

    def growth_mib(self) -> int:
        return max(
            (_status_kib(p, "VmHWM") - self.start[p]) // 1024
            for p in self.pids
            if Path(f"/proc/{p}").exists()
        )


# -- a node for the whole module ----------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("decode-bounds")
    env = {
        "DICOM_NODE_STABLE_SECONDS": "3600",
        "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
        "DICOM_NODE_SCP__RECEIVERS": "1",
        "DICOM_NODE_HTTP__TOKENS": json.dumps([TOKEN]),
    }
    proc = NodeProcess(tmp / "var", env).start()
    wait_until(
        lambda: requests.get(f"http://127.0.0.1:{proc.http_port}/healthz", timeout=5).ok,
        30,
        message="healthz",
    )
    yield proc
    proc.stop()
    print("\nmeasured peak memory growth (MiB):", json.dumps(FIGURES, sort_keys=True))


def _cstore(node: NodeProcess, path: Path) -> int:
    files, _ = collect_files([path])
    peer = Peer(
        ae_title="AINODE", host="127.0.0.1", port=node.dicom_port, calling_ae_title="BOMBER"
    )
    (outcome,) = send_files(peer, files)
    return outcome.status


def _stow(node: NodeProcess, parts: list[bytes]) -> requests.Response:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    body += f"--{BOUNDARY}--\r\n".encode()
    return requests.post(
        f"http://127.0.0.1:{node.http_port}/dicom-web/studies",
        data=body,
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json",
        },
        timeout=120,
    )


def _failures(r: requests.Response) -> list[tuple[str | None, int]]:
    out = []
    for item in r.json().get("00081198", {}).get("Value", []):
        uid = item.get("00081155", {}).get("Value", [None])[0]
        out.append((uid, item["00081197"]["Value"][0]))
    return out


def _referenced(r: requests.Response) -> list[str]:
    return [i["00081155"]["Value"][0] for i in r.json().get("00081199", {}).get("Value", [])]


def _stored_uids(node: NodeProcess) -> int:
    return len(spool_files(node.data_dir))


# -- C-STORE ------------------------------------------------------------------------------------


def test_cstore_refuses_bombs_with_bounded_memory(node: NodeProcess, tmp_path: Path) -> None:
    assert node.proc is not None
    cases = {
        "cstore-deflate-bomb-4GiB": (deflate_bomb()[0], 0xA700),
        "cstore-pixel-bomb-declared": (pixel_bomb("declared")[0], 0xA700),
        "cstore-pixel-bomb-frames": (pixel_bomb("frames")[0], 0xC000),
        "cstore-pixel-bomb-codestream": (pixel_bomb("codestream")[0], 0xC000),
    }
    before = _stored_uids(node)
    for name, (data, status) in cases.items():
        path = write(tmp_path / f"{name}.dcm", data)
        peak = PeakMemory(node.proc.pid)
        assert _cstore(node, path) == status, name
        FIGURES[name] = peak.growth_mib()
        assert FIGURES[name] < MEMORY_BOUND_MIB, (name, FIGURES[name])
    assert _stored_uids(node) == before, "a bomb reached the spool"
    assert temp_files(node.data_dir) == []
    # The same association path still stores a sound instance.
    assert _cstore(node, write(tmp_path / "good.dcm", good_instance()[0])) == 0x0000
    assert _stored_uids(node) == before + 1


# -- STOW-RS ------------------------------------------------------------------------------------


def test_stow_refuses_bombs_per_instance_with_bounded_memory(node: NodeProcess) -> None:
    assert node.proc is not None
    bomb, bomb_uid = deflate_bomb()
    before = _stored_uids(node)

    peak = PeakMemory(node.proc.pid)
    r = _stow(node, [bomb])
    FIGURES["stow-deflate-bomb-4GiB"] = peak.growth_mib()
    # PS3.18 10.5.3: none stored, and retrying the same body will not help: 409, not 503.
    assert r.status_code == 409, r.text
    assert _failures(r) == [(bomb_uid, 0xA700)]

    pixel, pixel_uid = pixel_bomb("declared")
    codestream, codestream_uid = pixel_bomb("codestream")
    good, good_uid = good_instance()
    peak = PeakMemory(node.proc.pid)
    r = _stow(node, [pixel, codestream, good])
    FIGURES["stow-pixel-bombs-and-a-good-instance"] = peak.growth_mib()
    assert r.status_code == 202, r.text
    assert _referenced(r) == [good_uid]
    assert _failures(r) == [(pixel_uid, 0xA700), (codestream_uid, 0xC000)]

    assert max(v for k, v in FIGURES.items() if k.startswith("stow")) < MEMORY_BOUND_MIB, FIGURES
    assert _stored_uids(node) == before + 1
    assert temp_files(node.data_dir) == []


# -- worker volume loader and preview -----------------------------------------------------------


def test_volume_loader_fails_the_job_with_a_reason(tmp_path: Path) -> None:
    from workers.volume import VolumeError, load_series

    reasons = {}
    for kind in ("codestream", "frames", "declared"):
        path = write(tmp_path / f"{kind}.dcm", pixel_bomb(kind)[0])
        with pytest.raises(VolumeError) as info:
            load_series([path])
        reasons[kind] = str(info.value)
    assert "a compressed frame declares 65000x65000 pixels" in reasons["codestream"]
    assert "exceeds the encapsulated fragments" in reasons["frames"]
    assert "exceeds the decode cap" in reasons["declared"] or "too large" in reasons["declared"]

    bomb = write(tmp_path / "deflate.dcm", deflate_bomb()[0])
    peak = PeakMemory(os.getpid())
    with pytest.raises(VolumeError, match="refused"):
        load_series([bomb])
    FIGURES["worker-volume-deflate-bomb-4GiB"] = peak.growth_mib()
    assert FIGURES["worker-volume-deflate-bomb-4GiB"] < MEMORY_BOUND_MIB


def test_preview_refuses_hostile_frames_quickly(tmp_path: Path) -> None:
    ds = base_dataset(rows=1, columns=1, frames=2**31 - 1)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = b"\x00\x00"
    hostile = write(tmp_path / "frames.dcm", part10(ds, "1.2.840.10008.1.2.1", encode(ds)))
    for path in (
        hostile,
        write(tmp_path / "fragments.dcm", pixel_bomb("frames")[0]),
        write(tmp_path / "codestream.dcm", pixel_bomb("codestream")[0]),
        write(tmp_path / "deflate.dcm", deflate_bomb()[0]),
    ):
        started = time.monotonic()
        with pytest.raises(PreviewUnavailable) as info:
            render_preview([path], [])
        assert time.monotonic() - started < 10, path.name
        assert "refused" in str(info.value), str(info.value)


def test_capped_open_streams_the_deflated_header(tmp_path: Path) -> None:
    """The header before a 4 GiB deflated pixel element reads in a few MiB; the whole refuses."""
    data, uid = deflate_bomb()
    peak = PeakMemory(os.getpid())
    opened = open_part10(data, limit=256 * MIB)
    assert str(opened.dataset.SOPInstanceUID) == uid
    with pytest.raises(StorageError, match="over the cap"):
        open_part10(data, limit=256 * MIB, stop_before_pixels=False)
    header_bomb, _ = deflate_bomb(200, in_pixels=False)  # a 200 MiB element under a 64 MiB cap
    with pytest.raises(StorageError):
        open_part10(header_bomb, limit=64 * MIB)
    assert peak.growth_mib() < 32
