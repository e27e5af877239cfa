"""``dicom-node echo``: C-ECHO a DICOM peer (by default, this node)."""

from __future__ import annotations

import time
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def echo(
        ctx: typer.Context,
        host: Annotated[str | None, typer.Option(help="Peer host (default: this node's bind address).")] = None,
        port: Annotated[int | None, typer.Option(help="Peer port (default: this node's DICOM port).")] = None,
        aet: Annotated[str | None, typer.Option("--aet", "-a", help="Called AE title (default: this node's).")] = None,
        calling_aet: Annotated[str, typer.Option("--calling-aet", help="Our AE title.")] = "DICOMNODE",
    ) -> None:
        """Verify DICOM connectivity with C-ECHO. Exit code 0 on success, 1 on a failure
        status, 3 when the peer cannot be reached or refuses the association."""
        from dicom_node.cli import EXIT_FAILED, EXIT_UNREACHABLE, state
        from dicom_node.dimse_status import STATUS_SUCCESS
        from dicom_node.dimse_status import describe as describe_status
        from dicom_node.scu import Peer
        from dicom_node.scu import echo as do_echo

        settings = state(ctx).settings()
        target_host = host or ("127.0.0.1" if settings.bind in ("0.0.0.0", "::") else settings.bind)
        peer = Peer(
            ae_title=aet or settings.ae_title,
            host=target_host,
            port=port or settings.dicom_port,
            calling_ae_title=calling_aet,
        )
        started = time.monotonic()
        try:
            status = do_echo(peer)
        except ConnectionError as exc:
            typer.secho(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: {exc}", err=True, fg="red")
            raise typer.Exit(EXIT_UNREACHABLE) from None
        took = (time.monotonic() - started) * 1000
        typer.echo(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: {describe_status(status)} ({took:.0f} ms)")
        if status != STATUS_SUCCESS:
            raise typer.Exit(EXIT_FAILED)
