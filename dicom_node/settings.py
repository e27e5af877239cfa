"""One typed settings object for the whole node.

Settings are loaded once, by an entry point, from (highest priority first):

1. command-line options that set a setting (``dicom-node serve --receivers 4``);
2. environment variables with the prefix ``DICOM_NODE_`` (nested fields use ``__``, for example
   ``DICOM_NODE_SCP__MAX_ASSOCIATIONS=20``);
3. a TOML file given with ``--config`` (or ``DICOM_NODE_CONFIG``);
4. the defaults below.

The layers merge table by table at every depth (:func:`deep_merge`): setting one key of
``[scp]`` on the command line or in the environment keeps the file's other ``[scp]`` keys.
List and map settings accept the forms an admin types (``tok1,tok2``, ``alice:pw1,bob:pw2``)
as well as JSON; lists and maps of tables need JSON in an environment variable.

The object is then passed down explicitly. Nothing in the package reads the environment or a
config file at import time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import types
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dicom_node.errors import ConfigError

ENV_PREFIX = "DICOM_NODE_"

DEFAULT_STABLE_SECONDS = 30.0
"""Quiet period (s) after the last instance before a study counts as complete.

Orthanc's ``StableAge`` defaults to 60 s and mercure's series trigger to 60 s; scanners send a
series within seconds, so 30 s trades a little latency for fewer split studies."""

DEFAULT_MAX_PDU = 131072
"""Maximum PDU size (bytes) we advertise. ``storescu`` never sends larger PDUs, and 128 KiB cut
the PDUs per 512 KB CT slice from 32 (pynetdicom's default 16382 bytes) to 4."""

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def _check_ae_title(value: str, what: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError(
            f"{what} must be 1-16 printable ASCII characters without backslash, got {value!r}"
        )
    return stripped


def _check_networks(values: list[str]) -> list[str]:
    """Refuse an entry that is not an IP address or CIDR network (host bits may be set)."""
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from exc
    return values


# Plain forms of list and map settings ----------------------------------------------------------
#
# Environment values reach validation as text unless they are a JSON array or object (see
# _EnvironmentSource); the before-validator on every section reads that text into the list or
# map the field wants, so one rule serves every list/map field, present and future.

_PLAIN_FORM_ERROR = "settings_form"
"""Error type of a value that could not be read; its input is never echoed (it may be a secret)."""

_SCALARS: tuple[type, ...] = (str, int, float, bool, Path, SecretStr)


def _is_scalar(annotation: Any) -> bool:
    if get_origin(annotation) is Literal:
        return True
    return annotation in _SCALARS or (isinstance(annotation, type) and issubclass(annotation, Enum))


def _text_shape(annotation: Any) -> str | None:
    """How text given for a field of this type is read.

    ``"list"``: comma-separated items or a JSON array; ``"map"``: ``name:value`` pairs or a
    JSON object; ``"json"``: JSON only (containers of tables); ``None``: left as it is.
    """
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return None
        annotation = members[0]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, set, frozenset, tuple):
        return "list" if all(_is_scalar(a) for a in args if a is not Ellipsis) else "json"
    if origin is dict:
        return "map" if args and all(_is_scalar(a) for a in args) else "json"
    if annotation in (list, dict) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    ):
        return "json"
    return None


def _read_text(text: str, shape: str) -> Any:
    """Read ``text`` given for a field of ``shape`` (see :func:`_text_shape`)."""
    text = text.strip()
    if shape == "json" or text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "unreadable"
            if isinstance(exc, json.JSONDecodeError):
                reason += f" at character {exc.pos + 1}"
            hint = (
                "; a setting made of tables needs JSON in an environment variable "
                '(e.g. [{"ae_title": "CT01"}]) or TOML tables in the --config file'
                if shape == "json"
                else ""
            )
            raise PydanticCustomError(
                _PLAIN_FORM_ERROR,
                "not valid JSON ({reason}){hint}",
                {"reason": reason, "hint": hint},
            ) from None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if shape == "list":
        return items
    pairs: dict[str, str] = {}
    for number, item in enumerate(items, 1):
        name, colon, value = item.partition(":")
        if not colon or not name.strip():
            raise PydanticCustomError(
                _PLAIN_FORM_ERROR,
                "item {number} is not a name:value pair; give comma-separated pairs such as "
                "alice:pw1,bob:pw2, or a JSON object (needed when a value contains a comma)",
                {"number": number},
            )
        if name.strip() in pairs:
            raise PydanticCustomError(
                _PLAIN_FORM_ERROR, "item {number} repeats a name", {"number": number}
            )
        pairs[name.strip()] = value.strip()
    return pairs


