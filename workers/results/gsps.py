"""Grayscale Softcopy Presentation State (highdicom ``pr``): the findings drawn on the source images.

For viewers that show presentation states but neither SR measurements nor SEG overlays (many
PACS viewers do), one GSPS (PS3.3 A.33.1) per result that applies to every source image of the
series:

* a VOI LUT: the lung window for CT (other modalities keep the window of their images);
* one Graphic Annotation per finding on its key slice (the image the SR draws it on): the
  finding's box (``bbox_2d``) as a closed POLYLINE in PIXEL units, exactly the SR's 2D SCOORD,
  carrying the finding's Tracking ID and Tracking UID (the ones its SR group and SEG segment
  carry), and a text object with a short caption (``AI 1: 12 mm 0.97``);
* all on one graphic layer, ``AI_FINDINGS``, described as AI output not verified;
* the patient and study of the source, the result identity (Contributing Equipment, "AI: ..."
  series description, deterministic UIDs) and every date and time from the job.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.valuerep import DA, TM

from workers.findings import DetectionResult
from workers.results.identity import (
    JobContext,
    OutputIdentity,
    contributing_equipment,
    display_version,
    stamp_dates,
    tracking_uid,
)
from workers.results.key_slices import LUNG_WINDOW, caption, key_slices
from workers.results.seg import finding_identifier
from workers.results.sources import source_images
from workers.results.sr import roi_graphic
from workers.volume import Volume

GRAPHIC_LAYER = "AI_FINDINGS"
CONTENT_LABEL = "AI_FINDINGS"
LAYER_COLOUR = (255, 230, 0)
"""Yellow, as on the Secondary Capture key images."""


def build_presentation_state(
    volume: Volume, result: DetectionResult, job: JobContext, identity: OutputIdentity
) -> hd.pr.GrayscaleSoftcopyPresentationState | None:
    """The GSPS drawing every finding of ``result``; ``None`` without findings."""
    if not result.findings:
        return None
    sources = source_images(volume)
    layer = hd.pr.GraphicLayer(
        layer_name=GRAPHIC_LAYER,
        order=1,
        description="AI findings, not verified by a physician",
        display_color=hd.color.CIELabColor.from_rgb(*LAYER_COLOUR),
    )
    annotations = []
    for key in key_slices(result, sources):
        left, top, _, _ = (float(v) for v in key.finding.bbox_2d)
        _, points = roi_graphic(key.finding, "box")
        box = hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            tracking_id=finding_identifier(key.finding, key.number),
            tracking_uid=tracking_uid(job, key.number - 1),
        )
        label = hd.pr.TextObject(
            text_value=caption(key),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            anchor_point=(left, top),
            text_justification=hd.pr.TextJustificationValues.LEFT,
            anchor_point_visible=False,
        )
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[key.image],
                graphic_layer=layer,
                referenced_frame_number=key.frame_number,
                graphic_objects=[box],
                text_objects=[label],
            )
        )
    voi = None
    if volume.modality.upper() == "CT":
        centre, width = LUNG_WINDOW
        voi = [
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=centre, window_width=width, window_explanation="LUNG"
            )
        ]
    model = job.model
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=sources.datasets,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=model.manufacturer[:64],
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=job.node.name[:64],
        content_label=CONTENT_LABEL,
        content_description=f"AI output, not verified: {model.name} {display_version(model.version)}"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=voi,
        institution_name=job.node.institution_name,
    )
    when = job.content_datetime.replace(microsecond=0)
    gsps.PresentationCreationDate = DA(when.date())
    gsps.PresentationCreationTime = TM(when.time().replace(tzinfo=None))
    gsps.SeriesDescription = identity.series_description
    gsps.StationName = job.node.ae_title[:16]
    gsps.ContributingEquipmentSequence = contributing_equipment(job)  # type: ignore[assignment]
    stamp_dates(gsps, job)
    # The GSPS IOD dates its content with Presentation Creation Date/Time, not Content Date/Time.
    del gsps.ContentDate, gsps.ContentTime
    # Type 2C in General Series: the source's value, or empty (unknown) as the source is silent.
    gsps.Laterality = sources.datasets[0].get("Laterality", "")
    return gsps
