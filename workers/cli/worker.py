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
                help=(
                    "Comma-separated queues to consume (default: worker.queues, plus 'delivery' "
                    "when this worker shares the node's result store)."
                ),
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
        """Run a worker that executes jobs: load the study, run the model, encode SR + SEG and
        put them in the node's result store; a worker on the node's host also delivers them
        (queue 'delivery'). Start one per machine (one per GPU with `-Q gpu -c 1`); all workers
        share the broker (DICOM_NODE_BROKER_URL) and the state database (DICOM_NODE_DATABASE_URL).
        Stops gracefully on SIGTERM (a running job finishes or is re-queued).
        """
        from dicom_node.broker import DELIVERY_QUEUE
        from dicom_node.cli import state
        from dicom_node.errors import ConfigError
        from dicom_node.logs import setup_logging
        from workers.celery_app import create_worker_app
        from workers.storage import results_mode

        settings = state(ctx).settings()
        setup_logging(settings.log)
        local = results_mode(settings) == "local"
        if queues is None:
            wanted = {*settings.worker.queues, *([DELIVERY_QUEUE] if local else [])}
            queues = ",".join(sorted(wanted))
        elif not local and DELIVERY_QUEUE in queues.split(","):
            # Delivery reads the central result store; this worker puts its results to the node
            # and has no copy that outlives it.
            raise ConfigError(
                f"--queues: queue {DELIVERY_QUEUE!r} is consumed on the node's host (where the "
                "result store is); this worker puts its results to the node (worker.results = "
                "node, the default when inputs come over WADO-RS)"
            )
        queue_list = queues
        host = name or socket.gethostname()
        celery = create_worker_app(
            settings, name=host, delivers=DELIVERY_QUEUE in queue_list.split(",")
        )
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
