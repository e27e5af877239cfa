"""Finding and loading detectors: entry points, model folders, ``module:attr`` plug-ins.

A model name resolves, in this order, to:

1. ``[models.<name>] bundle = "/models/x"`` (or a ``path`` holding ``configs/metadata.json``) —
   a MONAI bundle (:mod:`workers.models.bundle`); ``path = "/models/x"`` — a model folder
   (TorchScript + card, :mod:`workers.models.torchscript`);
2. ``[models.<name>] plugin = "package.module:Factory"``;
3. the entry point ``<name>`` of group ``dicom_node.models`` of any installed package (the
   built-in ``lung-nodules`` is one).

A factory (entry point or plug-in) is a Detector class or any callable returning a Detector.
It is called with the keyword arguments among ``device``, ``threshold`` and ``options`` that it
accepts (from ``[models.<name>]``); a callable taking one positional parameter instead gets the
whole ``ModelSettings``; one taking none is called without arguments.

Models load lazily, once per process: the cache remembers the process id and starts empty in a
forked child (a CUDA context or open files must not be shared across fork). ``device = "auto"``
(the default) picks CUDA when available, else the CPU.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from dicom_node.errors import ModelLoadError
from dicom_node.model_catalog import bundle_folder
from dicom_node.settings import ModelSettings, Settings
from workers.models.base import Detector, ModelInfo

LOGGER = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_node.models"

_lock = threading.Lock()
_cache: dict[str, Detector] = {}
_cache_pid: int | None = None


def resolve_device(wanted: str | None) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without CUDA is an error."""
    import torch

    if wanted in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' is configured but CUDA is not available on this worker")
    return wanted


def _entry_point_factories() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _call_factory(factory: Callable[..., Any], cfg: ModelSettings | None, device: str) -> Any:
    try:
        params: Mapping[str, inspect.Parameter] = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    offered = {"device": device, "threshold": cfg.threshold if cfg else None, "options": dict(cfg.options) if cfg else {}}
    named = {k: v for k, v in offered.items() if k in params}
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if has_kwargs:
        named = offered
    if named:
        return factory(**named)
    positional = [
        p for p in params.values() if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if positional:
        return factory(cfg or ModelSettings())
    return factory()


def _load(name: str, settings: Settings) -> Detector:
    cfg = settings.models.get(name)
    device = resolve_device(cfg.device if cfg else "auto")
    bundle = bundle_folder(cfg) if cfg is not None else None
    if cfg is not None and bundle is not None:
        from workers.models.bundle.detector import BundleDetector

        detector: Any = BundleDetector(name, cfg, bundle, device=device)
    elif cfg is not None and cfg.path is not None:
        from workers.models.torchscript import TorchScriptDetector

        detector = TorchScriptDetector.from_folder(cfg.path, device=device, threshold=cfg.threshold)
    else:
        if cfg is not None and cfg.plugin:
            module_name, _, attr = cfg.plugin.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise ModelLoadError(f"model {name!r}: plug-in {cfg.plugin!r} cannot be imported: {exc}") from exc
        else:
            eps = _entry_point_factories()
            if name not in eps:
                known = sorted(set(eps) | {n for n, c in settings.models.items() if c.path or c.bundle or c.plugin})
                raise ModelLoadError(f"unknown model {name!r}; available: {', '.join(known) or 'none'}")
            try:
                factory = eps[name].load()
            except Exception as exc:
                raise ModelLoadError(f"model {name!r}: entry point {eps[name].value} cannot be loaded: {exc}") from exc
        try:
            detector = _call_factory(factory, cfg, device)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"model {name!r} failed to initialise: {type(exc).__name__}: {exc}") from exc
    if not isinstance(detector, Detector):
        raise ModelLoadError(f"model {name!r} does not provide info, requirements and predict(volume)")
    LOGGER.info("loaded model %s %s on %s", detector.info.name, detector.info.version, device)
    return detector


def get_detector(name: str, settings: Settings) -> Detector:
    """The detector called ``name``, loaded on first use in this process and then reused.

    Raises :class:`~dicom_node.errors.ModelLoadError` with a clear message when the model is
    unknown, its folder or card is wrong, its weights' SHA-256 does not match, or it fails to
    initialise.
    """
    global _cache_pid
    with _lock:
        if _cache_pid != os.getpid():
            # A forked child never reuses the parent's models (CUDA contexts do not survive fork).
            _cache.clear()
            _cache_pid = os.getpid()
        detector = _cache.get(name)
        if detector is None:
            detector = _load(name, settings)
            _cache[name] = detector
        return detector


def clear_cache() -> None:
    """Forget loaded models (tests; or to reload changed model folders)."""
    with _lock:
        _cache.clear()


def available_models(settings: Settings) -> dict[str, ModelInfo]:
    """Name -> ModelInfo of every model this worker can run (installed entry points and the
    configured folders and plug-ins). Models that fail to load are left out and logged."""
    names = set(_entry_point_factories()) | {n for n, c in settings.models.items() if c.path or c.bundle or c.plugin}
    out: dict[str, ModelInfo] = {}
    for name in sorted(names):
        try:
            out[name] = get_detector(name, settings).info
        except ModelLoadError as exc:
            LOGGER.warning("model %s unavailable: %s", name, exc)
    return out


def publish_available(settings: Settings, worker: str) -> dict[str, ModelInfo]:
    """Load every model this worker can run and record each one's identity (name, version,
    weights' SHA-256) in the state database's ``model_versions`` table, under ``worker``: how
    the edge learns what the workers run now (:mod:`dicom_node.state.model_versions`).

    Run in a process of its own when a worker starts (``workers/celery_app.py``): loading a
    model may initialise CUDA, which the worker's main process must not do before it forks."""
    from dicom_node.state import open_database
    from dicom_node.state.model_versions import publish

    infos = available_models(settings)
    try:
        db = open_database(settings.resolved_database_url)
        try:
            for name, info in infos.items():
                publish(db, worker, name, info.version, info.weights_sha256)
        finally:
            db.dispose()
    except Exception as exc:  # the worker runs regardless; each model it loads is published
        LOGGER.warning("could not publish the model versions: %s", type(exc).__name__)
        return {}
    LOGGER.info("published %d model version(s) for worker %s", len(infos), worker)
    return infos
