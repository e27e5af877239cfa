"""``dicom-node audit``: read the audit trail."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer


def _when(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            "give an ISO date or date/time, e.g. 2026-12-01 or 2026-12-01T08:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def register(app: typer.Typer) -> None:
    @app.command()
    def audit(
        ctx: typer.Context,
        since: Annotated[
            str | None,
            typer.Option(
                "--since",
                metavar="WHEN",
                help="Records at or after this time (ISO date or date/time; UTC if no zone).",
            ),
        ] = None,
        event: Annotated[
            str | None, typer.Option("--event", metavar="NAME", help="Only this event.")
        ] = None,
        limit: Annotated[
            int, typer.Option("--limit", metavar="N", min=1, max=10000, help="Most records.")
        ] = 100,
        json_output: Annotated[
            bool, typer.Option("--json", help="One JSON object per line instead of a table.")
        ] = False,
    ) -> None:
        """Show the audit trail from the state database, oldest first: who did what, when,
        with which outcome (logins, reads of patient data, job actions, associations, ...).

        Without --since, the latest --limit records. Works against the node's database
        (DICOM_NODE_DATABASE_URL or the data directory), like `jobs`. Reading the trail is
        itself recorded (event audit-read, actor cli).
        """
        from rich.console import Console
        from rich.table import Table

        from dicom_node import audit as trail
        from dicom_node.cli import state
        from dicom_node.state import open_database

        moment = _when(since) if since else None
        settings = state(ctx).settings()
        db = open_database(settings.resolved_database_url)
        events = trail.read_events(db, since=moment, event=event, limit=limit)
        trail.record(db, trail.AUDIT_READ, actor="cli", via="cli", records=len(events))
        if json_output:
            for item in events:
                typer.echo(json.dumps(item, sort_keys=True))
            return
        table = Table(title=f"audit ({len(events)})", expand=True)
        for name, ratio in (("at (UTC)", 2), ("event", 2), ("actor", 3), ("outcome", 1)):
            table.add_column(name, ratio=ratio, overflow="fold")
        table.add_column("detail", ratio=4, overflow="fold")
        for item in events:
            at = (item["at"] or "")[:19].replace("T", " ")
            keys = {"study": item["study_key"], "job": item["job_id"]}
            detail = {k: v for k, v in keys.items() if v} | item["detail"]
            table.add_row(
                at,
                item["event"],
                item["actor"] or "-",
                item["outcome"],
                " ".join(f"{k}={v}" for k, v in detail.items()),
            )
        Console().print(table)
