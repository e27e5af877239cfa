"""The model runtime: TorchScript model folders (card, SHA-256 check, tiling, out-of-memory
retry), entry-point discovery (the built-in model and a third-party plug-in package), loading
once per process and again after fork."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.errors import ModelError, ModelLoadError
from tests.dicomgen import ct_series
from workers.models import registry
from workers.models.base import Detector
from workers.models.torchscript import TorchScriptDetector
from workers.volume import Volume, load_series


class Bright(torch.nn.Module):
    """Logit > 0 where the (min-max windowed) input is above 0.8, i.e. above 120 HU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.8) * 40.0


class BrightOrOom(torch.nn.Module):
    """Like Bright, but fails like a GPU that is out of memory on inputs above ``limit`` voxels."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return (x - 0.8) * 40.0


def write_model(folder: Path, module: torch.nn.Module, card_format: str = "toml", **card: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(folder / "model.pt"))
    data: dict[str, Any] = {
        "name": "blob-finder",
        "version": "2.1.0",
        "description": "finds bright blobs (test model)",
        "manufacturer": "Test Lab",
        "file": "model.pt",
        "sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
        "inputs": {"modalities": ["CT"], "min_slices": 4, "max_slice_thickness_mm": 5.0},
        "preprocessing": {"window": [-1000.0, 400.0], "normalize": "minmax"},
        "output": {"activation": "sigmoid", "tile": [64, 64, 64], "overlap": [2, 4, 4], "min_tile": [4, 8, 8]},
        "labels": {"0": {"code": "27925004", "scheme": "SCT", "meaning": "Nodule", "threshold": 0.5, "min_volume_mm3": 1.0,
                         "site": {"code": "39607008", "scheme": "SCT", "meaning": "Lung"}}},
    }  # fmt: skip
    for key, value in card.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    if card_format == "json":
        (folder / "model.json").write_text(json.dumps(data))
    elif card_format == "yaml":
        import yaml

        (folder / "model.yaml").write_text(yaml.safe_dump(data))
    else:
        (folder / "model.toml").write_text(_toml(data))
    return folder


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    def val(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = [f"{k} = {val(v)}" for k, v in data.items() if not isinstance(v, dict) or prefix]
    text = "\n".join(lines) + "\n"
    if not prefix:
        for k, v in data.items():
            if isinstance(v, dict):
                if k == "labels":
                    for n, spec in v.items():
                        text += f"\n[labels.{n}]\n" + "\n".join(f"{a} = {val(b)}" for a, b in spec.items()) + "\n"
                else:
                    text += f"\n[{k}]\n" + "\n".join(f"{a} = {val(b)}" for a, b in v.items()) + "\n"
    return text


@pytest.fixture
def blob_volume(tmp_path: Path) -> tuple[Volume, tuple[int, int, int]]:
    """A 20 x 48 x 48 CT series: -800 HU with one 200 HU ball (radius 5 px) at a known voxel."""
    paths = ct_series(tmp_path / "ct", slices=20, size=48, pixel_spacing=1.0, slice_thickness=1.0)
    centre = (11, 20, 27)  # (k, j, i) in loader order: k ascends along z
    zz, yy, xx = np.mgrid[0:20, 0:48, 0:48]
    ball = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= 25
    vol = load_series(paths)
    for k, s in enumerate(vol.slices):
        ds = pydicom.dcmread(s.path)
        hu = np.where(ball[k], 200, -800).astype(np.int16)
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        ds.save_as(s.path)
    return load_series(paths), centre


@pytest.fixture(autouse=True)
def _fresh_registry() -> None:
    registry.clear_cache()


@pytest.mark.parametrize("card_format", ["toml", "json", "yaml"])
def test_torchscript_model_folder_finds_the_blob(
    tmp_path: Path, make_settings: Callable[..., Any], blob_volume: tuple[Volume, tuple[int, int, int]], card_format: str
) -> None:
    vol, centre = blob_volume
    folder = write_model(tmp_path / "models" / "blob", Bright(), card_format)
    settings = make_settings(models={"blob-finder": {"path": str(folder), "device": "cpu"}})
    det = registry.get_detector("blob-finder", settings)
    assert isinstance(det, TorchScriptDetector) and isinstance(det, Detector)
    assert registry.get_detector("blob-finder", settings) is det  # loaded once, then reused
    assert det.info.name == "blob-finder" and det.info.version == "2.1.0"
    assert det.info.weights_sha256 == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    assert det.requirements.min_slices == 4
    result = det.predict(vol)
    assert len(result.findings) == 1
    f = result.findings[0]
    assert f.label.meaning == "Nodule" and f.site is not None and f.site.meaning == "Lung"
    assert np.allclose(f.center_ijk, centre, atol=0.1)
    assert np.allclose(f.center_mm, vol.index_to_patient(*centre), atol=0.1)
    assert f.key_slice == centre[0]
    assert f.mask is not None and f.mask.shape == vol.shape and f.mask.sum() == (vol.array > 120).sum()
    # 200 HU in a -1000..400 window is 0.857; the model's logit is (0.857 - 0.8) * 40.
    assert f.confidence == pytest.approx(1 / (1 + np.exp(-(1200 / 1400 - 0.8) * 40)), abs=1e-4)
    assert 9.0 <= f.diameter_mm <= 12.0


def test_weights_hash_mismatch_refuses_to_load(tmp_path: Path, make_settings: Callable[..., Any]) -> None:
    folder = write_model(tmp_path / "m", Bright(), sha256="0" * 64)
    settings = make_settings(models={"blob-finder": {"path": str(folder)}})
    with pytest.raises(ModelLoadError) as err:
        registry.get_detector("blob-finder", settings)
    message = str(err.value)
    assert "SHA-256 of model.pt" in message and "0" * 64 in message and "refusing to load" in message
    # A file swapped after the card was written is refused the same way.
    folder = write_model(tmp_path / "m2", Bright())
    torch.jit.save(torch.jit.script(BrightOrOom(10)), str(folder / "model.pt"))
    with pytest.raises(ModelLoadError, match="refusing to load"):
        TorchScriptDetector.from_folder(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": None}, "no \\[labels.N\\]"),
        ({"file": "../elsewhere.pt"}, "inside the model folder"),
        ({"output": {"activation": "relu"}}, "activation"),
        ({"version": ""}, "lacks version"),
    ],
)
def test_bad_cards_are_refused_with_a_clear_reason(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    folder = tmp_path / "m"
    write_model(folder, Bright(), "json")
    card = json.loads((folder / "model.json").read_text())
    for key, value in change.items():
        if value is None:
            card.pop(key)
        elif isinstance(value, dict):
            card[key].update(value)
        else:
            card[key] = value
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match=message):
        TorchScriptDetector.from_folder(folder)


def test_tiles_give_the_same_result_as_one_pass(tmp_path: Path, blob_volume: tuple[Volume, tuple[int, int, int]]) -> None:
    vol, _ = blob_volume
    whole = TorchScriptDetector.from_folder(write_model(tmp_path / "a", Bright()))
    tiled = TorchScriptDetector.from_folder(write_model(tmp_path / "b", Bright(), output={"tile": [6, 16, 16], "overlap": [1, 2, 2]}))
    a, b = whole.predict(vol), tiled.predict(vol)
    assert tiled.last_tile == (6, 16, 16)
    assert len(a.findings) == len(b.findings) == 1
    assert np.array_equal(a.findings[0].mask, b.findings[0].mask)


def test_out_of_memory_retries_on_smaller_tiles_then_fails_cleanly(
    tmp_path: Path, blob_volume: tuple[Volume, tuple[int, int, int]]
) -> None:
    """No GPU here: the scripted model raises the error CUDA raises when a tile is too big."""
    vol, centre = blob_volume
    det = TorchScriptDetector.from_folder(write_model(tmp_path / "a", BrightOrOom(5000), output={"tile": [32, 64, 64]}))
    result = det.predict(vol)
    assert det.last_tile is not None and int(np.prod(det.last_tile)) <= 5000
    assert len(result.findings) == 1 and np.allclose(result.findings[0].center_ijk, centre, atol=0.1)
    hopeless = TorchScriptDetector.from_folder(write_model(tmp_path / "b", BrightOrOom(10), output={"min_tile": [4, 8, 8]}))
    with pytest.raises(ModelError, match="out of memory on cpu even with"):
        hopeless.predict(vol)


# -- entry points ---------------------------------------------------------------------------------


def test_builtin_model_is_discovered_through_its_entry_point(make_settings: Callable[..., Any]) -> None:
    from workers.models.lung_nodules import LungNoduleDetector

    settings = make_settings()
    models = registry.available_models(settings)
    assert "lung-nodules" in models
    assert models["lung-nodules"].name == "lung-nodules"
    assert isinstance(registry.get_detector("lung-nodules", settings), LungNoduleDetector)


PLUGIN = textwrap.dedent(
    '''
    """A third-party model package, installed next to dicom-node."""
    import numpy as np
    from workers.findings import CodedConcept, DetectionResult
    from workers.models.base import InputRequirements, ModelInfo

    LOADS = []

    class AcmeDetector:
        def __init__(self, device="cpu", threshold=None, options=None):
            LOADS.append((device, threshold, dict(options or {})))
            self.options = dict(options or {})

        @property
        def info(self):
            return ModelInfo(name="acme-blob", version="0.9", family=CodedConcept("123110", "DCM", "Artificial Intelligence"))

        @property
        def requirements(self):
            return InputRequirements(min_slices=1)

        def predict(self, volume):
            return DetectionResult("acme-blob", "0.9", volume.series_instance_uid, [])
    '''
)


@pytest.fixture
def acme_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real distribution on sys.path with a ``dicom_node.models`` entry point."""
    import importlib

    site = tmp_path / "site"
    (site / "acme_models").mkdir(parents=True)
    (site / "acme_models" / "__init__.py").write_text(PLUGIN)
    info = site / "acme_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dicom_node.models]\nacme-blob = acme_models:AcmeDetector\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    import sys

    sys.modules.pop("acme_models", None)


