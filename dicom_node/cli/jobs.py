"""``dicom-node jobs``: list jobs, show one, retry or cancel."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def jobs(
        ctx: typer.Context,
        job_id: Annotated[str | None, typer.Argument(help="Show one job in detail.")] = None,
        state_filter: Annotated[
            str | None, typer.Option("--state", help="Only jobs in this state.")
        ] = None,
        model: Annotated[str | None, typer.Option(help="Only jobs of this model.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
        json_output: Annotated[
            bool, typer.Option("--json", help="JSON instead of a table.")
        ] = False,
        retry: Annotated[
            bool, typer.Option("--retry", help="Run the given finished job again.")
        ] = False,
        cancel: Annotated[
            bool, typer.Option("--cancel", help="Cancel the given unfinished job.")
        ] = False,
    ) -> None:
        """Show jobs from the state database: state, study key, model, attempts, timings, errors.

        Works against the node's database (DICOM_NODE_DATABASE_URL or the data directory), so it
        answers even when no worker or broker is running. Exit code 1 if a given job id does not
        exist or --retry/--cancel could not be applied.
        """
        from rich.console import Console
        from rich.table import Table

        from dicom_node import audit
        from dicom_node import jobs as jobstate
        from dicom_node.api import job_views as views
        from dicom_node.cli import EXIT_FAILED, state
        from dicom_node.state import open_database

        settings = state(ctx).settings()
        db = open_database(settings.resolved_database_url)
        if job_id and (retry or cancel):
            done = jobstate.retry(db, job_id) if retry else jobstate.cancel(db, job_id)
            action = "retry" if retry else "cancel"
            audit.record(
                db,
                audit.HTTP_ACTION,
                actor="cli",
                outcome="success" if done else "failure",
                job_id=job_id,
                action=action,
            )
            typer.echo(f"{action}: {'ok' if done else 'not applicable to this job'}")
            raise typer.Exit(0 if done else EXIT_FAILED)
        with db.session() as s:
            if job_id:
                view = views.get_job(s, job_id)
                if view is None:
                    typer.secho(f"no job {job_id}", err=True, fg="red")
                    raise typer.Exit(EXIT_FAILED)
                typer.echo(json.dumps(view, indent=2))
                return
            items = views.list_jobs(s, state=state_filter, model=model, limit=limit)
        if json_output:
            typer.echo(json.dumps(items, indent=2))
            return
        table = Table(title=f"jobs ({len(items)})")
        for col in (
            "job",
            "state",
            "study",
            "v",
            "model",
            "attempts",
            "created",
            "took (s)",
            "findings",
            "reason",
        ):
            table.add_column(col)
        for j in items:
            took = sum(v for v in (j["timings"] or {}).values() if isinstance(v, int | float))
            table.add_row(
                j["id"][:8],
                j["state"],
                j["study"]["key"][:10],
                str(j["study"]["version"]),
                f"{j['model']} {j['model_version'] or ''}".strip(),
                f"{j['attempts']}/{j['max_attempts']}",
                (j["created_at"] or "")[:19],
                f"{took:.1f}" if took else "",
                "" if j["findings"] is None else str(j["findings"]),
                (j["reason"] or "")[:60],
            )
        Console().print(table)