def _from_plain_form(
    fields: Mapping[str, FieldInfo],
    value: Any,
    info: ValidationInfo,
    shapes: Mapping[str, str] | None = None,
) -> Any:
    """Turn text given for a list or map field into that list or map (other values pass).

    ``shapes`` names the shape of fields whose type does not say it (a list whose items are a
    plain value or a table reads the plain form of the plain value)."""
    field = fields.get(info.field_name or "")
    if not isinstance(value, str) or field is None:
        return value
    shape = (shapes or {}).get(info.field_name or "") or _text_shape(field.annotation)
    return value if shape is None else _read_text(value, shape)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_forms(cls, value: Any, info: ValidationInfo) -> Any:
        return _from_plain_form(cls.model_fields, value, info)


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
        return _check_networks(v)

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
    max_connections: int = Field(default=64, ge=1, le=10000)
    """Open TCP connections per receiver process, associated or not. Connections over it are
    refused on accept (A-ASSOCIATE-RJ, transient, local limit exceeded) before a thread exists;
    between ``max_associations`` and this, pynetdicom reads the request and rejects it."""
    max_connections_per_host: int = Field(default=32, ge=1, le=10000)
    """Open TCP connections per peer address and receiver process (refused as above)."""
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
    """Accept Deflated Explicit VR Little Endian (inflation is bounded by max_decoded_bytes)."""
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1024)
    """Instances larger than this are refused with A700 and their partial file removed."""
    max_decoded_bytes: int = Field(default=1024**3, ge=1024)
    """Most bytes one instance may inflate (Deflated transfer syntax) or decode to (declared
    Rows x Columns x samples x bytes x frames); refused with A700 beyond it, before anything
    is allocated (:mod:`dicom_node.dataset_io`). 1 GiB is twice a 512x512x1000-frame enhanced
    CT (500 MiB) and above a breast tomosynthesis stack (~800 MiB)."""
    min_free_bytes: int = Field(default=1 * 1024**3, ge=0)
    """Refuse (A700) when the spool file system has less free space than this."""
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    fsync: bool = True
    """fsync each instance and its directory before answering success. Turn off only for
    benchmarks: a success status then no longer survives a power cut."""
    tls: TlsSettings = TlsSettings()

    @model_validator(mode="after")
    def _connections_cover_associations(self) -> ScpSettings:
        if self.max_connections < self.max_associations:
            raise ValueError(
                f"max_connections ({self.max_connections}) must be at least max_associations "
                f"({self.max_associations})"
            )
        return self


Role = Literal["viewer", "operator", "admin", "sender", "worker"]
"""What an HTTP client may do (:mod:`dicom_node.api.auth`): ``viewer`` reads jobs, previews and
DICOMweb; ``operator`` also retries and cancels jobs and stores over STOW-RS; ``admin`` also
reads the audit trail and configuration views, and may do everything. ``sender`` may only store
over STOW-RS (a PACS or scanner), ``worker`` may only read DICOMweb and put result files (a
remote worker's ``worker.node_token``)."""

ROLES: tuple[str, ...] = get_args(Role)


