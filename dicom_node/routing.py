"""Routing rules: which model runs on which series of a complete study, and where results go.

Rules (``[[routes]]`` in the TOML file) match series on DICOM attributes. For each rule, the
series it matches form one job per model it names. Fallback rules apply only when no other rule
matched any series. A study that no rule matches is recorded as *skipped* with the reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dicom_node.settings import RouteRule


@dataclass(frozen=True)
class SeriesFacts:
    """What routing may look at for one series (patient-free)."""

    series_instance_uid: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    manufacturer: str | None = None
    sop_class_uids: frozenset[str] = frozenset()
    calling_ae_titles: frozenset[str] = frozenset()
    slice_count: int = 0
    slice_thickness: float | None = None


@dataclass
class RouteDecision:
    """One job to create: a rule, a model, the series it runs on, the destinations, and the
    rule's priority (``stat`` overtakes ``routine``, which overtakes ``research``)."""

    rule: str
    model: str
    series_uids: list[str]
    destinations: list[str]
    priority: str = "routine"


@dataclass
class RoutingResult:
    decisions: list[RouteDecision] = field(default_factory=list)
    explanations: dict[str, dict[str, str]] = field(default_factory=dict)
    """rule name -> series UID -> "matched" or the reason it did not match."""

    @property
    def matched(self) -> bool:
        return bool(self.decisions)

    def skip_reason(self) -> str:
        """A short, patient-free account of why nothing matched."""
        parts = []
        for rule, per_series in self.explanations.items():
            reasons = sorted(set(per_series.values()))
            parts.append(f"{rule}: {'; '.join(reasons) if reasons else 'no series'}")
        return "no routing rule matched (" + " | ".join(parts) + ")"


def _regex(pattern: str, value: str | None) -> bool:
    return value is not None and re.search(pattern, value, flags=re.IGNORECASE) is not None


def explain_match(rule: RouteRule, series: SeriesFacts) -> str | None:
    """``None`` when ``rule`` matches ``series``, else the first reason it does not."""
    if rule.modality is not None and (series.modality or "").upper() not in {
        m.upper() for m in rule.modality
    }:
        return f"modality {series.modality or 'missing'} not in {rule.modality}"
    if rule.body_part is not None and not _regex(rule.body_part, series.body_part):
        return "body part does not match"
    if rule.study_description is not None and not _regex(
        rule.study_description, series.study_description
    ):
        return "study description does not match"
    if rule.series_description is not None and not _regex(
        rule.series_description, series.series_description
    ):
        return "series description does not match"
    if rule.manufacturer is not None and not _regex(rule.manufacturer, series.manufacturer):
        return "manufacturer does not match"
    if rule.sop_class_uid is not None and not (series.sop_class_uids & set(rule.sop_class_uid)):
        return "SOP class not in the rule's list"
    if rule.calling_ae_title is not None and not (
        series.calling_ae_titles & {a.strip() for a in rule.calling_ae_title}
    ):
        return "sent by a calling AE title the rule does not list"
    if rule.min_slices is not None and series.slice_count < rule.min_slices:
        return f"{series.slice_count} slices, fewer than {rule.min_slices}"
    if rule.max_slices is not None and series.slice_count > rule.max_slices:
        return f"{series.slice_count} slices, more than {rule.max_slices}"
    if rule.min_slice_thickness is not None or rule.max_slice_thickness is not None:
        t = series.slice_thickness
        if t is None:
            return "slice thickness unknown"
        if rule.min_slice_thickness is not None and t < rule.min_slice_thickness:
            return f"slice thickness {t:g} mm below {rule.min_slice_thickness:g} mm"
        if rule.max_slice_thickness is not None and t > rule.max_slice_thickness:
            return f"slice thickness {t:g} mm above {rule.max_slice_thickness:g} mm"
    return None


def route(
    rules: list[RouteRule], series: list[SeriesFacts], all_destinations: list[str]
) -> RoutingResult:
    """Decide the jobs for a complete study."""
    result = RoutingResult()

    def apply(rule: RouteRule) -> None:
        explained: dict[str, str] = {}
        matched: list[str] = []
        for s in series:
            reason = explain_match(rule, s)
            explained[s.series_instance_uid] = reason or "matched"
            if reason is None:
                matched.append(s.series_instance_uid)
        result.explanations[rule.name] = explained
        if matched:
            destinations = list(rule.destinations) or list(all_destinations)
            for model in rule.models:
                result.decisions.append(
                    RouteDecision(
                        rule.name, model, sorted(matched), destinations, rule.priority
                    )
                )

    for rule in [r for r in rules if not r.fallback]:
        apply(rule)
    if not result.decisions:
        for rule in [r for r in rules if r.fallback]:
            apply(rule)
    return result


def facts_from_headers(
    headers: list[Any], calling_ae_titles: dict[str, set[str]] | None = None
) -> list[SeriesFacts]:
    """Series facts from pydicom datasets (used by ``dicom-node route-test``)."""
    by_series: dict[str, list[Any]] = {}
    for ds in headers:
        uid = str(ds.get("SeriesInstanceUID", ""))
        by_series.setdefault(uid, []).append(ds)
    out = []
    for uid, items in by_series.items():
        first = items[0]

        def text(keyword: str, ds: Any = first) -> str | None:
            value = ds.get(keyword)
            return str(value) if value not in (None, "") else None

        try:
            thickness = (
                float(first.get("SliceThickness"))
                if first.get("SliceThickness") not in (None, "")
                else None
            )
        except (TypeError, ValueError):
            thickness = None
        frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in items)
        out.append(
            SeriesFacts(
                series_instance_uid=uid,
                modality=text("Modality"),
                body_part=text("BodyPartExamined"),
                series_description=text("SeriesDescription"),
                study_description=text("StudyDescription"),
                manufacturer=text("Manufacturer"),
                sop_class_uids=frozenset(str(ds.get("SOPClassUID", "")) for ds in items),
                calling_ae_titles=frozenset((calling_ae_titles or {}).get(uid, set())),
                slice_count=frames,
                slice_thickness=thickness,
            )
        )
    return out
