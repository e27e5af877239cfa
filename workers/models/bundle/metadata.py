"""A bundle's declarations as the model runtime needs them: input requirements for series
selection and the label table (index -> code) from the model settings.

The declarations themselves are read by :func:`dicom_node.model_catalog.read_bundle` (text
only), which the edge's ``dicom-node models`` uses as well.
"""

from __future__ import annotations

import logging

from dicom_node.model_catalog import BundleMetadata, read_bundle
from dicom_node.settings import ModelSettings
from workers.findings import MORPHOLOGICALLY_ABNORMAL_STRUCTURE, CodedConcept
from workers.models.base import InputRequirements

__all__ = ["BundleMetadata", "LabelCode", "label_table", "read_bundle", "requirements_of"]

LOGGER = logging.getLogger(__name__)

LabelCode = tuple[CodedConcept, CodedConcept | None, bool, float]
"""(finding type, finding site, report components as findings, minimum component volume mm3)."""


def requirements_of(meta: BundleMetadata) -> InputRequirements:
    """Series selection for a bundle: its declared modality; any plane (``Orientationd`` and
    ``Spacingd`` take the series as it is), enough slices for a 3D network."""
    return InputRequirements(
        modalities=(meta.modality,) if meta.modality else ("CT", "MR", "PT"),
        min_slices=8,
        max_slice_thickness_mm=None,
        axial_only=False,
    )


def label_table(meta: BundleMetadata, cfg: ModelSettings) -> dict[int, LabelCode]:
    """Label index -> code, from ``[models.<name>.labels.<index>]``. Labels the bundle declares
    but the settings do not code get the generic "Morphologically abnormal structure"."""
    table: dict[int, LabelCode] = {}
    for key, spec in cfg.labels.items():
        site = CodedConcept(spec.site.code, spec.site.scheme, spec.site.meaning) if spec.site else None
        table[int(key)] = (
            CodedConcept(spec.code, spec.scheme, spec.meaning),
            site,
            spec.findings,
            spec.min_volume_mm3,
        )
    declared = {int(k) for k in meta.channel_def if k.isdigit()}
    if meta.kind == "segmentation":
        declared.discard(0)  # background
    for index in sorted(declared - set(table)):
        LOGGER.warning(
            "bundle %s: label %d (%s) has no code in the settings; using %s",
            meta.name,
            index,
            meta.channel_def.get(str(index), "?"),
            MORPHOLOGICALLY_ABNORMAL_STRUCTURE.meaning,
        )
        table[index] = (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, None, False, 0.0)
    return table
