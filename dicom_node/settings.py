"""One typed settings object for the whole node.

Settings are loaded once, by an entry point, from (highest priority first):

1. environment variables with the prefix ``DICOM_NODE_`` (nested fields use ``__``, for example
   ``DICOM_NODE_SCP__MAX_ASSOCIATIONS=20``);
2. a TOML file given with ``--config`` (or ``DICOM_NODE_CONFIG``);
3. the defaults below.

The object is then passed down explicitly. Nothing in the package reads the environment or a
config file at import time.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_node.errors import ConfigError

ENV_PREFIX = "DICOM_NODE_"

DEFAULT_STABLE_SECONDS = 30.0
"""Quiet period (s) after the last instance before a study counts as complete.

Orthanc's ``StableAge`` defaults to 60 s and mercure's series trigger to 60 s; scanners send a
series within seconds, so 30 s trades a little latency for fewer split studies."""

DEFAULT_MAX_PDU = 131072
"""Maximum PDU size (bytes) we advertise. ``storescu`` never sends larger PDUs, and 128 KiB cut
per-instance CPU by a third in ``research/performance.md`` §2.3."""

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def _check_ae_title(value: str, what: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError(
            f"{what} must be 1-16 printable ASCII characters without backslash, got {value!r}"
        )
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DuplicatePolicy(str, Enum):
    """What to do when a SOP Instance UID arrives again with different bytes."""

    KEEP_FIRST = "keep-first"
    OVERWRITE = "overwrite"
    REJECT = "reject"


class AllowedCaller(_Section):
    """A calling AE title that may associate, optionally only from given hosts."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list)
    """IP addresses or networks (CIDR) the AE title may connect from; empty means any host."""

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v, "ae_title")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"{host!r} is not an IP address or CIDR network") from exc
        return v

    def allows_host(self, host: str) -> bool:
        if not self.hosts:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in ipaddress.ip_network(h, strict=False) for h in self.hosts)


class TlsSettings(_Section):
    """DICOM TLS (PS3.15 BCP 195 non-downgrading: TLS >= 1.2, mutual authentication)."""

    enabled: bool = False
    certificate: Path | None = None
    """PEM certificate chain presented by the node."""
    private_key: Path | None = None
    ca_certificates: Path | None = None
    """PEM bundle of the CAs whose certificates peers must present (client certs for the SCP,
    server certs for the SCU)."""
    require_peer_certificate: bool = True

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if self.enabled:
            for name in ("certificate", "private_key", "ca_certificates"):
                path = getattr(self, name)
                if path is None:
                    raise ValueError(f"tls.{name} is required when TLS is enabled")
                if not Path(path).is_file():
                    raise ValueError(f"tls.{name}: file {path} does not exist")
        return self


class ScpSettings(_Section):
    """The C-STORE listener."""

    receivers: int = Field(default=2, ge=1, le=64)
    """Receiver processes sharing the DICOM port (SO_REUSEPORT). Python's GIL makes processes,
    not threads, the way to use more cores."""
    max_associations: int = Field(default=16, ge=1, le=1000)
    """Concurrent associations per receiver process."""
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    max_pdu_size: int = Field(default=DEFAULT_MAX_PDU, ge=0)
    require_called_ae_title: bool = True
    """Reject associations whose called AE title is not ours."""
    allowed_callers: list[AllowedCaller] | None = None
    """Calling AE allow-list. ``None`` accepts any caller; an empty list accepts nobody."""
    accept_unknown_sop_classes: bool = False
    """Also accept storage of private or unknown SOP classes."""
    accept_deflated: bool = True
    """Accept Deflated Explicit VR Little Endian (inflation is bounded by max_instance_bytes)."""
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1024)
    """Instances larger than this are refused with A700 and their partial file removed."""
    min_free_bytes: int = Field(default=1 * 1024**3, ge=0)
    """Refuse (A700) when the spool file system has less free space than this."""
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    fsync: bool = True
    """fsync each instance and its directory before answering success. Turn off only for
    benchmarks: a success status then no longer survives a power cut."""
    tls: TlsSettings = TlsSettings()


class HttpSettings(_Section):
    """The HTTP API, dashboard and DICOMweb endpoints."""

    bind: str | None = None
    """Listen address for HTTP; defaults to the node's ``bind``."""
    tokens: list[SecretStr] = Field(default_factory=list)
    """Bearer tokens accepted by the API."""
    users: dict[str, SecretStr] = Field(default_factory=dict)
    """HTTP basic users (name -> password)."""
    ohif_url: str | None = None
    """Base URL of an OHIF viewer; job pages link to ``<ohif_url>/viewer?StudyInstanceUIDs=``."""


