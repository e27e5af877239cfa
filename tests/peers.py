"""Real peers for the test suite: Orthanc (+DICOMweb), redis-server, DCMTK storescp, the node.

Every server binds 127.0.0.1 on a free port, is started from its own config in a temporary
directory, and is stopped by PID. Orthanc 1.10 has no bind-address option, so it runs with an
LD_PRELOAD shim that turns bind(0.0.0.0) into bind(127.0.0.1) (``dicom_node/loopback_bind.c``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "tests" / ".cache"

ORTHANC_USER = "orthanc"
# Debian's orthanc-python; Orthanc loads it only for an Orthanc started with a python_script.
ORTHANC_PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
ORTHANC_PASSWORD = "orthanc-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.1,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the peer may not be ready yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def listeners_of(pid: int) -> list[str]:
    """Local addresses the process listens on (from ``ss``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False).stdout
    addrs = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            addrs.append(line.split()[3])
    return addrs


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def bind_shim() -> Path:
    """Build (once) the LD_PRELOAD library that keeps Orthanc on loopback."""
    CACHE.mkdir(parents=True, exist_ok=True)
    so = CACHE / "bind_lo.so"
    src = REPO / "dicom_node" / "loopback_bind.c"
    if not so.exists() or so.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(so), str(src), "-ldl"], check=True)
    return so


class RedisServer:
    """A private redis-server on a free loopback port."""

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--protected-mode", "yes",
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 15, message="redis-server")
        return self

    def ping(self) -> bool:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping())

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self) -> None:
        self.kill()
        self.start()


