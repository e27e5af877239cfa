"""The configuration views (admin): destinations with their last probe and delivery state,
routing rules and models — ``GET /destinations`` (dashboard page) and ``GET /api/destinations``
(the same as JSON).

Everything comes from the settings and the state database: the edge never imports
``workers``, so a model is described by its settings, its model card when it is a model folder
(name, version, weights SHA-256, validated input range; read as text, no weights loaded) and
the version the last jobs recorded. Secrets are masked: a password in a URL shows as ``***``,
a bearer token only as "set".
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from dicom_node.api.deps import Admin, DatabaseDep, SettingsDep
from dicom_node.delivery.probe import describe_target, last_probes, mask_url
from dicom_node.model_catalog import bundle_folder, describe_model
from dicom_node.settings import ModelSettings, RouteRule, Settings
from dicom_node.state import Database, Delivery, Job

router = APIRouter(tags=["configuration"])

CARD_NAMES = ("model.toml", "model.json")
"""Model card files read here (YAML cards are shown from their settings only: no YAML parser
on the edge just for this page)."""

MATCH_KEYS = (
    "modality",
    "body_part",
    "study_description",
    "series_description",
    "manufacturer",
    "sop_class_uid",
    "calling_ae_title",
    "min_slices",
    "max_slices",
    "min_slice_thickness",
    "max_slice_thickness",
)
"""The rule fields that select series, in the order the page lists them."""


def _delivery_states(db: Database) -> dict[str, dict[str, Any]]:
    """Per destination: counts of deliveries by state and the newest delivery's outcome."""
    out: dict[str, dict[str, Any]] = {}
    with db.session() as s:
        for name, state, count in s.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(
                Delivery.destination, Delivery.state
            )
        ):
            out.setdefault(name, {"counts": {}})["counts"][state] = int(count)
        newest = (
            select(Delivery.destination, func.max(Delivery.id).label("id"))
            .group_by(Delivery.destination)
            .subquery()
        )
        for d in s.scalars(select(Delivery).join(newest, newest.c.id == Delivery.id)):
            out.setdefault(d.destination, {"counts": {}})["last"] = {
                "state": d.state,
                "attempts": d.attempts,
                "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
                "error": d.last_error,
            }
    return out


def destination_views(settings: Settings, db: Database) -> list[dict[str, Any]]:
    """Each configured destination: where it is (secrets masked), its last probe and its
    delivery state."""
    probes = last_probes(db)
    deliveries = _delivery_states(db)
    views = []
    for name, cfg in sorted(settings.all_destinations().items()):
        method, target = describe_target(cfg)
        views.append(
            {
                "name": name,
                "method": method,
                "url": mask_url(cfg.url),
                "target": target,
                "token": "set" if cfg.token is not None else None,
                "tls": cfg.tls.enabled if method == "C-ECHO" else cfg.url.startswith("https"),
                "verify_tls": str(cfg.verify_tls),
                "read_back": cfg.read_back,
                "probe": probes.get(name),
                "deliveries": deliveries.get(name, {"counts": {}}),
            }
        )
    return views


def rule_view(rule: RouteRule) -> dict[str, Any]:
    """A routing rule: what it matches, what it runs, where results go, its priority."""
    match = {k: getattr(rule, k) for k in MATCH_KEYS if getattr(rule, k) is not None}
    return {
        "name": rule.name,
        "match": match,
        "models": list(rule.models),
        "destinations": list(rule.destinations) or ["(all)"],
        "priority": rule.priority,
        "fallback": rule.fallback,
    }


def read_card(folder: Path) -> dict[str, Any] | None:
    """The identifying parts of a model folder's card (TOML or JSON), or None."""
    for card_name in CARD_NAMES:
        path = folder / card_name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError):
            return {"error": f"{card_name} cannot be read"}
        if not isinstance(data, dict):
            return {"error": f"{card_name} is not a mapping"}
        keys = ("name", "version", "sha256", "validated_input", "licence", "intended_use")
        return {k: data.get(k) for k in keys if k in data}
    return None


def model_views(settings: Settings, db: Database) -> list[dict[str, Any]]:
    """Every model the settings name (``[models.*]`` and the rules' models): its source, queue
    and device, its card when it is a model folder, and what the jobs recorded."""
    names = set(settings.models)
    for rule in settings.effective_routes():
        names.update(rule.models)
    with db.session() as s:
        recorded: dict[str, dict[str, Any]] = {}
        for model, version, count, last in s.execute(
            select(Job.model, Job.model_version, func.count(), func.max(Job.finished_at))
            .where(Job.model_version.is_not(None))
            .group_by(Job.model, Job.model_version)
        ):
            seen = recorded.setdefault(model, {"versions": {}, "last": None})
            seen["versions"][version] = int(count)
            if last is not None and (seen["last"] is None or last > seen["last"][1]):
                seen["last"] = (version, last)
    views = []
    for name in sorted(names):
        cfg = settings.models.get(name) or ModelSettings()
        card = read_card(cfg.path) if cfg.path is not None else None
        if bundle_folder(cfg) is not None:
            bundle = describe_model(name, cfg)
            source = bundle["source"]
            card = {
                "version": bundle["version"],
                "error": bundle["error"],
                "licence": bundle["licence"],
                "intended_use": bundle["intended_use"],
                "validated_input": bundle["accepts"],
            }
        elif cfg.path is not None:
            source = f"model folder {cfg.path}"
        elif cfg.plugin is not None:
            source = f"plug-in {cfg.plugin}"
        else:
            source = "entry point (built in or installed)"
        seen = recorded.get(name, {"versions": {}, "last": None})
        views.append(
            {
                "name": name,
                "source": source,
                "queue": cfg.queue or "cpu",
                "device": cfg.device,
                "threshold": cfg.threshold,
                "card": card,
                "last_version": seen["last"][0] if seen["last"] else None,
                "versions": seen["versions"],
            }
        )
    return views


def configuration(settings: Settings, db: Database) -> dict[str, Any]:
    """Everything the Destinations page shows, as JSON (secrets masked)."""
    return {
        "destinations": destination_views(settings, db),
        "probe_interval_s": settings.probes.interval_s,
        "routes": [rule_view(r) for r in settings.effective_routes()],
        "models": model_views(settings, db),
    }


@router.get("/api/destinations", summary="Destinations, routing rules and models (admin)")
def destinations_json(user: Admin, db: DatabaseDep, settings: SettingsDep) -> dict[str, Any]:
    """Each destination with its last probe and delivery state, the routing rules and the
    models, from the settings and the state database; secrets masked."""
    # roles: admin only (configuration views, issue 20).
    return configuration(settings, db)


@router.get("/destinations", include_in_schema=False)
def destinations_page(
    request: Request, user: Admin, db: DatabaseDep, settings: SettingsDep
) -> Response:
    """The dashboard's Destinations page (the same content as ``/api/destinations``)."""
    # roles: admin only (configuration views, issue 20).
    from dicom_node.api.routes.dashboard import REFRESH_SECONDS

    context = configuration(settings, db)
    context.update(user=user, refresh_seconds=REFRESH_SECONDS)
    return request.app.state.templates.TemplateResponse(request, "destinations.html", context)
