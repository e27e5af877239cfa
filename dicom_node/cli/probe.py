"""``dicom-node probe [DESTINATION]``: check that write-back destinations answer."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from dicom_node.delivery.probe import ProbeOutcome
    from dicom_node.settings import Settings


def register(app: typer.Typer) -> None:
    @app.command()
    def probe(
        ctx: typer.Context,
        destinations: Annotated[
            list[str] | None,
            typer.Argument(
                metavar="DESTINATION",
                help="Configured destination name(s); default: every destination.",
                show_default=False,
            ),
        ] = None,
        json_output: Annotated[
            bool, typer.Option("--json", help="One JSON object per destination, one a line.")
        ] = False,
        record: Annotated[
            bool,
            typer.Option(
                "--record/--no-record",
                help="Keep the results in the state database's probe history (the dashboard's "
                "Destinations page).",
            ),
        ] = True,
    ) -> None:
        """Probe write-back destinations and print each one's state and round trip: C-ECHO
        for a DICOM (dicom://) destination, an authenticated QIDO-RS request for a DICOMweb
        one, with the destination's own credentials and TLS settings.

        Exit code 0 when every destination probed is up, 1 when any is down, 2 for an
        unknown destination name or when none is configured.
        """
        from dicom_node.cli import EXIT_FAILED, EXIT_USAGE, state
        from dicom_node.delivery.probe import probe_all

        settings = state(ctx).settings()
        configured = settings.all_destinations()
        if not configured:
            typer.secho(
                "no destination is configured ([destinations] or DICOM_NODE_DESTINATION)",
                err=True,
                fg="red",
            )
            raise typer.Exit(EXIT_USAGE)
        try:
            outcomes = probe_all(settings, list(destinations) if destinations else None)
        except KeyError as exc:
            typer.secho(
                f"unknown destination {exc.args[0]!r}; configured: {', '.join(sorted(configured))}",
                err=True,
                fg="red",
            )
            raise typer.Exit(EXIT_USAGE) from None
        if record:
            _record(settings, outcomes)
        for o in outcomes:
            if json_output:
                typer.echo(json.dumps(o.as_json(), sort_keys=True))
                continue
            if o.ok:
                typer.echo(f"{o.destination}: up, {o.method} {o.target} in {o.latency_ms:.0f} ms")
            else:
                typer.secho(f"{o.destination}: DOWN, {o.method} {o.target}: {o.error}", fg="red")
        if not all(o.ok for o in outcomes):
            raise typer.Exit(EXIT_FAILED)


def _record(settings: Settings, outcomes: list[ProbeOutcome]) -> None:
    """Add the results to the probe history; a database that cannot be opened is a warning
    (the probe's answer stands without it)."""
    from dicom_node.delivery.probe import record_probes
    from dicom_node.state import open_database

    try:
        db = open_database(settings.resolved_database_url)
        try:
            record_probes(db, outcomes, settings.probes.history)
        finally:
            db.dispose()
    except Exception as exc:  # the probe answered; its history is a side matter
        typer.secho(f"probe results not recorded: {type(exc).__name__}", err=True, fg="yellow")
