"""What each configured model is and what it accepts, read from text only (no torch, no weights).

Used by ``dicom-node models`` and the Destinations page on the edge, and by the worker's bundle
runtime (:mod:`workers.models.bundle`), which reads a bundle's declarations through
:func:`read_bundle` too, so both sides describe a bundle the same way.

A MONAI bundle (the Model Zoo layout, https://docs.monai.io/en/stable/mb_specification.html) is
a folder with ``configs/metadata.json`` (identity, licence, intended use, the network's inputs
and outputs: ``network_data_format``), ``configs/inference.json`` (the transforms, the network,
the inferer) and ``models/model.pt`` (state dict) and/or ``models/model.ts`` (TorchScript).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from dicom_node.errors import ModelLoadError
from dicom_node.settings import ModelSettings, Settings

METADATA_FILE = Path("configs") / "metadata.json"
INFERENCE_FILE = Path("configs") / "inference.json"
WEIGHT_FILES = ("model.pt", "model.ts")
"""Weights under ``models/``, in the order the runtime prefers them unless told otherwise."""
CARD_NAMES = ("model.toml", "model.json")
ENTRY_POINT_GROUP = "dicom_node.models"


def is_bundle(folder: Path | str) -> bool:
    """True when ``folder`` has the layout of a MONAI bundle (``configs/metadata.json``)."""
    return (Path(folder) / METADATA_FILE).is_file()


def bundle_folder(cfg: ModelSettings) -> Path | None:
    """The bundle a model's settings name: ``bundle``, or a ``path`` that holds a bundle."""
    if cfg.bundle is not None:
        return Path(cfg.bundle)
    if cfg.path is not None and is_bundle(cfg.path):
        return Path(cfg.path)
    return None


@dataclass(frozen=True)
class BundleMetadata:
    """A bundle's declarations, from ``configs/metadata.json`` and ``configs/inference.json``."""

    folder: Path
    name: str
    version: str
    kind: str
    """``detection`` (boxes, scores, labels) or ``segmentation`` (a label map)."""
    task: str = ""
    description: str = ""
    authors: str = ""
    licence: str = "not stated"
    intended_use: str = "not stated"
    modality: str | None = None
    """The input's declared modality (``CT``, ``MR``...), None when not declared."""
    num_channels: int = 1
    input_format: str = ""
    """``hounsfield``, ``magnitude``..."""
    spatial_shape: tuple[Any, ...] = ()
    """As declared: numbers, or expressions like ``"16*n"`` for patch-based networks."""
    is_patch_data: bool = True
    channel_def: dict[str, str] = field(default_factory=dict)
    """Output channel (segmentation) or label (detection) index -> name, as declared."""
    pixdim: tuple[float, float, float] | None = None
    """``Spacingd`` pixdim (x, y, z in the bundle's orientation), mm."""
    axcodes: str | None = None
    """``Orientationd`` axcodes, e.g. ``RAS``."""
    intensity: dict[str, float] = field(default_factory=dict)
    """``ScaleIntensityRanged`` a_min, a_max, b_min, b_max (clip window)."""
    roi_size: tuple[int, ...] | None = None
    """Sliding-window patch size (voxels) of the bundle's inferer."""
    overlap: float | None = None
    sw_batch_size: int | None = None
    weights: tuple[str, ...] = ()
    """Weight files present under ``models/``."""

    def accepts(self) -> dict[str, Any]:
        """What the bundle says it takes, for listings (no patient data)."""
        out: dict[str, Any] = {"modality": self.modality or "any", "channels": self.num_channels}
        if self.pixdim:
            out["spacing_mm"] = list(self.pixdim)
        if self.axcodes:
            out["orientation"] = self.axcodes
        if self.intensity:
            out["intensity_window"] = [self.intensity.get("a_min"), self.intensity.get("a_max")]
        if self.roi_size:
            out["sliding_window"] = {"roi_size": list(self.roi_size), "overlap": self.overlap}
        if self.spatial_shape:
            out["spatial_shape"] = list(self.spatial_shape)
        return out


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"bundle file {path.name} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"bundle file {path.name} is not a JSON object")
    return data


def _transforms(section: Any) -> list[dict[str, Any]]:
    """The transform items of a ``Compose`` config section (``{"transforms": [...]}`` or a list)."""
    if isinstance(section, dict):
        section = section.get("transforms", [])
    return [t for t in section or [] if isinstance(t, dict)] if isinstance(section, list) else []


