"""A bundle's declarations as the model runtime needs them: input requirements for series
selection and the label table (index -> code) from the model settings.

The declarations themselves are read by :func:`dicom_node.model_catalog.read_bundle` (text
only), which the edge's ``dicom-node models`` uses as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dicom_node.model_catalog import BundleMetadata, read_bundle
from dicom_node.settings import CodeSettings, ModelSettings
from workers.findings import MORPHOLOGICALLY_ABNORMAL_STRUCTURE, CodedConcept
from workers.models.base import InputRequirements

__all__ = ["GENERIC", "BundleMetadata", "LabelCode", "label_table", "read_bundle", "requirements_of"]

LOGGER = logging.getLogger(__name__)

@dataclass(frozen=True)
class LabelCode:
    """What one label of a bundle's output means, from ``[models.<name>.labels.<index>]``."""

    concept: CodedConcept
    """Finding type / Segmented Property Type."""
    site: CodedConcept | None = None
    """Finding site."""
    category: CodedConcept | None = None
    """Segmented Property Category (CID 7150); unset: from the type (``workers.results.seg``)."""
    per_component: bool = False
    """Segmentation: also report each connected component as a finding."""
    min_volume_mm3: float = 0.0
    """Segmentation: smaller components are left out of the findings."""


GENERIC = LabelCode(MORPHOLOGICALLY_ABNORMAL_STRUCTURE)
"""The code of a label the settings do not code."""


def _concept(spec: CodeSettings | None) -> CodedConcept | None:
    return None if spec is None else CodedConcept(spec.code, spec.scheme, spec.meaning)


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
        table[int(key)] = LabelCode(
            CodedConcept(spec.code, spec.scheme, spec.meaning),
            site=_concept(spec.site),
            category=_concept(spec.category),
            per_component=spec.findings,
            min_volume_mm3=spec.min_volume_mm3,
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
        table[index] = GENERIC
    return table
