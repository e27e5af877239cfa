"""MONAI bundles as node models (workers/models/bundle, dicom_node/model_catalog.py), with the
real ``monai`` package: bundles in the Model Zoo layout (tests/bundles.py), a RetinaNet detector
and UNet / SegResNet segmenters with small random weights from model.pt and model.ts, and
known-answer bundles whose networks return the box or mask of the brightest blob. The blob's
position is known in patient coordinates on straight, tilted and unevenly spaced series.
One end-to-end run: Orthanc -> node -> worker -> SR and SEG in Orthanc, checked with dciodvfy.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.errors import NoInputError
from dicom_node.model_catalog import describe_models, read_bundle
from dicom_node.settings import ModelSettings, Settings
from dicom_node.state import JobState
from tests.bundles import BLOB_CENTRE, BLOB_RADIUS, PIXDIM, make_bundle, phantom_series
from tests.peers import Orthanc, RedisServer
from tests.pipeline_env import NodeEnv


@pytest.fixture(scope="module", autouse=True)
def _monai() -> None:
    """Each test needs the ``monai`` extra: without it the test is skipped (a failure under
    CI=true, tests/conftest.py), not the whole module at collection."""
    pytest.importorskip("monai", reason="the monai extra is not installed (pip install 'dicom-node[monai]')")


pytestmark = [
    # Model Zoo bundles ship TorchScript (model.ts), which torch 2.13 calls deprecated.
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
    # Orientationd's axis labels now follow the MetaTensor's space, which the node sets to RAS.
    pytest.mark.filterwarnings(r"ignore:monai\.transforms\.spatial\.dictionary Orientationd:FutureWarning"),
]

GEOMETRIES = ("straight", "tilted", "uneven")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NODULE = {"code": "27925004", "scheme": "SCT", "meaning": "Nodule"}
TOLERANCE_MM = max(PIXDIM)
"""The bundles see the series at PIXDIM: a box or mask edge is good to one of their voxels."""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "blob-det": make_bundle(root, "detection"),
        "blob-seg": make_bundle(root, "segmentation"),
        "retinanet": make_bundle(root, "detection", known_answer=False),
        "unet": make_bundle(root, "segmentation", known_answer=False, network="unet"),
        "segresnet": make_bundle(root, "segmentation", known_answer=False, network="segresnet"),
        "mr-only": make_bundle(root, "segmentation", modality="MR", name="test-mr-only"),
        "two-channel": make_bundle(root, "segmentation", channels=2, name="test-two-channel"),
        "ras-boxes": make_bundle(root, "detection", boxes="ras", name="test-ras-boxes"),
        "image-boxes": make_bundle(root, "detection", boxes="image", name="test-image-boxes"),
        "no-invert": make_bundle(root, "segmentation", invert=False, name="test-no-invert"),
    }


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("phantoms")
    return {g: phantom_series(root / g, g) for g in GEOMETRIES}


@pytest.fixture(scope="module")
def volumes(series: dict[str, list[Path]]) -> dict[str, Any]:
    from workers.volume import load_series

    return {g: load_series([str(p) for p in paths]) for g, paths in series.items()}


def _detector(folder: Path, weights: str = "model.pt", **settings: Any) -> Any:
    from workers.models.bundle.detector import BundleDetector

    cfg = ModelSettings(bundle=folder, weights=weights, device="cpu", **settings)  # type: ignore[arg-type]
    return BundleDetector(folder.name, cfg, folder, device="cpu")


# -- metadata (torch-free) ------------------------------------------------------------------------


def test_metadata_of_a_detection_and_a_segmentation_bundle(bundles: dict[str, Path]) -> None:
    det = read_bundle(bundles["retinanet"])
    assert (det.kind, det.name, det.version) == ("detection", "test-detection-retinanet", "0.3.1")
    assert det.pixdim == tuple(PIXDIM) and det.axcodes == "RAS"
    assert det.intensity == {"a_min": -1024.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0}
    assert det.roi_size == (32, 32, 16) and det.overlap == 0.25 and det.sw_batch_size == 1
    assert det.licence == "Apache-2.0" and det.intended_use.startswith("Testing only")
    assert det.modality == "CT" and det.num_channels == 1 and det.weights == ("model.pt", "model.ts")
    seg = read_bundle(bundles["unet"])
    assert seg.kind == "segmentation" and seg.channel_def == {"0": "background", "1": "blob"}
    assert seg.roi_size == (32, 32, 16) and seg.sw_batch_size == 2
    assert read_bundle(bundles["mr-only"]).modality == "MR"


def test_settings_validate_bundle_entries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one source"):
        ModelSettings(bundle=tmp_path, path=tmp_path)
    with pytest.raises(ValueError, match="label index"):
        ModelSettings(bundle=tmp_path, labels={"nodule": NODULE})  # type: ignore[dict-item]
    cfg = ModelSettings(bundle=tmp_path, labels={"0": NODULE}, memory_limit_mib=512)  # type: ignore[dict-item]
    assert cfg.labels["0"].meaning == "Nodule" and cfg.labels["0"].findings is False


def test_models_command_lists_bundles_with_licence_and_input(bundles: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[models.nodules]\nbundle = "{bundles["retinanet"]}"\n[models.nodules.labels.0]\n'
        f'code = "27925004"\nmeaning = "Nodule"\n[models.organ]\npath = "{bundles["unet"]}"\n'
    )
    env = {**os.environ, "DICOM_NODE_DATA_DIR": str(tmp_path / "var")}  # its state database
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(config), "models", "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert run.returncode == 0, run.stderr
    views = {v["name"]: v for v in json.loads(run.stdout)}
    assert views["nodules"]["kind"] == "detection" and views["nodules"]["licence"] == "Apache-2.0"
    assert views["nodules"]["accepts"]["spacing_mm"] == PIXDIM
    assert views["nodules"]["labels"]["0"]["meaning"] == "Nodule"
    assert views["organ"]["kind"] == "segmentation" and views["organ"]["intended_use"].startswith("Testing")
    assert "lung-nodules" in views  # the built-in entry point
    text = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(config), "models"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert "licence: Apache-2.0" in text.stdout and "intended use: Testing only" in text.stdout
    settings = Settings(models={"x": ModelSettings(bundle=tmp_path / "missing")})
    assert "does not exist" in next(v for v in describe_models(settings) if v["name"] == "x")["error"]


# -- orientation: one place, three geometries -----------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bundle_affine_maps_grid_voxels_back_to_source_voxels(volumes: dict[str, Any], geometry: str) -> None:
    from workers.models.bundle.orientation import image_to_lps, lps_to_source, to_bundle_input

    volume = volumes[geometry]
    bi = to_bundle_input(volume)
    assert bi.array.shape == (volume.shape[2], volume.shape[1], bi.grid.array.shape[0])
    # RAS: x and y flipped against DICOM's LPS.
    assert bi.affine_ras[0, 0] == pytest.approx(-volume.pixel_spacing[1])
    rng = np.random.default_rng(1)
    xyz = rng.uniform([0, 0, 0], np.array(bi.array.shape) - 1, size=(50, 3))
    kji = lps_to_source(volume, image_to_lps(bi.affine_ras, xyz))
    np.testing.assert_allclose(kji[:, 2], xyz[:, 0], atol=1e-6)
    np.testing.assert_allclose(kji[:, 1], xyz[:, 1], atol=1e-6)
    np.testing.assert_allclose(kji[:, 0], bi.grid.to_source_index(xyz[:, 2]), atol=1e-6)
    # And the array holds the volume's values there (grid planes at whole source slices).
    if bi.grid.identity:
        np.testing.assert_array_equal(bi.array[3, 5, :], volume.array[:, 5, 3])


# -- known answers ----------------------------------------------------------------------------------


def _blob_index(volume: Any) -> tuple[float, float, float]:
    return volume.patient_to_index(*BLOB_CENTRE)


@pytest.mark.parametrize("weights", ["model.pt", "model.ts"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_detection_box_lands_on_the_blob(bundles: dict[str, Path], volumes: dict[str, Any], geometry: str, weights: str) -> None:
    volume = volumes[geometry]
    detector = _detector(bundles["blob-det"], weights, labels={"0": NODULE})
    result = detector.predict(volume)
    (finding,) = result.findings
    assert finding.label.meaning == "Nodule" and 0.9 < finding.confidence <= 1.0
    assert np.linalg.norm(np.subtract(finding.center_mm, BLOB_CENTRE)) < TOLERANCE_MM
    k, j, i = _blob_index(volume)
    assert abs(finding.key_slice - k) <= 1
    i0, j0, i1, j1 = finding.bbox_2d
    assert i0 < i + 0.5 < i1 and j0 < j + 0.5 < j1
    assert finding.diameter_mm == pytest.approx(2 * BLOB_RADIUS, abs=2 * TOLERANCE_MM)
    assert detector.info.weights_sha256 and len(detector.info.weights_sha256) == 64


@pytest.mark.parametrize("name", ["ras-boxes", "image-boxes"])
def test_boxes_are_read_in_the_space_the_postprocessing_leaves_them(
    bundles: dict[str, Path], volumes: dict[str, Any], name: str
) -> None:
    """World boxes in RAS (no ``affine_lps_to_ras``) and boxes left in image voxels land on
    the blob as well as the Model Zoo's LPS ones."""
    (finding,) = _detector(bundles[name]).predict(volumes["tilted"]).findings
    assert np.linalg.norm(np.subtract(finding.center_mm, BLOB_CENTRE)) < TOLERANCE_MM


