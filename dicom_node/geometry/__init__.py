"""Image geometry of a series, from headers only (numpy + pydicom; usable on the edge).

* :mod:`dicom_node.geometry.plane`: the plane of one image or frame (:class:`SliceGeometry`),
  read from the Image Plane module or an enhanced instance's functional groups, and which
  objects are not slices (localizers, non-image objects).
* :mod:`dicom_node.geometry.stack`: which images of a series form the volume and their order
  along the slice normal (:func:`order_slices`), spacing and gantry tilt
  (:func:`stack_spacing`).
* :mod:`dicom_node.geometry.functional_groups`: per-frame, then shared, functional group values
  of multi-frame instances, and the per-frame rescale.

The worker's volume loader, series selection and the edge's job preview all use these, so a
slice index means the same image in each of them.
"""

from dicom_node.geometry.errors import GeometryError
from dicom_node.geometry.functional_groups import functional_group_value, pixel_rescale
from dicom_node.geometry.plane import (
    LOCALIZER_TYPES,
    NON_IMAGE_MODALITIES,
    SliceGeometry,
    is_localizer,
    is_non_image,
    read_orientation,
    read_position,
    slice_geometry,
    slice_normal,
)
from dicom_node.geometry.stack import (
    DUPLICATE,
    LOCALIZER,
    NO_GEOMETRY,
    NON_IMAGE,
    ORIENTATION_TOLERANCE,
    OTHER_ORIENTATION,
    POSITION_TOLERANCE_MM,
    SPACING_RELATIVE_TOLERANCE,
    LeftOut,
    SliceOrder,
    StackSpacing,
    evenly_spaced,
    order_slices,
    stack_spacing,
)

__all__ = [
    "DUPLICATE",
    "LOCALIZER",
    "LOCALIZER_TYPES",
    "NON_IMAGE",
    "NON_IMAGE_MODALITIES",
    "NO_GEOMETRY",
    "ORIENTATION_TOLERANCE",
    "OTHER_ORIENTATION",
    "POSITION_TOLERANCE_MM",
    "SPACING_RELATIVE_TOLERANCE",
    "GeometryError",
    "LeftOut",
    "SliceGeometry",
    "SliceOrder",
    "StackSpacing",
    "evenly_spaced",
    "functional_group_value",
    "is_localizer",
    "is_non_image",
    "order_slices",
    "pixel_rescale",
    "read_orientation",
    "read_position",
    "slice_geometry",
    "slice_normal",
    "stack_spacing",
]
