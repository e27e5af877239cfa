"""``dicom-node backfill --from SOURCE --since DATE``: pull the studies the node missed."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from dicom_node.backfill import BackfillReport


def parse_day(text: str, option: str) -> date:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` (a Study Date), or ``today``."""
    if text.strip().lower() == "today":
        return date.today()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise typer.BadParameter(f"{text!r} is not a date (YYYY-MM-DD)", param_hint=option)


def register(app: typer.Typer) -> None:
    @app.command(
        epilog=(
            "Examples:\n\n"
            "    dicom-node backfill --from pacs --since 2026-11-30 --dry-run\n\n"
            "    dicom-node backfill --from 'https://ainode:PASS@pacs:8042/dicom-web' "
            "--since 2026-11-30 --until 2026-12-01 --modality CT\n\n"
            "    dicom-node backfill --from 'dicom://ORTHANC@pacs:4242' --since today --json"
        )
    )
    def backfill(
        ctx: typer.Context,
        source: Annotated[
            str,
            typer.Option(
                "--from",
                metavar="SOURCE",
                help="A DICOMweb URL (QIDO-RS + WADO-RS), dicom://AET@host:port (C-FIND + "
                "C-MOVE to this node's AE title), or the name of a configured destination "
                "(its credentials and TLS settings are used).",
                show_default=False,
            ),
        ],
        since: Annotated[
            str,
            typer.Option(
                "--since",
                metavar="DATE",
                help="First Study Date (YYYY-MM-DD or today).",
                show_default=False,
            ),
        ],
        until: Annotated[
            str | None,
            typer.Option("--until", metavar="DATE", help="Last Study Date (default: today)."),
        ] = None,
        modality: Annotated[
            str | None,
            typer.Option(
                "--modality", metavar="MODALITY", help="Only studies with this modality, e.g. CT."
            ),
        ] = None,
        limit: Annotated[
            int,
            typer.Option(
                "--limit",
                min=1,
                max=100_000,
                help="Pull or re-run at most this many studies; run again for the rest.",
            ),
        ] = 500,
        dry_run: Annotated[
            bool,
            typer.Option("--dry-run", help="List what would be pulled or re-run; change nothing."),
        ] = False,
        no_rerun: Annotated[
            bool,
            typer.Option(
                "--no-rerun",
                help="Do not re-run studies the node already holds; list them as stale.",
            ),
        ] = False,
        json_output: Annotated[
            bool, typer.Option("--json", help="One JSON object: counts and one entry per study.")
        ] = False,
    ) -> None:
        """Pull from a PACS the studies of a Study Date window that the node has not
        processed: what a PACS should have sent while the node was down, or older studies
        for a new model.

        Each study found is looked up in the node's state database first. It is skipped when
        every instance is already here (or is one of the node's own results) and its jobs
        have finished with the model version the workers run now; skipped too while it is
        still being processed. A study the node holds but processed with another model
        version than the workers run now (as they publish it when they start), or that a
        rule or model added since routes to, is re-run from the node's copy, not pulled: new
        jobs whose results supersede the older ones in the PACS (--no-rerun: listed as
        "stale" only). Everything else is pulled through the same ingest as C-STORE and
        STOW-RS, and completes and routes as if it had been sent; at most --limit studies
        are pulled or re-run per run, and a second run skips what the first one did.

        The running node (dicom-node serve) picks the pulled studies and the re-run jobs
        up; with C-MOVE it is the node's C-STORE receiver that takes the studies, so the
        PACS must know this node's AE title, host and port.

        Prints counts and Study Instance UIDs only (no patient data). Exit code 0 when
        everything to pull came, 1 when a study failed, 2 for a usage or configuration error,
        3 when the source cannot be reached.
        """
        from dicom_node.backfill import DateWindow, SourceUnreachable, run_backfill
        from dicom_node.cli import EXIT_FAILED, EXIT_UNREACHABLE, state
        from dicom_node.state import open_database

        first = parse_day(since, "--since")
        last = parse_day(until, "--until") if until else date.today()
        if last < first:
            raise typer.BadParameter("--until is before --since", param_hint="--until")
        wanted = modality.strip().upper() if modality else None
        if wanted is not None and not (wanted.isalnum() and len(wanted) <= 16):
            raise typer.BadParameter(f"{modality!r} is not a modality", param_hint="--modality")
        settings = state(ctx).settings()
        db = open_database(settings.resolved_database_url)
        try:
            report = run_backfill(
                settings,
                db,
                source=source,
                window=DateWindow(first, last),
                modality=wanted,
                limit=limit,
                dry_run=dry_run,
                rerun=not no_rerun,
                actor="cli",
            )
        except SourceUnreachable as exc:
            typer.secho(f"error: {exc}", err=True, fg="red")
            raise typer.Exit(EXIT_UNREACHABLE) from None
        finally:
            db.dispose()
        if json_output:
            typer.echo(json.dumps(report.as_json(), sort_keys=True))
        else:
            _print(report)
        if report.unreachable:
            raise typer.Exit(EXIT_UNREACHABLE)
        if report.failed:
            raise typer.Exit(EXIT_FAILED)


def _print(report: BackfillReport) -> None:
    from dicom_node.backfill import Action

    window = f"{report.window.since.isoformat()} to {report.window.until.isoformat()}"
    typer.echo(
        f"{'dry run: ' if report.dry_run else ''}{report.source}: {len(report.planned)} "
        f"stud{'y' if len(report.planned) == 1 else 'ies'} dated {window}"
        + (f" with modality {report.modality}" if report.modality else "")
    )
    counts = report.by_action()
    typer.echo(
        f"  to pull {counts['pull']}, to re-run {counts['rerun']}, already done "
        f"{counts['done']}, in progress {counts['in-progress']}, stale (not re-run) "
        f"{counts['stale']}"
    )
    if report.deferred:
        typer.echo(f"  {report.deferred} beyond --limit {report.limit}: run again for them")
    shown = (
        report.to_pull
        if report.dry_run
        else [p for p in report.planned if p.remote.study_instance_uid in report.pulled]
    )
    for p in shown:
        uid = p.remote.study_instance_uid
        line = f"  {p.remote.study_date or '-':8}  {'/'.join(p.remote.modalities) or '-':10}  {uid}"
        if uid in report.failed:
            typer.secho(f"{line}  FAILED: {report.failed[uid]}", fg="red")
        elif uid in report.pulled:
            typer.echo(f"{line}  {report.pulled[uid].received} instance(s)")
        else:
            typer.echo(f"{line}  would pull ({p.reason})")
    for p in report.to_rerun:
        uid = p.remote.study_instance_uid
        if uid in report.reran:
            typer.echo(f"  re-run: {uid} ({p.reason}), {len(report.reran[uid])} job(s)")
        else:
            typer.echo(f"  would re-run: {uid} ({p.reason})")
    for p in report.planned:
        if p.action is Action.STALE:
            typer.echo(f"  stale: {p.remote.study_instance_uid} ({p.reason})")
    if report.unreachable:
        typer.secho(f"  stopped: {report.unreachable}", err=True, fg="red")
    elif not report.dry_run:
        done = len(report.pulled) - len(report.failed)
        typer.echo(
            f"  pulled {done} stud{'y' if done == 1 else 'ies'} ({report.instances} instances) "
            f"in {report.seconds:.1f} s; the node completes and routes them as if sent"
        )
