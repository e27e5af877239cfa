"""Secondary Capture key images (highdicom ``SCImage``): a finding as any viewer can show it.

Many PACS viewers show an SR as text and a SEG not at all, but every one of them shows an image.
For each finding (at most :data:`~workers.results.key_slices.MAX_KEY_IMAGES`, the most
confident), one RGB Secondary Capture Image (PS3.3 A.8.1) of its key slice:

* the slice in the lung window (CT; other modalities in their 1st to 99th percentile), as
  8-bit grey, enlarged by a whole factor with nearest-neighbour sampling so that its short side
  is at least :data:`MIN_SIDE` pixels (small matrices stay readable, and pixels stay square);
* the finding's box (``bbox_2d``, the box the SR draws) as a yellow frame just outside the
  box edges, with its caption (``AI 1: 12 mm 0.97``);
* a black banner *above* the image (added rows, so no anatomy is hidden) reading
  :data:`~workers.results.key_slices.BANNER_TEXT` and the model with its version.

Text is drawn with Pillow's built-in bitmap font and enlarged by whole factors, so the pixels
are the same wherever the job is encoded (a scalable font would be rasterised by whatever
FreeType is installed). The images carry Burned In Annotation YES, Image Type DERIVED\\SECONDARY,
the key source image in Source Image Sequence with its purpose (DCM 121322, "Source image for
image processing operation"), Conversion Type WSD (rendered on a workstation), the patient and
study of the source, and the same identity as every result (Contributing Equipment, "AI: ..."
series description saying "not verified", deterministic UIDs: one series, instance ``n`` for the
``n``-th image).

Why Secondary Capture and not the source's SOP class with a derivation: a CT Image would have to
keep Hounsfield pixel values and the CT Image module's acquisition attributes, and viewers would
stack it with the source series by its geometry; a Secondary Capture is what a viewer shows as a
separate picture, which is what a burned-in annotation is.
"""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DA, TM

from dicom_node.geometry.plane import patient_orientation
from workers.findings import DetectionResult
from workers.results.identity import (
    NODE_MANUFACTURER,
    JobContext,
    OutputIdentity,
    contributing_equipment,
    display_version,
    stamp_dates,
)
from workers.results.key_slices import (
    BANNER_TEXT,
    KeySlice,
    display_window,
    key_slices,
    most_confident,
)
from workers.results.sources import source_images
from workers.volume import Volume

MIN_SIDE = 512
"""Key images are enlarged (by a whole factor) until their short side is at least this."""
MAX_SIDE = 2048
"""...but never beyond this long side."""

BOX_COLOUR = (255, 230, 0)
"""Yellow: stands out on grey CT, and is not the SEG's red."""
BANNER_COLOUR = (0, 0, 0)
TEXT_COLOUR = (255, 255, 255)

SOURCE_IMAGE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")
"""PS3.16 CID 7202 purpose of the Source Image Sequence item."""


def _font() -> ImageFont.ImageFont:
    # Pillow >= 10.1 names the bitmap font; before, load_default() returned it.
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()  # type: ignore[return-value]


def text_mask(text: str, scale: int) -> np.ndarray:
    """Boolean pixels of ``text`` in Pillow's bitmap font, enlarged ``scale`` times."""
    font = _font()
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    small = np.asarray(canvas) > 127
    return np.repeat(np.repeat(small, scale, axis=0), scale, axis=1)


def _stamp(rgb: np.ndarray, mask: np.ndarray, top: int, left: int, colour: tuple[int, int, int]) -> None:
    """Paint ``mask`` into ``rgb`` at (top, left), clipped to the image."""
    h, w = rgb.shape[:2]
    top, left = max(top, 0), max(left, 0)
    part = mask[: max(h - top, 0), : max(w - left, 0)]
    region = rgb[top : top + part.shape[0], left : left + part.shape[1]]
    region[part] = colour


