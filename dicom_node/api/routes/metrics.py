"""``GET /metrics``: Prometheus text exposition (receiver counters + state database metrics)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from dicom_node.api.deps import User

router = APIRouter(tags=["operations"])

METRICS_DESCRIPTION = """Prometheus text format (version 0.0.4). Needs credentials like every
route but /healthz (Prometheus: `basic_auth` or `authorization` in the scrape config).

Receiver metrics, summed over all receiver processes:
`dicom_node_received_instances_total{source}`, `dicom_node_received_bytes_total{source}`,
`dicom_node_cstore_responses_total{status,outcome}`, `dicom_node_associations_total{outcome}`,
`dicom_node_associations_active`.

From the state database at scrape time: `dicom_node_jobs{state}`,
`dicom_node_queue_depth{queue,priority}`, `dicom_node_queue_oldest_job_age_seconds{queue,priority}`,
`dicom_node_outbox_records`, `dicom_node_deliveries{destination,state}`,
`dicom_node_delivery_attempts_total{destination}`, `dicom_node_delivery_failures_total{destination}`,
histograms `dicom_node_job_stage_duration_seconds{stage}`, `dicom_node_job_turnaround_seconds{model,version}`,
`dicom_node_inference_duration_seconds{model,version}`, counters
`dicom_node_jobs_finished_total{model,version,state}`,
`dicom_node_model_results_total{model,version,result}`, gauge
`dicom_node_model_positive_ratio{model,version}`, and `dicom_node_state_database_up`.

Health, for alerting (`docker/prometheus/alerts.yml`): `dicom_node_destination_up{destination}`,
`dicom_node_oldest_waiting_job_age_seconds`, `dicom_node_queue_age_seconds{priority}`,
`dicom_node_spool_free_bytes`, `dicom_node_database_free_bytes` (SQLite only), and
`dicom_node_webhooks_total{outcome}` when webhooks are configured."""


def setup(app: FastAPI) -> None:
    from dicom_node import metrics

    app.state.metrics_collector = metrics.StateCollector(app.state.db, app.state.settings)
    # Create the receiver series at zero in this process, so that they exist (and rates work)
    # before the first association arrives.
    m = metrics._receiver_metrics()
    for source in ("dimse", "stow"):
        m.instances.labels(source=source)
        m.bytes.labels(source=source)
    for outcome in ("accepted", "rejected"):
        m.associations.labels(outcome=outcome)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    description=METRICS_DESCRIPTION,
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics_page(request: Request, user: User) -> Response:
    from dicom_node import metrics

    body, content_type = metrics.render(request.app.state.metrics_collector)
    return Response(body, media_type=content_type)