@pytest.mark.parametrize("geometry", ["tilted", "uneven"])
def test_label_map_without_invertd_is_brought_back_by_the_node(
    bundles: dict[str, Path], volumes: dict[str, Any], geometry: str
) -> None:
    (region,) = _detector(bundles["no-invert"]).predict(volumes[geometry]).findings
    assert region.mask is not None and region.mask.shape == volumes[geometry].shape
    assert np.linalg.norm(np.subtract(region.center_mm, BLOB_CENTRE)) < TOLERANCE_MM


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_segmentation_mask_lands_on_the_blob(bundles: dict[str, Path], volumes: dict[str, Any], geometry: str) -> None:
    volume = volumes[geometry]
    labels = {"1": {**NODULE, "findings": True}}
    result = _detector(bundles["blob-seg"], "model.ts", labels=labels).predict(volume)
    region, component = result.findings  # the label's segment, and its one component
    assert region.mask is not None and region.mask.shape == volume.shape and component.mask is None
    for finding in (region, component):
        assert np.linalg.norm(np.subtract(finding.center_mm, BLOB_CENTRE)) < TOLERANCE_MM
    # Every voxel inside the blob (by more than one bundle voxel) is in the mask.
    from tests.resultdata import voxel_centres_mm

    dist = np.linalg.norm(voxel_centres_mm(volume) - np.asarray(BLOB_CENTRE), axis=-1)
    assert region.mask[dist < BLOB_RADIUS - TOLERANCE_MM].all()
    assert not region.mask[dist > BLOB_RADIUS + TOLERANCE_MM].any()
    assert region.volume_mm3 == pytest.approx(4 / 3 * np.pi * BLOB_RADIUS**3, rel=0.5)


