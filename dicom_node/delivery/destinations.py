"""Write-back destinations, built once from :class:`~dicom_node.settings.DestinationSettings`.

* :class:`StowDestination` -- ``http(s)://[user:password@]host[:port]/dicom-web``: STOW-RS, with
  HTTP basic auth from the URL's userinfo or a bearer token, and TLS verification always on
  (the system trust store, or a CA bundle file).
* :class:`CStoreDestination` -- ``dicom://AET@host:port``: C-STORE over one association per
  batch, optionally over DICOM TLS.

Secrets stay in :class:`~pydantic.SecretStr` and never appear in ``repr`` or messages.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from pydantic import SecretStr

from dicom_node.errors import ConfigError, PermanentDeliveryError
from dicom_node.scu import Peer
from dicom_node.settings import DestinationSettings, TlsSettings, parse_destination_url

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

    from dicom_node.settings import Settings

LOGGER = logging.getLogger(__name__)

DEFAULT_CALLING_AE_TITLE = "AINODE"
MAX_REQUEST_BYTES = 64 * 1024**2
"""Largest STOW-RS request body we build; more objects go into further requests."""


class DestinationConfigError(PermanentDeliveryError, ConfigError):
    """A destination's settings cannot work. A ``ConfigError`` at start-up, and a permanent
    delivery failure for a job that meets it (a resend cannot fix configuration)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures."""

    max_attempts: int = 8
    initial: float = 2.0
    maximum: float = 300.0


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb origin server that accepts STOW-RS."""

    name: str
    base_url: str
    """The DICOMweb root without credentials, e.g. ``https://pacs:8042/dicom-web``."""
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    token: SecretStr | None = field(default=None, repr=False)
    verify: bool | Path = True
    timeout: float = 30.0
    read_back: bool = False
    retry: RetryPolicy = RetryPolicy()
    max_request_bytes: int = MAX_REQUEST_BYTES

    kind = "stow"

    @property
    def display(self) -> str:
        """Name and URL for messages (no credentials)."""
        return f"STOW-RS to {self.name!r} ({self.base_url})"

    @property
    def studies_url(self) -> str:
        return f"{self.base_url}/studies"

    @property
    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts for requests: fail fast on a dead host, wait for a slow one."""
        return (min(self.timeout, 10.0), self.timeout)

    def session(self) -> requests.Session:
        """A requests session carrying this destination's credentials and TLS trust."""
        s = CABundleSession()
        s.verify = str(self.verify) if isinstance(self.verify, Path) else self.verify
        if self.token is not None:
            s.headers["Authorization"] = f"Bearer {self.token.get_secret_value()}"
        elif self.username is not None:
            s.auth = (self.username, self.password.get_secret_value() if self.password else "")
        return s

    def client(self, session: requests.Session) -> DICOMwebClient:
        """A dicomweb-client for QIDO-RS / WADO-RS on ``session``, with its own retries off (the
        delivery's backoff decides when to try again)."""
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(self.base_url, session=session, timeout=self.timeouts)
        client.set_http_retry_params(retry=False)
        return client


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM storage SCP (a PACS's C-STORE port)."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = DEFAULT_CALLING_AE_TITLE
    timeout: float = 30.0
    tls: TlsSettings | None = None
    read_back: bool = False
    retry: RetryPolicy = RetryPolicy()

    kind = "cstore"

    @property
    def display(self) -> str:
        return f"C-STORE to {self.name!r} ({self.ae_title}@{self.host}:{self.port})"

    def peer(self) -> Peer:
        """The scu ``Peer``; the one timeout bounds association set-up, each DIMSE reply and
        socket silence, so a hung PACS costs at most that long per attempt."""
        return Peer(
            ae_title=self.ae_title,
            host=self.host,
            port=self.port,
            calling_ae_title=self.calling_ae_title,
            tls=_client_tls_context(self.tls) if self.tls and self.tls.enabled else None,
            server_hostname=self.host,
            acse_timeout=self.timeout,
            dimse_timeout=self.timeout,
            network_timeout=self.timeout,
        )


Destination = StowDestination | CStoreDestination


class CABundleSession(requests.Session):
    """A session whose configured CA bundle is not overridden by ``REQUESTS_CA_BUNDLE``.

    requests lets that environment variable replace ``Session.verify`` for every request that
    does not pass ``verify`` itself (psf/requests#3829), and dicomweb-client's requests don't.
    With ``verify_tls`` set to a bundle, that bundle must be the one used; with ``True``, the
    environment's bundle (a site's own CA) still applies."""

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(
            url, proxies, stream, verify, cert
        )
        if verify is None and isinstance(self.verify, str):
            settings["verify"] = self.verify
        return settings


def _client_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS >= 1.2, server certificate checked against the configured CAs, our certificate
    presented for mutual authentication (PS3.15 BCP 195 non-downgrading profile)."""
    assert tls.ca_certificates is not None  # TlsSettings validates this when enabled
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificates))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate and tls.private_key:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_destination(
    name: str,
    settings: DestinationSettings,
    *,
    calling_ae_title: str | None = None,
) -> Destination:
    """Build the destination named ``name`` from its settings.

    ``calling_ae_title`` is the node's AE title, used for C-STORE when the destination does not
    set its own. Raises :class:`DestinationConfigError` when the settings cannot work (TLS
    verification turned off, a CA bundle that does not exist, both a token and a password).
    """
    kind, parts = parse_destination_url(settings.url)
    retry = RetryPolicy(settings.max_attempts, settings.backoff_initial, settings.backoff_max)
    if kind == "cstore":
        return CStoreDestination(
            name=name,
            ae_title=parts["ae_title"],
            host=parts["host"],
            port=parts["port"],
            calling_ae_title=settings.calling_ae_title
            or calling_ae_title
            or DEFAULT_CALLING_AE_TITLE,
            timeout=settings.timeout,
            tls=settings.tls if settings.tls.enabled else None,
            read_back=settings.read_back,
            retry=retry,
        )

    url = urlsplit(settings.url)
    verify = settings.verify_tls
    if verify is False:
        raise DestinationConfigError(
            f"destination {name!r}: verify_tls = false is not supported; give the path of the CA "
            "bundle that signed the server's certificate instead"
        )
    if isinstance(verify, Path) and not verify.is_file():
        raise DestinationConfigError(f"destination {name!r}: CA bundle {verify} does not exist")
    username = unquote(url.username) if url.username else None
    password = SecretStr(unquote(url.password)) if url.password else None
    if settings.token is not None and username is not None:
        raise DestinationConfigError(
            f"destination {name!r}: give either a bearer token or user:password in the URL, not both"
        )
    host = url.hostname or ""
    if url.scheme == "http" and (username or settings.token) and not _is_loopback(host):
        LOGGER.warning(
            "destination %r sends credentials over plain HTTP to %s; use https:// outside a "
            "trusted network",
            name,
            host,
        )
    netloc = host if ":" not in host else f"[{host}]"
    if url.port:
        netloc += f":{url.port}"
    base = urlunsplit((url.scheme, netloc, url.path.rstrip("/"), url.query, ""))
    return StowDestination(
        name=name,
        base_url=base,
        username=username,
        password=password,
        token=settings.token,
        verify=verify,
        timeout=settings.timeout,
        read_back=settings.read_back,
        retry=retry,
    )


def destinations_from_settings(settings: Settings) -> dict[str, Destination]:
    """Every configured destination (``[destinations]`` and ``DICOM_NODE_DESTINATION`` as
    ``default``), built with the node's AE title as the C-STORE calling AE title."""
    return {
        name: build_destination(name, cfg, calling_ae_title=settings.ae_title)
        for name, cfg in settings.all_destinations().items()
    }
