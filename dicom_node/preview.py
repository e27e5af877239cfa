"""Job previews: the key slice of a job's input as a PNG, with the detections' boxes drawn.

Rendered on the edge with pydicom, numpy and Pillow only (no torch, highdicom or ``workers``),
from the spooled source instances. The slices are numbered by the same function the worker's
volume loader numbers them with (:func:`dicom_node.geometry.order_slices`: sorted by position
along the slice normal; localizers, non-image objects, unreadable planes and stray orientations
left out), so a finding's ``key_slice`` and ``bbox_2d`` from the job summary land on the image
the model saw.

When the preview cannot be drawn (inputs no longer spooled, a compressed transfer syntax no
installed pydicom plug-in decodes, a job without image input), a placeholder image says why.
Rendered previews are cached under ``<data_dir>/previews``, keyed by the job's summary and the
checksums of its input instances, so a re-run job or a changed input draws a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.dataset_io import DEFAULT_MAX_DECODED_BYTES, check_pixels, open_part10
from dicom_node.errors import IngestError
from dicom_node.geometry import (
    NO_GEOMETRY,
    GeometryError,
    SliceGeometry,
    order_slices,
    pixel_rescale,
)
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database, Instance, Job, Series, Study

LOGGER = logging.getLogger(__name__)

PREVIEW_VERSION = 2
"""Bump when the rendering changes, so cached previews are drawn again."""

LUNG_WINDOW = (1500.0, -600.0)
"""(width, level) in HU for CT: the lung window radiologists read nodules in."""

OUTPUT_SIZE = 512
"""Longer side of the preview in pixels (small inputs are enlarged without smoothing)."""

BOX_COLOUR = (255, 48, 48)
"""Detection boxes: a saturated red that no windowed greyscale pixel can have."""
TEXT_COLOUR = (255, 220, 80)
PLACEHOLDER_BACKGROUND = (64, 64, 64)
PLACEHOLDER_TEXT = (230, 230, 230)


@dataclass(frozen=True)
class Preview:
    """A rendered preview. ``placeholder`` is True when it only explains why there is none."""

    png: bytes
    placeholder: bool = False
    reason: str | None = None
    slice_index: int | None = None
    boxes: int = 0


class PreviewUnavailable(Exception):
    """The preview cannot be drawn; the message (patient-free) goes on the placeholder."""


@dataclass(frozen=True)
class PreviewFrame:
    """Slice ``k`` of a job's input: the file it is in, and its plane."""

    path: Path
    geometry: SliceGeometry
    offset: float
    """Position along the slice normal, mm."""

    @property
    def frame_index(self) -> int | None:
        """0-based frame index for multi-frame instances, None for single-frame."""
        number = self.geometry.frame_number
        return None if number is None else number - 1


# -- entry point --------------------------------------------------------------------------------


