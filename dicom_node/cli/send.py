"""``dicom-node send``: C-STORE files and folders to a DICOM peer (by default, this node)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def send(
        ctx: typer.Context,
        paths: Annotated[
            list[Path], typer.Argument(help="Files and folders (searched recursively).")
        ],
        host: Annotated[
            str | None, typer.Option(help="Peer host (default: this node's bind address).")
        ] = None,
        port: Annotated[
            int | None, typer.Option(help="Peer port (default: this node's DICOM port).")
        ] = None,
        aet: Annotated[
            str | None, typer.Option("--aet", "-a", help="Called AE title (default: this node's).")
        ] = None,
        calling_aet: Annotated[
            str, typer.Option("--calling-aet", help="Our AE title.")
        ] = "DICOMNODE",
        json_output: Annotated[
            bool, typer.Option("--json", help="Print a JSON summary instead of a table.")
        ] = False,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    ) -> None:
        """Send DICOM files with C-STORE over one association per batch of up to 127 SOP class /
        transfer syntax pairs. Files are sent exactly as stored (no transcoding).

        Prints a per-status summary. Exit code 0 when every instance was stored (warnings
        included), 1 when any was not, 3 when the peer could not be reached.
        """
        import json

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.table import Table

        from dicom_node.cli import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, state
        from dicom_node.dimse_status import STATUS_NOT_SENT
        from dicom_node.dimse_status import describe as describe_status
        from dicom_node.scu import Peer, SendOutcome, collect_files, send_files

        settings = state(ctx).settings()
        target_host = host or ("127.0.0.1" if settings.bind in ("0.0.0.0", "::") else settings.bind)
        peer = Peer(
            ae_title=aet or settings.ae_title,
            host=target_host,
            port=port or settings.dicom_port,
            calling_ae_title=calling_aet,
        )
        console = Console(stderr=True)
        try:
            files, skipped = collect_files(paths)
        except FileNotFoundError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        if not files:
            console.print("[red]error:[/red] no DICOM files found")
            raise typer.Exit(2)

        with Progress(
            TextColumn("sending"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not progress or json_output,
        ) as bar:
            task = bar.add_task("send", total=len(files))

            def tick(_: SendOutcome) -> None:
                bar.advance(task)

            outcomes = send_files(peer, files, on_result=tick)

        by_status = Counter(o.status for o in outcomes)
        categories = Counter(o.category for o in outcomes)
        unreachable = all(o.status == STATUS_NOT_SENT for o in outcomes)
        if json_output:
            typer.echo(
                json.dumps(
                    {
                        "peer": f"{peer.ae_title}@{peer.host}:{peer.port}",
                        "sent": len(outcomes),
                        "skipped_not_dicom": len(skipped),
                        "by_category": dict(categories),
                        "by_status": {describe_status(k): v for k, v in sorted(by_status.items())},
                        "failures": [
                            {
                                "path": str(o.path),
                                "status": describe_status(o.status),
                                "detail": o.detail,
                            }
                            for o in outcomes
                            if o.category == "failure"
                        ],
                    },
                    indent=2,
                )
            )
        else:
            table = Table(title=f"C-STORE to {peer.ae_title}@{peer.host}:{peer.port}")
            table.add_column("status")
            table.add_column("instances", justify="right")
            for status, count in sorted(by_status.items()):
                table.add_row(describe_status(status), str(count))
            Console().print(table)
            if skipped:
                console.print(f"skipped {len(skipped)} file(s) that are not DICOM Part 10")
            for o in [o for o in outcomes if o.category == "failure"][:20]:
                console.print(f"[red]failed[/red] {o.path}: {describe_status(o.status)} {o.detail}")
        if unreachable:
            raise typer.Exit(EXIT_UNREACHABLE)
        raise typer.Exit(EXIT_FAILED if categories.get("failure") else EXIT_OK)