def window_to_grey(pixels: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window (PS3.3 C.11.2.1.2 without the half-pixel detail) to 8-bit grey."""
    low = centre - width / 2.0
    scaled = (np.asarray(pixels, dtype=np.float64) - low) * (255.0 / width)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def enlargement(rows: int, columns: int) -> int:
    """The whole factor key images of a ``rows`` x ``columns`` slice are enlarged by."""
    factor = max(1, math.ceil(MIN_SIDE / max(min(rows, columns), 1)))
    return max(1, min(factor, MAX_SIDE // max(rows, columns, 1)))


def _draw_box(rgb: np.ndarray, box: tuple[int, int, int, int], thickness: int) -> None:
    """A frame of ``thickness`` pixels just outside the box (so it hides none of the finding)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    outer = (max(x0 - thickness, 0), max(y0 - thickness, 0), min(x1 + thickness, w), min(y1 + thickness, h))
    ox0, oy0, ox1, oy1 = outer
    rgb[oy0:y0, ox0:ox1] = BOX_COLOUR  # top
    rgb[y1:oy1, ox0:ox1] = BOX_COLOUR  # bottom
    rgb[oy0:oy1, ox0:x0] = BOX_COLOUR  # left
    rgb[oy0:oy1, x1:ox1] = BOX_COLOUR  # right


def _banner(width: int, lines: list[str]) -> np.ndarray:
    """The black banner with ``lines`` of white text, as large as fits (whole factors)."""
    widest = max(_font().getbbox(line)[2] for line in lines)
    scale = max(1, min(4, (width - 16) // max(widest, 1)))
    masks = [text_mask(line, scale) for line in lines]
    gap = 3 * scale
    height = gap + sum(m.shape[0] + gap for m in masks)
    banner = np.empty((height, width, 3), dtype=np.uint8)
    banner[:] = BANNER_COLOUR
    y = gap
    for mask in masks:
        _stamp(banner, mask, y, max((width - mask.shape[1]) // 2, 0), TEXT_COLOUR)
        y += mask.shape[0] + gap
    return banner


def render_key_image(volume: Volume, key: KeySlice, model_line: str) -> tuple[np.ndarray, dict[str, int]]:
    """The RGB pixels of ``key``'s image, and where things are in them (``banner_rows``,
    ``scale``, and the frame's ``box_left``, ``box_top``, ``box_right``, ``box_bottom``,
    exclusive right/bottom, in the returned image's pixels)."""
    rows, columns = volume.shape[1], volume.shape[2]
    scale = enlargement(rows, columns)
    grey = window_to_grey(volume.array[key.slice_index], *display_window(volume, key.slice_index))
    grey = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)
    image = np.repeat(grey[..., None], 3, axis=2)

    left, top, right, bottom = (float(v) for v in key.finding.bbox_2d)
    box = (
        math.floor(left * scale),
        math.floor(top * scale),
        math.ceil(right * scale),
        math.ceil(bottom * scale),
    )
    thickness = max(2, grey.shape[1] // 256)
    _draw_box(image, box, thickness)
    label_scale = max(1, grey.shape[1] // 256)
    label = text_mask(f"{key.finding.label.meaning} {key.number} - {_caption_tail(key)}", label_scale)
    above = box[1] - thickness - 2 - label.shape[0]
    label_top = above if above >= 0 else box[3] + thickness + 2
    label_left = min(max(box[0] - thickness, 0), max(image.shape[1] - label.shape[1], 0))
    _stamp(image, label, label_top, label_left, BOX_COLOUR)

    banner = _banner(image.shape[1], [BANNER_TEXT, model_line])
    out = np.concatenate([banner, image], axis=0)
    n = banner.shape[0]
    where = {
        "banner_rows": n,
        "scale": scale,
        "box_left": box[0],
        "box_top": box[1] + n,
        "box_right": box[2],
        "box_bottom": box[3] + n,
    }
    return np.ascontiguousarray(out), where


def _caption_tail(key: KeySlice) -> str:
    finding = key.finding
    return f"{float(finding.diameter_mm):.0f} mm, {100.0 * float(finding.confidence):.0f}%"


def _source_reference(key: KeySlice) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = key.image.SOPClassUID
    item.ReferencedSOPInstanceUID = key.image.SOPInstanceUID
    if key.frame_number is not None:
        item.ReferencedFrameNumber = key.frame_number
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_IMAGE_FOR_PROCESSING
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def build_key_images(
    volume: Volume, result: DetectionResult, job: JobContext, identity: OutputIdentity
) -> list[hd.sc.SCImage]:
    """One Secondary Capture key image per finding (the most confident, capped); none when
    there are no findings (the SR says so)."""
    sources = source_images(volume)
    chosen = most_confident(key_slices(result, sources))
    model = job.model
    model_line = f"{model.name} {display_version(model.version)}"[:60]
    when = job.content_datetime.replace(microsecond=0)
    images = []
    for number, key in enumerate(chosen, start=1):
        ident = identity.instance(number)
        pixels, _ = render_key_image(volume, key, model_line)
        orientation = key.image.get("ImageOrientationPatient")
        row_dir, col_dir = patient_orientation(
            [float(v) for v in orientation] if orientation else [1, 0, 0, 0, 1, 0]
        )
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=key.image,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=ident.series_instance_uid,
            series_number=ident.series_number,
            sop_instance_uid=ident.sop_instance_uid,
            instance_number=ident.instance_number,
            manufacturer=model.manufacturer[:64],
            patient_orientation=(row_dir[:1], col_dir[:1]),
            transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian
            manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64],
        )
        sc.copy_patient_and_study_information(key.image)
        sc.PatientOrientation = [row_dir, col_dir]
        # Type 2C in General Series for a derived image of a possibly paired body part: the
        # source's value, or empty (unknown) as the source does not say.
        sc.Laterality = key.image.get("Laterality", "")
        sc.BurnedInAnnotation = "YES"
        sc.ConversionType = "WSD"
        sc.DateOfSecondaryCapture = DA(when.date())
        sc.TimeOfSecondaryCapture = TM(when.time().replace(tzinfo=None))
        sc.SecondaryCaptureDeviceManufacturer = NODE_MANUFACTURER
        sc.SecondaryCaptureDeviceManufacturerModelName = job.node.name[:64]
        sc.SecondaryCaptureDeviceSoftwareVersions = job.node.software_version[:64]
        sc.DerivationDescription = (
            f"Key slice of AI finding {key.number}, display window applied, box and "
            f"'{BANNER_TEXT}' burned in"
        )
        sc.SourceImageSequence = DicomSequence([_source_reference(key)])
        sc.SeriesDescription = ident.series_description
        sc.StationName = job.node.ae_title[:16]
        sc.ContributingEquipmentSequence = contributing_equipment(job)  # type: ignore[assignment]
        stamp_dates(sc, job)
        images.append(sc)
    return images
