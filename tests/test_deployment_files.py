"""The deployment files in ``docker/`` and the guide ``docs/deployment.md``, checked with real tools.

There is no Docker engine where the suite runs, so nothing here builds an image or starts a
container. Instead:

* the compose files are rendered and schema-checked by ``docker-compose config`` (Debian's
  ``docker-compose``, which validates against the compose-spec JSON schema it ships);
* the Dockerfiles are linted by ``hadolint`` and parsed with BuildKit's own parser (``dockerfile``);
* every ``DICOM_NODE_*`` variable a container gets is loaded through
  :func:`dicom_node.settings.load_settings`, exactly as the container would;
* the viewer's nginx template is rendered with ``envsubst`` (what the nginx image runs), checked
  with ``nginx -t``, and then run for real in front of a real Orthanc and a real ``dicom-node
  serve``;
* OHIF's ``app-config.js`` is evaluated with node;
* the tables of the guide are compared with what compose and the Dockerfiles say.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import requests
import yaml

from dicom_node.api.auth import check_exposure
from dicom_node.settings import ENV_PREFIX, Settings, load_settings, parse_destination_url
from tests.peers import NodeProcess, Orthanc, free_port, port_open, stop_process, wait_until

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
MULTIHOST = DOCKER / "docker-compose.multihost.yml"
REMOTE_WORKER = DOCKER / "docker-compose.worker.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
GUIDE = REPO / "docs" / "deployment.md"
DOCKERFILES = {
    "cpu": DOCKER / "Dockerfile",
    "cuda": DOCKER / "Dockerfile.cuda",
    "viewer": DOCKER / "ohif" / "Dockerfile",
}
NODE_IMAGES = ("cpu", "cuda")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|PASSWD|API_KEY", re.IGNORECASE)
TORCH_PIN = "2.13.0"
"""The torch version pinned by scripts/bootstrap and the README."""

CONTAINER_CONFIG = "/etc/dicom-node/dicom-node.toml"


def _tool(name: str) -> str:
    # hadolint comes with the test extra into the virtual environment's bin directory.
    search = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin:/sbin"]
    )
    path = shutil.which(name, path=search)
    assert path, f"{name} is not installed (./scripts/bootstrap --test installs it)"
    return path


# ------------------------------------------------------------------------------- compose helpers


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def filled_env(**extra: str) -> dict[str, str]:
    """.env.example with every empty secret filled in, as the guide tells the operator to do."""
    values = env_example()
    for key, value in values.items():
        if not value and SECRET_NAME.search(key):
            values[key] = secrets.token_hex(16)
    values.update(extra)
    return values


def run_compose(
    tmp_path: Path, files: list[Path], env: dict[str, str], *args: str, profile: str | None = None
) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / f"env-{secrets.token_hex(4)}"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    cmd = [_tool("docker-compose"), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    if profile:
        cmd += ["--profile", profile]
    # A clean environment: interpolation must come from the env file alone, not from whatever
    # the machine running the tests has set.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=120, env=clean, cwd=files[0].parent
    )


def render(tmp_path: Path, files: list[Path], env: dict[str, str]) -> dict[str, Any]:
    """``docker-compose config``: interpolated, merged and validated against the compose schema."""
    result = run_compose(tmp_path, files, env, "config", profile="gpu")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


@pytest.fixture
def env() -> dict[str, str]:
    return filled_env()


@pytest.fixture
def compose(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    return render(tmp_path, [COMPOSE], env)


def published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host side, container port) of each published port, in either syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            host = f"{port.get('host_ip', '')}:{port.get('published', '')}".lstrip(":")
            out.append((host, int(port["target"])))
        else:
            spec = str(port).split("/")[0]
            host, _, target = spec.rpartition(":")
            out.append((host, int(target)))
    return out


def healthcheck_command(service: dict[str, Any]) -> str:
    """The healthcheck as the container runs it (compose turns "$$" into "$")."""
    test = service["healthcheck"]["test"]
    return (" ".join(test) if isinstance(test, list) else str(test)).replace("$$", "$")


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Volumes by container path, from either the short ("src:dst:mode") or the long syntax."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            volume = {
                "source": source,
                "target": target,
                "type": "bind" if source.startswith(("/", ".")) else "volume",
                "read_only": mode == ["ro"],
            }
        out[volume["target"]] = volume
    return out


# ------------------------------------------------------------------------------- compose: schema


def test_compose_files_pass_the_compose_schema(tmp_path: Path, env: dict[str, str]) -> None:
    for files, extra in (
        ([COMPOSE], {}),
        ([COMPOSE, MULTIHOST], {"BACKEND_PUBLISH_IP": "10.1.2.3"}),
        ([REMOTE_WORKER], {"CENTRAL_HOST": "10.1.2.3"}),
    ):
        result = run_compose(tmp_path, files, {**env, **extra}, "config", "--quiet", profile="gpu")
        assert result.returncode == 0, f"{[f.name for f in files]}: {result.stderr}"


def test_the_validator_rejects_what_the_schema_forbids(tmp_path: Path, env: dict[str, str]) -> None:
    # The same file with one unknown service key and one mistyped healthcheck: if this passed,
    # the check above would prove nothing.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["node"]["restart_policy"] = "always"
    bad = DOCKER / f".broken-{secrets.token_hex(4)}.yml"
    try:
        bad.write_text(yaml.safe_dump(broken))
        result = run_compose(tmp_path, [bad], env, "config", "--quiet")
    finally:
        bad.unlink()
    assert result.returncode != 0
    assert "restart_policy" in result.stderr


def test_env_example_has_no_usable_default_secrets(tmp_path: Path) -> None:
    values = env_example()
    secret_keys = [k for k in values if SECRET_NAME.search(k)]
    assert len(secret_keys) >= 7, secret_keys
    assert all(values[k] == "" for k in secret_keys), "secrets in .env.example must be empty"
    # Copied unchanged, it does not start: compose names the missing secret.
    result = run_compose(tmp_path, [COMPOSE], values, "config", "--quiet")
    assert result.returncode != 0
    assert re.search(r"set \w*(PASSWORD|TOKEN)\w* in docker/\.env", result.stderr), result.stderr
    # And the real .env stays out of git.
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_compose_files_hold_no_literal_secrets() -> None:
    for path in (COMPOSE, MULTIHOST, REMOTE_WORKER):
        text = path.read_text()
        for match in re.finditer(r"^\s*([A-Z_]*(?:PASSWORD|TOKEN)[A-Z_]*):\s*(.+)$", text, re.M):
            assert "${" in match.group(2), match.group(0)
        # Passwords inside URLs and JSON are interpolated too.
        for url in re.findall(r"://[^@\s]*:([^@\s]+)@", text):
            assert url.startswith("${"), url


# ------------------------------------------------------------------------------- compose: content

EXPECTED_SERVICES = {"orthanc", "redis", "postgres", "node", "worker", "worker-gpu", "viewer"}


def test_services_each_have_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == EXPECTED_SERVICES
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert service.get("restart") == "unless-stopped", name
    assert "/healthz" in healthcheck_command(services["node"])
    assert "/probes/test-aliveness.py" in healthcheck_command(services["orthanc"])
    assert "pg_isready" in healthcheck_command(services["postgres"])
    assert "redis-cli ping" in healthcheck_command(services["redis"])
    assert "/nginx-health" in healthcheck_command(services["viewer"])
    for worker in ("worker", "worker-gpu"):
        # This worker's own name: a ping answered by another replica must not count.
        assert "inspect ping --destination" in healthcheck_command(services[worker])
        assert "$HOSTNAME@$HOSTNAME" in healthcheck_command(services[worker])


def test_worker_healthcheck_names_the_worker_as_the_worker_names_itself() -> None:
    # `dicom-node worker` registers as "<host>@%h", %h being the host name; the healthcheck
    # pings "$HOSTNAME@$HOSTNAME". Check the worker command still builds the name that way.
    source = (REPO / "workers" / "cli" / "worker.py").read_text()
    assert "host = name or socket.gethostname()" in source
    assert 'f"{host}@%h"' in source


def test_redis_keeps_messages_and_refuses_to_evict(
    compose: dict[str, Any], env: dict[str, str]
) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--maxmemory"] == env["REDIS_MAXMEMORY"]
    assert options["--requirepass"] == env["REDIS_PASSWORD"]
    assert options["--protected-mode"] == "yes"
    assert redis["environment"]["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]


def test_broker_and_database_are_not_published(
    compose: dict[str, Any], tmp_path: Path, env: dict[str, str]
) -> None:
    services = compose["services"]
    assert compose["networks"]["backend"].get("internal") is True
    for name in ("redis", "postgres"):
        assert not services[name].get("ports"), f"{name} must not be published"
        assert set(services[name]["networks"]) == {"backend"}
    # Only the services that need the broker or the database are on that network.
    on_backend = {n for n, s in services.items() if "backend" in s.get("networks", {})}
    assert on_backend == {"redis", "postgres", "node", "worker", "worker-gpu"}
    # The multi-host override publishes them on the one private address given, never 0.0.0.0.
    multi = render(tmp_path, [COMPOSE, MULTIHOST], {**env, "BACKEND_PUBLISH_IP": "10.1.2.3"})
    for name, port in (("redis", 6379), ("postgres", 5432)):
        assert published(multi["services"][name]) == [(f"10.1.2.3:{port}", port)]


def test_published_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert published(services["node"]) == [("11112", 11112), ("8080", 8080)]
    assert published(services["orthanc"]) == [("4242", 4242), ("127.0.0.1:8042", 8042)]
    assert published(services["viewer"]) == [("3000", 8080)]
    for name in ("redis", "postgres", "worker", "worker-gpu"):
        assert published(services[name]) == [], name


def test_gpu_worker_reserves_a_gpu_and_consumes_the_gpu_queue(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert gpu["command"] == ["worker", "--queues", "gpu", "--concurrency", "1"]
    cpu = compose["services"]["worker"]
    assert cpu["command"][:3] == ["worker", "--queues", "cpu,delivery"]
    assert cpu["deploy"]["replicas"] == 2
    assert "profiles" not in cpu


def test_spool_is_shared_by_node_and_local_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("node", "worker", "worker-gpu"):
        volumes = mounts(services[name])
        assert volumes["/var/lib/dicom-node"]["type"] == "volume"
        assert volumes["/var/lib/dicom-node"]["source"] == "node-data"
        assert volumes[CONTAINER_CONFIG]["read_only"] is True


def test_containers_are_locked_down(compose: dict[str, Any]) -> None:
    for name in ("node", "worker", "worker-gpu", "viewer"):
        service = compose["services"][name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    assert compose["services"]["orthanc"]["user"] == "999:999"


def test_orthanc_wiring(compose: dict[str, Any], env: dict[str, str]) -> None:
    orthanc = compose["services"]["orthanc"]
    volumes = mounts(orthanc)
    config_mount = volumes["/etc/orthanc/orthanc.json"]
    script_mount = volumes["/etc/orthanc/autoroute.py"]
    for mount in (config_mount, script_mount):
        # Docker would create a directory in place of a missing bind source.
        assert Path(mount["source"]).is_file(), mount["source"]
        assert mount["read_only"] is True
    config = json.loads(Path(config_mount["source"]).read_text())
    environment = orthanc["environment"]
    assert environment["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    # The orthancteam image moves enabled plugins into /usr/share/orthanc/plugins/.
    assert "/usr/share/orthanc/plugins/libOrthancDicomWeb.so" in config["Plugins"]
    assert "/usr/share/orthanc/plugins/libOrthancPython.so" in config["Plugins"]
    assert config["DicomWeb"]["Enable"] is True
    assert config["AuthenticationEnabled"] is True
    # Storage inside the named volume, which the image's orthanc user owns.
    assert volumes["/var/lib/orthanc"]["source"] == "orthanc-data"
    assert config["StorageDirectory"].startswith("/var/lib/orthanc/")
    # Environment overrides are valid JSON and complete the file's entries.
    users = json.loads(environment["ORTHANC__REGISTERED_USERS"])
    assert users == {
        "admin": env["ORTHANC_ADMIN_PASSWORD"],
        "ainode": env["ORTHANC_AINODE_PASSWORD"],
        "viewer": env["ORTHANC_VIEWER_PASSWORD"],
    }
    # The auto-route script runs in the image's Python plugin (retries on a timer), never
    # together with the Lua script (every study would be sent twice).
    assert environment["PYTHON_PLUGIN_ENABLED"] == "true"
    assert environment["ORTHANC__PYTHON_SCRIPT"] == "/etc/orthanc/autoroute.py"
    assert "ORTHANC__LUA_SCRIPTS" not in environment and "LuaScripts" not in config
    assert Path(script_mount["source"]).name == "autoroute.py"
    assert {"AiNodeRouted", "AiNodePending"} <= set(config["UserMetadata"])
    modalities = json.loads(environment["ORTHANC__DICOM_MODALITIES"])
    assert set(modalities) == {"ainode"} and "ainode" in config["DicomModalities"]
    assert modalities["ainode"] == {"AET": "AINODE", "Host": "node", "Port": 11112}
    # autoroute.py sends to that modality.
    assert re.search(r'^TARGET = "ainode"', Path(script_mount["source"]).read_text(), re.M)


def test_viewer_is_wired_to_orthanc_and_the_node(
    compose: dict[str, Any], env: dict[str, str]
) -> None:
    viewer = compose["services"]["viewer"]
    assert viewer["environment"] == {
        "ORTHANC_VIEWER_USER": "viewer",
        "ORTHANC_VIEWER_PASSWORD": env["ORTHANC_VIEWER_PASSWORD"],
    }
    assert set(viewer["depends_on"]) == {"orthanc", "node"}
    conf = (DOCKER / "nginx" / "viewer.conf").read_text()
    assert "server orthanc:8042;" in conf and "server node:8080;" in conf
    node_env = compose["services"]["node"]["environment"]
    assert node_env["DICOM_NODE_HTTP__OHIF_URL"] == env["OHIF_PUBLIC_URL"]


# ------------------------------------------------------- Redis and worker healthchecks, for real


def _healthcheck_shell(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    return str(test[1]).replace("$$", "$")


@pytest.fixture
def compose_redis(tmp_path: Path, compose: dict[str, Any]) -> Iterator[int]:
    """redis-server started with the compose service's own options, on a loopback port."""
    command = compose["services"]["redis"]["command"]
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    proc = subprocess.Popen(
        [
            _tool("redis-server"),
            *command[1:],
            *("--bind", "127.0.0.1", "--port", str(port)),
            *("--dir", str(workdir), "--logfile", str(workdir / "redis.log")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), 15, 0.05, message="redis-server")
        yield port
    finally:
        stop_process(proc, timeout=10)


def test_redis_runs_with_the_compose_options(
    compose: dict[str, Any], env: dict[str, str], compose_redis: int
) -> None:
    port = compose_redis
    password = env["REDIS_PASSWORD"]
    base = {"PATH": os.environ.get("PATH", "")}

    def cli(*args: str, auth: str | None = password) -> subprocess.CompletedProcess[str]:
        extra = {"REDISCLI_AUTH": auth} if auth else {}
        return subprocess.run(
            [_tool("redis-cli"), "-p", str(port), *args],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=10,
        )

    assert "NOAUTH" in cli("ping", auth=None).stdout
    assert cli("config", "get", "appendonly").stdout.split() == ["appendonly", "yes"]
    assert cli("config", "get", "maxmemory-policy").stdout.split() == [
        "maxmemory-policy",
        "noeviction",
    ]
    assert cli("config", "get", "maxmemory").stdout.split() == ["maxmemory", str(1024**3)]
    # The compose healthcheck, pointed at this port: healthy with the password, unhealthy
    # without (redis-cli itself exits 0 on NOAUTH, hence the grep).
    check = _healthcheck_shell(compose["services"]["redis"]).replace(
        "redis-cli", f"redis-cli -p {port}"
    )
    ok = subprocess.run(["sh", "-c", check], env={**base, "REDISCLI_AUTH": password}, timeout=10)
    assert ok.returncode == 0
    bad = subprocess.run(["sh", "-c", check], env={**base, "REDISCLI_AUTH": "wrong"}, timeout=10)
    assert bad.returncode != 0


def test_worker_healthcheck_pings_this_worker_through_the_broker(
    tmp_path: Path, compose: dict[str, Any], env: dict[str, str], compose_redis: int
) -> None:
    broker = f"redis://:{env['REDIS_PASSWORD']}@127.0.0.1:{compose_redis}/0"
    worker_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
        "DICOM_NODE_BROKER_URL": broker,
        "DICOM_NODE_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(REPO),
    }
    service = compose["services"]["worker"]
    # The compose command, without a --name: the worker names itself after the host, as in a
    # container (whose host name Docker also puts into $HOSTNAME).
    assert "--name" not in service["command"]
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", *service["command"]],
        env=worker_env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    check = _healthcheck_shell(service)
    shell_env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DICOM_NODE_BROKER_URL": broker,
        "HOME": str(tmp_path),
    }

    def healthy(hostname: str) -> bool:
        result = subprocess.run(
            ["sh", "-c", check],
            env={**shell_env, "HOSTNAME": hostname},
            capture_output=True,
            timeout=60,
        )
        return result.returncode == 0

    try:
        wait_until(
            lambda: healthy(socket.gethostname()), 90, 1.0, message="worker answering its ping"
        )
        # Another replica's name does not count for this one.
        assert not healthy("some-other-container")
    finally:
        stop_process(proc, timeout=40)
        log.close()
    assert not healthy(socket.gethostname())


