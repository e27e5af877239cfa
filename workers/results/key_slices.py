"""Key slices of findings: the source image each finding is shown on, for the viewer outputs.

The Secondary Capture images (``sc``), the presentation state (``gsps``) and the key object
selection (``key-images``) all show a finding on the same image the SR draws it on: its
``key_slice`` (the source slice through the finding where it is best seen, normally its
centre), with its ``bbox_2d`` box in that image's pixel coordinates. This module maps findings
to those source images and holds what the three outputs share: the caption and the display
window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from workers.findings import DetectionResult, Finding
from workers.results.sources import SourceImages
from workers.volume import Volume

MAX_KEY_IMAGES = 20
"""At most this many Secondary Capture key images per result (the most confident findings)."""

LUNG_WINDOW = (-600.0, 1500.0)
"""(centre, width) in HU of the lung window CT key images are shown in."""

BANNER_TEXT = "AI result - not verified"
"""Burned into every Secondary Capture key image."""


@dataclass(frozen=True)
class KeySlice:
    """One finding on its key slice."""

    number: int
    """1-based finding number, as in the SR's tracking identifiers (``Nodule 2``)."""
    finding: Finding
    slice_index: int
    image: Dataset
    """The source instance of the key slice (a repaired header copy, ``sources.source_images``)."""
    frame_number: int | None
    """1-based frame of ``image`` for a multi-frame source, else None."""


def key_slices(result: DetectionResult, sources: SourceImages) -> list[KeySlice]:
    """Every finding on its key slice, in finding order."""
    return [
        KeySlice(
            number=index + 1,
            finding=finding,
            slice_index=int(finding.key_slice),
            image=sources.slice_image[int(finding.key_slice)],
            frame_number=sources.slice_frame[int(finding.key_slice)],
        )
        for index, finding in enumerate(result.findings)
    ]


def most_confident(slices: list[KeySlice], limit: int = MAX_KEY_IMAGES) -> list[KeySlice]:
    """The ``limit`` most confident findings, in finding order (ties: the earlier finding)."""
    ranked = sorted(slices, key=lambda s: (-float(s.finding.confidence), s.number))[:limit]
    return sorted(ranked, key=lambda s: s.number)


def caption(key: KeySlice) -> str:
    """Short patient-free label of a finding, e.g. ``AI 2: 12 mm 0.97``."""
    finding = key.finding
    return f"AI {key.number}: {float(finding.diameter_mm):.0f} mm {float(finding.confidence):.2f}"


def display_window(volume: Volume, slice_index: int) -> tuple[float, float]:
    """(centre, width) to show a slice with: the lung window for CT, else the 1st to 99th
    percentile of that slice."""
    if volume.modality.upper() == "CT":
        return LUNG_WINDOW
    low, high = np.percentile(volume.array[slice_index], [1.0, 99.0])
    width = max(float(high - low), 1.0)
    return float(low) + width / 2.0, width