def _target(item: dict[str, Any]) -> str:
    return str(item.get("_target_", "")).rsplit(".", 1)[-1]


def _resolve(value: Any, config: dict[str, Any]) -> Any:
    """Follow a plain ``@name`` reference one level (no expressions are evaluated here)."""
    if isinstance(value, str) and value.startswith("@") and re.fullmatch(r"@[\w#]+", value):
        return config.get(value[1:].split("#")[0], value)
    return value


def _licence(folder: Path, meta: dict[str, Any]) -> str:
    for key in ("license", "licence"):
        if meta.get(key):
            return str(meta[key])
    for name in ("LICENSE", "LICENSE.txt", "LICENCE"):
        path = folder / name
        if path.is_file():
            first = next((ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()), "")
            return first or f"see {name}"
    return "not stated"


def _sliding_window(config: dict[str, Any]) -> tuple[tuple[int, ...] | None, float | None, int | None]:
    inferer = config.get("inferer")
    if isinstance(inferer, dict) and "roi_size" in inferer:
        roi = _resolve(inferer.get("roi_size"), config)
        overlap = inferer.get("overlap")
        batch = inferer.get("sw_batch_size")
        return (
            tuple(int(v) for v in roi) if isinstance(roi, list) else None,
            float(overlap) if isinstance(overlap, (int, float)) else None,
            int(batch) if isinstance(batch, int) else None,
        )
    # Detection bundles configure the detector's own inferer in "detector_ops".
    for op in config.get("detector_ops", []) or []:
        call = re.search(r"set_sliding_window_inferer\((.*)\)", str(op))
        if not call:
            continue
        args = dict(re.findall(r"(\w+)\s*=\s*(\[[^\]]*\]|[^,]+)", call.group(1)))
        roi_text = args.get("roi_size", "")
        roi = _resolve(roi_text.strip(), config) if roi_text.startswith("@") else None
        if roi is None and roi_text.startswith("["):
            roi = json.loads(roi_text)
        overlap = args.get("overlap")
        batch = args.get("sw_batch_size")
        return (
            tuple(int(v) for v in roi) if isinstance(roi, list) else None,
            float(overlap) if overlap and re.fullmatch(r"[\d.]+", overlap.strip()) else None,
            int(batch) if batch and batch.strip().isdigit() else None,
        )
    return None, None, None