class WorkerSettings(_Section):
    """Job execution (edge side and worker side)."""

    embedded_workers: int | None = Field(default=None, ge=0, le=64)
    """Worker processes ``dicom-node serve`` starts itself. Default: 1 with the embedded broker,
    0 with an external broker (start ``dicom-node worker`` on the worker machines)."""
    concurrency: int = Field(default=1, ge=1, le=64)
    """Child processes per worker (one per GPU is the usual choice)."""
    queues: list[str] = Field(default_factory=lambda: ["cpu"])
    lease_seconds: float = Field(default=60.0, ge=1)
    """A running job's lease; renewed every third of it. A dead worker's job is taken over
    after at most this long (plus the reconcile interval)."""
    max_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts before a job that keeps failing or killing its worker ends failed."""
    task_time_limit: float = Field(default=1800.0, ge=10)
    queued_timeout: float = Field(default=120.0, ge=1)
    """A queued job not started after this long is dispatched again."""
    reconcile_interval: float = Field(default=10.0, gt=0)
    source: Literal["auto", "spool", "dicomweb"] = "auto"
    """Where workers read study inputs: the shared spool, or WADO-RS from the node."""
    node_url: str | None = None
    """Base URL of the node's HTTP API for workers that read over WADO-RS."""
    node_token: SecretStr | None = None
    dciodvfy: bool = True
    """When dciodvfy (Debian dicom3tools) is installed, require zero errors from it on every SR
    and SEG before they are stored and sent (in addition to the built-in conformance gate)."""


class DestinationSettings(_Section):
    """A write-back target: STOW-RS (http/https) or C-STORE (dicom://AET@host:port)."""

    url: str
    token: SecretStr | None = None
    """Bearer token for STOW-RS (basic credentials go in the URL)."""
    verify_tls: bool | Path = True
    """True, or a CA bundle path. Never silently turned off."""
    calling_ae_title: str | None = None
    timeout: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_initial: float = Field(default=2.0, gt=0)
    backoff_max: float = Field(default=300.0, gt=0)
    read_back: bool = False
    """Verify with QIDO-RS / C-FIND that the objects are there before counting delivery done."""
    tls: TlsSettings = TlsSettings()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_destination_url(v)
        return v


class RouteRule(_Section):
    """A routing rule: which model runs on which series and where results go."""

    name: str
    models: list[str] = Field(default_factory=lambda: ["lung-nodules"])
    destinations: list[str] = Field(default_factory=list)
    """Destination names; empty means every configured destination."""
    modality: list[str] | None = None
    body_part: str | None = None
    """Regex on BodyPartExamined (case-insensitive)."""
    study_description: str | None = None
    series_description: str | None = None
    sop_class_uid: list[str] | None = None
    calling_ae_title: list[str] | None = None
    manufacturer: str | None = None
    min_slices: int | None = Field(default=None, ge=1)
    max_slices: int | None = Field(default=None, ge=1)
    min_slice_thickness: float | None = Field(default=None, gt=0)
    max_slice_thickness: float | None = Field(default=None, gt=0)
    fallback: bool = False
    """A fallback rule applies only when no other rule matched."""

    @field_validator("body_part", "study_description", "series_description", "manufacturer")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
        return v


