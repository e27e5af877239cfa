"""Decoding the frames of a series' instances to HU, within the decoded-bytes cap.

:func:`decode_frames` fills one float32 array, frame by frame, from the instances a series was
loaded from (files or in-memory datasets). Every file is reopened through
:func:`dicom_node.dataset_io.open_checked`, so a pixel bomb (declared size over the cap, frames
beyond the encapsulated fragments, a codestream larger than Rows x Columns) is refused with a
reason before a decoder allocates anything. Which frames, and in which order, is decided from the
headers beforehand (:func:`dicom_node.geometry.order_slices`); :func:`workers.volume.load_series`
puts the two together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.dataset_io import open_checked
from dicom_node.errors import IngestError, JobError
from dicom_node.geometry import GeometryError, SliceGeometry, pixel_rescale


class PixelDataError(JobError):
    """Pixel data cannot be decoded or is refused; the message says why (no patient data)."""


@dataclass(frozen=True)
class SourceInstance:
    """One instance a series is loaded from."""

    header: Dataset
    path: str | None
    """Where the instance is read from, if a file."""
    dataset: Dataset | None
    """The full dataset when the caller passed Datasets (pixel data in memory)."""


def decode_frames(
    instances: Sequence[SourceInstance],
    frames: Sequence[SliceGeometry],
    rows: int,
    cols: int,
    limit: int,
) -> np.ndarray:
    """Decode ``frames`` (each naming its instance by index) into a float32 (K, rows, cols) HU array.

    ``array[k]`` is ``frames[k]`` rescaled with its own RescaleSlope / RescaleIntercept (per frame
    for multi-frame instances). Each instance is decoded once, within ``limit`` decoded bytes,
    and dropped right away, so the peak stays close to the size of the float32 array (a 300-slice
    CT: about 1.1x instead of 2.2x). Raises :class:`PixelDataError` when pixel data is refused,
    cannot be decoded, does not match ``rows`` x ``cols`` or is not greyscale, or a rescale is
    malformed.
    """
    array = np.empty((len(frames), rows, cols), dtype=np.float32)
    by_instance: dict[int, list[tuple[int, SliceGeometry]]] = {}
    for k, f in enumerate(frames):
        by_instance.setdefault(f.source, []).append((k, f))
    for index, entries in by_instance.items():
        instance = instances[index]
        pixels = _stored_values(instance, limit)
        multi = entries[0][1].frame_number is not None
        if multi and pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.shape[-2:] != (rows, cols):
            raise PixelDataError("decoded pixel data does not match Rows/Columns")
        for k, f in entries:
            frame = pixels[f.frame_number - 1] if f.frame_number is not None else pixels
            if frame.ndim != 2:
                raise PixelDataError("only single-sample (greyscale) images can be loaded")
            try:
                slope, intercept = pixel_rescale(instance.header, f.frame_number)
            except GeometryError as exc:
                raise PixelDataError(str(exc)) from None
            np.multiply(frame, slope, out=array[k], casting="unsafe")
            array[k] += np.float32(intercept)
        del pixels
    return array


def _stored_values(instance: SourceInstance, limit: int) -> np.ndarray:
    """Pixel data of one instance as stored values (before rescale), all frames."""
    try:
        if instance.dataset is not None and "PixelData" in instance.dataset:
            return instance.dataset.pixel_array
        if instance.path is None:
            raise PixelDataError("a dataset without pixel data was given")
        ds = open_checked(instance.path, limit=limit)
        if "PixelData" not in ds:
            raise PixelDataError("an image instance has no pixel data")
        return ds.pixel_array
    except PixelDataError:
        raise
    except IngestError as exc:
        raise PixelDataError(f"pixel data refused before decoding: {exc}") from None
    except Exception as exc:
        ts = ""
        meta = getattr(instance.header, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            ts = f" (transfer syntax {meta.TransferSyntaxUID.name})"
        raise PixelDataError(f"cannot decode pixel data{ts}: {type(exc).__name__}") from exc
