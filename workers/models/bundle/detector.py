"""Running a MONAI bundle as a node model: its own transforms, network and postprocessing, fed
the node's loaded volume instead of a file reader.

What happens to ``configs/inference.json`` (read with :class:`monai.bundle.ConfigParser`):

* ``bundle_root`` is the bundle folder, ``device`` the worker's device; ``[models.<name>.options]``
  override config items first (``options = { whether_raw_luna16 = true }`` turns on the Model
  Zoo lung detector's own resampling, which it leaves off for pre-resampled LUNA16 files);
* ``preprocessing``: the ``LoadImage(d)`` transforms are left out and the image comes in as
  ``LoadImaged`` would hand it on: a MetaTensor (x, y, z) in HU with a RAS affine
  (:mod:`workers.models.bundle.orientation`); the rest (``EnsureChannelFirstd``,
  ``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``...) runs as declared;
* the network: ``network`` with ``models/model.pt`` (a state dict, or ``{"model": ...}``)
  loaded into it, or ``models/model.ts`` (TorchScript) in its place;
* detection bundles (a ``detector`` item, e.g. ``RetinaNetDetector``): ``detector_ops`` run (box
  keys, score threshold, the sliding-window inferer), the detector sees the image, then
  ``postprocessing`` runs (``ClipBoxToImaged``, ``AffineBoxToWorldCoordinated``,
  ``ConvertBoxModed``...); each box becomes a finding;
* segmentation bundles: the ``inferer`` (e.g. ``SlidingWindowInferer``) runs the network, then
  ``postprocessing`` (``Activationsd``, ``Invertd``, ``AsDiscreted``); writers (``SaveImaged``)
  are left out. The label map goes back onto the source slices; each label is one SEG segment,
  and its connected components are findings where the label's settings ask for them.

Weights are identified by their SHA-256 (in the algorithm identification and the output UIDs).
An input outside what the bundle declares (channels, a fixed input shape) or beyond
``memory_limit_mib`` ends the job as ``skipped`` with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.errors import ModelError, ModelLoadError, NoInputError
from dicom_node.model_catalog import INFERENCE_FILE, BundleMetadata
from dicom_node.settings import ModelSettings
from workers.findings import DetectionResult, Finding
from workers.models.base import InputRequirements, ModelInfo
from workers.models.bundle.metadata import LabelCode, label_table, read_bundle, requirements_of
from workers.models.bundle.orientation import (
    BundleInput,
    label_map_to_source,
    onto_input_grid,
    to_bundle_input,
)
from workers.models.bundle.outputs import GENERIC, box_convention, box_finding, label_map_findings
from workers.models.torchscript import AI_FAMILY, sha256_of
from workers.volume import Volume

LOGGER = logging.getLogger(__name__)

READERS = ("LoadImaged", "LoadImage")
"""File readers in ``preprocessing``: replaced by the node's volume."""
WRITERS = ("SaveImaged", "SaveImage", "DetectionSaver")
"""Writers in ``postprocessing``: left out (results go to SEG/SR)."""

_import_lock = threading.Lock()


def _import_monai() -> Any:
    try:
        import monai
    except ImportError as exc:
        raise ModelLoadError(
            "MONAI bundles need the monai extra on the worker: pip install 'dicom-node[monai]'"
        ) from exc
    return monai


@contextlib.contextmanager
def _bundle_scripts(folder: Path) -> Iterator[None]:
    """Make the bundle's ``scripts`` package importable (Model Zoo convention: targets like
    ``scripts.detection_inferer.RetinaNetInferer``), without another bundle's ``scripts``
    shadowing it."""
    with _import_lock:
        stale = [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]
        for m in stale:
            del sys.modules[m]
        sys.path.insert(0, str(folder))
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(folder))


