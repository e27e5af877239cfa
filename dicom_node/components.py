"""Which background parts ``dicom-node serve`` runs next to the receivers."""

from __future__ import annotations

from typing import Any

from dicom_node.settings import Settings
from dicom_node.state import open_database


def build_components(settings: Settings, service: Any) -> list[Any]:
    """Components with ``start()``/``stop()``, started in order and stopped in reverse."""
    from dicom_node.embedded import EmbeddedWorkers
    from dicom_node.loop import PipelineLoop

    db = open_database(settings.resolved_database_url)
    components: list[Any] = [PipelineLoop(settings, db)]
    if settings.probes.interval_s and settings.all_destinations():
        from dicom_node.delivery.probe import Prober

        components.append(Prober(settings, db))
    if settings.alerts.webhooks:
        from dicom_node.alerts.monitor import AlertMonitor

        components.append(AlertMonitor(settings, db))
    if settings.retention.interval_s:
        from dicom_node.retention import RetentionSweeper

        components.append(RetentionSweeper(settings, db))
    if any(p.enabled for p in settings.pull):
        from dicom_node.backfill.schedule import PullScheduler

        components.append(PullScheduler(settings, db))
    if settings.http_port:
        from dicom_node.api.server import HttpServer

        components.append(HttpServer(settings, db))
    if settings.embedded_worker_count:
        supervisor = service if hasattr(service, "part_restarted") else None
        components.append(
            EmbeddedWorkers(settings, getattr(service, "config_path", None), supervisor)
        )
    return components