def test_a_labels_category_is_the_seg_segments_category(bundles: dict[str, Path], volumes: dict[str, Any]) -> None:
    """An organ from a segmentation bundle is an Anatomical Structure in the SEG, not the
    "Morphologically abnormal structure" a lesion type gets by default."""
    from tests.resultdata import detection, job_for
    from workers.results import KIND_SEG, encode_results

    volume = volumes["straight"]
    organ = {"code": "78961009", "scheme": "SCT", "meaning": "Spleen"}
    anatomical = {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
    categories = []
    for labels in ({"1": organ}, {"1": {**organ, "category": anatomical}}):
        detector = _detector(bundles["blob-seg"], "model.ts", labels=labels)
        result = detector.predict(volume)
        (seg,) = [
            o.dataset
            for o in encode_results(volume, detection(volume, result.findings), job_for(volume))
            if o.kind == KIND_SEG
        ]
        (segment,) = seg.SegmentSequence
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
        categories.append(str(segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue))
    assert categories == ["49755003", "91723000"]


@pytest.mark.parametrize("name", ["retinanet", "unet", "segresnet"])
@pytest.mark.parametrize("weights", ["model.pt", "model.ts"])
def test_random_weight_networks_run_from_both_weight_files(
    bundles: dict[str, Path], volumes: dict[str, Any], name: str, weights: str
) -> None:
    detector = _detector(bundles[name], weights)
    result = detector.predict(volumes["tilted"])
    for finding in result.findings:
        assert 0 <= finding.key_slice < volumes["tilted"].shape[0]
        assert np.all(np.isfinite(finding.center_mm))
    assert result.model_version == "0.3.1"


def test_weights_files_give_different_identities(bundles: dict[str, Path]) -> None:
    pt = _detector(bundles["retinanet"], "model.pt").info
    ts = _detector(bundles["retinanet"], "model.ts").info
    assert pt.weights_sha256 != ts.weights_sha256 and pt.name == ts.name == "test-detection-retinanet"
    from workers.results.identity import algorithm_device_uid

    assert algorithm_device_uid(pt) != algorithm_device_uid(ts)


# -- inputs the bundle does not declare: skipped with a reason --------------------------------------


def test_input_outside_the_declaration_is_refused_with_a_reason(bundles: dict[str, Path], volumes: dict[str, Any], series: dict[str, list[Path]]) -> None:
    from workers.selection import select_series
    from workers.volume import read_header

    mr = _detector(bundles["mr-only"])
    headers = {"s": [read_header(p) for p in series["straight"]]}
    selection = select_series(headers, mr.requirements)
    assert selection.series_instance_uid is None and "modality CT is not MR" in selection.reason()
    with pytest.raises(NoInputError, match="2 input channels"):
        _detector(bundles["two-channel"]).predict(volumes["straight"])
    with pytest.raises(NoInputError, match="memory_limit_mib = 16"):
        _detector(bundles["blob-seg"], memory_limit_mib=16).predict(_large(volumes["straight"]))


def _large(volume: Any) -> Any:
    import dataclasses

    k = 40
    array = np.zeros((k, 512, 512), dtype=np.float32)
    positions = volume.positions[0] + np.arange(k)[:, None] * (volume.positions[1] - volume.positions[0])
    return dataclasses.replace(volume, array=array, positions=positions, slices=volume.slices[:1] * k, pixel_spacing=(0.5, 0.5))


# -- end to end: Orthanc -> node -> worker -> SR + SEG in Orthanc -----------------------------------


def _scoords(ds: pydicom.Dataset) -> Iterator[tuple[list[float], str]]:
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "SCOORD":
            ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            yield [float(v) for v in item.GraphicData], str(ref)
        yield from _scoords(item)


def _texts(ds: pydicom.Dataset) -> Iterator[str]:
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            yield str(item.TextValue)
        yield from _texts(item)


def _image_point_mm(image: pydicom.Dataset, col: float, row: float) -> np.ndarray:
    """Patient coordinates of an image coordinate (pixel (0, 0) spans [0, 1) x [0, 1))."""
    row_dir, col_dir = np.array(image.ImageOrientationPatient[:3]), np.array(image.ImageOrientationPatient[3:])
    ps_row, ps_col = (float(v) for v in image.PixelSpacing)
    return np.array(image.ImagePositionPatient) + (col - 0.5) * ps_col * row_dir + (row - 0.5) * ps_row * col_dir


@pytest.mark.slow
def test_end_to_end_bundles_through_orthanc(
    tmp_path: Path, database_url: str, redis_server: RedisServer, orthanc: Orthanc, bundles: dict[str, Path]
) -> None:
    from workers.models.torchscript import sha256_of
    from workers.results.conformance import dciodvfy_errors

    config = f"""
[[routes]]
name = "ct"
modality = ["CT"]
models = ["blob-det", "blob-seg", "mr-only"]

[models.blob-det]
bundle = "{bundles['blob-det']}"
weights = "model.ts"
[models.blob-det.labels.0]
code = "27925004"
meaning = "Nodule"
site = {{ code = "39607008", scheme = "SCT", meaning = "Lung" }}

[models.blob-seg]
path = "{bundles['blob-seg']}"
[models.blob-seg.labels.1]
code = "27925004"
meaning = "Nodule"
findings = true

[models.mr-only]
bundle = "{bundles['mr-only']}"

[destinations.pacs]
url = "{orthanc.dicomweb_url_with_credentials}"
"""
    studies = {g: phantom_series(tmp_path / g, g) for g in GEOMETRIES}
    env = NodeEnv(tmp_path / "node", database_url, broker_url=redis_server.url, config_text=config).start()
    try:
        env.add_worker()
        # The PACS sends each study to the node, as a routing rule in Orthanc would.
        orthanc.add_modality("ainode", "AINODE", env.node.dicom_port)
        for paths in studies.values():
            ids = orthanc.upload(paths)
            sent = orthanc.post("/modalities/ainode/store", json={"Resources": ids, "Synchronous": True})
            assert sent.status_code == 200, sent.text
        jobs = env.wait_all_terminal(3 * len(studies), timeout=150)
        by_model: dict[str, list[Any]] = {}
        for job in jobs:
            by_model.setdefault(job.model, []).append(job)
        assert all(j.state == JobState.DONE.value for j in by_model["blob-det"] + by_model["blob-seg"]), env.diagnostics()
        for job in by_model["mr-only"]:
            assert job.state == JobState.SKIPPED.value and "modality CT is not MR" in (job.reason or "")
        for geometry, paths in studies.items():
            sources = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in paths)}
            study_uid = next(iter(sources.values())).StudyInstanceUID
            found: dict[str, list[pydicom.Dataset]] = {SR_CLASS: [], SEG_CLASS: []}
            for inst in orthanc.instances_in_study(study_uid):
                sop_class = inst["00080016"]["Value"][0]
                if sop_class in found:
                    hit = orthanc.post("/tools/lookup", data=inst["00080018"]["Value"][0]).json()
                    raw = orthanc.get(f"/instances/{hit[0]['ID']}/file").content
                    assert dciodvfy_errors(raw) == [], f"{geometry}: dciodvfy errors"
                    found[sop_class].append(pydicom.dcmread(io.BytesIO(raw)))
            assert len(found[SR_CLASS]) == 2 and len(found[SEG_CLASS]) == 1, geometry
            # The weights' SHA-256 in the algorithm identification of every object.
            assert {p for sr in found[SR_CLASS] for p in _texts(sr) if p.startswith("weights_sha256=")} == {
                f"weights_sha256={sha256_of(bundles['blob-det'] / 'models' / 'model.ts')}",
                f"weights_sha256={sha256_of(bundles['blob-seg'] / 'models' / 'model.pt')}",
            }
            (seg,) = found[SEG_CLASS]
            assert [str(x.SegmentedPropertyTypeCodeSequence[0].CodeValue) for x in seg.SegmentSequence] == ["27925004"]
            algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert sha256_of(bundles["blob-seg"] / "models" / "model.pt") in algorithm.AlgorithmParameters
            boxes = [b for sr in found[SR_CLASS] for b in _scoords(sr)]
            assert len(boxes) == 3, geometry  # the detector's box; the segment's and its component's
            for data, ref in boxes:
                image = sources[ref]
                cols, rows = data[0::2], data[1::2]
                corners = [_image_point_mm(image, c, r) for c in (min(cols), max(cols)) for r in (min(rows), max(rows))]
                centre = np.mean(corners, axis=0)
                normal = np.cross(image.ImageOrientationPatient[:3], image.ImageOrientationPatient[3:])
                off_plane = float(np.dot(np.asarray(BLOB_CENTRE) - np.array(image.ImagePositionPatient), normal))
                in_plane = np.asarray(BLOB_CENTRE) - off_plane * normal
                assert abs(off_plane) < 2.0 + TOLERANCE_MM, f"{geometry}: key slice {off_plane:.1f} mm from the blob"
                assert np.linalg.norm(centre - in_plane) < TOLERANCE_MM, f"{geometry}: box centre off the blob"
        env.assert_every_complete_study_terminal()
    finally:
        env.stop()


