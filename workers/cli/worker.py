"""``dicom-node worker``: a Celery worker consuming job queues."""

from __future__ import annotations

import socket
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def worker(
        ctx: typer.Context,
        queues: Annotated[
            str | None,
            typer.Option(
                "--queues",
                "-Q",
                help="Comma-separated queues to consume (default: worker.queues plus 'delivery').",
            ),
        ] = None,
        concurrency: Annotated[
            int | None,
            typer.Option(
                "--concurrency", "-c", min=1, help="Child processes (default: worker.concurrency)."
            ),
        ] = None,
        name: Annotated[
            str | None, typer.Option(help="Worker name (default: the host name).")
        ] = None,
        pool: Annotated[
            str, typer.Option(help="Celery pool: prefork (default) or solo.")
        ] = "prefork",
    ) -> None:
        """Run a worker that executes jobs: load the study, run the model, encode SR + SEG,
        deliver them. Start one per machine (one per GPU with `-Q gpu -c 1`); all workers share
        the broker (DICOM_NODE_BROKER_URL) and the state database (DICOM_NODE_DATABASE_URL).
        Stops gracefully on SIGTERM (a running job finishes or is re-queued).
        """
        from dicom_node.cli import state
        from dicom_node.logs import setup_logging
        from workers.celery_app import create_worker_app

        settings = state(ctx).settings()
        setup_logging(settings.log)
        queue_list = queues or ",".join(sorted({*settings.worker.queues, "delivery"}))
        host = name or socket.gethostname()
        celery = create_worker_app(settings, name=host)
        argv = [
            "worker",
            "--queues",
            queue_list,
            "--concurrency",
            str(concurrency or settings.worker.concurrency),
            "--hostname",
            f"{host}@%h",
            "--pool",
            pool,
            "--loglevel",
            settings.log.level,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        celery.worker_main(argv=argv)
