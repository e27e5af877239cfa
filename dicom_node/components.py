"""Which background parts ``dicom-node serve`` runs next to the receivers."""

from __future__ import annotations

from typing import Any

from dicom_node.settings import Settings


def build_components(settings: Settings, service: Any) -> list[Any]:
    """Components with ``start()``/``stop()``, started in order and stopped in reverse."""
    return []
