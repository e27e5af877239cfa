"""``dicom-node db``: the state database's schema (``upgrade``, ``current``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import typer

T = TypeVar("T")

db_app = typer.Typer(
    name="db",
    help=(
        "The state database's schema. The node, the workers and every command that opens the "
        "database upgrade it themselves at start; `db upgrade` does it on its own, e.g. as a "
        "deployment step after taking a backup."
    ),
    no_args_is_help=True,
)


@db_app.command()
def upgrade(ctx: typer.Context) -> None:
    """Upgrade the state database's schema to this release's revision.

    An empty database gets the whole schema; a database made by dicom-node 0.1.0 (which had no
    revisions) is recognised and upgraded with its data; one already current is left alone.
    Safe while other processes start: only one migrates, the others wait for it. Back up the
    database first (see "Upgrading" in docs/deployment.md).

    Exit code 0 when the schema is current; 2 when the database cannot be upgraded by this
    release (a newer release's schema, or a partial one); 3 when it cannot be reached.
    """
    from dicom_node.state import migrate

    outcome = _with_database(ctx, migrate.upgrade)
    before = outcome.before
    if not outcome.changed:
        typer.echo(f"state database: already at {outcome.after} (head)")
    elif before.kind == "empty":
        typer.echo(f"state database: created at {outcome.after}")
    elif before.kind == "release-0.1.0":
        typer.echo(
            f"state database: made by dicom-node 0.1.0, stamped {migrate.BASELINE}, "
            f"upgraded to {outcome.after}"
        )
    else:
        typer.echo(f"state database: upgraded from {before.revision} to {outcome.after}")


@db_app.command()
def current(ctx: typer.Context) -> None:
    """Show the state database's schema revision and whether it is this release's (read only).

    Exit code 0, 2 for a partial schema, 3 when the database cannot be reached.
    """
    from dicom_node.state import migrate

    found = _with_database(ctx, migrate.current)
    typer.echo(f"state database: {found.describe()}")


def _with_database(ctx: typer.Context, action: Callable[[Any], T]) -> T:
    """Run ``action(engine)`` on the configured database; unreachable -> exit 3, one line."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from dicom_node.cli import EXIT_UNREACHABLE, state
    from dicom_node.state import Database

    url = state(ctx).settings().resolved_database_url
    db = Database(url)
    try:
        return action(db.engine)
    except OperationalError as exc:
        where = make_url(url).render_as_string(hide_password=True)
        reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
        typer.secho(
            f"error: the state database {where} cannot be reached: {reason}", err=True, fg="red"
        )
        raise typer.Exit(EXIT_UNREACHABLE) from None
    finally:
        db.dispose()


def register(app: typer.Typer) -> None:
    app.add_typer(db_app)
