"""Small MONAI bundles in the Model Zoo layout, and CT phantoms with a bright blob at a known
patient position on straight, tilted and unevenly spaced series (tests/test_bundles.py).

The bundles follow ``lung_nodule_ct_detection`` and ``spleen_ct_segmentation``: the same
``configs/metadata.json`` keys, the same transform names and keys in ``configs/inference.json``
(``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd`` RAS, ``Spacingd``,
``ScaleIntensityRanged``, ``RetinaNetDetector`` with ``detector_ops``, ``ClipBoxToImaged``,
``AffineBoxToWorldCoordinated``, ``ConvertBoxModed``; ``SlidingWindowInferer``,
``Activationsd``, ``Invertd``, ``AsDiscreted``, ``SaveImaged``), with tiny networks and
``models/model.pt`` (state dict) and ``models/model.ts`` (TorchScript).

The known-answer bundles' networks (``scripts/blob.py`` in the bundle) return the box, or the
mask, of the voxels above a threshold: the brightest blob.
"""

from __future__ import annotations

import json
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PIXDIM = [1.5, 1.5, 2.0]
"""The test bundles' Spacingd pixdim (x, y, z) mm: coarser than the phantoms, so resampling
matters."""
A_MIN, A_MAX = -1024.0, 300.0
BLOB_THRESHOLD = 0.95
"""Scaled intensity above which a voxel is "blob": (0.95 * 1324 - 1024) = 234 HU; the body is
40 HU, the blob 1000 HU."""

BLOB_SCRIPT = '''
"""Known-answer networks: the box or mask of the voxels above a threshold."""
import torch
from torch import nn


class BrightestBlobBox(nn.Module):
    """(1, 1, X, Y, Z) -> (boxes (N, 6) xyzxyz in voxel coordinates, scores (N,))."""

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor):
        hot = torch.nonzero(x[0, 0] > self.threshold).to(torch.float32)
        if hot.shape[0] == 0:
            return torch.zeros((0, 6)), torch.zeros((0,))
        # Voxel centres are integers; the box spans each voxel's whole extent.
        lo = hot.min(dim=0).values - 0.5
        hi = hot.max(dim=0).values + 0.5
        return torch.cat([lo, hi])[None], x[0, 0].max().clamp(0.0, 1.0)[None]


class BlobDetector:
    """A detector in RetinaNetDetector's calling convention: images list -> list of dicts."""

    def __init__(self, network) -> None:
        self.network = network
        self.target_box_key = "box"
        self.target_label_key = "label"
        self.pred_score_key = "label_scores"

    def set_target_keys(self, box_key: str, label_key: str) -> None:
        self.target_box_key = box_key
        self.target_label_key = label_key
        self.pred_score_key = label_key + "_scores"

    def eval(self):
        return self

    def __call__(self, images, use_inferer: bool = False):
        out = []
        for image in images:
            boxes, scores = self.network(image[None])
            out.append(
                {
                    self.target_box_key: boxes,
                    self.target_label_key: torch.zeros(boxes.shape[0], dtype=torch.long),
                    self.pred_score_key: scores,
                }
            )
        return out


class BrightestBlobMask(nn.Module):
    """(B, 1, X, Y, Z) -> (B, 2, X, Y, Z) logits: background, blob."""

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x - self.threshold) * 50.0
        return torch.cat([-d, d], dim=1)


class TinyFeatures(nn.Module):
    """A two-level feature pyramid for a tiny RetinaNet (no torchvision needed)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.out_channels = channels
        self.c1 = nn.Conv3d(1, channels, 3, stride=2, padding=1)
        self.c2 = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor):
        f1 = torch.relu(self.c1(x))
        f2 = torch.relu(self.c2(f1))
        return [f1, f2]
'''


def _metadata(kind: str, *, modality: str = "CT", name: str, channels: int = 1) -> dict[str, Any]:
    image = {
        "type": "image",
        "format": "hounsfield",
        "modality": modality,
        "num_channels": channels,
        "spatial_shape": ["16*n", "16*n", "8*n"],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": {"0": "image"},
    }
    if kind == "detection":
        pred = {
            "type": "object",
            "format": "dict",
            "dtype": "float32",
            "num_channels": 1,
            "spatial_shape": ["n", "n", "n"],
            "value_range": [-10000, 10000],
            "channel_def": {"0": "blob"},
        }
    else:
        pred = {
            "type": "image",
            "format": "segmentation",
            "num_channels": 2,
            "spatial_shape": [32, 32, 16],
            "dtype": "float32",
            "value_range": [0, 1],
            "is_patch_data": True,
            "channel_def": {"0": "background", "1": "blob"},
        }
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.3.1",
        "changelog": {"0.3.1": "test bundle"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "numpy_version": "2.4.6",
        "name": name,
        "task": f"test {kind}",
        "description": f"A tiny {kind} bundle for dicom-node's tests",
        "authors": "dicom-node tests",
        "copyright": "Copyright (c) dicom-node tests",
        "license": "Apache-2.0",
        "intended_use": "Testing only, not for diagnostic use",
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
    }


