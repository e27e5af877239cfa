"""Which result objects a destination receives, and so which ones a job must encode.

A destination's ``outputs`` setting (:data:`dicom_node.settings.DESTINATION_OUTPUTS`) names what
its viewers can show; each value stands for one or more *output kinds*, the names under which a
job's result files are stored (``workers/results/identity.py``):

======== ============================== ==================================================
setting  output kinds                   object
======== ============================== ==================================================
``sr``   ``sr``, ``sr-volumetric``      TID 1500 Comprehensive 3D SR (and the volumetric one)
``seg``  ``seg``                        Segmentation
``sc``   ``sc``                         Secondary Capture key images, annotations burned in
``gsps`` ``gsps``                       Grayscale Softcopy Presentation State
``kos``  ``key-images``                 Key Object Selection, title (113000, DCM) "Of Interest"
======== ============================== ==================================================

The IOCM rejection note (kind ``kos``) is not in this table: a destination's ``supersede``
policy decides whether it gets one. ``sc``, ``gsps`` and ``key-images`` are encoded only when a
destination of the job asks for them (:func:`requested_kinds`); every kind is stored once and
each destination is sent its own selection (:func:`sends`).
"""

from __future__ import annotations

from collections.abc import Iterable

from dicom_node.settings import DestinationSettings, Settings

REJECTION_NOTE_KIND = "kos"
"""Output kind of the IHE IOCM rejection note (sent per ``supersede``, not per ``outputs``)."""

KINDS_BY_OUTPUT: dict[str, tuple[str, ...]] = {
    "sr": ("sr", "sr-volumetric"),
    "seg": ("seg",),
    "sc": ("sc",),
    "gsps": ("gsps",),
    "kos": ("key-images",),
}
"""Output kinds each ``outputs`` value stands for."""

ON_REQUEST_KINDS = frozenset({"sc", "gsps", "key-images"})
"""Kinds encoded only when a destination of the job asks for them."""


def kinds_for(settings: DestinationSettings) -> frozenset[str]:
    """The output kinds a destination receives (the rejection note aside)."""
    return frozenset(kind for output in settings.outputs for kind in KINDS_BY_OUTPUT[output])


def sends(settings: DestinationSettings, kind: str) -> bool:
    """Whether a stored result object of ``kind`` goes to this destination."""
    if kind == REJECTION_NOTE_KIND:
        return settings.supersede == "kos"
    return kind in kinds_for(settings)


def requested_kinds(settings: Settings, destinations: Iterable[str]) -> frozenset[str]:
    """The on-request kinds (:data:`ON_REQUEST_KINDS`) a job for ``destinations`` must encode.

    A destination this process's settings do not know (a worker configured apart from the
    node) could want any of them, so all are encoded: delivery sends each destination only its
    own selection, and an unsent object costs only its storage.
    """
    configured = settings.all_destinations()
    wanted: set[str] = set()
    for name in destinations:
        cfg = configured.get(name)
        if cfg is None:
            return ON_REQUEST_KINDS
        wanted |= kinds_for(cfg) & ON_REQUEST_KINDS
    return frozenset(wanted)