def job_preview(settings: Settings, db: Database, job_id: str) -> Preview | None:
    """The preview of a job (cached), a placeholder saying why there is none, or None when the
    job does not exist."""
    from sqlalchemy import select

    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        study = s.get(Study, job.study_id)
        summary = dict(job.summary or {})
        series_uid = summary.get("series_instance_uid") or next(iter(job.series_uids or []), None)
        rows: list[Any] = []
        if study is not None and series_uid:
            rows = list(
                s.execute(
                    select(Instance.path, Instance.sha256, Instance.sop_instance_uid)
                    .join(Series, Series.id == Instance.series_id)
                    .where(Instance.study_id == study.id, Series.series_instance_uid == series_uid)
                    .order_by(Instance.id)
                ).all()
            )
        job_key = job.id
    if not rows:
        return placeholder("no image series recorded for this job")

    cache_dir = settings.data_dir / "previews"
    digest = hashlib.sha256(
        json.dumps(
            {
                "v": PREVIEW_VERSION,
                "findings": summary.get("findings") or [],
                "inputs": sorted(r.sha256 for r in rows),
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:20]
    # The job id is a UUID from our own database (never a DICOM UID): safe as a file name.
    cached = cache_dir / f"{job_key}-{digest}.png"
    if cached.is_file():
        return Preview(cached.read_bytes())

    spool = Spool(settings.spool_dir)
    try:
        paths = [spool.path(r.path) for r in rows]
        preview = render_preview(
            paths, summary.get("findings") or [], limit=settings.scp.max_decoded_bytes
        )
    except PreviewUnavailable as exc:
        return placeholder(str(exc))
    except Exception as exc:
        # A header value no check foresaw: a placeholder naming the type, never the value.
        LOGGER.warning("preview cannot be drawn (%s)", type(exc).__name__)
        return placeholder(f"the preview cannot be drawn ({type(exc).__name__})")
    _store(cache_dir, job_key, cached, preview.png)
    return preview


def _store(cache_dir: Path, job_key: str, target: Path, data: bytes) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for old in cache_dir.glob(f"{job_key}-*.png"):
            old.unlink(missing_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.part")
        tmp.write_bytes(data)
        tmp.replace(target)
    except OSError as exc:  # a full disk costs the cache, not the page
        LOGGER.warning("preview cache not written: %s", exc.strerror)


# -- rendering ----------------------------------------------------------------------------------


def render_preview(
    paths: list[Path], findings: list[dict[str, Any]], *, limit: int = DEFAULT_MAX_DECODED_BYTES
) -> Preview:
    """Draw the key slice of the first finding (or the middle slice) of one series' instances.

    ``findings`` are job summary entries with ``key_slice`` (index along the slice normal) and
    ``bbox_2d`` (col_min, row_min, col_max, row_max in pixels on that slice). Every instance
    is opened and sized through :mod:`dicom_node.dataset_io`: one that inflates or declares
    pixel data beyond ``limit`` bytes, or NumberOfFrames beyond its fragments, is refused with
    :class:`PreviewUnavailable` before anything is decoded.
    """
    frames = order_frames(paths, limit=limit)
    if not frames:
        raise PreviewUnavailable("the series has no cross-sectional images")
    index = len(frames) // 2
    if findings:
        key = findings[0].get("key_slice")
        if isinstance(key, int) and 0 <= key < len(frames):
            index = key
    frame = frames[index]
    image, modality = _decode(frame, limit)
    rgb, scale = _to_rgb(image, modality)
    boxes = [f for f in findings if f.get("key_slice") == index and f.get("bbox_2d")]
    _draw_boxes(rgb, boxes, scale)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", optimize=False)
    return Preview(buf.getvalue(), slice_index=index, boxes=len(boxes))


def order_frames(
    paths: list[Path], *, limit: int = DEFAULT_MAX_DECODED_BYTES
) -> list[PreviewFrame]:
    """Image frames of one series in the worker's slice order: index k here is ``key_slice`` k.

    The order comes from :func:`dicom_node.geometry.order_slices`, the function the worker's
    volume loader uses. Raises :class:`PreviewUnavailable` when an instance is no longer in
    the spool or is refused by the size checks.
    """
    headers = []
    missing = 0
    for path in paths:
        try:
            opened = open_part10(path, limit=limit)
            check_pixels(opened, path, limit)
        except FileNotFoundError:
            missing += 1
            continue
        except IngestError as exc:
            raise PreviewUnavailable(f"a source instance is refused: {exc}") from None
        except Exception as exc:
            raise PreviewUnavailable(
                f"a source instance cannot be read ({type(exc).__name__})"
            ) from None
        headers.append((path, opened.dataset))
    if missing and not headers:
        raise PreviewUnavailable("the source instances are no longer in the spool")
    if missing:
        raise PreviewUnavailable(f"{missing} source instance(s) are no longer in the spool")
    order = order_slices([ds for _, ds in headers])
    if order.count(NO_GEOMETRY):
        LOGGER.info(
            "preview: %d image(s) without a readable plane left out", order.count(NO_GEOMETRY)
        )
    return [
        PreviewFrame(headers[g.source][0], g, float(off))
        for g, off in zip(order.slices, order.offsets, strict=True)
    ]


def _decode(frame: PreviewFrame, limit: int) -> tuple[np.ndarray, str]:
    """Stored values of one frame, rescaled (HU for CT), and the modality."""
    from pydicom.pixels import pixel_array

    try:
        opened = open_part10(frame.path, limit=limit)
        check_pixels(opened, frame.path, limit)
        ds = opened.dataset
        deflated = opened.meta.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    except IngestError as exc:
        raise PreviewUnavailable(f"the source instance is refused: {exc}") from None
    except Exception as exc:
        raise PreviewUnavailable(
            f"the source instance cannot be read ({type(exc).__name__})"
        ) from None
    try:
        if deflated:
            # pydicom would inflate the file whole: read it through the capped inflater.
            full = open_part10(frame.path, limit=limit, stop_before_pixels=False).dataset
            pixels = pixel_array(full, index=frame.frame_index)
        else:
            pixels = pixel_array(frame.path, index=frame.frame_index)
    except IngestError as exc:
        raise PreviewUnavailable(f"the source instance is refused: {exc}") from None
    except Exception as exc:
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = getattr(ts, "name", None) or str(ts or "unknown")
        LOGGER.info("preview: pixel data not decodable (%s): %s", name, type(exc).__name__)
        raise PreviewUnavailable(
            f"pixel data in {name} cannot be decoded on this node (no pydicom plug-in for it)"
        ) from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return pixels[..., :3].astype(np.float32), "RGB"
    if pixels.ndim != 2:
        raise PreviewUnavailable("only single-sample or RGB images can be previewed")
    try:
        slope, intercept = pixel_rescale(ds, frame.geometry.frame_number)
    except GeometryError as exc:  # a malformed slope/intercept: show stored values unscaled
        LOGGER.info("preview: rescale values cannot be read (%s)", exc)
        slope, intercept = 1.0, 0.0
    image = pixels.astype(np.float32) * slope + intercept
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = image.max() + image.min() - image
    return image, str(ds.get("Modality", "")).upper()


def _to_rgb(image: np.ndarray, modality: str) -> tuple[Any, float]:
    from PIL import Image

    if modality == "RGB":
        low, high = float(image.min()), float(image.max())
        grey = None
        data = np.clip((image - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(data, mode="RGB")
    else:
        if modality == "CT":
            width, level = LUNG_WINDOW
            low, high = level - width / 2, level + width / 2
        else:
            low, high = (float(v) for v in np.percentile(image, [1.0, 99.0]))
        grey = np.clip((image - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(grey, mode="L").convert("RGB")
    rows, cols = image.shape[:2]
    scale = OUTPUT_SIZE / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return img.resize(size, resample), scale


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_boxes(img: Any, findings: list[dict[str, Any]], scale: float) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    width = max(2, round(OUTPUT_SIZE / 170))
    font = _font(14)
    for f in findings:
        c0, r0, c1, r1 = (float(v) for v in f["bbox_2d"])
        # bbox_2d is in pixel indices, inclusive: the box encloses pixels c0..c1, r0..r1.
        box = (c0 * scale, r0 * scale, (c1 + 1) * scale - 1, (r1 + 1) * scale - 1)
        draw.rectangle(box, outline=BOX_COLOUR, width=width)
        label = str(f.get("label") or "finding")
        conf = f.get("confidence")
        text = f"{label} {conf:.2f}" if isinstance(conf, int | float) else label
        y = box[1] - 18 if box[1] >= 18 else box[3] + 4
        draw.text((box[0], y), text, fill=TEXT_COLOUR, font=font)


def placeholder(reason: str) -> Preview:
    """A grey image that says why there is no preview (patient-free ``reason``)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (OUTPUT_SIZE, OUTPUT_SIZE // 2), PLACEHOLDER_BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((24, 24), "No preview", fill=PLACEHOLDER_TEXT, font=_font(28))
    y = 80
    for line in _wrap(reason, 52):
        draw.text((24, y), line, fill=PLACEHOLDER_TEXT, font=_font(16))
        y += 24
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Preview(buf.getvalue(), placeholder=True, reason=reason)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines[: max(1, math.floor(200 / 24))]
