"""What ``--from SOURCE`` (or a ``[[pull]]`` table's ``source``) names."""

from __future__ import annotations

from dicom_node.delivery.destinations import Destination, StowDestination, build_destination
from dicom_node.errors import ConfigError
from dicom_node.settings import DestinationSettings, Settings, parse_destination_url

URL_NAME = "--from"
"""The name a source given as a URL gets (a destination name cannot contain dashes first)."""


def resolve_source(settings: Settings, source: str) -> Destination:
    """The peer to query and retrieve from: a URL (``http(s)://...`` for DICOMweb,
    ``dicom://AET@host:port`` for C-FIND/C-MOVE) or the name of a configured destination, whose
    credentials, TLS trust and timeout are then used. Raises :class:`ConfigError`."""
    if "://" in source:
        try:
            parse_destination_url(source)
            cfg = DestinationSettings(url=source)
        except ValueError as exc:
            raise ConfigError(f"--from: {exc}") from None
        name = URL_NAME
    else:
        configured = settings.all_destinations()
        if source not in configured:
            known = ", ".join(sorted(configured)) or "none configured"
            raise ConfigError(
                f"unknown source {source!r}: give a DICOMweb URL, dicom://AET@host:port, or a "
                f"configured destination ({known})"
            )
        cfg, name = configured[source], source
    return build_destination(name, cfg, calling_ae_title=settings.ae_title)


def describe(source: Destination) -> str:
    """The source for messages and the audit trail: its name and address, no credentials."""
    if isinstance(source, StowDestination):
        where = source.base_url
    else:
        where = f"{source.ae_title}@{source.host}:{source.port}"
    return where if source.name == URL_NAME else f"{source.name!r} ({where})"
