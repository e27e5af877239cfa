"""``dicom-node route-test``: which routing rule a study would hit, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("route-test")
    def route_test(
        ctx: typer.Context,
        paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders of one study.")],
        calling_aet: Annotated[
            str | None,
            typer.Option("--calling-aet", help="Pretend the study came from this AE title."),
        ] = None,
        json_output: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Evaluate the configured routing rules against files without sending them: prints the
        jobs that would be created (rule, model, series, destinations) and, per rule and series,
        why it matched or not. Exit code 1 when no rule matches."""
        import json

        from pydicom import dcmread
        from rich.console import Console
        from rich.table import Table

        from dicom_node.cli import EXIT_FAILED, state
        from dicom_node.routing import facts_from_headers, route
        from dicom_node.scu import collect_files

        settings = state(ctx).settings()
        files, _ = collect_files(paths)
        if not files:
            typer.secho("no DICOM files found", err=True, fg="red")
            raise typer.Exit(2)
        headers = [dcmread(f.path, stop_before_pixels=True) for f in files]
        callers = None
        if calling_aet:
            callers = {str(h.get("SeriesInstanceUID", "")): {calling_aet} for h in headers}
        facts = facts_from_headers(headers, callers)
        result = route(settings.effective_routes(), facts, list(settings.all_destinations()))
        labels = {
            f.series_instance_uid: f"{f.modality or '?'} {f.series_description or ''} ({f.slice_count} images)".strip()
            for f in facts
        }
        if json_output:
            typer.echo(
                json.dumps(
                    {
                        "jobs": [d.__dict__ for d in result.decisions],
                        "explanations": result.explanations,
                        "matched": result.matched,
                    },
                    indent=2,
                )
            )
        else:
            console = Console()
            table = Table(title="rule evaluation")
            table.add_column("rule")
            table.add_column("series")
            table.add_column("result")
            for rule, per_series in result.explanations.items():
                for uid, why in per_series.items():
                    table.add_row(rule, labels.get(uid, uid), why)
            console.print(table)
            if result.decisions:
                for d in result.decisions:
                    console.print(
                        f"job: rule [bold]{d.rule}[/bold] runs model [bold]{d.model}[/bold] on {len(d.series_uids)} series"
                        f" -> destinations: {', '.join(d.destinations) or '(none configured)'}"
                        f", priority {d.priority}"
                    )
            else:
                console.print(f"[yellow]skipped[/yellow]: {result.skip_reason()}")
        if not result.matched:
            raise typer.Exit(EXIT_FAILED)
