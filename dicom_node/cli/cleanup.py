"""``dicom-node cleanup``: one retention sweep (:mod:`dicom_node.retention`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from dicom_node.retention import SweepReport
    from dicom_node.settings import Settings


def register(app: typer.Typer) -> None:
    @app.command()
    def cleanup(
        ctx: typer.Context,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
        ] = False,
        json_output: Annotated[
            bool, typer.Option("--json", help="One JSON object (counts and bytes).")
        ] = False,
    ) -> None:
        """Remove received instances and result files by the [retention] settings: past their
        age, or, while the spool's file system is above its high watermark, oldest first down
        to the low watermark. Never an instance of a study with a job not yet finished, nor a
        result not yet delivered to every destination; the database rows stay, marked purged.

        Prints counts and bytes only (no patient data). Runs beside a running node (which
        sweeps on its own every retention.interval_s). Exit code 1 when the disk is still
        above its high watermark afterwards (nothing more was allowed to go).
        """
        from dicom_node.cli import EXIT_FAILED, state
        from dicom_node.retention import sweep
        from dicom_node.state import open_database

        settings = state(ctx).settings()
        db = open_database(settings.resolved_database_url)
        try:
            report = sweep(db, settings, dry_run=dry_run, actor="cli")
        finally:
            db.dispose()
        if json_output:
            typer.echo(json.dumps(report.as_json(), sort_keys=True))
        else:
            _print(report, settings)
        if report.pressure and not report.relieved:
            raise typer.Exit(EXIT_FAILED)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _print(report: SweepReport, settings: Settings) -> None:
    verb = "would remove" if report.dry_run else "removed"
    typer.echo(
        f"{'dry run: ' if report.dry_run else ''}{verb} the instances of {report.studies} "
        f"stud{'y' if report.studies == 1 else 'ies'} ({report.instances} files, "
        f"{_size(report.instance_bytes)}) and the results of {report.jobs} "
        f"job{'' if report.jobs == 1 else 's'} ({report.results} files, "
        f"{_size(report.result_bytes)})"
    )
    if report.by_state:
        by_state = ", ".join(f"{k} {v}" for k, v in sorted(report.by_state.items()))
        typer.echo(f"  studies by their jobs' outcome: {by_state}")
    typer.echo(
        f"  past their age limit: {report.by_age}; early, for disk space: {report.by_pressure}"
    )
    if report.used_percent_before is not None:
        r = settings.retention
        typer.echo(
            f"  spool file system: {report.used_percent_before:.1f}% used before, "
            f"{report.used_percent_after or 0.0:.1f}% after (high watermark "
            f"{r.high_watermark_percent:g}%, low {r.low_watermark_percent:g}%)"
        )
    if report.pressure and not report.relieved:
        typer.secho(
            "  still above the high watermark: what is left belongs to unfinished jobs or "
            "undelivered results",
            fg="red",
        )
    if report.errors:
        typer.secho(f"  {report.errors} file(s) could not be removed (see the log)", fg="yellow")
