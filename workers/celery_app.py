"""The worker's Celery app: the shared safe configuration plus the two tasks.

Tasks are thin (Celery's own advice): they carry a job id and call the pipeline, which holds
all logic and is testable without Celery: ``run_job`` the model phase
(:mod:`workers.pipeline`), ``deliver`` the delivery phase (:mod:`dicom_node.delivery.phase`). Their names are stable protocol constants.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from dicom_node.broker import DELIVER_TASK, RUN_JOB_TASK, make_celery
from dicom_node.settings import Settings
from workers.runtime import WorkerRuntime, get_runtime, set_runtime

LOGGER = logging.getLogger(__name__)


def create_worker_app(
    settings: Settings, name: str | None = None, *, delivers: bool = False
) -> Celery:
    """A Celery app with the job tasks registered and the runtime installed for this process.

    ``delivers``: this worker consumes the ``delivery`` queue (it shares the result store), so it
    delivers the results of the jobs it runs itself, at once, instead of queueing the delivery
    behind the next job."""
    set_runtime(WorkerRuntime(settings, name, delivers=delivers))
    app = make_celery(settings, name="dicom_node.worker")

    @app.task(
        name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True
    )
    def run_job(self: Any, job_id: str) -> None:
        from workers.pipeline import JobRunner

        JobRunner(get_runtime()).run(job_id)

    @app.task(
        name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True
    )
    def deliver(self: Any, job_id: str) -> None:
        from dicom_node.delivery.phase import DeliveryPhase

        runtime = get_runtime()
        DeliveryPhase(runtime.db, runtime.settings, runtime.owner_id).run(job_id)

    return app


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    with contextlib.suppress(RuntimeError):  # not started through `dicom-node worker`
        get_runtime().after_fork()


@worker_ready.connect
def _publish_models(**_: Any) -> None:
    """Record what this worker runs (``model_versions``), from a spawned process: loading the
    models here, in the process Celery forks its pool from, could initialise CUDA before a
    fork (``workers/models/registry.py``, ``publish_available``)."""
    try:
        runtime = get_runtime()
    except RuntimeError:  # not started through `dicom-node worker`
        return
    from workers.models.registry import publish_available

    proc = multiprocessing.get_context("spawn").Process(
        target=publish_available,
        args=(runtime.settings, runtime.name),
        name="publish-models",
        daemon=True,
    )
    proc.start()
    threading.Thread(target=proc.join, name="publish-models-join", daemon=True).start()