def read_bundle(folder: Path | str) -> BundleMetadata:
    """Read a bundle's declarations (no weights, no torch). Raises
    :class:`~dicom_node.errors.ModelLoadError` saying what is missing or wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"bundle folder {folder} does not exist")
    if not (folder / METADATA_FILE).is_file():
        raise ModelLoadError(f"bundle folder {folder} has no {METADATA_FILE}")
    if not (folder / INFERENCE_FILE).is_file():
        raise ModelLoadError(f"bundle folder {folder} has no {INFERENCE_FILE} (only JSON configs are read)")
    meta = _load_json(folder / METADATA_FILE)
    config = _load_json(folder / INFERENCE_FILE)
    fmt = meta.get("network_data_format") or {}
    inputs = fmt.get("inputs") or {}
    outputs = fmt.get("outputs") or {}
    image: dict[str, Any] = next(iter(inputs.values()), {}) if isinstance(inputs, dict) else {}
    pred: dict[str, Any] = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    if "detector" in config or str(pred.get("format", "")).lower() in ("dict", "object", "detection"):
        kind = "detection"
    elif str(pred.get("format", "")).lower() == "segmentation" or "inferer" in config:
        kind = "segmentation"
    else:
        raise ModelLoadError(
            f"bundle {folder.name}: its output is neither boxes (a 'detector') nor a segmentation"
        )
    pixdim = axcodes = None
    intensity: dict[str, float] = {}
    for item in _transforms(config.get("preprocessing")):
        if item.get("_disabled_") is True:
            continue
        target = _target(item)
        if target in ("Spacingd", "Spacing") and isinstance(item.get("pixdim"), list):
            a, b, c = (float(v) for v in item["pixdim"])
            pixdim = (a, b, c)
        elif target in ("Orientationd", "Orientation"):
            axcodes = str(item.get("axcodes") or "") or None
        elif target in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            intensity = {k: float(item[k]) for k in ("a_min", "a_max", "b_min", "b_max") if isinstance(item.get(k), (int, float))}
    roi, overlap, batch = _sliding_window(config)
    channel_def = pred.get("channel_def") or {}
    try:
        num_channels = int(image.get("num_channels", 1))
    except (TypeError, ValueError):
        num_channels = 1
    return BundleMetadata(
        folder=folder,
        name=str(meta.get("name") or folder.name),
        version=str(meta.get("version") or "unknown"),
        kind=kind,
        task=str(meta.get("task", "")),
        description=str(meta.get("description", "")),
        authors=str(meta.get("authors", "")),
        licence=_licence(folder, meta),
        intended_use=str(meta.get("intended_use") or "not stated"),
        modality=str(image["modality"]).upper() if image.get("modality") else None,
        num_channels=num_channels,
        input_format=str(image.get("format", "")),
        spatial_shape=tuple(image.get("spatial_shape") or ()),
        is_patch_data=bool(image.get("is_patch_data", True)),
        channel_def={str(k): str(v) for k, v in channel_def.items()} if isinstance(channel_def, dict) else {},
        pixdim=pixdim,
        axcodes=axcodes,
        intensity=intensity,
        roi_size=roi,
        overlap=overlap,
        sw_batch_size=batch,
        weights=tuple(n for n in WEIGHT_FILES if (folder / "models" / n).is_file()),
    )


# -- listings (``dicom-node models``, the Destinations page) -----------------------------------


def _card(folder: Path) -> dict[str, Any]:
    for name in CARD_NAMES:
        path = folder / name
        if path.is_file():
            try:
                text = path.read_text()
                data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
            except (OSError, ValueError):
                return {"error": f"{name} cannot be read"}
            return data if isinstance(data, dict) else {"error": f"{name} is not a mapping"}
    return {"error": f"no model card ({', '.join(CARD_NAMES)}) in {folder}"}


def describe_model(name: str, cfg: ModelSettings, entry_point: str | None = None) -> dict[str, Any]:
    """One model as the settings and its files describe it (no weights read, no patient data)."""
    view: dict[str, Any] = {
        "name": name,
        "queue": cfg.queue or "cpu",
        "device": cfg.device,
        "threshold": cfg.threshold,
        "memory_limit_mib": cfg.memory_limit_mib,
        "version": None,
        "licence": None,
        "intended_use": None,
        "accepts": {},
        "error": None,
    }
    folder = bundle_folder(cfg)
    if folder is not None:
        view["source"] = f"MONAI bundle {folder}"
        try:
            meta = read_bundle(folder)
        except ModelLoadError as exc:
            view["error"] = str(exc)
            return view
        view.update(
            kind=meta.kind,
            bundle_name=meta.name,
            version=meta.version,
            licence=meta.licence,
            intended_use=meta.intended_use,
            description=meta.description,
            accepts=meta.accepts(),
            outputs=meta.channel_def,
            weights=list(meta.weights),
            labels={k: v.concept() for k, v in cfg.labels.items()},
        )
        return view
    if cfg.path is not None:
        view["source"] = f"model folder {cfg.path}"
        card = _card(Path(cfg.path))
        view["error"] = card.get("error")
        view["version"] = card.get("version")
        view["description"] = card.get("description", "")
        view["licence"] = card.get("licence") or card.get("license")
        view["intended_use"] = card.get("intended_use")
        view["accepts"] = dict(card.get("inputs") or {})
        return view
    if cfg.plugin is not None:
        view["source"] = f"plug-in {cfg.plugin}"
        return view
    view["source"] = f"entry point {entry_point}" if entry_point else "entry point (not installed here)"
    return view


def describe_models(settings: Settings) -> list[dict[str, Any]]:
    """Every model the node can be asked to run: ``[models.*]``, the routing rules' models and
    the installed entry points (group ``dicom_node.models``), sorted by name."""
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    names = set(settings.models) | set(eps)
    for rule in settings.effective_routes():
        names.update(rule.models)
    return [
        describe_model(name, settings.models.get(name) or ModelSettings(), eps.get(name))
        for name in sorted(names)
    ]


def as_json(meta: BundleMetadata) -> dict[str, Any]:
    """A bundle's declarations as plain JSON values."""
    out = asdict(meta)
    out["folder"] = str(meta.folder)
    return out
