"""``dicom-node jobs``: list jobs, find a study's jobs, show one, retry or cancel.

The table is made for an 80-column terminal: the columns an operator reads first come first
(state, job, model, created, findings), ids are the shortest prefix that is unique in the list
(at least :data:`MIN_ID_LENGTH` characters; ``dicom-node jobs PREFIX`` accepts it), and long
values wrap instead of being cut with an ellipsis. The Study Instance UIDs, too long for a
column, are listed under the table by study key, and so are the failure reasons when the
terminal leaves no room for them (under about 100 columns).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from rich.table import Table

MIN_ID_LENGTH = 8
"""Shortest id prefix the table prints (a job id's first group; a study key's first 8 hex)."""


def short_ids(ids: Iterable[str], minimum: int = MIN_ID_LENGTH) -> int:
    """The shortest prefix length, at least ``minimum``, that tells all ``ids`` apart (one
    length for the whole column, so it stays aligned).

    >>> short_ids(["abcdefgh-1", "abcdefgh-2", "zz"])
    10
    >>> short_ids(["0123456789", "1123456789"])
    8
    """
    distinct = set(ids)
    longest = max((len(i) for i in distinct), default=0)
    length = minimum
    while length < longest and len({i[:length] for i in distinct}) < len(distinct):
        length += 1
    return length


REASON_MIN_WIDTH = 24
"""Narrower than this, the reasons go under the table (by job) instead of in a column."""

MODEL_MAX_WIDTH = 24
"""The model column's width when the reason column takes the rest (a longer name wraps)."""

_COLUMNS: tuple[tuple[str, Literal["left", "right"], int], ...] = (
    # name, justification, narrowest width (a value wraps at spaces, and folds below that)
    ("state", "left", len("delivering")),
    ("job", "left", MIN_ID_LENGTH),
    ("model", "left", len("lung-nodules")),
    ("created", "left", len("2026-12-06")),  # UTC (the title says so); time under the date
    ("findings", "right", len("findings")),
    ("study", "left", MIN_ID_LENGTH),
    ("tries", "right", len("tries")),
    ("took s", "right", len("took s")),
)


def jobs_table(
    items: list[dict[str, Any]], title: str, width: int
) -> tuple[Table, dict[str, str], dict[str, str]]:
    """The job list as a rich table for a terminal ``width`` columns wide; the Study Instance
    UIDs by short study key; and, when the reason column would be too narrow to read, the
    reasons by short job id (printed under the table)."""
    from rich.table import Table

    job_len = short_ids(j["id"] for j in items)
    study_len = short_ids(j["study"]["key"] for j in items)
    # No borders, one space between columns: 80 columns hold every column but the reason.
    table = Table(
        title=title,
        box=None,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="bold underline",
        title_justify="left",
    )
    minimums = {"job": job_len, "study": study_len}
    fixed = 0
    for name, _justify, narrowest in _COLUMNS:
        if name == "model":
            continue
        fixed += max(narrowest, minimums.get(name, 0)) + 1
    models = [f"{j['model']} {j['model_version'] or ''}".strip() for j in items]
    model_width = min(MODEL_MAX_WIDTH, max([len("lung-nodules"), *(len(m) for m in models)]))
    inline_reason = width - fixed - model_width - 1 >= REASON_MIN_WIDTH
    for name, justify, narrowest in _COLUMNS:
        # Fixed widths (rich would otherwise widen a column to its longest value and push the
        # last ones off the edge); the model (or the reason, when it fits) takes what is left.
        # Every column wraps at spaces and folds a longer word: no ellipsis.
        if name == "model":
            if inline_reason:
                table.add_column(name, width=model_width, overflow="fold")
            else:
                table.add_column(name, min_width=narrowest, ratio=1, overflow="fold")
            continue
        table.add_column(
            name,
            justify=justify,
            width=max(narrowest, minimums.get(name, 0)),
            overflow="fold",
            no_wrap=False,
        )
    if inline_reason:
        table.add_column("reason", ratio=1, overflow="fold", no_wrap=False)
    uids: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for j, model in zip(items, models, strict=True):
        took = sum(v for v in (j["timings"] or {}).values() if isinstance(v, int | float))
        study_key = j["study"]["key"][:study_len]
        short_id = j["id"][:job_len]
        if j["study"].get("study_instance_uid"):
            uids[study_key] = j["study"]["study_instance_uid"]
        if j["reason"] and not inline_reason:
            reasons[short_id] = j["reason"]
        priority = j.get("priority") or "routine"
        row = [
            # A stat or research job says so under its state (the cell wraps at the space):
            # no extra column at 80, and the usual case, routine, stays quiet.
            j["state"] if priority == "routine" else f"{j['state']} {priority}",
            short_id,
            model,
            (j["created_at"] or "")[:19].replace("T", " "),
            "" if j["findings"] is None else str(j["findings"]),
            f"{study_key} v{j['study']['version']}",
            f"{j['attempts']}/{j['max_attempts']}",
            f"{took:.1f}" if took else "",
        ]
        table.add_row(*row, *([j["reason"] or ""] if inline_reason else []))
    return table, uids, reasons


