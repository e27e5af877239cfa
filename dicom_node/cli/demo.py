"""``dicom-node demo``: the whole loop on this machine, with nothing configured."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        data_dir: Annotated[
            Path | None,
            typer.Option(
                help="Where to keep everything (default: a new temporary folder).", file_okay=False
            ),
        ] = None,
        seed: Annotated[int, typer.Option(help="Phantom seed.")] = 1,
        slices: Annotated[int, typer.Option(min=16, help="Phantom slices (1.25 mm).")] = 150,
        matrix: Annotated[
            int,
            typer.Option(
                min=448,
                help=(
                    "Phantom matrix (rows = columns). Pixels are 0.7 mm, inside the detector's "
                    "validated input range, so a smaller matrix is a smaller chest (448 still "
                    "holds the lung volume the detector expects)."
                ),
            ),
        ] = 512,
        orthanc: Annotated[
            bool, typer.Option(help="Use a local Orthanc as the PACS when installed.")
        ] = True,
        keep_running: Annotated[
            bool, typer.Option(help="Leave the node (and Orthanc) running until Ctrl-C.")
        ] = False,
        timeout: Annotated[float, typer.Option(min=10, help="Seconds to wait for the job.")] = 900,
        json_output: Annotated[
            bool, typer.Option("--json", help="Print the result as JSON.")
        ] = False,
    ) -> None:
        """Start a node with embedded defaults (plus a private Orthanc on loopback when Orthanc
        with DICOMweb is installed, else results stay in a folder), generate a chest-CT phantom,
        send it, wait for the AI results and print a summary with the dashboard and viewer links.
        Exit code 0 when the job ended done, 1 otherwise.
        """
        import json

        from rich.console import Console
        from rich.table import Table

        from dicom_node.demo import run_demo, stop_all

        console = Console(stderr=json_output)
        folder = data_dir or Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
        console.print(f"demo folder: {folder}")
        running: list = []
        try:
            result = run_demo(
                folder,
                running,
                seed=seed,
                slices=slices,
                matrix=matrix,
                use_orthanc=orthanc,
                timeout=timeout,
                log=console.print,
            )
            job = result.job
            if json_output:
                typer.echo(
                    json.dumps(
                        {
                            "job": job,
                            "truth": result.truth,
                            "pacs": result.pacs,
                            "links": {
                                "dashboard": result.dashboard_url,
                                "job": f"{result.dashboard_url}jobs/{job['id']}",
                                "pacs": result.pacs_url,
                            },
                        },
                        indent=2,
                        default=str,
                    )
                )
            else:
                table = Table(title=f"job {job['id']}: {job['state']}")
                table.add_column("what")
                table.add_column("value")
                table.add_row("model", f"{job['model']} {job.get('model_version') or ''}")
                table.add_row("attempts", str(job["attempts"]))
                for stage, seconds in (job.get("timings") or {}).items():
                    table.add_row(f"time: {stage}", f"{seconds:.2f} s")
                findings = (job.get("summary") or {}).get("findings", [])
                table.add_row("findings", str(len(findings)))
                for f in findings:
                    table.add_row(
                        "  finding",
                        f"{f.get('kind') or f['label']} {f['diameter_mm']:.1f} mm, confidence {f['confidence']:.2f}, slice {f['key_slice'] + 1}",
                    )
                truth = result.truth.get("nodules", [])
                table.add_row(
                    "phantom nodules",
                    ", ".join(f"{n['type']} {n['diameter_mm']:.1f} mm" for n in truth) or "none",
                )
                for d in job.get("deliveries", []):
                    table.add_row(
                        f"delivery: {d['destination']}",
                        f"{d['state']} ({d['attempts']} attempt(s))",
                    )
                for o in job.get("outputs", []):
                    table.add_row(f"output: {o['kind']}", f"{o['size']} bytes")
                if result.pacs is not None:
                    table.add_row(
                        "in the PACS",
                        ", ".join(f"{k}: {v}" for k, v in sorted(result.pacs.items())),
                    )
                if job.get("reason"):
                    table.add_row("reason", job["reason"])
                Console().print(table)
                console.print(f"dashboard: {result.dashboard_url}jobs/{job['id']}")
                if result.pacs_url:
                    console.print(
                        f"PACS (Orthanc Explorer): {result.pacs_url}/app/explorer.html (user 'demo', password in {folder / 'orthanc' / 'orthanc.json'})"
                    )
                console.print(
                    "viewer: set DICOM_NODE_HTTP__OHIF_URL to an OHIF that reads this PACS to get an "
                    "'Open in OHIF' link on each job page (see docs/deployment.md)"
                )
            if keep_running:
                console.print("running; press Ctrl-C to stop")
                import time

                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
            raise typer.Exit(0 if result.ok else 1)
        finally:
            stop_all(running)