# -- settings, devices and views ------------------------------------------------------------------


def test_registry_runs_a_path_holding_a_bundle_and_refuses_cuda_without_it(bundles: dict[str, Path]) -> None:
    import torch

    from dicom_node.errors import ModelLoadError
    from workers.models.registry import clear_cache, get_detector

    clear_cache()
    settings = Settings(models={"organ": ModelSettings(path=bundles["unet"], device="cpu")})
    assert get_detector("organ", settings).info.name == "test-segmentation-unet"
    clear_cache()
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        get_detector("organ", Settings(models={"organ": ModelSettings(bundle=bundles["unet"], device="cuda")}))
    clear_cache()


def test_options_override_the_bundle_config(bundles: dict[str, Path]) -> None:
    detector = _detector(bundles["retinanet"], options={"infer_patch_size": [48, 48, 16]})
    assert list(detector.detector.inferer.roi_size) == [48, 48, 16]


def test_destinations_page_shows_a_bundles_licence_and_intended_use(bundles: dict[str, Path], tmp_path: Path) -> None:
    from dicom_node.api.routes.destinations import model_views
    from dicom_node.state import open_database

    db = open_database(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        settings = Settings(models={"spleen": ModelSettings(bundle=bundles["unet"])})
        (view,) = [v for v in model_views(settings, db) if v["name"] == "spleen"]
    finally:
        db.dispose()
    assert view["source"].startswith("MONAI bundle ")
    assert view["card"]["licence"] == "Apache-2.0" and view["card"]["version"] == "0.3.1"
    assert view["card"]["intended_use"].startswith("Testing only")
    assert view["card"]["validated_input"]["spacing_mm"] == PIXDIM


def test_a_worker_without_monai_says_which_extra_to_install(bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.errors import ModelLoadError

    monkeypatch.setitem(sys.modules, "monai", None)  # import monai -> ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'dicom-node\[monai\]'"):
        _detector(bundles["unet"])
