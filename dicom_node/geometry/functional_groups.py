"""Reading header values safely, at the top level or in functional groups.

pydicom decodes an element when it is first read, so a damaged header (an unknown VR, a value
that does not parse) fails there, not when the file is opened: :func:`header_value` turns any
such failure into a :class:`GeometryError` naming the attribute. For enhanced and
legacy-converted multi-frame instances, an attribute of a frame is found in that frame's
Per-frame Functional Groups item first, then in the Shared one (PS3.3 C.7.6.16).
"""

from __future__ import annotations

import math
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.geometry.errors import GeometryError


def header_value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, with a decoding failure raised as :class:`GeometryError`."""
    try:
        return ds.get(keyword, default)
    except Exception:  # whatever pydicom raises for a damaged element
        raise GeometryError(f"{keyword} cannot be decoded") from None


def _first(seq: Any) -> Any:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def functional_group_value(ds: Dataset, frame_index: int, sequence: str, keyword: str) -> Any:
    """``keyword`` in functional group ``sequence`` of frame ``frame_index`` (0-based): the
    Per-frame Functional Groups item first, then the Shared one (PS3.3 C.7.6.16); None if
    neither has it."""
    per_frame = header_value(ds, "PerFrameFunctionalGroupsSequence")
    frame_item = None
    if per_frame is not None and 0 <= frame_index < len(per_frame):
        frame_item = per_frame[frame_index]
    for group in (frame_item, _first(header_value(ds, "SharedFunctionalGroupsSequence"))):
        if group is None:
            continue
        item = _first(header_value(group, sequence))
        if item is not None and keyword in item:
            return header_value(item, keyword)
    return None


def pixel_rescale(ds: Dataset, frame_number: int | None) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a single-frame image or of frame ``frame_number``
    (1-based) of a multi-frame one: the Pixel Value Transformation functional group first, then
    the top level; (1, 0) when neither has it. :class:`GeometryError` for malformed values."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = None
        if frame_number is not None:
            value = functional_group_value(
                ds, frame_number - 1, "PixelValueTransformationSequence", keyword
            )
        if value is None:
            value = header_value(ds, keyword)
        try:
            number = default if value in (None, "") else float(value)
        except (TypeError, ValueError):
            raise GeometryError(f"{keyword} is malformed") from None
        if not math.isfinite(number):
            raise GeometryError(f"{keyword} is malformed")
        values.append(number)
    return values[0], values[1]
