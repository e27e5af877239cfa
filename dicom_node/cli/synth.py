"""``dicom-node synth``: write synthetic chest-CT phantoms (DICOM series + ground truth JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def synth(
        out: Annotated[Path, typer.Argument(help="Output folder (one phantom) or parent folder (--count > 1).", file_okay=False)],
        seed: Annotated[int, typer.Option(help="Random seed: the same seed and options give the same series.")] = 0,
        count: Annotated[int, typer.Option(min=1, help="Number of phantoms (seeds SEED, SEED+1, ...), each in OUT/seed-N.")] = 1,
        slices: Annotated[int, typer.Option(min=1, help="Number of slices.")] = 300,
        thickness: Annotated[float, typer.Option(min=0.1, help="Slice thickness = spacing, mm.")] = 1.0,
        pixel_size: Annotated[float, typer.Option(min=0.1, help="Pixel spacing, mm.")] = 0.7,
        matrix: Annotated[int, typer.Option(min=16, help="Rows = columns.")] = 512,
        nodules: Annotated[int | None, typer.Option(min=0, help="Number of nodules (default: 4-8, drawn from the seed).")] = None,
        no_nodules: Annotated[bool, typer.Option("--no-nodules", help="A nodule-free phantom (same as --nodules 0).")] = False,
        nodule_types: Annotated[
            str, typer.Option(help="Comma-separated kinds among solid, part-solid, ground-glass, juxtapleural.")
        ] = "solid,part-solid,ground-glass,juxtapleural",
        min_size: Annotated[float, typer.Option(min=1.0, help="Smallest nodule diameter, mm.")] = 3.0,
        max_size: Annotated[float, typer.Option(min=1.0, help="Largest nodule diameter, mm.")] = 30.0,
        noise: Annotated[float | None, typer.Option(min=0.0, help="Noise standard deviation, HU (default: 15-35 from the seed).")] = None,
        patient_name: Annotated[str, typer.Option(help="PatientName written into every image.")] = "SYNTH^PHANTOM",
        patient_id: Annotated[str | None, typer.Option(help="PatientID (default SYNTH-<seed>).")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace a phantom already in the output folder.")] = False,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    ) -> None:
        """Generate chest-CT phantoms: body, lungs with noise, branching vessels, ribs, spine and
        nodules of 3-30 mm (solid, part-solid, ground-glass, juxtapleural), written as a DICOM
        CT series (one file per slice) with ``truth.json`` (nodule centres in patient mm,
        diameters, types). Reproducible by seed. Evaluate a model on them with
        ``dicom-node evaluate``.
        """
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskID,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        from dicom_node.synth import (
            NODULE_TYPES,
            TRUTH_FILE,
            PhantomSpec,
            make_phantom,
            write_series,
        )

        console = Console(stderr=True)
        types = tuple(t.strip() for t in nodule_types.split(",") if t.strip())
        unknown = [t for t in types if t not in NODULE_TYPES]
        if unknown or not types:
            console.print(f"[red]error:[/red] unknown nodule type(s) {unknown}; choose among {', '.join(NODULE_TYPES)}")
            raise typer.Exit(2)
        if min_size > max_size:
            console.print("[red]error:[/red] --min-size is larger than --max-size")
            raise typer.Exit(2)
        targets = [(seed, out)] if count == 1 else [(seed + n, out / f"seed-{seed + n}") for n in range(count)]
        for _, folder in targets:
            existing = list(folder.glob("slice_*.dcm")) + list(folder.glob(TRUTH_FILE)) if folder.is_dir() else []
            if existing and not overwrite:
                console.print(f"[red]error:[/red] {folder} already holds a phantom; use --overwrite to replace it")
                raise typer.Exit(2)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
        ) as bar:
            for s, folder in targets:
                spec = PhantomSpec(
                    seed=s,
                    slices=slices,
                    slice_thickness=thickness,
                    pixel_spacing=pixel_size,
                    matrix=matrix,
                    nodules=0 if no_nodules else nodules,
                    nodule_types=types,
                    min_diameter=min_size,
                    max_diameter=max_size,
                    noise_hu=noise,
                    patient_name=patient_name,
                    patient_id=patient_id,
                )
                task = bar.add_task(f"seed {s}", total=1.0)

                def report(stage: str, fraction: float, task: TaskID = task, s: int = s) -> None:
                    bar.update(task, completed=fraction, description=f"seed {s}: {stage}")

                phantom = make_phantom(spec, progress=lambda st, fr: report(st, 0.8 * fr))
                if folder.is_dir() and overwrite:
                    for old in folder.glob("slice_*.dcm"):
                        old.unlink()
                files = write_series(phantom, folder, progress=lambda st, fr: report(st, 0.8 + 0.2 * fr))
                bar.update(task, completed=1.0, description=f"seed {s}: done")
                kinds = ", ".join(f"{n.type} {n.diameter_mm:.1f} mm" for n in phantom.nodules) or "none"
                typer.echo(f"{folder}: {len(files.paths)} slices, nodules: {kinds}")
