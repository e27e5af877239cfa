"""``dicom-node demo``: the whole loop on one machine, with nothing configured.

It starts a node with embedded defaults (embedded broker, SQLite, one worker) in a fresh data
directory, and — when Orthanc with its DICOMweb plugin is installed and can be kept on loopback —
a private Orthanc as the PACS the results go to; otherwise the results stay in the node's results
folder. It then generates a chest-CT phantom, sends it with C-STORE, waits for the job and prints
what was found next to the phantom's ground truth, with the dashboard and viewer links.

Everything binds 127.0.0.1 and is stopped at the end (unless ``keep_running``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SHIM_SOURCE = Path(__file__).with_name("loopback_bind.c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class LocalOrthanc:
    """A private Orthanc with DICOMweb, on loopback only, in ``workdir``."""

    workdir: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    proc: subprocess.Popen[bytes] | None = None

    user = "demo"

    @staticmethod
    def available() -> str | None:
        """``None`` when a loopback-only Orthanc can be started here, else why not."""
        if shutil.which("Orthanc") is None or not ORTHANC_PLUGIN.exists():
            return "Orthanc with the DICOMweb plugin is not installed"
        if shutil.which("gcc") is None:
            # Orthanc 1.10 has no bind-address option; without the shim it would listen on
            # every interface, which the demo never does.
            return "gcc is missing (needed to keep Orthanc 1.10 on 127.0.0.1)"
        return None

    @property
    def dicomweb_url(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.http_port}/dicom-web"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        shim = self.workdir / "loopback_bind.so"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM_SOURCE), "-ldl"],
            check=True,
        )
        config = {
            "Name": "DICOM-NODE-DEMO",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "Plugins": [str(ORTHANC_PLUGIN)],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomServerEnabled": True,
            "DicomAet": "DEMOPACS",
            "DicomPort": self.dicom_port,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        env = dict(os.environ, LD_PRELOAD=str(shim), TCP_NODELAY="1")
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=log, env=env)
        _wait(
            lambda: (
                requests.get(self.url + "/system", auth=(self.user, self.password), timeout=2).ok
            ),
            30,
            "Orthanc",
        )

    def stop(self) -> None:
        _stop(self.proc)

    def study_objects(self, study_instance_uid: str) -> dict[str, int]:
        """Modality -> instance count of a study (QIDO-RS)."""
        r = requests.get(
            f"{self.url}/dicom-web/studies/{study_instance_uid}/instances",
            auth=(self.user, self.password),
            timeout=30,
        )
        if r.status_code != 200:
            return {}
        counts: dict[str, int] = {}
        for inst in r.json():
            modality = (inst.get("00080060", {}).get("Value") or ["?"])[0]
            counts[modality] = counts.get(modality, 0) + 1
        return counts


@dataclass
class DemoResult:
    job: dict[str, Any]
    truth: dict[str, Any]
    study_instance_uid: str
    dashboard_url: str
    pacs: dict[str, int] | None
    pacs_url: str | None
    data_dir: Path

    @property
    def ok(self) -> bool:
        return self.job.get("state") == "done"


def run_demo(
    data_dir: Path,
    running: list[Any],
    *,
    seed: int = 1,
    slices: int = 150,
    matrix: int = 512,
    use_orthanc: bool = True,
    timeout: float = 900,
    log: Any = print,
) -> DemoResult:
    """Run the demo. Everything it starts is appended to ``running`` as soon as it starts, so
    the caller can stop it (:func:`stop_all`) whatever happens."""
    from dicom_node.scu import Peer, collect_files, send_files
    from dicom_node.state import Database
    from dicom_node.synth import PhantomSpec, make_phantom
    from dicom_node.synth.series import write_series

    data_dir.mkdir(parents=True, exist_ok=True)
    orthanc: LocalOrthanc | None = None
    if use_orthanc:
        why_not = LocalOrthanc.available()
        if why_not:
            log(f"no local PACS ({why_not}); results stay in {data_dir / 'var' / 'results'}")
        else:
            orthanc = LocalOrthanc(data_dir / "orthanc")
            running.append(orthanc)
            orthanc.start()
            log(f"local PACS: Orthanc on {orthanc.url} (DICOMweb, loopback only)")

    dicom_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update(
        DICOM_NODE_DATA_DIR=str(data_dir / "var"),
        DICOM_NODE_DICOM_PORT=str(dicom_port),
        DICOM_NODE_HTTP_PORT=str(http_port),
        DICOM_NODE_BIND="127.0.0.1",
        DICOM_NODE_STABLE_SECONDS="3",
    )
    if orthanc is not None:
        env["DICOM_NODE_DESTINATION"] = orthanc.dicomweb_url
    node_log = (data_dir / "node.log").open("ab")
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve"], env=env, stdout=node_log, stderr=node_log
    )
    running.append(node)
    dashboard = f"http://127.0.0.1:{http_port}/"
    _wait(lambda: requests.get(dashboard + "healthz", timeout=2).ok, 60, "the node")
    log(f"node: AINODE@127.0.0.1:{dicom_port}, dashboard {dashboard}")

    log(f"generating a {slices}-slice {matrix}x{matrix} chest-CT phantom (seed {seed})")
    # 0.7 mm pixels, 1.25 mm slices and 20 HU noise whatever the matrix: inside the input range
    # the built-in detector was validated on (workers/models/weights/lung_nodules_fp.json,
    # validated_input), so the demo shows findings rather than a skipped job; a smaller matrix
    # is a smaller chest.
    pixel = 0.7
    phantom = make_phantom(
        PhantomSpec(
            seed=seed,
            slices=slices,
            matrix=matrix,
            pixel_spacing=pixel,
            slice_thickness=1.25,
            noise_hu=20.0,
        )
    )
    written = write_series(phantom, data_dir / "phantom")
    truth = json.loads(written.truth_path.read_text())

    files, _ = collect_files([written.folder])
    if orthanc is not None:
        # The scanner sends to the PACS too, so the results land next to the images.
        pacs_peer = Peer("DEMOPACS", "127.0.0.1", orthanc.dicom_port, calling_ae_title="DEMO")
        if any(o.category == "failure" for o in send_files(pacs_peer, files)):
            raise RuntimeError("the local PACS did not store the phantom")
    outcomes = send_files(Peer("AINODE", "127.0.0.1", dicom_port, calling_ae_title="DEMO"), files)
    failed = [o for o in outcomes if o.category == "failure"]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(outcomes)} instances were not stored by the node"
        )
    log(f"sent {len(outcomes)} instances; waiting for the job")

    db = Database(f"sqlite:///{(data_dir / 'var' / 'state.sqlite').resolve()}")
    from dicom_node.api.job_views import get_job, list_jobs

    job: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as s:
            jobs = list_jobs(s, limit=5)
            if jobs and jobs[0]["state"] in ("done", "failed", "skipped", "cancelled"):
                job = get_job(s, jobs[0]["id"]) or {}
                break
        if node.poll() is not None:
            raise RuntimeError(
                f"the node exited with {node.returncode}; see {data_dir / 'node.log'}"
            )
        time.sleep(1)
    db.dispose()
    if not job:
        raise TimeoutError(
            f"the job did not finish within {timeout:.0f} s; see {data_dir / 'node.log'}"
        )
    pacs = orthanc.study_objects(written.study_instance_uid) if orthanc else None
    return DemoResult(
        job=job,
        truth=truth,
        study_instance_uid=written.study_instance_uid,
        dashboard_url=dashboard,
        pacs=pacs,
        pacs_url=orthanc.url if orthanc else None,
        data_dir=data_dir,
    )


def stop_all(running: list[Any]) -> None:
    for item in reversed(running):
        if isinstance(item, subprocess.Popen):
            _stop(item, timeout=60)
        else:
            item.stop()
