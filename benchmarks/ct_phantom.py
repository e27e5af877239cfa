"""The benchmark CT: a 512x512 chest phantom from ``dicom-node synth``, written once and reused.

Every benchmark run sends the same bytes (Explicit VR Little Endian, 16-bit, about 525 KB per
slice, 158 MB for 300 slices: a thin-slice chest CT series). No patient data.
"""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.synth import PhantomSpec, make_phantom
from dicom_node.synth.series import write_series


def generate(out_dir: Path, *, slices: int = 300, size: int = 512, seed: int = 7) -> list[Path]:
    """Write the series to ``out_dir`` (once: reuses a complete earlier run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "series.json"
    if done.exists():
        info = json.loads(done.read_text())
        paths = [out_dir / name for name in info["files"]]
        if len(paths) == slices and all(p.exists() for p in paths):
            return paths
    phantom = make_phantom(PhantomSpec(seed=seed, slices=slices, matrix=size, nodules=5))
    written = write_series(phantom, out_dir)
    done.write_text(json.dumps({"files": [p.name for p in written.paths]}))
    return written.paths