def test_third_party_plugin_is_discovered_and_configured(acme_plugin: Path, make_settings: Callable[..., Any]) -> None:
    settings = make_settings(models={"acme-blob": {"device": "cpu", "threshold": 0.3, "options": {"level": 7}}})
    assert "acme-blob" in registry.available_models(settings)
    det = registry.get_detector("acme-blob", settings)
    import acme_models  # type: ignore[import-not-found]

    assert acme_models.LOADS == [("cpu", 0.3, {"level": 7})]
    assert det.info.version == "0.9"
    assert registry.get_detector("acme-blob", settings) is det
    assert len(acme_models.LOADS) == 1


def _child_loads(settings: Any, queue: Any) -> None:
    import acme_models  # type: ignore[import-not-found]

    before = len(acme_models.LOADS)
    registry.get_detector("acme-blob", settings)
    queue.put((before, len(acme_models.LOADS)))


def test_models_load_again_in_a_forked_worker(acme_plugin: Path, make_settings: Callable[..., Any]) -> None:
    settings = make_settings(models={"acme-blob": {"device": "cpu"}})
    registry.get_detector("acme-blob", settings)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_loads, args=(settings, queue))
    child.start()
    before, after = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    # The child inherited the parent's loaded instance, but loads its own.
    assert (before, after) == (1, 2)


def test_unknown_model_names_the_available_ones(make_settings: Callable[..., Any]) -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model 'nope'.*lung-nodules"):
        registry.get_detector("nope", make_settings())


def test_cuda_requested_without_cuda_is_refused(make_settings: Callable[..., Any]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        registry.get_detector("lung-nodules", make_settings(models={"lung-nodules": {"device": "cuda"}}))