# ------------------------------------------------------------------- settings the containers get


def _setting_path_exists(name: str) -> bool:
    """Does DICOM_NODE_A__B__C name a field of Settings (nested models, dict keys allowed)?"""
    parts = name.removeprefix(ENV_PREFIX).lower().split("__")
    model: Any = Settings
    for i, part in enumerate(parts):
        fields = model.model_fields
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return False
        annotation = field.annotation
        nested = getattr(annotation, "model_fields", None)
        if nested is not None:
            model = annotation
            continue
        origin = getattr(annotation, "__origin__", None)
        if origin is dict:
            return i <= len(parts) - 1  # a dict of scalars or of models: keys are free
        return i == len(parts) - 1
    return True


def image_env(path: Path) -> dict[str, str]:
    """DICOM_NODE_* defaults set by a Dockerfile's final stage."""
    stages = _stages(path)
    out: dict[str, str] = {}
    for cmd in stages[-1]:
        if cmd.cmd == "ENV":
            pairs = dict(zip(cmd.value[::2], cmd.value[1::2], strict=True))
            out.update({k: v for k, v in pairs.items() if k.startswith(ENV_PREFIX)})
    return out


def load_container_settings(
    monkeypatch: pytest.MonkeyPatch, service: dict[str, Any], image: str
) -> Settings:
    """The settings the service's container would load: image ENV, then compose environment,
    with the TOML file mounted at DICOM_NODE_CONFIG."""
    environment = {**image_env(DOCKERFILES[image]), **service["environment"]}
    binds = {t: v["source"] for t, v in mounts(service).items() if v["type"] == "bind"}
    config = environment.pop("DICOM_NODE_CONFIG")
    assert config == CONTAINER_CONFIG
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, str(value))
    return load_settings(binds[config])