class HttpToken(_Section):
    """A named bearer token with a role (``[[http.tokens]]``)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x20:@\x7f]+$")
    """Recorded as the actor in the audit trail (no spaces, ``:`` or ``@``)."""
    token: SecretStr
    role: Role = "admin"

    @field_validator("token")
    @classmethod
    def _not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("a token may not be empty")
        return v


class HttpUser(_Section):
    """An HTTP basic user with a role (``[http.users.NAME]``)."""

    password: SecretStr
    role: Role = "admin"


def _plain_or_table(value: Any) -> str:
    """Which form a token or user entry has: ``plain`` (a string) or ``table``."""
    return "table" if isinstance(value, Mapping | BaseModel) else "plain"


TokenEntry = Annotated[
    Annotated[SecretStr, Tag("plain")] | Annotated[HttpToken, Tag("table")],
    Discriminator(_plain_or_table),
]
"""A token as before roles (a string: an admin) or a table with name, token and role."""

UserEntry = Annotated[
    Annotated[SecretStr, Tag("plain")] | Annotated[HttpUser, Tag("table")],
    Discriminator(_plain_or_table),
]
"""A password as before roles (an admin) or a table with password and role."""


class OidcSettings(_Section):
    """OpenID Connect: bearer JWTs issued by the site's identity provider (``[http.oidc]``).

    A token is accepted when its signature verifies against the issuer's JWKS and its ``exp``,
    ``nbf``, ``iss`` and ``aud`` claims hold; its role comes from ``role_claim``."""

    issuer: str
    """The ``iss`` the tokens carry, e.g. ``https://login.example.org/realms/radiology``."""
    audience: str
    """The ``aud`` the tokens must carry (the client id the provider issues them for)."""
    role_claim: str = "roles"
    """Claim holding a role name or a list of them; a dotted path reaches into an object
    (``realm_access.roles``). With several, the highest-ranked one counts."""
    name_claim: str = "preferred_username"
    """Claim recorded as the actor in the audit trail (``sub`` when it is missing)."""
    roles: dict[str, Role] = Field(default_factory=dict)
    """Provider values (groups, app roles) to node roles; empty: the values are role names."""
    jwks_url: str | None = None
    """Where the signing keys are; default: ``jwks_uri`` of the issuer's
    ``/.well-known/openid-configuration``."""
    algorithms: list[str] = Field(
        default_factory=lambda: [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"
        ]
    )
    """Signature algorithms accepted (never ``none`` nor a shared-secret HS*)."""
    leeway: float = Field(default=30.0, ge=0, le=300)
    """Seconds of clock skew allowed on ``exp`` and ``nbf``."""
    cache_seconds: float = Field(default=300.0, ge=10)
    """How long fetched keys are kept before they are fetched again."""
    timeout: float = Field(default=5.0, gt=0, le=60)
    """Seconds for one fetch of the configuration or the keys."""
    ca_certificates: Path | None = None
    """PEM bundle to verify the provider's HTTPS certificate; default: the system's."""

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("must be https (plain http is allowed on loopback only)")
        return v

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        weak = [a for a in v if a.lower() == "none" or a.upper().startswith("HS")]
        if weak or not v:
            raise ValueError(
                "give asymmetric algorithms (RS256, ES256, ...); none and HS* are refused"
            )
        return v


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpSettings(_Section):
    """The HTTP API, dashboard and DICOMweb endpoints."""

    bind: str | None = None
    """Listen address for HTTP; defaults to the node's ``bind``."""
    tokens: list[TokenEntry] = Field(default_factory=list)
    """Bearer tokens accepted by the API: tables with ``name``, ``token`` and ``role``
    (:class:`HttpToken`). A plain token string is still accepted and means role ``admin``,
    named ``token-N`` by its position in the list."""
    users: dict[str, UserEntry] = Field(default_factory=dict)
    """HTTP basic users: name -> a table with ``password`` and ``role`` (:class:`HttpUser`),
    or name -> password, which means role ``admin``."""
    oidc: OidcSettings | None = None
    """Also accept bearer JWTs from an OpenID Connect provider."""
    ohif_url: str | None = None
    """Base URL of an OHIF viewer; job pages link to ``<ohif_url>/viewer?StudyInstanceUIDs=``."""
    tls_certificate: Path | None = None
    """PEM certificate chain for built-in HTTPS (TLS >= 1.2, BCP 195 ciphers); with
    ``tls_private_key``. Unset: plain HTTP (put a TLS proxy in front beyond loopback)."""
    tls_private_key: Path | None = None
    header_timeout: float = Field(default=15.0, gt=0)
    """Seconds a client has to send a request's headers, from connection or first byte: a
    slow-loris client is cut off after this."""
    body_timeout: float = Field(default=60.0, gt=0)
    """Seconds the node waits for the next piece of a request body before answering 408."""
    keep_alive_timeout: int = Field(default=5, ge=1)
    """Seconds an idle keep-alive connection stays open."""
    max_connections: int = Field(default=100, ge=1, le=100_000)
    """Concurrent connections plus requests; beyond it requests are answered 503."""
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    """Largest request line plus headers; a larger request is answered 400."""
    max_stow_bytes: int = Field(default=4 * 1024**3, ge=1024)
    """Largest STOW-RS request body (parts are streamed to the spool, so this bounds disk, not
    memory); a larger body is answered 413 before more is read. Send bigger studies in several
    requests."""
    shutdown_timeout: int = Field(default=10, ge=0)
    """Seconds requests in flight may finish at shutdown."""
    login_failures: int = Field(default=5, ge=1)
    """Failed logins an address may make before it must wait (429, Retry-After)."""
    login_lockout_max: float = Field(default=300.0, gt=0)
    """Longest wait (s); the wait doubles with each further failure, from 1 s."""
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    """Addresses or networks (CIDR) of reverse proxies whose ``X-Forwarded-For`` /
    ``X-Forwarded-Proto`` are believed: the client address audited and throttled is then the
    one the proxy saw. ``[]`` believes none."""

    @field_validator("*", mode="before")
    @classmethod
    def _plain_forms(cls, value: Any, info: ValidationInfo) -> Any:
        # tokens and users take their plain forms (tok1,tok2 / alice:pw) as before roles.
        return _from_plain_form(
            cls.model_fields, value, info, shapes={"tokens": "list", "users": "map"}
        )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        return _check_networks(v)

    @model_validator(mode="after")
    def _unique_token_names(self) -> HttpSettings:
        names = [t.name for t in self.tokens if isinstance(t, HttpToken)]
        if len(names) != len(set(names)):
            raise ValueError("http.tokens: token names must be unique")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> HttpSettings:
        pair = (self.tls_certificate, self.tls_private_key)
        if (pair[0] is None) != (pair[1] is None):
            raise ValueError("http.tls_certificate and http.tls_private_key go together")
        for name, path in zip(("tls_certificate", "tls_private_key"), pair, strict=True):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"http.{name}: file {path} does not exist")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certificate is not None


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
    results: Literal["auto", "local", "node"] = "auto"
    """Where workers put finished results: ``local`` writes into this data directory's result
    store (a worker that shares the node's disk), ``node`` puts them through the node's API
    (``worker.node_url``) so they outlive this machine. ``auto``: ``node`` when ``worker.source``
    is ``dicomweb``, else ``local``."""
    dciodvfy: bool = True
    """When dciodvfy (Debian dicom3tools) is installed, require zero errors from it on every SR
    and SEG before they are stored and sent (in addition to the built-in conformance gate)."""


