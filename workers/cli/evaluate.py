"""``dicom-node evaluate``: run a detector over studies with ground truth; FROC report + plot.

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
        studies: Annotated[list[Path], typer.Argument(help="Study folders with truth.json, or folders containing them.")],
        model: Annotated[str, typer.Option("--model", "-m", help="Model name (entry point or [models.NAME]).")] = "lung-nodules",
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json and froc.png.")] = Path("evaluation"),
        threshold: Annotated[float | None, typer.Option(help="Operating-point threshold (default: the model's).")] = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (default: the model's setting).")] = None,
        threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
        progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
    ) -> None:
        """Evaluate a detector on studies with ground truth (``dicom-node synth`` writes such
        studies). Reports sensitivity at 0.125-8 false positives per scan (FROC, LUNA16 hit
        criterion: a detection hits a nodule when its centre lies within the nodule's radius),
        precision/recall/F1 at the operating point, a breakdown by size and type, and runtime
        and peak memory per study. Writes OUT/report.json and OUT/froc.png.
        """
        import json

        import torch
        from rich.console import Console
        from rich.table import Table

        from dicom_node.cli import EXIT_USAGE, state
        from workers.evaluate import evaluate as run_evaluation
        from workers.evaluate import find_studies, write_report
        from workers.models.registry import get_detector

        console = Console(stderr=True)
        folders = find_studies(studies)
        if not folders:
            console.print("[red]error:[/red] no study folders with truth.json found")
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

        result = run_evaluation(folders, detector, progress=report)
        json_path, png_path = write_report(result, out)
        summary = json.loads(json_path.read_text())
        table = Table(title=f"{summary['model']} {summary['model_version']} on {summary['scans']} scans")
        table.add_column("nodules")
        table.add_column("n", justify="right")
        for r in ("0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0"):
            table.add_column(f"{r} FP", justify="right")
        for name, f in summary["froc"].items():
            table.add_row(name, str(f["nodules"]), *(f"{f['sensitivity_at'][r]:.3f}" for r in f["sensitivity_at"]))
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