def _preprocessing() -> dict[str, Any]:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "meta_key_postfix": "meta_dict", "reader": "itkreader", "affine_lps_to_ras": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": PIXDIM, "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": A_MIN, "a_max": A_MAX, "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    }


def _detection_config(known_answer: bool, boxes: str = "lps") -> dict[str, Any]:
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": [],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": False,
        "infer_patch_size": [32, 32, 16],
        "preprocessing": _preprocessing(),
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "ClipBoxToImaged", "box_keys": "box", "label_keys": "label", "box_ref_image_keys": "image", "remove_empty": True},
                {"_target_": "AffineBoxToWorldCoordinated", "box_keys": "box", "box_ref_image_keys": "image", "image_meta_key_postfix": "meta_dict", "affine_lps_to_ras": boxes == "lps"},
                {"_target_": "ConvertBoxModed", "box_keys": "box", "src_mode": "xyzxyz", "dst_mode": "cccwhd"},
                {"_target_": "DeleteItemsd", "keys": ["image"]},
            ],
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"}},
        ],
    }
    if boxes == "image":  # boxes left in voxel coordinates of the preprocessed image
        config["postprocessing"]["transforms"] = config["postprocessing"]["transforms"][:1]
    if known_answer:
        config["network_def"] = {"_target_": "scripts.blob.BrightestBlobBox", "threshold": BLOB_THRESHOLD}
        config["network"] = "$@network_def.to(@device)"
        config["detector"] = {"_target_": "scripts.blob.BlobDetector", "network": "@network"}
        config["detector_ops"] = ["$@detector.set_target_keys(box_key='box', label_key='label')"]
    else:
        config["anchor_generator"] = {
            "_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
            "feature_map_scales": [1, 2],
            "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
        }
        config["feature_extractor"] = {"_target_": "scripts.blob.TinyFeatures", "channels": 8}
        config["network_def"] = {
            "_target_": "RetinaNet",
            "spatial_dims": 3,
            "num_classes": 1,
            "num_anchors": 3,
            "feature_extractor": "@feature_extractor",
            "size_divisible": [16, 16, 8],
        }
        config["network"] = "$@network_def.to(@device)"
        config["detector"] = {"_target_": "RetinaNetDetector", "network": "@network", "anchor_generator": "@anchor_generator", "debug": False}
        config["detector_ops"] = [
            "$@detector.set_target_keys(box_key='box', label_key='label')",
            "$@detector.set_box_selector_parameters(score_thresh=0.02,topk_candidates_per_level=100,nms_thresh=0.22,detections_per_img=5)",
            "$@detector.set_sliding_window_inferer(roi_size=@infer_patch_size,overlap=0.25,sw_batch_size=1,mode='constant',device='cpu')",
        ]
    return config


