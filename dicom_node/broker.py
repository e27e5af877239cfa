"""The Celery configuration shared by the edge (producer) and the workers (consumers).

Celery gives neither exactly-once nor no-loss (Celery's documentation, "Redis: caveats": an
unacknowledged message is redelivered after the visibility timeout, and a message Redis loses is
gone): the state database is the source of truth, messages carry a job id only, and the
reconciler re-sends what got lost. This module only makes the transport behave as well as it can:

* ``acks_late`` + ``reject_on_worker_lost``: a killed child's message goes back to the queue;
* prefetch 1: a worker holds only the task it runs;
* visibility timeout well above the task time limit (Redis redelivers unacked messages after it);
* JSON only (never pickle), no result backend (job state lives in our database);
* stable task names and one queue per model class, so GPU workers can consume only their queue;
* message priorities (:data:`PRIORITY_STEPS`): a ``stat`` job's message is taken before the
  ``routine`` ones already waiting in its queue, a ``routine`` one before ``research``.

With ``DICOM_NODE_BROKER_URL`` unset the broker is kombu's SQLAlchemy transport on a SQLite file
in the data directory: a real broker that needs no server.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from dicom_node.settings import Settings

RUN_JOB_TASK = "dicom_node.run_job"
"""Stable task names: part of the message protocol, never renamed."""
DELIVER_TASK = "dicom_node.deliver"

PRIORITY_STEPS = [0, 3, 6]
"""Redis keeps one list per queue and step (``cpu``, then ``cpu`` + kombu's separator ``"\\x06\\x16"`` + ``3``, and + ``6``) and a worker pops
them in this order, so the lowest number wins (kombu's Redis transport: 0 is the highest
priority). Messages without a priority land in step 0, as before priorities existed."""

CELERY_PRIORITY = {"stat": 0, "routine": 3, "research": 6}
"""Job priority (route key ``priority``) -> the Celery message priority on Redis."""

DEFAULT_QUEUE = "cpu"
DELIVERY_QUEUE = "delivery"
"""Write-back runs on its own queue so a slow PACS never holds a GPU worker."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """The safe Celery configuration for these settings."""
    time_limit = settings.worker.task_time_limit
    visibility = int(2 * time_limit + 600)
    transport: dict[str, Any] = {}
    if settings.embedded_broker:
        transport = {}
    else:
        transport = {
            "visibility_timeout": visibility,
            "socket_keepalive": True,
            "health_check_interval": 25,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            # Priority lists per queue. Across queues (a worker on `cpu` and `delivery`) kombu
            # pops every queue's step 0 before any step 3, so the default round-robin queue
            # order is kept: "priority" order would starve `delivery` behind `cpu`.
            # kombu's default separator is kept: it also separates the fields of Redis's
            # binding tables, and a client with another one (`celery inspect ping`, the
            # container healthcheck) could not read them (ValueError in every reply).
            "priority_steps": PRIORITY_STEPS,
        }
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_connection_timeout": 5,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker.concurrency,
        "worker_max_tasks_per_child": 200,
        "task_time_limit": time_limit,
        "task_soft_time_limit": max(time_limit - 60, time_limit * 0.9),
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": 30.0,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "task_send_sent_event": False,
        "worker_send_task_events": False,
        "event_queue_expires": 60,
        "broker_pool_limit": 4,
        "enable_utc": True,
    }


def make_celery(settings: Settings, name: str = "dicom_node") -> Celery:
    """A Celery app configured for ``settings`` (tasks are registered by ``workers``)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def publish_job(
    app: Celery,
    task: str,
    job_id: str,
    *,
    queue: str,
    task_id: str,
    priority: str | None = None,
) -> None:
    """Send one job message. Raises on broker errors instead of retrying (the outbox retries).

    The message holds the job id only: no patient data, no UIDs. ``priority`` (``stat``,
    ``routine``, ``research``; None: ``routine``) becomes the message priority. The embedded
    broker (kombu's SQLAlchemy transport) ignores it; there the dispatcher's order (stat
    first) is all there is.
    """
    app.send_task(
        task,
        args=[job_id],
        queue=queue,
        task_id=task_id,
        retry=False,
        argsrepr="(job)",
        priority=CELERY_PRIORITY.get(priority or "routine", CELERY_PRIORITY["routine"]),
    )
