"""The ``dicom-node`` command.

Exit codes (stable; scripts rely on them):

* 0 — success
* 1 — the operation ran but failed (for ``send``: at least one instance not stored)
* 2 — usage or configuration error (bad option, invalid settings)
* 3 — could not reach the peer or a required service

Commands that need the compute side (``worker``, ``evaluate``) are registered by the
``workers`` package through the ``dicom_node.commands`` entry point group, so this package
never imports ``workers``. A plug-in that fails to load is logged as a warning, and its command
stays listed and says why when it is run.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dicom_node import __version__
from dicom_node.errors import ConfigError, DicomNodeError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

LOGGER = logging.getLogger(__name__)


def _plain_flags(params: list[Any]) -> list[Any]:
    """Give the boolean flags among ``params`` an empty metavar (in place; returns them).

    Typer (0.2x, which carries its own copy of click) prints a type label in the rich help's
    type column for every option, flags included: ``--json <bool>``, ``--help <bool>``, as if
    the flag took a value. Its plain-text help skips flags; the rich one only skips a
    parameter whose metavar is set, so an empty one leaves the column blank. Older Typer
    (click's ParamType metavars) left out the ``BOOLEAN`` label itself.
    """
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", "") is None:
            param.metavar = ""
    return params


class NodeGroup(TyperGroup):
    """The ``dicom-node`` group: every command and sub-command it hands out, and the group
    itself, show their flags without a type label (:func:`_plain_flags`). Done here once, so
    a command module (or a plug-in) declares its options the ordinary way."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_command(command, ctx)
        return command


def _plain_command(command: Any, ctx: Any) -> None:
    # The help option is made on first use and cached; made with this (parent) context, it
    # gets the same names a sub-command's context inherits from it (-h, --help).
    _plain_flags(command.get_params(ctx))
    if isinstance(command, TyperGroup):  # a sub-app (`db`): its commands too
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                _plain_command(sub, ctx)


app = typer.Typer(
    cls=NodeGroup,
    name="dicom-node",
    help=(
        "An AI node for imaging networks: receives studies over DICOM (C-STORE) and DICOMweb "
        "(STOW-RS), runs detection models on Celery workers, and writes results back to the PACS "
        "as DICOM SR + SEG.\n\nConfiguration: --config FILE (TOML), DICOM_NODE_* environment "
        "variables (these win over the file) and command options (these win over both). Exit "
        "codes: 0 ok, 1 failed, 2 usage/configuration, 3 peer or service unreachable."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class CliState:
    """Per-invocation state: the config path, and the settings once loaded."""

    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: Any = None

    def settings(self) -> Any:
        """Load and validate the settings (once)."""
        if self._settings is None:
            from dicom_node.settings import load_settings

            self._settings = load_settings(self.config, **self.overrides)
        return self._settings


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliState)
    return obj


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dicom-node {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML configuration file (also DICOM_NODE_CONFIG). Environment variables override it.",
            envvar="DICOM_NODE_CONFIG",
            dir_okay=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    ctx.obj = CliState(config=config)


def _register_commands() -> None:
    import importlib
    import pkgutil

    import dicom_node.cli as package

    # Each module of this package that defines register(app) adds its command(s).
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(app)
    for ep in entry_points(group="dicom_node.commands"):
        try:
            ep.load()(app)
        except Exception as exc:  # one broken plug-in must not take every other command down
            from dicom_node.phi import reason_text

            # Import errors describe code and installed packages, never patient data.
            reason = reason_text(f"{type(exc).__name__}: {exc}", 500) or type(exc).__name__
            LOGGER.warning(
                "command plug-in %r (%s) could not be loaded: %s", ep.name, ep.value, reason
            )
            if ep.name not in _command_names():
                _register_unavailable(
                    ep.name, ep.value, reason, worker_extra=_needs_worker_extra(ep.value, exc)
                )


def _command_names() -> set[str]:
    names = set()
    for info in app.registered_commands:
        callback_name = info.callback.__name__ if info.callback is not None else ""
        names.add(info.name or callback_name.lower().replace("_", "-"))
    return names


_WORKER_EXTRA_HINT = "the worker extra: pip install 'dicom-node[worker]'"


def _missing_dependency(exc: BaseException) -> str | None:
    """The top-level name of the missing third-party module, when ``exc`` says one is missing
    (one of our own modules missing is a broken install, not a missing extra)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    return None if top in ("dicom_node", "workers") else top


def _needs_worker_extra(value: str, exc: Exception) -> bool:
    # The built-in compute commands live in `workers`, whose imports come with the worker extra.
    return value.startswith("workers.") and _missing_dependency(exc) is not None


def _register_unavailable(name: str, value: str, reason: str, *, worker_extra: bool) -> None:
    """Register ``name`` as a command that explains why its plug-in is missing (instead of
    click's "No such command"), whatever options it is given, ``--help`` included."""
    message = f"the {name} plug-in ({value}) could not be loaded: {reason}"
    if worker_extra:
        message += f" (it needs {_WORKER_EXTRA_HINT})"

    @app.command(
        name=name,
        help=f"Not available: its plug-in could not be loaded (run `dicom-node {name}` for why).",
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def unavailable(ctx: typer.Context) -> None:
        raise ConfigError(message)


def _is_settings_error(exc: Exception) -> bool:
    # Checked only once something failed: importing pydantic_settings costs ~0.2 s at start-up.
    from pydantic_settings import SettingsError

    return isinstance(exc, SettingsError)


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    _register_commands()
    try:
        # With standalone_mode=False, click returns a command's exit code instead of exiting.
        rc = app(args=argv, standalone_mode=False)
    except ConfigError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return EXIT_USAGE
    except DicomNodeError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return EXIT_FAILED
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.secho("aborted", err=True)
        return EXIT_FAILED
    except ModuleNotFoundError as exc:
        # A command importing an optional dependency when it runs (the compute commands import
        # torch only then): say what to install instead of showing a traceback.
        missing = _missing_dependency(exc)
        if missing is None:
            raise
        typer.secho(
            f"error: this command needs the Python package that provides {missing!r}, which is "
            f"not installed (the worker and evaluate commands need {_WORKER_EXTRA_HINT})",
            err=True,
            fg=typer.colors.RED,
        )
        return EXIT_USAGE
    except Exception as exc:  # click usage errors
        import click

        # Typer (>= 0.16) raises its vendored click's exceptions, which are not click's classes.
        if isinstance(exc, click.exceptions.ClickException) or (
            callable(getattr(exc, "show", None))
            and isinstance(getattr(exc, "exit_code", None), int)
        ):
            exc.show()  # type: ignore[attr-defined]
            return EXIT_USAGE
        if _is_settings_error(exc):  # load_settings converts these; a stray one is still config
            typer.secho(f"error: invalid configuration: {exc}", err=True, fg=typer.colors.RED)
            return EXIT_USAGE
        raise
    return int(rc) if isinstance(rc, int) else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