class Orthanc:
    """A real Orthanc with the DICOMweb plugin, configured from its own file on loopback."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        extra: dict[str, Any] | None = None,
        python_script: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.aet = aet
        self.python_script = python_script  # loaded by the Python plugin ("PythonScript")
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.extra = extra or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dicomweb_url_with_credentials(self) -> str:
        return f"http://{ORTHANC_USER}:{ORTHANC_PASSWORD}@127.0.0.1:{self.http_port}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (ORTHANC_USER, ORTHANC_PASSWORD)

    def config(self) -> dict[str, Any]:
        plugins = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
        gdcm = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")
        if gdcm.exists():
            plugins.append(str(gdcm))
        if self.python_script is not None:
            plugins.append(str(ORTHANC_PYTHON_PLUGIN))
        cfg: dict[str, Any] = {
            "Name": "TEST-ORTHANC",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "Plugins": plugins,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomModalities": {},
            "DicomModalitiesInDatabase": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
            "StableAge": 2,
            "SaveJobs": False,
            "OverwriteInstances": True,
            "UnknownSopClassAccepted": True,
            "DicomScuTimeout": 10,
            "StorageCompression": False,
        }
        if self.python_script is not None:
            cfg["PythonScript"] = str(self.python_script)
        cfg.update(self.extra)
        return cfg

    def start(self) -> Orthanc:
        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        if self.python_script is not None and not ORTHANC_PYTHON_PLUGIN.exists():
            raise RuntimeError("Orthanc's Python plugin is not installed (apt-get install orthanc-python)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ, LD_PRELOAD=str(bind_shim()), TCP_NODELAY="1")
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", str(config_path)], stdout=log, stderr=log, env=env)
        wait_until(lambda: self.get("/system").ok, 30, message="Orthanc HTTP")
        wait_until(lambda: port_open(self.dicom_port), 30, message="Orthanc DICOM")
        bad = [a for a in listeners_of(self.proc.pid) if not a.startswith("127.0.0.1:")]
        if bad:
            self.stop()
            raise RuntimeError(f"Orthanc listens beyond loopback: {bad}")
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # -- REST helpers -------------------------------------------------------------------------

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, auth=self.auth, timeout=30, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, auth=self.auth, timeout=120, **kw)

    def put(self, path: str, **kw: Any) -> requests.Response:
        return requests.put(self.url + path, auth=self.auth, timeout=30, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return requests.delete(self.url + path, auth=self.auth, timeout=30, **kw)

    def clear(self) -> None:
        for study in self.get("/studies").json():
            self.delete(f"/studies/{study}")

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        r = self.put(f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})
        r.raise_for_status()

    def upload(self, paths: list[Path]) -> list[str]:
        ids = []
        for p in paths:
            r = self.post("/instances", data=Path(p).read_bytes())
            r.raise_for_status()
            ids.append(r.json()["ParentStudy"])
        return sorted(set(ids))

    def instances_in_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        r = self.get(f"/dicom-web/studies/{study_instance_uid}/instances")
        if r.status_code == 204 or not r.content:
            return []
        r.raise_for_status()
        return list(r.json())


class StoreSCP:
    """DCMTK storescp, optionally with its fault-injection flags."""

    def __init__(self, workdir: Path, *, aet: str = "STORESCP", flags: list[str] | None = None) -> None:
        self.workdir = workdir
        self.aet = aet
        self.port = free_port()
        self.flags = flags or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = self.workdir / "received"
        out.mkdir(exist_ok=True)
        env = dict(os.environ, LD_PRELOAD=str(bind_shim()), TCP_NODELAY="1")
        log = (self.workdir / "storescp.log").open("ab")
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.aet, "-od", str(out), "-uf", *self.flags, str(self.port)],
            stdout=log,
            stderr=log,
            env=env,
        )
        wait_until(lambda: port_open(self.port), 15, message="storescp")
        return self

    @property
    def received(self) -> list[Path]:
        return sorted((self.workdir / "received").glob("*"))

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)


class NodeProcess:
    """``dicom-node serve`` as a real subprocess with its own data directory."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, *, config: Path | None = None) -> None:
        self.data_dir = data_dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config = config
        self.env = {
            "DICOM_NODE_DATA_DIR": str(data_dir),
            "DICOM_NODE_DICOM_PORT": str(self.dicom_port),
            "DICOM_NODE_HTTP_PORT": str(self.http_port),
            "DICOM_NODE_BIND": "127.0.0.1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"

    def command(self, *args: str) -> list[str]:
        cfg = ["--config", str(self.config)] if self.config else []
        return [sys.executable, "-m", "dicom_node", *cfg, *args]

    def full_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, *extra: str, wait: bool = True) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command("serve", *extra), env=self.full_env(), stdout=log, stderr=log)
        if wait:
            wait_until(self._ready, 60, 0.2, message="dicom-node serve")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dicom-node serve exited with {self.proc.returncode}:\n{self.log()}")
        # Both listeners: the DICOM port opens before uvicorn binds HTTP, and a test that posts
        # to STOW-RS right after start must not race it.
        http_port = int(self.env.get("DICOM_NODE_HTTP_PORT", "0"))
        return port_open(self.dicom_port) and (http_port == 0 or port_open(http_port))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def run(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run another ``dicom-node`` command against this node's settings."""
        return subprocess.run(
            self.command(*args), env=self.full_env(), capture_output=True, text=True, timeout=timeout, check=check
        )

    def stop(self, timeout: float = 40.0) -> int | None:
        stop_process(self.proc, timeout=timeout)
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)


def storescu(port: int, paths: list[Path], *, aet: str = "AINODE", calling: str = "STORESCU", extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu with -R (propose only what the files need) and TCP_NODELAY."""
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        ["storescu", "-R", "-aet", calling, "-aec", aet, *(extra or []), "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


class WorkerProcess:
    """``dicom-node worker`` as a real subprocess (a real Celery worker with prefork children)."""

    def __init__(self, node: NodeProcess, *, queues: str = "cpu,delivery", concurrency: int = 1, name: str = "w1") -> None:
        self.node = node
        self.queues = queues
        self.concurrency = concurrency
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = node.data_dir.parent / f"worker-{name}.log"

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        cmd = self.node.command("worker", "--queues", self.queues, "--concurrency", str(self.concurrency), "--name", self.name)
        self.proc = subprocess.Popen(cmd, env=self.node.full_env(), stdout=log, stderr=log, start_new_session=True)
        return self

    def children(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 40.0) -> None:
        stop_process(self.proc, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole worker: parent and children (a container kill)."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