def _target(item: Any) -> str:
    return str(item.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(item, dict) else ""


def _kept(section: Any, drop: tuple[str, ...]) -> Any:
    """A ``Compose`` config section without the transforms named in ``drop``."""
    if isinstance(section, dict) and isinstance(section.get("transforms"), list):
        return {**section, "transforms": [t for t in section["transforms"] if _target(t) not in drop]}
    if isinstance(section, list):
        return [t for t in section if _target(t) not in drop]
    return section


def _transform_items(section: Any) -> list[dict[str, Any]]:
    items = section.get("transforms", []) if isinstance(section, dict) else section
    return [t for t in items or [] if isinstance(t, dict)]


class BundleDetector:
    """A MONAI bundle behind the :class:`~workers.models.base.Detector` protocol."""

    def __init__(self, name: str, cfg: ModelSettings, folder: Path, *, device: str = "cpu") -> None:
        _import_monai()
        from monai.bundle import ConfigParser

        self.name = name
        """The model's name in the settings (``[models.<name>]``)."""
        self.meta: BundleMetadata = read_bundle(folder)
        self.cfg = cfg
        self.device = device
        self.labels: dict[int, LabelCode] = label_table(self.meta, cfg)
        weights: str | None = cfg.weights or next(iter(self.meta.weights), None)
        if weights is None or not (folder / "models" / weights).is_file():
            raise ModelLoadError(f"bundle {self.meta.name}: no models/{weights or 'model.pt or model.ts'}")
        self.weights_path = folder / "models" / weights
        digest = sha256_of(self.weights_path)

        parser = ConfigParser()
        parser.read_config(str(folder / INFERENCE_FILE))
        parser["bundle_root"] = str(folder)
        parser["device"] = torch.device(device)
        for key, value in cfg.options.items():
            parser[key] = value
        # Only the sections the node runs are kept; readers and writers are left out.
        config = parser.get()
        self._pre_items = _transform_items(_kept(config.get("preprocessing"), READERS))
        self._post_items = _transform_items(_kept(config.get("postprocessing"), WRITERS))
        parser["preprocessing"] = _kept(config.get("preprocessing"), READERS)
        if "postprocessing" in config:
            parser["postprocessing"] = _kept(config["postprocessing"], WRITERS)
        try:
            with _bundle_scripts(folder):
                self.network = self._load_network(parser, config)
                parser["network"] = self.network
                self.preprocessing = parser.get_parsed_content("preprocessing")
                self.postprocessing = (
                    parser.get_parsed_content("postprocessing") if "postprocessing" in config else None
                )
                if self.meta.kind == "detection":
                    self.detector = parser.get_parsed_content("detector")
                    if "detector_ops" in config:
                        parser.get_parsed_content("detector_ops")
                    self.inferer = None
                else:
                    self.detector = None
                    self.inferer = parser.get_parsed_content("inferer") if "inferer" in config else None
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"bundle {self.meta.name}: inference.json cannot be set up: {type(exc).__name__}: {exc}"
            ) from exc
        for module in (self.network, self.detector):
            if hasattr(module, "eval"):
                module.eval()
        self._info = ModelInfo(
            name=self.meta.name,
            version=self.meta.version,
            family=AI_FAMILY,
            description=(self.meta.description or self.meta.task)[:64],
            manufacturer=(self.meta.authors or "unknown")[:64],
            weights_sha256=digest,
            labels=tuple(code.concept for _, code in sorted(self.labels.items())),
            queue=cfg.queue or "cpu",
        )
        self._requirements = requirements_of(self.meta)
        LOGGER.info(
            "model %s: bundle %s %s (%s, %s) ready on %s",
            name, self.meta.name, self.meta.version, self.meta.kind, weights, device,
        )

    def _load_network(self, parser: Any, config: dict[str, Any]) -> Any:
        path = self.weights_path
        if path.suffix == ".ts":
            try:
                return torch.jit.load(str(path), map_location=self.device)
            except Exception as exc:
                raise ModelLoadError(f"bundle {self.meta.name}: {path.name} is not loadable TorchScript: {exc}") from exc
        key = "network" if "network" in config else "network_def"
        network = parser.get_parsed_content(key)
        try:
            state = torch.load(str(path), map_location=self.device, weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"bundle {self.meta.name}: {path.name} cannot be read: {exc}") from exc
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        try:
            network.load_state_dict(state)
        except Exception as exc:
            raise ModelLoadError(f"bundle {self.meta.name}: {path.name} does not fit its network: {exc}") from exc
        return network.to(self.device)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def requirements(self) -> InputRequirements:
        return self._requirements

    # -- inference ----------------------------------------------------------------------------

    def _check_input(self, volume: Volume) -> None:
        if self.meta.num_channels != 1:
            raise NoInputError(
                f"model {self.meta.name} needs {self.meta.num_channels} input channels; one series gives 1"
            )
        limit = self.cfg.memory_limit_mib
        if limit is None:
            return
        voxels = float(np.prod(volume.shape))
        if self.meta.pixdim:
            voxels *= float(np.prod(volume.spacing)) / float(np.prod(self.meta.pixdim))
        channels = max(len(self.meta.channel_def), 2)
        need_mib = voxels * 4 * (2 + channels) / 2**20
        if need_mib > limit:
            raise NoInputError(
                f"model {self.meta.name}: the resampled input needs about {need_mib:.0f} MiB, "
                f"above memory_limit_mib = {limit}"
            )

    def _image(self, bundle_input: BundleInput, *, channel_first: bool = False) -> Any:
        """The volume as ``LoadImaged`` hands it on (x, y, z), or with a channel axis first."""
        from monai.data import MetaTensor

        affine = torch.as_tensor(bundle_input.affine_ras, dtype=torch.float64)
        array = torch.from_numpy(bundle_input.array)
        return MetaTensor(
            array[None] if channel_first else array,
            affine=affine,
            meta={
                "original_channel_dim": 0 if channel_first else "no_channel",
                "original_affine": affine.clone(),
                "spatial_shape": np.asarray(bundle_input.array.shape),
                "filename_or_obj": "dicom-node volume",
                "space": "RAS",
            },
        )

    def _check_shape(self, image: Any) -> None:
        declared = self.meta.spatial_shape
        if self.meta.is_patch_data or not declared or not all(isinstance(v, int) for v in declared):
            return
        shape = tuple(int(v) for v in image.shape[1:])
        if shape != tuple(declared):
            raise NoInputError(
                f"model {self.meta.name} takes whole images of {list(declared)} voxels; this series "
                f"gives {list(shape)} after its preprocessing"
            )

    def predict(self, volume: Volume) -> DetectionResult:
        started = time.perf_counter()
        self._check_input(volume)
        bundle_input = to_bundle_input(volume)
        data = self.preprocessing({"image": self._image(bundle_input)})
        image = data["image"]
        self._check_shape(image)
        try:
            with torch.no_grad():
                if self.detector is not None:
                    findings = self._detect(volume, image)
                else:
                    findings = self._segment(volume, bundle_input, image)
        except (NoInputError, ModelError):
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelError(f"model {self.meta.name}: out of memory on {self.device}") from exc
        except Exception as exc:
            raise ModelError(f"model {self.meta.name} failed: {type(exc).__name__}") from exc
        findings.sort(key=lambda f: -f.confidence)
        return DetectionResult(
            model_name=self.info.name,
            model_version=self.info.version,
            series_instance_uid=volume.series_instance_uid,
            findings=findings,
            runtime_seconds=time.perf_counter() - started,
            device=self.device,
            extra={"bundle": self.meta.name, "kind": self.meta.kind},
        )

    # -- detection ----------------------------------------------------------------------------

    def _detect(self, volume: Volume, image: Any) -> list[Finding]:
        from monai.data.box_utils import convert_box_mode

        detector = self.detector
        assert detector is not None
        box_key = str(getattr(detector, "target_box_key", "box"))
        label_key = str(getattr(detector, "target_label_key", "label"))
        score_key = str(getattr(detector, "pred_score_key", f"{label_key}_scores"))
        # As the Model Zoo's RetinaNetInferer does: the sliding window only when the image is
        # larger than one window (and the bundle set one up in its detector_ops).
        inferer = getattr(detector, "inferer", None)
        roi = getattr(inferer, "roi_size", None)
        use_inferer = inferer is not None and (roi is None or image[0].numel() >= int(np.prod(roi)))
        out = detector([image.to(self.device)], use_inferer=use_inferer)[0]
        data = {**out, "image": image}
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        boxes = torch.as_tensor(data[box_key]).detach().float().cpu()
        labels = torch.as_tensor(data[label_key]).detach().cpu().reshape(-1)
        scores = torch.as_tensor(data[score_key]).detach().float().cpu().reshape(-1)
        mode, space = box_convention(self._post_items)
        if boxes.numel() == 0:
            return []
        converted = convert_box_mode(boxes.reshape(-1, 6), src_mode=mode, dst_mode="xyzxyz")
        corners = np.asarray(torch.as_tensor(converted).numpy(), dtype=np.float64)
        affine = image.affine.detach().cpu().numpy()
        findings = []
        for box, label, score in zip(corners, labels.tolist(), scores.tolist(), strict=True):
            if self.cfg.threshold is not None and score < self.cfg.threshold:
                continue
            code = self.labels.get(int(label), GENERIC)
            finding = box_finding(volume, affine, box, code, float(score), space)
            if finding is not None:
                findings.append(finding)
        return findings

    # -- segmentation -------------------------------------------------------------------------

    def _label_map(self, bundle_input: BundleInput, image: Any) -> np.ndarray:
        batch = image[None].to(self.device)
        pred = self.inferer(batch, self.network) if self.inferer is not None else self.network(batch)
        data = {"image": image, "pred": pred[0]}
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        labels = data["pred"]
        if labels.shape[0] > 1:  # probabilities or one-hot: take the label per voxel
            labels = torch.argmax(labels, dim=0, keepdim=True)
        if tuple(labels.shape[1:]) != bundle_input.array.shape:
            # No Invertd in the postprocessing: bring the map back onto the input grid here.
            labels = onto_input_grid(labels, self._image(bundle_input, channel_first=True))
        return np.rint(labels[0].detach().cpu().numpy()).astype(np.int32)

    def _segment(self, volume: Volume, bundle_input: BundleInput, image: Any) -> list[Finding]:
        source = label_map_to_source(bundle_input, self._label_map(bundle_input, image))
        return label_map_findings(volume, source, self.labels)
