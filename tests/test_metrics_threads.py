"""Receiver counters counted from many association threads at once, in a fresh process in
prometheus_client's multiprocess mode (as a receiver process runs them): every event counts.

A CI run lost one "accepted" of two: the echo's rejection and the next association's
acceptance, on two threads of one receiver process, both created the process's counters on
first use; the second creation hit prometheus_client's duplicate-registration error, and the
observer (which must never fail a C-STORE) swallowed it with the count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import threading
from dicom_node import metrics

THREADS = 32
barrier = threading.Barrier(THREADS)

def one(i):
    barrier.wait()
    metrics.receiver_observer("association", "accepted" if i % 2 else "rejected", 1)
    metrics.receiver_observer("status", 0, 100)

threads = [threading.Thread(target=one, args=(i,)) for i in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def _totals(path: Path) -> dict[tuple[str, str], float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    out: dict[tuple[str, str], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.name, ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def test_every_association_and_instance_counts_when_threads_start_together(tmp_path: Path) -> None:
    for run in range(3):  # the race needs the first use to coincide: give it several chances
        path = tmp_path / f"run-{run}"
        path.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        totals = _totals(path)
        assert totals[("dicom_node_associations_total", "outcome=accepted")] == 16
        assert totals[("dicom_node_associations_total", "outcome=rejected")] == 16
        assert totals[("dicom_node_received_instances_total", "source=dimse")] == 32
        assert totals[("dicom_node_received_bytes_total", "source=dimse")] == 3200
