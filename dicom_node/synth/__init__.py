"""Synthetic chest-CT phantoms with ground truth, for testing and evaluating detectors.

``dicom-node synth`` writes them as DICOM series; :func:`make_phantom` builds the volume and
:func:`write_series` writes it. Each phantom has a body, lungs around -860 HU (denser
posteriorly) with noise, branching vessels down to sub-millimetre calibre (near the hilum as
thick as nodules), ribs, spine, sternum, heart, aorta, trachea and main bronchi, and nodules of
3-30 mm of four kinds (solid, part-solid, ground-glass, juxtapleural) with partial-volume
edges. Everything is reproducible from the seed. numpy and pydicom only (this package is on
the edge and never imports torch).
"""

from dicom_node.synth.nodules import NODULE_TYPES, NoduleTruth
from dicom_node.synth.phantom import Phantom, PhantomSpec, make_phantom
from dicom_node.synth.series import TRUTH_FILE, SeriesFiles, write_series

__all__ = [
    "NODULE_TYPES",
    "TRUTH_FILE",
    "NoduleTruth",
    "Phantom",
    "PhantomSpec",
    "SeriesFiles",
    "make_phantom",
    "write_series",
]
