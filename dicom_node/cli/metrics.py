"""``dicom-node metrics``: the ``/metrics`` page without HTTP (scripts, node_exporter textfiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def metrics(
        ctx: typer.Context,
        json_output: Annotated[
            bool, typer.Option("--json", help="One JSON object per sample instead of Prometheus text.")
        ] = False,
        textfile: Annotated[
            Path | None,
            typer.Option(
                "--textfile",
                help="Write the Prometheus text to this file atomically (node_exporter's textfile "
                "collector reads *.prom files) instead of printing it.",
                dir_okay=False,
            ),
        ] = None,
    ) -> None:
        """Print the node's metrics: job metrics from the state database, plus the receiver
        counters of the node running on this data directory (when one is running).

        The same names as ``GET /metrics`` (see the API docs). Exit code 0, or 3 when the state
        database cannot be reached (the output then says dicom_node_state_database_up 0).
        """
        import json
        import os

        from prometheus_client.parser import text_string_to_metric_families

        from dicom_node import metrics as node_metrics
        from dicom_node.cli import EXIT_UNREACHABLE, state
        from dicom_node.state import Database

        settings = state(ctx).settings()
        db = Database(settings.resolved_database_url)
        try:
            body, _ = node_metrics.render(
                node_metrics.StateCollector(db, settings),
                receiver_dir=node_metrics.live_run_dir(settings.data_dir),
                this_process=False,
            )
        finally:
            db.dispose()
        text = body.decode()
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        up = next((s.value for s in samples if s.name == "dicom_node_state_database_up"), 0.0)
        if textfile is not None:
            tmp = textfile.with_name(f".{textfile.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(textfile)
        elif json_output:
            for s in samples:
                typer.echo(json.dumps({"name": s.name, "labels": s.labels, "value": s.value}))
        else:
            typer.echo(text, nl=False)
        if not up:
            typer.secho("error: the state database cannot be reached", err=True, fg="red")
            raise typer.Exit(EXIT_UNREACHABLE)