DESTINATION_OUTPUTS = ("sr", "seg", "sc", "gsps", "kos")
"""What a destination may ask to receive (``outputs``): ``sr`` the TID 1500 report (and the
volumetric SR when one is made), ``seg`` the Segmentation, ``sc`` Secondary Capture key images
with the finding's box and an "AI result - not verified" banner burned in, ``gsps`` a Grayscale
Softcopy Presentation State drawing each box on the source image, ``kos`` a Key Object
Selection ("Of Interest") flagging the key images. The IOCM rejection note is governed by
``supersede``, not by this list."""

DEFAULT_DESTINATION_OUTPUTS = ("sr", "seg")
"""What a destination receives unless it says otherwise (OHIF shows both)."""


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
    supersede: Literal["kos", "delete", "none"] = "kos"
    """What happens to a study's earlier AI results here when a newer version is delivered:
    ``kos`` sends an IHE IOCM rejection note (a Key Object Selection document titled
    "Rejected for Quality Reasons" listing them), ``delete`` deletes them through Orthanc's REST
    API (``orthanc_url``; for an Orthanc that ignores IOCM), ``none`` leaves them."""
    orthanc_url: str | None = None
    """Orthanc's REST root (``http(s)://[user:password@]host:port``) for ``supersede =
    "delete"``; unset: the destination's DICOMweb URL without its trailing ``/dicom-web``."""
    outputs: list[str] = Field(default_factory=lambda: list(DEFAULT_DESTINATION_OUTPUTS))
    """Which result objects this destination receives (:data:`DESTINATION_OUTPUTS`), e.g.
    ``["sr", "sc", "kos"]`` for a PACS viewer that shows SR as text and SEG not at all."""

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        unknown = [item for item in v if item not in DESTINATION_OUTPUTS]
        if unknown:
            raise ValueError(
                f"outputs: unknown value(s) {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(DESTINATION_OUTPUTS)}"
            )
        if not v:
            raise ValueError(f"outputs must name at least one of {', '.join(DESTINATION_OUTPUTS)}")
        return list(dict.fromkeys(v))

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_destination_url(v)
        return v

    @field_validator("orthanc_url")
    @classmethod
    def _orthanc_url(cls, v: str | None) -> str | None:
        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError(f"orthanc_url {_redact(v)} must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _delete_needs_orthanc(self) -> DestinationSettings:
        if self.supersede == "delete" and self.orthanc_rest_url is None:
            raise ValueError(
                'supersede = "delete" needs orthanc_url (the Orthanc REST root) unless url is '
                "Orthanc's DICOMweb root ending in /dicom-web"
            )
        return self

    @property
    def orthanc_rest_url(self) -> str | None:
        """The Orthanc REST root used to delete superseded results (with its credentials)."""
        if self.orthanc_url is not None:
            return self.orthanc_url.rstrip("/")
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/")
        if parts.scheme in ("http", "https") and path.endswith("/dicom-web"):
            return parts._replace(path=path.removesuffix("/dicom-web"), query="").geturl()
        return None


Priority = Literal["stat", "routine", "research"]
"""A job's priority (route key ``priority``)."""


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
    priority: Priority = "routine"
    """``stat`` jobs overtake ``routine`` ones, which overtake ``research`` ones, at dispatch,
    in the broker's queues and at delivery (:mod:`dicom_node.broker`)."""

    @field_validator("body_part", "study_description", "series_description", "manufacturer")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
        return v


class CodeSettings(_Section):
    """A coded concept typed in the settings, e.g. ``{code = "27925004", scheme = "SCT",
    meaning = "Nodule"}`` (SNOMED CT; DCM for DICOM-defined codes)."""

    code: str = Field(min_length=1, max_length=64)
    scheme: str = Field(default="SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class BundleLabelSettings(CodeSettings):
    """What one label of a MONAI bundle's output means (``[models.<name>.labels.<index>]``):
    a detection class index or a segmentation label value."""

    site: CodeSettings | None = None
    """Finding site, e.g. ``{code = "39607008", scheme = "SCT", meaning = "Lung"}``."""
    category: CodeSettings | None = None
    """Segmented Property Category of its SEG segment (CID 7150), e.g. ``{code = "91723000",
    scheme = "SCT", meaning = "Anatomical Structure"}`` for an organ; unset: Morphologically
    Abnormal Structure unless the type is a known organ or tissue."""
    findings: bool = False
    """Segmentation bundles: also report each connected component of this label as a finding
    (centre, key slice, diameter, volume) besides its SEG segment. Detection bundles: every
    box is a finding anyway."""
    min_volume_mm3: float = Field(default=0.0, ge=0)
    """Segmentation bundles: components smaller than this are left out of the findings."""

    def concept(self) -> dict[str, str]:
        return {"code": self.code, "scheme": self.scheme, "meaning": self.meaning}


class ModelSettings(_Section):
    """Per-model options, keyed by model name in ``[models.<name>]``."""

    path: Path | None = None
    """A model folder (TorchScript file + model card) instead of an entry point; a folder with
    ``configs/metadata.json`` is run as a MONAI bundle."""
    bundle: Path | None = None
    """A MONAI bundle folder (Model Zoo layout; needs the ``monai`` extra on the worker)."""
    plugin: str | None = None
    """``module:attribute`` of a Detector class or factory, for plug-ins that are not installed
    as a package (the attribute is called with this ModelSettings, or with no argument)."""
    queue: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threshold: float | None = None
    """Detection bundles: the lowest box score reported (default: what the bundle keeps)."""
    options: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, BundleLabelSettings] = Field(default_factory=dict)
    """Bundles: label index (as a string) -> the code its findings and segments carry."""
    weights: Literal["model.pt", "model.ts"] | None = None
    """Bundles: which file under ``models/`` to load (default: model.pt if present, else
    model.ts)."""
    memory_limit_mib: int | None = Field(default=None, ge=16)
    """Bundles: skip a study whose resampled input and outputs would need more than this."""

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, v: dict[str, BundleLabelSettings]) -> dict[str, BundleLabelSettings]:
        for key in v:
            if not key.isdigit():
                raise ValueError(f"labels: key {key!r} must be a label index (0, 1, 2...)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        given = [n for n in ("path", "bundle", "plugin") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"a model has one source: {' and '.join(given)} are both set")
        return self


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AuditSyslogSettings(_Section):
    """Export of the audit trail as DICOM Audit Messages (PS3.15 A.5, IHE ATNA) over syslog
    (RFC 5424 messages, RFC 6587 octet-counted frames) on TCP or TLS (RFC 5425)."""

    host: str
    port: int = Field(default=6514, ge=1, le=65535)
    """6514 is syslog over TLS (RFC 5425); plain TCP collectors often listen on 601 or 514."""
    tls: bool = True
    """TLS >= 1.2 to the collector (ATNA's Secure Node requires it); off: plain TCP."""
    ca_certificates: Path | None = None
    """PEM bundle to verify the collector's certificate; default: the system's."""
    certificate: Path | None = None
    """PEM certificate (with ``private_key``) presented to the collector (mutual TLS)."""
    private_key: Path | None = None
    queue_size: int = Field(default=1000, ge=1, le=1_000_000)
    """Messages waiting to be sent; beyond it new ones are dropped and counted in /metrics."""
    timeout: float = Field(default=5.0, gt=0, le=120)
    """Seconds to connect or send; the sender retries a lost collector after this long."""
    participant: Literal["study-key", "study-uid", "none"] = "study-key"
    """What identifies the study in a message: the node's opaque study key (default), the Study
    Instance UID (what an ATNA repository correlates on), or nothing."""
    audit_source_id: str | None = None
    """AuditSourceIdentification; default: ``node_name``."""

    @model_validator(mode="after")
    def _files(self) -> AuditSyslogSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("audit.syslog.certificate and private_key go together")
        for name in ("ca_certificates", "certificate", "private_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"audit.syslog.{name}: file {path} does not exist")
        return self


class AuditSettings(_Section):
    """The audit trail (:mod:`dicom_node.audit`)."""

    syslog: AuditSyslogSettings | None = None
    """Send audit messages to a syslog collector (ATNA audit record repository)."""


AlertEvent = Literal[
    "job-failed", "destination-down", "destination-recovered", "disk-low", "finding"
]
"""What an outgoing webhook can be told (:mod:`dicom_node.alerts`)."""

ALERT_EVENTS: tuple[AlertEvent, ...] = get_args(AlertEvent)


class WebhookSettings(_Section):
    """One ``[[alerts.webhooks]]`` receiver: a URL that gets signed JSON events."""

    url: str
    secret: SecretStr
    """Key of the HMAC-SHA256 signature (``X-Dicom-Node-Signature``); at least 16 characters."""
    events: list[AlertEvent] = Field(default_factory=lambda: list(ALERT_EVENTS))
    min_finding_mm: float | None = Field(default=None, ge=0)
    """``finding`` events only for a job with a finding at least this long (mm); unset: any."""
    timeout: float = Field(default=10.0, gt=0, le=120)
    max_attempts: int = Field(default=5, ge=1, le=50)
    """Tries per event (back-off between them, see ``alerts.backoff_*``) before it is dropped."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL, got scheme {parts.scheme!r}")
        return v

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return v


class AlertSettings(_Section):
    """``[alerts]``: what the node watches and whom it tells (:mod:`dicom_node.alerts`)."""

    webhooks: list[WebhookSettings] = Field(default_factory=list)
    interval: float = Field(default=15.0, gt=0, le=3600)
    """Seconds between two looks at the state database and the disks."""
    disk_low_bytes: int = Field(default=5 * 1024**3, ge=0)
    """``disk-low`` when the spool's (or SQLite database's) file system has less free space."""
    queue_size: int = Field(default=1000, ge=1, le=100_000)
    """Events waiting to be sent (or retried); past it new events are dropped and counted."""
    backoff_initial: float = Field(default=1.0, gt=0)
    backoff_max: float = Field(default=60.0, gt=0)


class ProbeSettings(_Section):
    """Periodic checks of the destinations (:mod:`dicom_node.delivery.probe`)."""

    interval_s: float = Field(default=300.0, ge=0)
    """Seconds between two probes of every destination; 0 turns periodic probing off
    (``dicom-node probe`` still works)."""
    history: int = Field(default=100, ge=1, le=10000)
    """Probe results kept per destination (older ones are deleted)."""


class RetentionSettings(_Section):
    """``[retention]``: how long received instances and results stay on the node's disk, and
    the disk watermarks that make room before the C-STORE floor (``scp.min_free_bytes``)
    refuses ingest (:mod:`dicom_node.retention`).

    The node is not an archive: the PACS keeps the images and the delivered results. Only
    what is allowed is removed: instances of studies whose jobs are all terminal, results
    delivered to every destination. The database rows stay (patient-free), marked
    ``purged_at``. An age of 0 keeps that kind of data by age for ever (the watermarks still
    apply)."""

    instances_days_done: float = Field(default=30.0, ge=0)
    """Days the instances of a study are kept after its last job finished, when its jobs all
    ended ``done``."""
    instances_days_failed: float = Field(default=90.0, ge=0)
    """... when one of its jobs ended ``failed`` (time to look into it and retry)."""
    instances_days_skipped: float = Field(default=30.0, ge=0)
    """... when its jobs ended ``skipped`` or ``cancelled`` (and none failed)."""
    results_days: float = Field(default=90.0, ge=0)
    """Days a finished job's result files (SR, SEG, ...) are kept, once delivered to every
    destination; a result not delivered everywhere is kept whatever its age."""
    high_watermark_percent: float = Field(default=90.0, gt=0, le=100)
    """Used space of the spool's file system at which a sweep purges what is allowed, oldest
    first, before its age limit."""
    low_watermark_percent: float = Field(default=80.0, gt=0, le=100)
    """Used space that sweep brings the file system down to (or as far as allowed)."""
    floor_margin_bytes: int = Field(default=1024**3, ge=0)
    """The sweep also starts when free space comes within this of ``scp.min_free_bytes`` (a
    small disk's percentages could sit below the floor), and goes on to twice this above it."""
    interval_s: float = Field(default=600.0, ge=0)
    """Seconds between two sweeps in ``dicom-node serve``; 0 turns the background sweep off
    (``dicom-node cleanup`` still works)."""

    @model_validator(mode="after")
    def _low_below_high(self) -> RetentionSettings:
        if self.low_watermark_percent >= self.high_watermark_percent:
            raise ValueError(
                f"low_watermark_percent ({self.low_watermark_percent}) must be below "
                f"high_watermark_percent ({self.high_watermark_percent})"
            )
        return self


class PullSettings(_Section):
    """One ``[[pull]]`` table: a backfill that ``dicom-node serve`` runs every ``interval_s``
    seconds (:mod:`dicom_node.backfill`), pulling the studies of the last ``lookback_hours``
    from ``source`` that the node has not processed yet. The catch-up for studies a PACS
    should have sent while the node was down."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    """Names the schedule in the audit trail, the log and the metrics."""
    source: str = Field(min_length=1)
    """A DICOMweb URL (``http(s)://[user:password@]host/dicom-web``), ``dicom://AET@host:port``
    (C-FIND + C-MOVE to this node's AE title), or the name of a configured destination."""
    interval_s: float = Field(default=3600.0, ge=10)
    """Seconds between two runs; the first runs shortly after start-up."""
    lookback_hours: float = Field(default=24.0, gt=0)
    """Each run asks for studies with a Study Date since now minus this (whole days: Study
    Date has no time)."""
    modality: str | None = Field(default=None, pattern=r"^[A-Z0-9]{1,16}$")
    """Only studies with this modality (ModalitiesInStudy), e.g. ``CT``."""
    limit: int = Field(default=500, ge=1, le=100_000)
    """At most this many studies pulled per run; the rest come in later runs."""
    enabled: bool = True


class Settings(BaseSettings):
    """Everything the node can be told. See the README for the environment variable names."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _plain_forms(cls, value: Any, info: ValidationInfo) -> Any:
        return _from_plain_form(cls.model_fields, value, info)

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
    audit: AuditSettings = AuditSettings()
    alerts: AlertSettings = AlertSettings()
    probes: ProbeSettings = ProbeSettings()
    retention: RetentionSettings = RetentionSettings()
    pull: list[PullSettings] = Field(default_factory=list)
    """``[[pull]]`` schedules run by ``dicom-node serve`` (:mod:`dicom_node.backfill`)."""

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

    @model_validator(mode="after")
    def _pull_sources(self) -> Settings:
        names = [p.name for p in self.pull]
        if len(names) != len(set(names)):
            raise ValueError("[[pull]] names must be unique")
        known = set(self.all_destinations())
        for pull in self.pull:
            if "://" in pull.source:
                parse_destination_url(pull.source)
            elif pull.source not in known:
                raise ValueError(
                    f"pull {pull.name!r}: source {pull.source!r} is neither a URL nor a "
                    f"configured destination ({', '.join(sorted(known)) or 'none configured'})"
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
        return bool(self.http.tokens or self.http.users or self.http.oidc)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings layers the file, the environment and the command line itself (one deep
        # merge, one priority order); Settings(**values) validates exactly the values given.
        return (init_settings,)


class _EnvironmentSource(EnvSettingsSource):
    """The ``DICOM_NODE_*`` variables, nested by ``__``.

    A value that is a JSON array or object is decoded; any other text is kept as it is for the
    fields' validators, which read the plain forms (``tok1,tok2``, ``alice:pw``) or say what is
    wrong. pydantic-settings would instead fail on non-JSON text with a bare ``SettingsError``.
    """

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            decoded = json.loads(value)
        except (TypeError, ValueError):
            return value
        return decoded if isinstance(decoded, list | dict) else value


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


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Load and validate the settings once, at start-up.

    ``config_file`` (or ``DICOM_NODE_CONFIG``) names a TOML file; ``DICOM_NODE_*`` environment
    variables override it; ``overrides`` (command-line options such as ``serve --receivers``,
    and tests) override both. The three merge key by key at every depth (:func:`deep_merge`).
    Raises :class:`~dicom_node.errors.ConfigError` whose message names each wrong setting, its
    environment variable and the reason, and never echoes a secret.
    """
    path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
    file_layer: dict[str, Any] = {}
    if path:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                file_layer = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {path} does not exist") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror}") from exc
    try:
        env_layer = _EnvironmentSource(Settings)()
        return Settings(**deep_merge(file_layer, env_layer, overrides))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None
    except SettingsError as exc:  # pydantic-settings' own failures carry no setting-level detail
        raise ConfigError(f"invalid configuration: {exc}") from None


def deep_merge(base: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge settings layers, later ones winning: tables merge key by key at every depth,
    anything else (a list included) replaces what was there.

    >>> deep_merge({"scp": {"receivers": 2, "fsync": False}}, {"scp": {"receivers": 4}})
    {'scp': {'receivers': 4, 'fsync': False}}
    """
    merged = dict(base)
    for layer in layers:
        for key, value in layer.items():
            below = merged.get(key)
            if isinstance(value, Mapping) and isinstance(below, Mapping):
                merged[key] = deep_merge(below, value)
            else:
                merged[key] = value
    return merged


_SECRET_WORDS = ("password", "token", "users", "secret", "key")
"""A setting whose dotted name contains one of these never has its value echoed."""


def format_validation_error(exc: ValidationError, path: Path | str | None) -> str:
    """One line per wrong setting: its dotted name, its environment variable and the reason,
    with the offending value only where it cannot be a secret."""
    lines = ["invalid configuration" + (f" (file {path})" if path else "") + ":"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"] if not isinstance(p, int)).upper()
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if isinstance(got, str) and "://" in got:
            got = _redact(got)  # a URL may carry a password
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        if err["type"] == _PLAIN_FORM_ERROR or any(w in loc.lower() for w in _SECRET_WORDS):
            shown = ""
        lines.append(f"  - {loc} [{env}]: {msg}{shown}")
    return "\n".join(lines)
