"""Routing rules: matching on DICOM attributes, fallback, skip reasons, and `route-test`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dicom_node.routing import SeriesFacts, explain_match, route
from dicom_node.settings import RouteRule
from tests.dicomgen import ct_series
from tests.peers import REPO

CT_THIN = SeriesFacts(
    series_instance_uid="1.2.3.1",
    modality="CT",
    body_part="CHEST",
    series_description="LUNG 1.0 B70f",
    study_description="CT THORAX",
    manufacturer="SIEMENS",
    sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
    calling_ae_titles=frozenset({"CT01"}),
    slice_count=300,
    slice_thickness=1.0,
)
CT_THICK = SeriesFacts(
    series_instance_uid="1.2.3.2",
    modality="CT",
    body_part="CHEST",
    series_description="MEDIASTINUM 5mm",
    study_description="CT THORAX",
    slice_count=60,
    slice_thickness=5.0,
    calling_ae_titles=frozenset({"CT01"}),
)
MR = SeriesFacts(series_instance_uid="1.2.3.3", modality="MR", body_part="HEAD", slice_count=40)


def test_each_attribute_is_matched_and_explained() -> None:
    rule = RouteRule(
        name="chest-ct",
        modality=["CT"],
        body_part="chest|thorax",
        series_description="lung",
        study_description="thorax",
        manufacturer="siemens",
        calling_ae_title=["CT01"],
        sop_class_uid=["1.2.840.10008.5.1.4.1.1.2"],
        min_slices=100,
        max_slice_thickness=1.5,
    )
    assert explain_match(rule, CT_THIN) is None
    assert "modality" in (explain_match(rule, MR) or "")
    assert "series description" in (explain_match(rule, CT_THICK) or "")
    thickness_only = RouteRule(name="thin", max_slice_thickness=1.5)
    assert "5 mm above 1.5 mm" in (explain_match(thickness_only, CT_THICK) or "")
    slices_only = RouteRule(name="many", min_slices=100)
    assert "60 slices, fewer than 100" in (explain_match(slices_only, CT_THICK) or "")
    ae_only = RouteRule(name="ae", calling_ae_title=["OTHER"])
    assert "calling AE" in (explain_match(ae_only, CT_THIN) or "")


def test_rules_pick_series_models_and_destinations() -> None:
    rules = [
        RouteRule(name="lung", modality=["CT"], max_slice_thickness=1.5, models=["lung-nodules", "other"], destinations=["pacs"]),
        RouteRule(name="neuro", modality=["MR"], models=["brain"]),
    ]
    result = route(rules, [CT_THIN, CT_THICK, MR], ["pacs", "archive"])
    got = {(d.rule, d.model, tuple(d.series_uids), tuple(d.destinations)) for d in result.decisions}
    assert got == {
        ("lung", "lung-nodules", ("1.2.3.1",), ("pacs",)),
        ("lung", "other", ("1.2.3.1",), ("pacs",)),
        ("neuro", "brain", ("1.2.3.3",), ("pacs", "archive")),  # no destinations listed: all of them
    }


def test_fallback_only_when_nothing_else_matched() -> None:
    rules = [
        RouteRule(name="lung", modality=["CT"], max_slice_thickness=1.5),
        RouteRule(name="catch-all", fallback=True, models=["qa"]),
    ]
    assert [d.rule for d in route(rules, [CT_THIN], []).decisions] == ["lung"]
    assert [d.rule for d in route(rules, [CT_THICK], []).decisions] == ["catch-all"]


def test_no_match_gives_a_reason_without_patient_data() -> None:
    result = route([RouteRule(name="lung", modality=["CT"])], [MR], [])
    assert not result.matched
    reason = result.skip_reason()
    assert reason.startswith("no routing rule matched")
    assert "modality MR not in ['CT']" in reason


def test_route_test_command_explains_a_study(tmp_path: Path) -> None:
    ct_series(tmp_path / "study", slices=6, size=32, slice_thickness=1.0)
    config = tmp_path / "node.toml"
    config.write_text(
        '[[routes]]\nname = "thin-chest"\nmodality = ["CT"]\nmax_slice_thickness = 1.5\nmodels = ["lung-nodules"]\n'
        '[[routes]]\nname = "mr-only"\nmodality = ["MR"]\nmodels = ["brain"]\n'
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(config), "route-test", "--json", str(tmp_path / "study")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert [(j["rule"], j["model"]) for j in out["jobs"]] == [("thin-chest", "lung-nodules")]
    assert "modality CT not in ['MR']" in next(iter(out["explanations"]["mr-only"].values()))
    # The same study sent as MR-only configuration: nothing matches, exit code 1 and a reason.
    config.write_text('[[routes]]\nname = "mr-only"\nmodality = ["MR"]\n')
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(config), "route-test", str(tmp_path / "study")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert run.returncode == 1
    assert "no routing rule matched" in run.stdout
