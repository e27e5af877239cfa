"""``dicom-node models``: the configured models, what each accepts, its licence and intended use
(:mod:`dicom_node.model_catalog`; settings and files only, no torch, no weights loaded)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def models(
        ctx: typer.Context,
        json_output: Annotated[bool, typer.Option("--json", help="One JSON array, one object per model.")] = False,
    ) -> None:
        """List the models this node can run: ``[models.*]`` (MONAI bundles, model folders,
        plug-ins), the models routing rules name, and installed entry points. For each: its
        source, version, licence and intended use (from a bundle's metadata or a model card),
        what input it accepts, its queue and device, and the version each worker reported
        running (``workers``, from the state database). Exit code 1 when a configured model's
        files cannot be read."""
        from dicom_node.cli import EXIT_FAILED, state
        from dicom_node.model_catalog import describe_models

        settings = state(ctx).settings()
        views = describe_models(settings)
        running = _published(settings)
        for view in views:
            view["workers"] = running.get(view["name"], [])
        if json_output:
            typer.echo(json.dumps(views, sort_keys=True, default=str))
        else:
            for view in views:
                _print(view)
        if any(v.get("error") for v in views):
            raise typer.Exit(EXIT_FAILED)


def _print(view: dict[str, Any]) -> None:
    version = f" {view['version']}" if view.get("version") else ""
    typer.echo(f"{view['name']}{version}  ({view['source']})")
    if view.get("error"):
        typer.echo(f"  error: {view['error']}")
    for key, label in (("kind", "kind"), ("licence", "licence"), ("intended_use", "intended use")):
        if view.get(key):
            typer.echo(f"  {label}: {view[key]}")
    accepts = view.get("accepts") or {}
    if accepts:
        typer.echo("  accepts: " + ", ".join(f"{k} {_value(v)}" for k, v in accepts.items()))
    if view.get("labels"):
        typer.echo("  labels: " + ", ".join(f"{k} = {v['meaning']} ({v['scheme']} {v['code']})" for k, v in view["labels"].items()))
    typer.echo(f"  queue {view['queue']} · device {view['device']}")
    for seen in view.get("workers") or []:
        weights = f", weights {seen['weights_sha256'][:12]}" if seen.get("weights_sha256") else ""
        typer.echo(f"  worker {seen['worker']} runs {seen['version']}{weights} (seen {seen['seen_at']})")
    if not view.get("workers"):
        typer.echo("  no worker has reported running it yet")


def _published(settings: Any) -> dict[str, list[dict[str, Any]]]:
    """What the workers reported (``model_versions``); empty when the state database cannot
    be read (the configuration is still worth listing)."""
    from sqlalchemy.exc import SQLAlchemyError

    from dicom_node.errors import DicomNodeError
    from dicom_node.state import open_database
    from dicom_node.state.model_versions import published

    try:
        db = open_database(settings.resolved_database_url)
    except (DicomNodeError, OSError):
        return {}
    try:
        return published(db)
    except SQLAlchemyError:  # an older schema (before revision 0006): nothing reported yet
        return {}
    finally:
        db.dispose()


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)
