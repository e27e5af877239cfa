"""MONAI bundles (Model Zoo layout) as node models: ``[models.<name>] bundle = "DIR"``.

* :mod:`~workers.models.bundle.metadata`: the bundle's declarations (read by
  :mod:`dicom_node.model_catalog`, text only) as input requirements and a label table;
* :mod:`~workers.models.bundle.orientation`: LPS/RAS, axes and resampling, in one place;
* :mod:`~workers.models.bundle.detector`: :class:`BundleDetector`, which runs the bundle's own
  ``inference.json`` on the node's volume (needs the ``monai`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.models.bundle.detector import BundleDetector

__all__ = ["BundleDetector"]


def __getattr__(name: str) -> object:
    if name == "BundleDetector":
        from workers.models.bundle.detector import BundleDetector

        return BundleDetector
    raise AttributeError(name)