def print_jobs(items: list[dict[str, Any]], title: str) -> None:
    """Print the table, then the reasons that did not fit in it and each study's UID."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table, uids, reasons = jobs_table(items, title, console.width)
    console.print(table)
    for heading, rows in (("Reasons", reasons), ("Study Instance UIDs", uids)):
        if rows:
            console.print(heading, style="bold")
            legend = Table.grid(padding=(0, 2, 0, 0))  # a hanging indent for wrapped values
            legend.add_column(no_wrap=True)
            legend.add_column(overflow="fold")
            for key, text in rows.items():
                legend.add_row(f"  {key}", text)
            console.print(legend, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def jobs(
        ctx: typer.Context,
        job_id: Annotated[
            str | None, typer.Argument(help="Show one job in detail (its id or a unique prefix).")
        ] = None,
        state_filter: Annotated[
            str | None, typer.Option("--state", metavar="STATE", help="Only jobs in this state.")
        ] = None,
        model: Annotated[
            str | None, typer.Option(metavar="NAME", help="Only jobs of this model.")
        ] = None,
        study: Annotated[
            str | None,
            typer.Option(
                "--study",
                metavar="UID",
                help="Only the jobs of the study with this Study Instance UID.",
            ),
        ] = None,
        accession: Annotated[
            str | None,
            typer.Option(
                "--accession",
                metavar="NUMBER",
                help="Only the jobs of studies with this accession number.",
            ),
        ] = None,
        patient: Annotated[
            str | None,
            typer.Option(
                "--patient", metavar="ID", help="Only the jobs of studies of this patient ID."
            ),
        ] = None,
        limit: Annotated[
            int, typer.Option(min=1, max=10000, metavar="N", help="At most N jobs, newest first.")
        ] = 50,
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
        """Show jobs from the state database: state, model, findings, study, attempts, timings,
        errors; or the jobs of one study, found by --study, --accession or --patient (exact
        match; audited, without the identifier).

        Works against the node's database (DICOM_NODE_DATABASE_URL or the data directory), so it
        answers even when no worker or broker is running. Exit code 1 if a given job id does not
        exist or --retry/--cancel could not be applied.
        """
        from dicom_node import audit
        from dicom_node import jobs as jobstate
        from dicom_node.api import job_views as views
        from dicom_node.cli import EXIT_FAILED, state
        from dicom_node.state import open_database
        from dicom_node.study_lookup import LookupKind

        lookups = [
            (kind, value)
            for kind, value in (
                (LookupKind.STUDY_INSTANCE_UID, study),
                (LookupKind.ACCESSION_NUMBER, accession),
                (LookupKind.PATIENT_ID, patient),
            )
            if value is not None
        ]
        if len(lookups) > 1 or (lookups and job_id):
            raise typer.BadParameter(
                "give at most one of --study, --accession and --patient, and no job id with it"
            )
        if lookups and not lookups[0][1].strip(" \x00"):
            raise typer.BadParameter(f"the {lookups[0][0].value} to find is empty")

        settings = state(ctx).settings()
        db = open_database(settings.resolved_database_url)
        if job_id:
            with db.session() as s:
                resolved = views.resolve_job_id(s, job_id)
            if resolved is None:
                typer.secho(f"no job {job_id} (or the prefix is not unique)", err=True, fg="red")
                raise typer.Exit(EXIT_FAILED)
            job_id = resolved
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
        if job_id:
            with db.session() as s:
                view = views.get_job(s, job_id)
            typer.echo(json.dumps(view, indent=2))
            return
        if lookups:
            kind, value = lookups[0]
            # roles: the CLI reads the database directly; who may run it is the OS's question.
            found = views.find_study_jobs(
                db,
                kind,
                value,
                actor="cli",
                via="cli",
                state=state_filter,
                model=model,
                limit=limit,
            )
            if json_output:
                typer.echo(json.dumps(found, indent=2))
                return
            studies = len(found["studies"])
            print_jobs(
                found["jobs"],
                f"jobs of the {studies} study(ies) found: {found['count']} (times in UTC)",
            )
            return
        with db.session() as s:
            items = views.list_jobs(s, state=state_filter, model=model, limit=limit)
        if json_output:
            typer.echo(json.dumps(items, indent=2))
            return
        print_jobs(items, f"jobs ({len(items)}, times in UTC)")
