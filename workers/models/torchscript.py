"""Users' own models: a folder with a TorchScript file and a model card.

A model folder holds ``model.toml`` (or ``model.json``, ``model.yaml``) and the TorchScript file
it names. The card says what the model is, what it accepts, how to prepare its input and how
to read its output; the weights' SHA-256 is checked before anything is loaded. Example::

    name = "my-nodules"
    version = "1.2.0"
    description = "3D U-Net, trained on ..."
    manufacturer = "Example Hospital AI Lab"
    file = "model.pt"                 # torch.jit.save(...) output
    sha256 = "9f2c..."                # sha256sum model.pt
    queue = "gpu"                     # optional: Celery queue for its jobs

    [inputs]                          # series selection (InputRequirements)
    modalities = ["CT"]
    min_slices = 32
    max_slice_thickness_mm = 2.5
    preferred_kernels = ["LUNG", "B60"]

    [preprocessing]
    window = [-1000.0, 400.0]         # clip HU to this range ...
    normalize = "minmax"              # ... then scale to 0..1 ("minmax"), or "zscore" with
    # mean = -500.0; std = 400.0      #     these, or "none"
    spacing_mm = [1.25, 0.8, 0.8]     # optional: resample (k, j, i) to this spacing first

    [output]
    activation = "sigmoid"            # sigmoid | softmax | none (the model already outputs 0..1)
    tile = [64, 192, 192]             # sliding window (k, j, i) voxels; bounded memory
    overlap = [8, 32, 32]
    min_tile = [16, 32, 32]           # on GPU out-of-memory, tiles halve down to this
    divisible_by = 16                 # tiles are padded to a multiple of this

    [labels.1]                        # output channel 1 (channel 0 = background with softmax)
    meaning = "Nodule"
    code = "27925004"
    scheme = "SCT"
    site = { code = "39607008", scheme = "SCT", meaning = "Lung" }
    threshold = 0.5
    min_volume_mm3 = 10.0

The model gets a float32 tensor (1, 1, K, J, I) and must return (1, C, K, J, I): one channel
per label (or a background channel first with softmax). Connected components of each label's
thresholded probability become findings (centre, long axis, volume, mask, confidence = the
component's highest probability).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicom_node.errors import ModelError, ModelLoadError
from workers.findings import CodedConcept, DetectionResult, Finding
from workers.grid import uniform_grid
from workers.models.base import InputRequirements, ModelInfo
from workers.models.measure import finding_from_mask
from workers.volume import Volume

LOGGER = logging.getLogger(__name__)

CARD_NAMES = ("model.toml", "model.json", "model.yaml", "model.yml")
AI_FAMILY = CodedConcept("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class LabelSpec:
    """One output channel of the model."""

    channel: int
    concept: CodedConcept
    site: CodedConcept | None
    threshold: float
    min_volume_mm3: float


@dataclass
class ModelCard:
    """A parsed, validated model card."""

    folder: Path
    name: str
    version: str
    file: str
    sha256: str
    description: str = ""
    manufacturer: str = "unknown"
    queue: str = "cpu"
    requirements: InputRequirements = field(default_factory=InputRequirements)
    window: tuple[float, float] = (-1000.0, 400.0)
    normalize: str = "minmax"
    mean: float = 0.0
    std: float = 1.0
    spacing_mm: tuple[float, float, float] | None = None
    activation: str = "sigmoid"
    tile: tuple[int, int, int] = (64, 192, 192)
    overlap: tuple[int, int, int] = (8, 32, 32)
    min_tile: tuple[int, int, int] = (16, 32, 32)
    divisible_by: int = 1
    labels: tuple[LabelSpec, ...] = ()

    @property
    def weights_path(self) -> Path:
        return self.folder / self.file


def _concept(data: Any, where: str) -> CodedConcept:
    try:
        return CodedConcept(str(data["code"]), str(data["scheme"]), str(data["meaning"]))
    except (KeyError, TypeError) as exc:
        raise ModelLoadError(f"model card: {where} needs code, scheme and meaning") from exc


def _triple(value: Any, where: str, cast: type = int) -> tuple[Any, Any, Any]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    try:
        a, b, c = (cast(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"model card: {where} must be a number or three numbers") from exc
    return a, b, c


def read_card(folder: Path) -> ModelCard:
    """Find and parse the model card in ``folder`` (no weights are read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    card_path = next((folder / n for n in CARD_NAMES if (folder / n).is_file()), None)
    if card_path is None:
        raise ModelLoadError(f"model folder {folder} has no model card ({', '.join(CARD_NAMES)})")
    try:
        text = card_path.read_text()
        if card_path.suffix == ".toml":
            data = tomllib.loads(text)
        elif card_path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ModelLoadError(f"model card {card_path.name} in {folder} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"model card {card_path.name} must be a mapping")
    missing = [k for k in ("name", "version", "file", "sha256") if not data.get(k)]
    if missing:
        raise ModelLoadError(f"model card {card_path.name} lacks {', '.join(missing)}")
    if "/" in str(data["file"]) or "\\" in str(data["file"]) or str(data["file"]).startswith("."):
        raise ModelLoadError("model card: file must name a file inside the model folder")
    inputs = data.get("inputs", {}) or {}
    pre = data.get("preprocessing", {}) or {}
    out = data.get("output", {}) or {}
    try:
        req = InputRequirements(
            modalities=tuple(str(m) for m in inputs.get("modalities", ("CT",))),
            min_slices=int(inputs.get("min_slices", 16)),
            max_slice_thickness_mm=(
                float(inputs["max_slice_thickness_mm"]) if inputs.get("max_slice_thickness_mm") is not None else None
            ),
            axial_only=bool(inputs.get("axial_only", True)),
            preferred_kernels=tuple(str(k) for k in inputs.get("preferred_kernels", ())),
            max_voxels=int(inputs.get("max_voxels", InputRequirements().max_voxels)),
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"model card [inputs] is invalid: {exc}") from exc
    labels = []
    for key, spec in sorted((data.get("labels") or {}).items(), key=lambda kv: int(kv[0])):
        site = _concept(spec["site"], f"labels.{key}.site") if spec.get("site") else None
        labels.append(
            LabelSpec(
                channel=int(key),
                concept=_concept(spec, f"labels.{key}"),
                site=site,
                threshold=float(spec.get("threshold", 0.5)),
                min_volume_mm3=float(spec.get("min_volume_mm3", 0.0)),
            )
        )
    if not labels:
        raise ModelLoadError("model card has no [labels.N] (what the output channels mean)")
    activation = str(out.get("activation", "sigmoid"))
    if activation not in ("sigmoid", "softmax", "none"):
        raise ModelLoadError("model card: output.activation must be sigmoid, softmax or none")
    normalize = str(pre.get("normalize", "minmax"))
    if normalize not in ("minmax", "zscore", "none"):
        raise ModelLoadError("model card: preprocessing.normalize must be minmax, zscore or none")
    try:
        window = tuple(float(v) for v in pre.get("window", (-1000.0, 400.0)))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError("model card: preprocessing.window must be two numbers") from exc
    if len(window) != 2 or window[0] >= window[1]:
        raise ModelLoadError("model card: preprocessing.window must be [low, high] with low < high")
    spacing = pre.get("spacing_mm")
    return ModelCard(
        folder=folder,
        name=str(data["name"]),
        version=str(data["version"]),
        file=str(data["file"]),
        sha256=str(data["sha256"]).lower(),
        description=str(data.get("description", "")),
        manufacturer=str(data.get("manufacturer", "unknown")),
        queue=str(data.get("queue", "cpu")),
        requirements=req,
        window=(float(window[0]), float(window[1])),
        normalize=normalize,
        mean=float(pre.get("mean", 0.0)),
        std=float(pre.get("std", 1.0)) or 1.0,
        spacing_mm=_triple(spacing, "preprocessing.spacing_mm", float) if spacing else None,
        activation=activation,
        tile=_triple(out.get("tile", (64, 192, 192)), "output.tile"),
        overlap=_triple(out.get("overlap", (8, 32, 32)), "output.overlap"),
        min_tile=_triple(out.get("min_tile", (16, 32, 32)), "output.min_tile"),
        divisible_by=max(1, int(out.get("divisible_by", 1))),
        labels=tuple(labels),
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class TorchScriptDetector:
    """A detector backed by a model folder (see the module docstring)."""

    def __init__(self, card: ModelCard, *, device: str = "cpu", threshold: float | None = None) -> None:
        self.card = card
        self.device = device
        self.threshold_override = threshold
        path = card.weights_path
        if not path.is_file():
            raise ModelLoadError(f"model {card.name}: weights file {card.file} is missing from its folder")
        digest = sha256_of(path)
        if digest != card.sha256:
            raise ModelLoadError(
                f"model {card.name} {card.version}: SHA-256 of {card.file} is {digest}, but the model card "
                f"says {card.sha256}; refusing to load (file changed or card out of date)"
            )
        try:
            self.module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:
            raise ModelLoadError(f"model {card.name}: {card.file} is not a loadable TorchScript file: {exc}") from exc
        self.module.eval()
        self._info = ModelInfo(
            name=card.name,
            version=card.version,
            family=AI_FAMILY,
            description=card.description,
            manufacturer=card.manufacturer,
            weights_sha256=digest,
            labels=tuple(label.concept for label in card.labels),
            queue=card.queue,
        )
        self.last_tile: tuple[int, int, int] | None = None
        """The tile size the last prediction finally ran with (after any OOM retries)."""

    @classmethod
    def from_folder(cls, folder: Path | str, *, device: str = "cpu", threshold: float | None = None) -> TorchScriptDetector:
        return cls(read_card(Path(folder)), device=device, threshold=threshold)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def requirements(self) -> InputRequirements:
        return self.card.requirements

    # -- inference ----------------------------------------------------------------------------

    def _prepare(self, array: np.ndarray) -> torch.Tensor:
        lo, hi = self.card.window
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).clamp(lo, hi)
        if self.card.normalize == "minmax":
            x = (x - lo) / max(hi - lo, 1e-6)
        elif self.card.normalize == "zscore":
            x = (x - self.card.mean) / self.card.std
        return x

    def _run_tiles(self, x: torch.Tensor, tile: tuple[int, int, int]) -> torch.Tensor:
        """Sliding-window inference over (K, J, I) -> (C, K, J, I) probabilities on the CPU."""
        shape = tuple(x.shape)
        t0, t1, t2 = (min(t, s) for t, s in zip(tile, shape, strict=True))
        tile = (t0, t1, t2)
        overlap = tuple(min(o, max(t // 2, 0)) for o, t in zip(self.card.overlap, tile, strict=True))
        starts = []
        for axis in range(3):
            step = max(tile[axis] - overlap[axis], 1)
            s = list(range(0, max(shape[axis] - tile[axis], 0) + 1, step))
            if s[-1] + tile[axis] < shape[axis]:
                s.append(shape[axis] - tile[axis])
            starts.append(s)
        out: torch.Tensor | None = None
        weight = torch.zeros(shape, dtype=torch.float32)
        div = self.card.divisible_by
        with torch.no_grad():
            for k in starts[0]:
                for j in starts[1]:
                    for i in starts[2]:
                        piece = x[k : k + tile[0], j : j + tile[1], i : i + tile[2]]
                        pad = [(-n) % div for n in piece.shape]
                        inp = piece[None, None].to(self.device)
                        if any(pad):
                            inp = F.pad(inp, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
                        y = self.module(inp)
                        if not isinstance(y, torch.Tensor) or y.dim() != 5 or y.shape[0] != 1:
                            raise ModelError(f"model {self.card.name} must return a (1, C, K, J, I) tensor")
                        if self.card.activation == "sigmoid":
                            y = torch.sigmoid(y)
                        elif self.card.activation == "softmax":
                            y = torch.softmax(y, dim=1)
                        y = y[0, :, : piece.shape[0], : piece.shape[1], : piece.shape[2]].float().cpu()
                        if out is None:
                            out = torch.zeros((y.shape[0], *shape), dtype=torch.float32)
                        out[:, k : k + tile[0], j : j + tile[1], i : i + tile[2]] += y
                        weight[k : k + tile[0], j : j + tile[1], i : i + tile[2]] += 1
        assert out is not None
        return out / weight.clamp(min=1)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Tiled inference; on out-of-memory, retry with tiles half the size down to ``min_tile``,
        then fail with :class:`~dicom_node.errors.ModelError`."""
        tile = self.card.tile
        while True:
            try:
                probs = self._run_tiles(x, tile)
                self.last_tile = tile
                return probs
            except Exception as exc:
                if not _is_oom(exc):
                    if isinstance(exc, ModelError):
                        raise
                    raise ModelError(f"model {self.card.name} failed: {type(exc).__name__}: {exc}") from exc
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                m0, m1, m2 = (max(m, t // 2) for t, m in zip(tile, self.card.min_tile, strict=True))
                smaller = (m0, m1, m2)
                if smaller == tile:
                    raise ModelError(
                        f"model {self.card.name}: out of memory on {self.device} even with {tile} tiles"
                    ) from exc
                LOGGER.warning("model %s: out of memory with %s tiles; retrying with %s", self.card.name, tile, smaller)
                tile = smaller

    def predict(self, volume: Volume) -> DetectionResult:
        started = time.perf_counter()
        grid = uniform_grid(volume)
        x = self._prepare(grid.array)
        grid_spacing = (grid.spacing, volume.pixel_spacing[0], volume.pixel_spacing[1])
        if self.card.spacing_mm:
            target = tuple(max(1, round(n * s / t)) for n, s, t in zip(x.shape, grid_spacing, self.card.spacing_mm, strict=True))
            x = F.interpolate(x[None, None], size=target, mode="trilinear", align_corners=False)[0, 0]
        probs = self.infer(x)
        if self.card.spacing_mm:
            probs = F.interpolate(probs[None], size=tuple(grid.array.shape), mode="trilinear", align_corners=False)[0]
        findings: list[Finding] = []
        voxel_mm3 = float(np.prod(grid_spacing))
        for label in self.card.labels:
            if label.channel >= probs.shape[0]:
                raise ModelError(f"model {self.card.name}: no output channel {label.channel}")
            p = probs[label.channel].numpy()
            threshold = self.threshold_override if self.threshold_override is not None else label.threshold
            components, _ = ndimage.label(p >= threshold)
            for n, box in enumerate(ndimage.find_objects(components), start=1):
                if box is None:
                    continue
                comp = components[box] == n
                if comp.sum() * voxel_mm3 < label.min_volume_mm3:
                    continue
                confidence = float(p[box][comp].max())
                if grid.identity:
                    sub, offset = comp, (int(box[0].start), int(box[1].start), int(box[2].start))
                else:
                    full = np.zeros(grid.array.shape, dtype=bool)
                    full[box] = comp
                    src = grid.mask_to_source(full)
                    ks = np.flatnonzero(src.any(axis=(1, 2)))
                    if ks.size == 0:
                        continue
                    sub = src[ks[0] : ks[-1] + 1, box[1], box[2]]
                    offset = (int(ks[0]), int(box[1].start), int(box[2].start))
                finding = finding_from_mask(volume, sub, confidence, label=label.concept, site=label.site, offset=offset)
                if finding is not None:
                    findings.append(finding)
        findings.sort(key=lambda f: -f.confidence)
        return DetectionResult(
            model_name=self.info.name,
            model_version=self.info.version,
            series_instance_uid=volume.series_instance_uid,
            findings=findings,
            runtime_seconds=time.perf_counter() - started,
            device=self.device,
            extra={"tile": list(self.last_tile) if self.last_tile else None},
        )