class ModelSettings(_Section):
    """Per-model options, keyed by model name in ``[models.<name>]``."""

    path: Path | None = None
    """A model folder (TorchScript file + model card) instead of an entry point."""
    plugin: str | None = None
    """``module:attribute`` of a Detector class or factory, for plug-ins that are not installed
    as a package (the attribute is called with this ModelSettings, or with no argument)."""
    queue: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threshold: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Settings(BaseSettings):
    """Everything the node can be told. See the README for the environment variable names."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    ae_title: str = "AINODE"
    dicom_port: Annotated[int, Field(ge=1, le=65535)] = 11112
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """0 turns the HTTP server off."""
    bind: str = "127.0.0.1"
    """Listen address for DICOM (and HTTP unless http.bind is set). Loopback by default: set it
    to the imaging network's interface (or 0.0.0.0) to receive from scanners."""
    data_dir: Path = Path("./var")
    broker_url: str | None = None
    """Celery broker. Unset: an embedded SQLite-backed broker in the data directory."""
    database_url: str | None = None
    """SQLAlchemy URL of the state database. Unset: SQLite in the data directory."""
    stable_seconds: Annotated[float, Field(gt=0)] = DEFAULT_STABLE_SECONDS
    destination: str | None = None
    """A single write-back destination URL (the simple case of ``[destinations]``)."""
    node_name: str = "dicom-node"
    """Shown in Contributing Equipment and the audit trail."""

    scp: ScpSettings = ScpSettings()
    http: HttpSettings = HttpSettings()
    worker: WorkerSettings = WorkerSettings()
    log: LogSettings = LogSettings()
    destinations: dict[str, DestinationSettings] = Field(default_factory=dict)
    routes: list[RouteRule] = Field(default_factory=list)
    models: dict[str, ModelSettings] = Field(default_factory=dict)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v, "ae_title")

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(
                f"must be an IP address such as 127.0.0.1 or 0.0.0.0, got {v!r}"
            ) from exc
        return v

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str | None) -> str | None:
        if v:
            parse_destination_url(v)
        return v or None

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        names = [r.name for r in self.routes]
        if len(names) != len(set(names)):
            raise ValueError("route names must be unique")
        known = set(self.all_destinations())
        for rule in self.routes:
            missing = [d for d in rule.destinations if d not in known]
            if missing:
                raise ValueError(
                    f"route {rule.name!r} names unknown destination(s) {missing}; "
                    f"configured: {sorted(known) or 'none'}"
                )
        return self

    # Derived values -------------------------------------------------------------------------

    def all_destinations(self) -> dict[str, DestinationSettings]:
        """Configured destinations, with ``DICOM_NODE_DESTINATION`` as one named ``default``."""
        out = dict(self.destinations)
        if self.destination and "default" not in out:
            out["default"] = DestinationSettings(url=self.destination)
        return out

    def effective_routes(self) -> list[RouteRule]:
        """The routing rules; without any, one catch-all rule for CT runs ``lung-nodules``."""
        if self.routes:
            return list(self.routes)
        return [RouteRule(name="default-ct", modality=["CT"], models=["lung-nodules"])]

    @property
    def http_bind(self) -> str:
        return self.http.bind or self.bind

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'state.sqlite').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def embedded_worker_count(self) -> int:
        if self.worker.embedded_workers is not None:
            return self.worker.embedded_workers
        return 1 if self.embedded_broker else 0

    @property
    def http_auth_configured(self) -> bool:
        return bool(self.http.tokens or self.http.users)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return env_settings, init_settings


def parse_destination_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split a destination URL into its kind and parts, raising ``ValueError`` when malformed.

    >>> parse_destination_url("dicom://PACS@10.0.0.5:104")[1]["ae_title"]
    'PACS'
    >>> parse_destination_url("https://pacs.example/dicom-web")[0]
    'stow'
    """
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"destination {_redact(url)} has no host")
        return "stow", {"url": url}
    if parts.scheme == "dicom":
        if not parts.username or not parts.hostname or not parts.port:
            raise ValueError(f"destination {_redact(url)} must look like dicom://AET@host:port")
        return "cstore", {
            "ae_title": _check_ae_title(parts.username, "destination AE title"),
            "host": parts.hostname,
            "port": parts.port,
        }
    raise ValueError(f"destination {_redact(url)} must start with http://, https:// or dicom://")


def _redact(url: str) -> str:
    """Hide a password in a URL before it goes into a message."""
    try:
        parts = urlsplit(url)
        if parts.password:
            host = parts.hostname or ""
            netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
            return parts._replace(netloc=netloc).geturl()
    except ValueError:  # unparseable (e.g. a bad port): hide everything before the host
        return url.split("://", 1)[0] + "://***"
    return url


def redact_url(url: str) -> str:
    """Public form of :func:`_redact` for logs and API output."""
    return _redact(url)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Load and validate the settings once, at start-up.

    ``config_file`` (or ``DICOM_NODE_CONFIG``) names a TOML file; environment variables override
    it; ``overrides`` (used by tests and the ``demo`` command) override the file but not the
    environment. Raises :class:`~dicom_node.errors.ConfigError` whose message names each wrong
    setting, its environment variable and the reason.
    """
    path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None


def format_validation_error(exc: ValidationError, path: Path | str | None) -> str:
    lines = ["invalid configuration" + (f" (file {path})" if path else "") + ":"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"] if not isinstance(p, int)).upper()
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if isinstance(got, str) and "://" in got:
            got = _redact(got)  # a URL may carry a password
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        if "password" in loc or "token" in loc or "users" in loc:
            shown = ""
        lines.append(f"  - {loc} [{env}]: {msg}{shown}")
    return "\n".join(lines)
