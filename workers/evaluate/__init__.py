"""Evaluating a detector on scans with a reference standard, as a site would run it.

* :mod:`.metrics`: the LUNA16 hit rule, FROC, CPM, bootstrap intervals, operating point;
* :mod:`.references`: one :class:`Reference` per scan (positives, ignore regions, a loader);
* readers: :mod:`.truth` (``truth.json``: synth and real chest CT), :mod:`.lidc` (LIDC XML
  readings under the LUNA16 rule), :mod:`.luna16` (``.mhd``/``.raw`` and the CSV files);
* :mod:`.runner`: finding the scans, running the detector; :mod:`.report` and
  :mod:`.pictures`: ``report.json``, ``froc.png`` and a PNG per false finding and per miss.
"""

from workers.evaluate.metrics import (
    FALSE,
    FP_RATES,
    IGNORED,
    SIZE_BINS,
    SUBSETS,
    Candidate,
    ScanResult,
    Select,
    _assign,
    bootstrap_froc,
    breakdown,
    cpm,
    froc,
    ignored,
    match,
    operating_point,
)
from workers.evaluate.references import Reference, SkipScan
from workers.evaluate.report import Report, plot_froc, write_report
from workers.evaluate.runner import evaluate, find_references, find_studies, load_study, run_study
from workers.evaluate.truth import TRUTH_FILE

__all__ = [
    "FALSE",
    "FP_RATES",
    "IGNORED",
    "SIZE_BINS",
    "SUBSETS",
    "TRUTH_FILE",
    "Candidate",
    "Reference",
    "Report",
    "ScanResult",
    "Select",
    "SkipScan",
    "_assign",
    "bootstrap_froc",
    "breakdown",
    "cpm",
    "evaluate",
    "find_references",
    "find_studies",
    "froc",
    "ignored",
    "load_study",
    "match",
    "operating_point",
    "plot_froc",
    "run_study",
    "write_report",
]