def _image_of(service: dict[str, Any]) -> str:
    return "cuda" if service["build"]["dockerfile"].endswith(".cuda") else "cpu"


def test_every_dicom_node_variable_is_a_real_setting(tmp_path: Path, env: dict[str, str]) -> None:
    names: set[str] = set(k for k in env_example() if k.startswith(ENV_PREFIX))
    for files, extra in (([COMPOSE], {}), ([REMOTE_WORKER], {"CENTRAL_HOST": "10.1.2.3"})):
        config = render(tmp_path, files, {**env, **extra})
        for service in config["services"].values():
            names |= {k for k in service.get("environment", {}) if k.startswith(ENV_PREFIX)}
    for image in NODE_IMAGES:
        names |= set(image_env(DOCKERFILES[image]))
    names.discard("DICOM_NODE_CONFIG")  # the config file's path, read by load_settings itself
    assert len(names) >= 12, sorted(names)
    unknown = sorted(n for n in names if not _setting_path_exists(n))
    assert not unknown, f"not settings: {unknown}"


def test_node_container_settings_load(
    compose: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_container_settings(monkeypatch, compose["services"]["node"], "cpu")
    assert settings.ae_title == "AINODE"
    assert (
        settings.bind == "0.0.0.0" and settings.dicom_port == 11112 and settings.http_port == 8080
    )
    assert str(settings.data_dir) == "/var/lib/dicom-node"
    assert settings.broker_url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
    assert settings.database_url == (
        f"postgresql+psycopg://dicomnode:{env['POSTGRES_PASSWORD']}@postgres:5432/dicomnode"
    )
    kind, _ = parse_destination_url(settings.destination or "")
    assert kind == "stow"
    assert (
        settings.destination
        == f"http://ainode:{env['ORTHANC_AINODE_PASSWORD']}@orthanc:8042/dicom-web"
    )
    assert settings.http.users["admin"].get_secret_value() == env["NODE_ADMIN_PASSWORD"]
    assert [t.get_secret_value() for t in settings.http.tokens] == [env["NODE_API_TOKEN"]]
    assert settings.http.ohif_url == env["OHIF_PUBLIC_URL"]
    assert settings.embedded_worker_count == 0
    assert settings.log.json_format is True
    assert [c.ae_title for c in settings.scp.allowed_callers or []] == ["ORTHANC"]
    # Listening on all interfaces is allowed only because credentials are configured.
    check_exposure(settings)


def test_worker_container_settings_load(
    compose: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = load_container_settings(monkeypatch, compose["services"]["node"], "cpu")
    for name in ("worker", "worker-gpu"):
        service = compose["services"][name]
        settings = load_container_settings(monkeypatch, service, _image_of(service))
        # Same broker, database, destination and config as the node.
        assert settings.broker_url == node.broker_url
        assert settings.database_url == node.database_url
        assert settings.destination == node.destination
        assert settings.worker.source == "spool"
        assert settings.spool_dir == node.spool_dir


def test_remote_worker_reads_over_dicomweb(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = render(tmp_path, [REMOTE_WORKER], {**env, "CENTRAL_HOST": "10.1.2.3"})
    assert list(config["services"]) == ["worker-gpu-0"]
    service = config["services"]["worker-gpu-0"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert mounts(service)["/var/lib/dicom-node"]["source"] == "worker-gpu-0-data"
    settings = load_container_settings(monkeypatch, service, "cuda")
    assert settings.worker.source == "dicomweb"
    assert settings.worker.node_url == "http://10.1.2.3:8080"
    assert settings.worker.node_token is not None
    assert settings.worker.node_token.get_secret_value() == env["NODE_API_TOKEN"]
    assert settings.broker_url == f"redis://:{env['REDIS_PASSWORD']}@10.1.2.3:6379/0"
    # Results go into the node's store; the node's host delivers, the GPU machine never needs the PACS.
    from workers.storage import results_mode

    assert results_mode(settings) == "node"
    assert settings.destination is None and "ORTHANC_AINODE_PASSWORD" not in str(service["environment"])


# ------------------------------------------------------------------------------- Dockerfiles


def _stages(path: Path) -> list[list[Any]]:
    stages: list[list[Any]] = []
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    return stages


def _args(stage: list[Any]) -> dict[str, str]:
    out = {}
    for cmd in stage:
        if cmd.cmd == "ARG" and "=" in cmd.value[0]:
            key, _, value = cmd.value[0].partition("=")
            out[key] = value
    return out


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), text)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_live() -> None:
    # A Dockerfile with the classic mistakes must fail, or the check above proves nothing.
    bad = "FROM python:latest\nRUN pip install torch\nUSER root\n"
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3002" in result.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_as_an_unprivileged_user_with_a_healthcheck(name: str) -> None:
    stage = _stages(DOCKERFILES[name])[-1]
    users = [c for c in stage if c.cmd == "USER"]
    assert users, "no USER in the final stage"
    user = _expand(users[-1].value[0], _args(stage))
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, user
    assert [c for c in stage if c.cmd == "HEALTHCHECK"], "no HEALTHCHECK"


@pytest.mark.parametrize("name", NODE_IMAGES)
def test_node_images(name: str) -> None:
    stages = _stages(DOCKERFILES[name])
    assert len(stages) >= 2, "multi-stage: build and runtime"
    build, runtime = stages[0], stages[-1]
    args = _args(build)
    # torch pinned to the project's version, installed before the package.
    runs = [c.value[0] for c in build if c.cmd == "RUN"]
    torch_runs = [r for r in runs if "torch==" in r]
    assert torch_runs and "${TORCH_VERSION}" in torch_runs[0]
    assert args["TORCH_VERSION"] == TORCH_PIN
    assert TORCH_PIN in (REPO / "scripts" / "bootstrap").read_text()
    if name == "cpu":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    package = [r for r in runs if '".[worker,postgres]"' in r]
    assert package and runs.index(package[0]) > runs.index(torch_runs[0])
    # The runtime stage takes the virtual environment from the build stage, nothing else.
    copies = [c for c in runtime if c.cmd == "COPY"]
    assert [(c.flags, c.value) for c in copies] == [
        (("--from=build",), ("/opt/dicom-node", "/opt/dicom-node"))
    ]
    env = image_env(DOCKERFILES[name])
    volumes = [c.value[0] for c in runtime if c.cmd == "VOLUME"]
    assert volumes == [env["DICOM_NODE_DATA_DIR"]] == ["/var/lib/dicom-node"]
    healthcheck = next(c for c in runtime if c.cmd == "HEALTHCHECK")
    assert "/healthz" in " ".join(healthcheck.value)
    entrypoint = next(c for c in runtime if c.cmd == "ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("dicom-node",)
    cmd = next(c for c in runtime if c.cmd == "CMD")
    assert cmd.value == (
        ("serve",) if name == "cpu" else ("worker", "--queues", "gpu", "--concurrency", "1")
    )
    # What the Dockerfile copies from the repository exists.
    for c in build:
        if c.cmd == "COPY" and not c.flags:
            for src in c.value[:-1]:
                assert (REPO / src).exists(), src


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_secrets_baked_into_images(name: str) -> None:
    for cmd in dockerfile.parse_file(str(DOCKERFILES[name])):
        if cmd.cmd in ("ENV", "ARG", "LABEL"):
            text = " ".join(cmd.value)
            assert not SECRET_NAME.search(text), cmd.original
        if cmd.cmd in ("COPY", "ADD"):
            assert not any(".env" in v.split("/")[-1] and v.endswith(".env") for v in cmd.value), (
                cmd.original
            )


def test_build_contexts_leave_out_secrets_and_the_venv() -> None:
    root_ignore = (REPO / ".dockerignore").read_text().split()
    # Everything is excluded, then only what the images need is let back in.
    assert root_ignore[root_ignore.index("*") :][:5] == [
        "*",
        "!pyproject.toml",
        "!README.md",
        "!dicom_node/",
        "!workers/",
    ]
    viewer_ignore = [
        line.strip()
        for line in (DOCKER / "ohif" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert viewer_ignore[0] == "*"
    assert not any(line.lstrip("!").endswith(".env") for line in viewer_ignore)
    for cmd in _stages(DOCKERFILES["viewer"])[-1]:
        if cmd.cmd == "COPY" and cmd.flags[:1] != ("--from=ohif",):
            for src in cmd.value[:-1]:
                assert f"!{src}" in viewer_ignore, src
                assert (DOCKER / src).is_file(), src


# ------------------------------------------------------------------------------- viewer proxy


def render_viewer_conf(
    tmp_path: Path, authorization: str, *, orthanc: str, node: str, port: int, root: Path
) -> Path:
    """viewer.conf as the nginx image renders it (envsubst on the one variable), with the
    upstream names and paths of this machine, wrapped in a minimal nginx.conf."""
    rendered = subprocess.run(
        [_tool("envsubst"), "${ORTHANC_AUTHORIZATION}"],
        input=(DOCKER / "nginx" / "viewer.conf").read_text(),
        capture_output=True,
        text=True,
        env={"ORTHANC_AUTHORIZATION": authorization, "PATH": os.environ.get("PATH", "")},
        check=True,
    ).stdout
    assert "${" not in rendered
    assert "server orthanc:8042;" in rendered and "server node:8080;" in rendered
    rendered = (
        rendered.replace("server orthanc:8042;", f"server {orthanc};")
        .replace("server node:8080;", f"server {node};")
        .replace("listen 8080;", f"listen 127.0.0.1:{port};")
        .replace("/tmp/nginx-auth-cache", str(tmp_path / "auth-cache"))
        .replace("root /usr/share/nginx/html;", f"root {root};")
    )
    (tmp_path / "default.conf").write_text(rendered)
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = tmp_path / "nginx.conf"
    main.write_text(
        textwrap.dedent(
            f"""\
            {user}pid {tmp_path}/nginx.pid;
            error_log {tmp_path}/error.log;
            worker_processes 1;
            events {{ worker_connections 64; }}
            http {{
                include /etc/nginx/mime.types;
                access_log off;
                client_body_temp_path {tmp_path}/body;
                proxy_temp_path {tmp_path}/proxy;
                fastcgi_temp_path {tmp_path}/fastcgi;
                uwsgi_temp_path {tmp_path}/uwsgi;
                scgi_temp_path {tmp_path}/scgi;
                include {tmp_path}/default.conf;
            }}
            """
        )
    )
    return main


def envsh_authorization(user: str, password: str) -> str:
    """What 16-orthanc-authorization.envsh exports, run by a real POSIX shell."""
    script = DOCKER / "nginx" / "16-orthanc-authorization.envsh"
    result = subprocess.run(
        ["sh", "-c", f'. "{script}" && printf %s "$ORTHANC_AUTHORIZATION"'],
        env={
            "PATH": os.environ.get("PATH", ""),
            "ORTHANC_VIEWER_USER": user,
            "ORTHANC_VIEWER_PASSWORD": password,
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_envsh_builds_the_basic_header_and_refuses_an_empty_password() -> None:
    header = envsh_authorization("viewer", "s3cret-x")
    assert header == "Basic " + base64.b64encode(b"viewer:s3cret-x").decode()
    script = DOCKER / "nginx" / "16-orthanc-authorization.envsh"
    assert os.access(script, os.X_OK), "the nginx entrypoint skips non-executable .envsh files"
    result = subprocess.run(
        ["sh", "-c", f'. "{script}"'],
        env={"PATH": os.environ.get("PATH", ""), "ORTHANC_VIEWER_USER": "viewer"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "ORTHANC_VIEWER_PASSWORD" in result.stderr


def test_nginx_accepts_the_rendered_viewer_config(tmp_path: Path) -> None:
    root = tmp_path / "html"
    root.mkdir()
    conf = render_viewer_conf(
        tmp_path,
        envsh_authorization("viewer", "pw"),
        orthanc="127.0.0.1:1",
        node="127.0.0.1:2",
        port=free_port(),
        root=root,
    )
    result = subprocess.run(
        [_tool("nginx"), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_app_config_points_ohif_at_the_proxy(tmp_path: Path) -> None:
    script = (
        "global.window = {};"
        f"require({json.dumps(str(DOCKER / 'ohif' / 'app-config.js'))});"
        "process.stdout.write(JSON.stringify(window.config));"
    )
    result = subprocess.run(
        [_tool("node"), "-e", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["routerBasename"] == "/"
    (source,) = [
        s for s in config["dataSources"] if s["sourceName"] == config["defaultDataSourceName"]
    ]
    roots = source["configuration"]
    assert (roots["qidoRoot"], roots["wadoRoot"], roots["wadoUriRoot"]) == (
        "/dicom-web",
        "/dicom-web",
        "/wado",
    )
    # The proxy forwards exactly those prefixes.
    conf = (DOCKER / "nginx" / "viewer.conf").read_text()
    assert "location ~ ^/(dicom-web/|wado) {" in conf


class Nginx:
    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> Nginx:
        self.proc = subprocess.Popen(
            [_tool("nginx"), "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: _http_ok(f"http://127.0.0.1:{port}/nginx-health"), 20, 0.1, message="nginx"
        )
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def viewer_stack(tmp_path: Path, clean_orthanc: Orthanc) -> Iterator[dict[str, Any]]:
    """The viewer's nginx configuration, running, in front of a real Orthanc and a real node."""
    node = NodeProcess(
        tmp_path / "node",
        env={
            "DICOM_NODE_HTTP__USERS": json.dumps({"admin": "node-pw"}),
            "DICOM_NODE_HTTP__TOKENS": json.dumps(["node-token"]),
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
        },
    ).start()
    proxy = None
    try:
        wait_until(
            lambda: _http_ok(f"http://127.0.0.1:{node.http_port}/healthz"),
            60,
            0.2,
            message="node HTTP",
        )
        root = tmp_path / "html"
        root.mkdir()
        (root / "index.html").write_text("<!doctype html><title>OHIF stand-in</title>")
        shutil.copy(DOCKER / "ohif" / "app-config.js", root / "app-config.js")
        user, password = clean_orthanc.auth
        port = free_port()
        (tmp_path / "nginx").mkdir()
        conf = render_viewer_conf(
            tmp_path / "nginx",
            envsh_authorization(user, password),
            orthanc=f"127.0.0.1:{clean_orthanc.http_port}",
            node=f"127.0.0.1:{node.http_port}",
            port=port,
            root=root,
        )
        proxy = Nginx(conf).start(port)
        yield {"url": f"http://127.0.0.1:{port}", "orthanc": clean_orthanc, "node": node}
    finally:
        if proxy:
            proxy.stop()
        node.stop()


def test_viewer_proxy_against_real_orthanc_and_node(
    viewer_stack: dict[str, Any], tmp_path: Path
) -> None:
    from tests.dicomgen import ct_series

    url = viewer_stack["url"]
    orthanc: Orthanc = viewer_stack["orthanc"]
    good = ("admin", "node-pw")

    # Without the node's credentials: nothing but the health probe, and the browser is asked
    # to log in (the node's challenge).
    assert requests.get(f"{url}/nginx-health", timeout=10).status_code == 200
    for path in ("/", "/viewer", "/app-config.js", "/dicom-web/studies"):
        response = requests.get(url + path, timeout=10)
        assert response.status_code == 401, path
        assert "Basic" in response.headers.get("WWW-Authenticate", ""), path
    assert (
        requests.get(f"{url}/dicom-web/studies", auth=("admin", "wrong"), timeout=10).status_code
        == 401
    )

    # With them: OHIF, with SPA fallback, and the bearer token works as well.
    page = requests.get(f"{url}/viewer?StudyInstanceUIDs=1.2.3", auth=good, timeout=10)
    assert page.status_code == 200 and "OHIF stand-in" in page.text
    token = {"Authorization": "Bearer node-token"}
    assert requests.get(f"{url}/app-config.js", headers=token, timeout=10).status_code == 200

    # DICOMweb reaches Orthanc with Orthanc's credentials, added by the proxy.
    series = ct_series(tmp_path / "ct", slices=3)
    orthanc.upload(series)
    studies = requests.get(f"{url}/dicom-web/studies", auth=good, timeout=30)
    assert studies.status_code == 200, studies.text
    assert studies.headers["Cache-Control"] == "no-store"
    (study,) = studies.json()
    study_uid = study["0020000D"]["Value"][0]
    metadata = requests.get(f"{url}/dicom-web/studies/{study_uid}/metadata", auth=good, timeout=30)
    assert metadata.status_code == 200
    # Orthanc wrote the bulk data URLs for the proxy's origin (Host passed through).
    bulk = [
        i["7FE00010"]["BulkDataURI"]
        for i in metadata.json()
        if "BulkDataURI" in i.get("7FE00010", {})
    ]
    assert bulk and all(u.startswith(f"{url}/dicom-web/") for u in bulk), bulk[:1]

    # Read-only: no STOW-RS and no DELETE through the viewer.
    post = requests.post(f"{url}/dicom-web/studies", auth=good, data=b"x", timeout=10)
    assert post.status_code == 403
    delete = requests.delete(f"{url}/dicom-web/studies/{study_uid}", auth=good, timeout=10)
    assert delete.status_code == 403
    assert len(requests.get(f"{url}/dicom-web/studies", auth=good, timeout=30).json()) == 1
    # Orthanc's own REST API is not reachable through the viewer (SPA fallback instead).
    assert "OHIF stand-in" in requests.get(f"{url}/system", auth=good, timeout=10).text


# ------------------------------------------------------------------------------- the guide


def _guide_table(heading: str) -> list[dict[str, str]]:
    """The first markdown table after ``heading`` as a list of row dicts."""
    text = GUIDE.read_text()
    start = text.index(heading)
    rows = []
    header: list[str] | None = None
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if header:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_guide_service_table_matches_compose(compose: dict[str, Any]) -> None:
    rows = {
        re.match(r"`([\w-]+)`", r["service"]).group(1): r
        for r in _guide_table("## 1. What runs where")
    }  # type: ignore[union-attr]
    services = compose["services"]
    assert set(rows) == set(services)
    for name, service in services.items():
        row = rows[name]
        # Image or Dockerfile.
        if "build" in service:
            assert f"`{service['build']['dockerfile'].removeprefix('docker/')}`" in row[
                "image"
            ].replace("`docker/", "`"), name
        else:
            assert f"`{service['image']}`" in row["image"], name
        # Who it runs as.
        if "user" in service:
            assert row["runs as"].startswith(f"`{service['user']}`"), name
        elif "build" in service:
            path = REPO / "docker" / service["build"]["dockerfile"].removeprefix("docker/")
            if service["build"]["context"].rstrip("/").endswith("docker"):
                path = DOCKER / service["build"]["dockerfile"]
            stage = _stages(path)[-1]
            user = _expand([c for c in stage if c.cmd == "USER"][-1].value[0], _args(stage))
            assert row["runs as"].startswith(f"`{user}`"), (name, user)
        else:
            assert "entrypoint drops root" in row["runs as"], name
        # Published container ports and named volumes.
        ports = [target for _, target in published(service)]
        guide_ports = [int(p) for p in re.findall(r"\b(\d{4,5})\b", row["published ports"])]
        if name == "viewer":
            assert ports == [8080] and guide_ports == [3000]  # host side, as the guide states
        else:
            assert guide_ports == ports, name
        volumes = sorted(v["source"] for v in mounts(service).values() if v["type"] == "volume")
        assert sorted(re.findall(r"`([\w-]+)`", row["volumes"])) == volumes, name


def test_guide_ports_and_ae_titles_match_the_configuration(compose: dict[str, Any]) -> None:
    rows = _guide_table("## 2. Ports and AE titles")
    listener = next(r for r in rows if r["what"].startswith("node, DICOM listener"))
    assert "`AINODE`" in listener["AE title"] and "11112" in listener["port"]
    assert Settings().ae_title == "AINODE" and Settings().dicom_port == 11112
    assert load_settings(DOCKER / "dicom-node.toml").ae_title == "AINODE"
    orthanc_config = json.loads((REPO / "orthanc" / "orthanc.json").read_text())
    orthanc_row = next(r for r in rows if r["what"].startswith("Orthanc, DICOM"))
    assert f"`{orthanc_config['DicomAet']}`" in orthanc_row["AE title"]
    assert str(orthanc_config["DicomPort"]) in orthanc_row["port"]
    for row in rows:
        if row["what"].startswith(("Redis", "PostgreSQL")):
            assert row["port"].startswith("not published")


def test_guide_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Deployment" in readme and "(docs/deployment.md)" in readme
