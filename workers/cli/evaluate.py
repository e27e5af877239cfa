"""``dicom-node evaluate``: run a detector over scans with a reference (synth, real chest CT,
LIDC-IDRI, LUNA16); FROC, CPM with intervals, false findings and misses with pictures.

Registered through the ``dicom_node.commands`` entry point (it needs the compute side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        ctx: typer.Context,
        studies: Annotated[
            list[Path],
            typer.Argument(
                metavar="PATHS",
                help="Folders to search for scans with a reference (see above).",
                show_default=False,
            ),
        ],
        model: Annotated[
            str, typer.Option("--model", "-m", help="Model name (entry point or [models.NAME]).")
        ] = "lung-nodules",
        out: Annotated[
            Path,
            typer.Option("--out", "-o", help="Folder for report.json, froc.png and pictures/."),
        ] = Path("evaluation"),
        threshold: Annotated[
            float | None, typer.Option(help="Operating-point threshold (default: the model's).")
        ] = None,
        device: Annotated[
            str | None, typer.Option(help="cpu, cuda or auto (default: the model's setting).")
        ] = None,
        threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
        pictures: Annotated[
            bool, typer.Option(help="Write a PNG per false finding and per miss.")
        ] = True,
        bootstrap: Annotated[
            int, typer.Option(min=0, help="Bootstrap rounds for the 95 % intervals.")
        ] = 1000,
        progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    ) -> None:
        """Evaluate a detector on scans with a reference standard, as a site would.

        Each folder given (and, when it is none of these, its sub-folders) is read as:

        - truth.json beside a DICOM series: a `dicom-node synth` study, or a real
          chest CT reference (positives, ignore marks, tumour boxes);
        - annotations.csv: LUNA16 (.mhd/.raw volumes and annotations_excluded.csv
          anywhere below it);
        - an LIDC XML reading (LidcReadMessage) beside the DICOM series: the LUNA16
          rule applies (a nodule >= 3 mm marked by >= 3 of 4 readers is a positive;
          nodules of 1-2 readers, < 3 mm marks and non-nodules are ignored).

        A finding hits a positive when its centre lies within the positive's radius
        (LUNA16); findings in ignore regions count neither way; every other one is
        a false finding. Writes OUT/report.json (FROC at 1/8-8 false findings per
        scan and CPM, each with a bootstrap 95 % interval; the operating point; per
        scan each false finding with its score and position and each miss; runtime
        and memory), OUT/froc.png and OUT/pictures/ (an axial crop per false finding
        and per miss). Scans are named by series UID; scans the model refuses are
        listed as skipped with the reason.
        """
        import json

        import torch
        from rich.console import Console
        from rich.table import Table

        from dicom_node.cli import EXIT_USAGE, state
        from workers.evaluate import evaluate as run_evaluation
        from workers.evaluate import find_references, write_report
        from workers.models.registry import get_detector

        console = Console(stderr=True)
        refs = find_references(studies)
        if not refs:
            console.print(
                "[red]error:[/red] no scans with a reference (truth.json, LUNA16 annotations.csv or LIDC XML) found"
            )
            raise typer.Exit(EXIT_USAGE)
        if threads:
            torch.set_num_threads(threads)
        # Through the settings' own layers (deep-merged over the file's [models.NAME]), so a bad
        # value ends in the one-line configuration message and exit 2 like any other setting.
        overrides: dict[str, object] = {}
        if threshold is not None:
            overrides["threshold"] = threshold
        if device is not None:
            overrides["device"] = device
        if overrides:
            models = state(ctx).overrides.setdefault("models", {})
            models.setdefault(model, {}).update(overrides)
        settings = state(ctx).settings()
        detector = get_detector(model, settings)

        def report(n: int, total: int, scan: object) -> None:
            if progress:
                console.print(
                    f"[{n}/{total}] {scan.name}: {len(scan.findings)} finding(s), "  # type: ignore[attr-defined]
                    f"detector {scan.detector_seconds:.1f} s, load {scan.load_seconds:.1f} s"  # type: ignore[attr-defined]
                )

        result = run_evaluation(
            refs, detector, progress=report, pictures=out / "pictures" if pictures else None
        )
        result.bootstrap_rounds = bootstrap
        for skip in result.skipped:
            console.print(f"skipped {skip['name']}: {skip['reason']}")
        json_path, png_path = write_report(result, out)
        summary = json.loads(json_path.read_text())
        table = Table(
            title=f"{summary['model']} {summary['model_version']} on {summary['scans']} scans"
        )
        table.add_column("nodules")
        table.add_column("n", justify="right")
        for r in ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0"):
            table.add_column(f"{r} FP", justify="right")
        table.add_column("CPM (95 % CI)", justify="right")
        for name, f in summary["froc"].items():
            ci = f["interval_95"]["cpm"]
            cpm = f"{f['cpm']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
            table.add_row(
                name,
                str(f["nodules"]),
                *(f"{f['sensitivity_at'][r]:.3f}" for r in f["sensitivity_at"]),
                cpm,
            )
        Console().print(table)
        op = summary["operating_point"]["all"]
        rt = summary["runtime"]
        typer.echo(
            f"operating point (threshold {summary['threshold']}): precision {op['precision']:.3f} recall {op['recall']:.3f} "
            f"F1 {op['f1']:.3f} ({op['fp_per_scan']:.2f} FP/scan)"
        )
        typer.echo(
            f"detector time per study: median {rt['detector_seconds_median']} s, max {rt['detector_seconds_max']} s "
            f"on {rt['device']}; peak RSS {rt['peak_rss_mb_max']} MiB"
        )
        typer.echo(f"wrote {json_path} and {png_path}")