def _segmentation_config(known_answer: bool, network: str, invert: bool = True) -> dict[str, Any]:
    if known_answer:
        network_def: dict[str, Any] = {"_target_": "scripts.blob.BrightestBlobMask", "threshold": BLOB_THRESHOLD}
    elif network == "segresnet":
        network_def = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}
    else:
        network_def = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 1, "norm": "batch"}
    post: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext", "output_postfix": "seg"},
    ]
    if not invert:  # the map stays on the bundle's grid; the node brings it back
        post = [t for t in post if t["_target_"] != "Invertd"]
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": _preprocessing(),
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def make_bundle(
    root: Path,
    kind: str,
    *,
    known_answer: bool = True,
    network: str = "unet",
    modality: str = "CT",
    channels: int = 1,
    name: str | None = None,
    seed: int = 0,
    boxes: str = "lps",
    invert: bool = True,
) -> Path:
    """Write a bundle under ``root`` and return its folder: ``kind`` is ``detection`` or
    ``segmentation``; with ``known_answer`` the network finds the brightest blob, otherwise it
    is a RetinaNet / UNet / SegResNet with small random weights. Both model.pt and model.ts.
    ``boxes``: where the detection postprocessing leaves the boxes (``lps`` world as the Model
    Zoo's, ``ras`` world, ``image`` voxels); ``invert``: the segmentation postprocessing has
    ``Invertd``."""
    import sys

    import torch
    from monai.bundle import ConfigParser

    name = name or f"test-{kind}-" + ("blob" if known_answer else ("retinanet" if kind == "detection" else network))
    folder = root / name
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "scripts").mkdir(exist_ok=True)
    (folder / "scripts" / "__init__.py").write_text("")
    (folder / "scripts" / "blob.py").write_text(textwrap.dedent(BLOB_SCRIPT).lstrip())
    (folder / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    meta = _metadata(kind, modality=modality, name=name, channels=channels)
    if kind == "detection":
        config = _detection_config(known_answer, boxes)
    else:
        config = _segmentation_config(known_answer, network, invert)
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=4))

    torch.manual_seed(seed)
    parser = ConfigParser(config)
    parser["bundle_root"] = str(folder)
    parser["device"] = torch.device("cpu")
    stale = [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]
    for m in stale:
        del sys.modules[m]
    sys.path.insert(0, str(folder))
    try:
        net = parser.get_parsed_content("network_def")
        net.eval()
        torch.save(net.state_dict(), folder / "models" / "model.pt")
        torch.jit.save(torch.jit.script(net), str(folder / "models" / "model.ts"))
    finally:
        sys.path.remove(str(folder))
        for m in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[m]
    return folder


# -- phantoms -----------------------------------------------------------------------------------

BLOB_CENTRE = (6.0, -4.0, -14.0)
"""The blob's centre in patient coordinates (LPS, mm)."""
BLOB_RADIUS = 5.0


def phantom_series(
    out_dir: Path,
    geometry: str,
    *,
    size: int = 48,
    slices: int = 16,
    pixel_spacing: float = 0.8,
    study_uid: str | None = None,
    centre: tuple[float, float, float] = BLOB_CENTRE,
    radius: float = BLOB_RADIUS,
    modality: str = "CT",
) -> list[Path]:
    """A CT series with a 1000 HU sphere at ``centre`` (LPS mm) in a 40 HU body.

    ``geometry``: ``straight`` (2 mm slices), ``tilted`` (15 degree gantry tilt: the image
    planes tilt about x while positions advance along z) or ``uneven`` (gaps of 1.5 to 3 mm).
    Voxel values come from each voxel centre's patient position, so the truth is exact in
    every geometry.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    tilt = np.deg2rad(15.0) if geometry == "tilted" else 0.0
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(tilt), np.sin(tilt)])
    if geometry == "uneven":
        gaps = np.array([2.0, 2.0, 3.0, 1.5, 2.0, 2.5, 2.0, 1.5, 3.0, 2.0, 2.0, 1.5, 2.5, 2.0, 2.0][: slices - 1])
    else:
        gaps = np.full(slices - 1, 2.0)
    z = -np.concatenate([[0.0], np.cumsum(gaps)])
    half = size * pixel_spacing / 2
    rng = np.random.default_rng(7)
    jj, ii = np.mgrid[0:size, 0:size]
    now = datetime(2026, 11, 29, 9, 30, 0)
    paths = []
    for k in range(slices):
        origin = np.array([-half, -half * np.cos(tilt), z[k] - half * np.sin(tilt)])
        pts = origin + ii[..., None] * pixel_spacing * row_dir + jj[..., None] * pixel_spacing * col_dir
        inside = ((pts - np.asarray(centre)) ** 2).sum(-1) <= radius**2
        body = ((ii - size / 2) ** 2 + (jj - size / 2) ** 2) < (size * 0.45) ** 2
        hu = np.where(body, 40, -1000) + rng.normal(0, 8, (size, size))
        hu = np.where(inside, 1000, hu).astype(np.int16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PHANTOM^BLOB", "BLOB-1", "19700101", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "ACC-BLOB", "", "1"
        ds.StudyDescription, ds.SeriesDescription = "CT PHANTOM", f"BLOB {geometry.upper()}"
        ds.Modality, ds.BodyPartExamined, ds.Manufacturer = modality, "CHEST", "dicom-node tests"
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in origin]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.SliceThickness = 2.0
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.WindowCenter, ds.WindowWidth = 120, 40, 400
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        path = out_dir / f"ct_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
