"""Profile the node's receivers with py-spy during a bench_ingest-style four-association send.

Starts ``dicom-node serve`` with ``bench_ingest.py``'s node settings (fsync on, no embedded
worker, no study completes), sends ``--copies`` copies of the 300-slice 512x512 benchmark CT
(fresh UIDs per copy, so every instance takes the new-instance path), each split over four
concurrent ``storescu`` processes, while ``py-spy record`` samples every receiver process. Writes
the raw collapsed stacks and a flame graph per receiver, and prints where receiver CPU goes:
inclusive and self samples per function (``file:line`` of the function's first line), as a
percentage of all receiver samples, and the receivers' CPU per instance.

py-spy is not a project dependency: ``.venv/bin/python -m pip install py-spy``.

    .venv/bin/python benchmarks/profile_ingest.py --out /work/notes --copies 4
    .venv/bin/python benchmarks/profile_ingest.py --mode idle   # wall time: fsync waits too
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import bench_ingest, bench_soak, ct_phantom  # noqa: E402

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*):(?P<line>\d+)\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: .venv/bin/python -m pip install py-spy")
    return found


def aggregate(raw_files: list[Path], prefix: str) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, inclusive and self samples per function whose file contains ``prefix``.

    py-spy's raw format is one line per distinct stack: ``frame;frame;... count``, each frame
    ``function (file:line)``. With ``--function`` the line is the function's first line.
    """
    total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for path in raw_files:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            frames = []
            for frame in stack.split(";"):
                m = _FRAME.match(frame.strip())
                if m:
                    frames.append(f"{m['func']} ({m['file']}:{m['line']})")
                else:
                    frames.append(frame.strip())
            for name in set(frames):
                if prefix in name:
                    inclusive[name] += count
            if frames:
                own[frames[-1]] += count
    return total, inclusive, own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / ".cache" / "profile")
    parser.add_argument("--copies", type=int, default=4, help="studies sent (300 instances each)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--mode",
        choices=("gil", "active", "idle"),
        default="gil",
        help="gil: only samples holding the GIL (Python CPU; the default); active: py-spy's "
        "default (threads not known to wait; counts fsync and 1 ms select polls too); idle: all "
        "threads (wall time)",
    )
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--flamegraph", action="store_true", help="write SVG flame graphs instead of the tables"
    )
    args = parser.parse_args(argv)
    spy = py_spy()
    args.out.mkdir(parents=True, exist_ok=True)

    files = ct_phantom.generate(bench_ingest.CACHE / f"synth{args.slices}", slices=args.slices)
    template = bench_soak.template_from(
        files, bench_ingest.CACHE / f"profile-template{args.slices}"
    )
    work = Path(tempfile.mkdtemp(prefix="profile-ingest-"))
    node = bench_ingest.NodeReceiver(work / "node", receivers=None)
    spies: list[subprocess.Popen[bytes]] = []
    raw_files: list[Path] = []
    tag = args.mode
    try:
        studies = []
        for i in range(args.copies):
            studies.append(
                template.instantiate(work / f"study{i}", bench_soak.new_uid(), run_model=False)
            )
        node.start()
        assert node.node is not None and node.node.proc is not None
        procs = bench_soak.node_processes(node.node.proc.pid)
        receivers = {label: pid for label, pid in procs.items() if label.startswith("receiver")}
        # Warm-up: first associations, imports, caches; not recorded.
        warm = template.instantiate(work / "warm", bench_soak.new_uid(), run_model=False)[:20]
        bench_ingest_send(node, warm, 1)
        for label, pid in receivers.items():
            suffix = "svg" if args.flamegraph else "txt"
            raw = args.out / f"ingest_profile_{tag}_{label}.{suffix}"
            raw_files.append(raw)
            cmd = [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--function"]
            cmd += ["--nonblocking", "--format", "flamegraph" if args.flamegraph else "raw"]
            cmd += ["-o", str(raw)]
            if args.mode != "active":
                cmd.append("--gil" if args.mode == "gil" else "--idle")
            if args.native:
                cmd.append("--native")
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(1.0)  # py-spy attached
        pids = list(receivers.values())
        cpu0 = bench_ingest.cpu_seconds(pids)
        started = time.perf_counter()
        for paths in studies:
            bench_ingest_send(node, paths, 4)
        wall = time.perf_counter() - started
        cpu = bench_ingest.cpu_seconds(pids) - cpu0
        for proc in spies:
            proc.send_signal(signal.SIGINT)
        for proc in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        n = sum(len(p) for p in studies)
        print(
            f"{n} instances in {wall:.1f} s ({n / wall:.0f} inst/s, 4 associations); receivers "
            f"{', '.join(receivers)}: {cpu:.1f} s CPU = {1000 * cpu / n:.2f} ms/instance; "
            f"load {Path('/proc/loadavg').read_text().split()[0]}"
        )
    finally:
        for proc in spies:
            if proc.poll() is None:
                proc.kill()
        node.stop()
        shutil.rmtree(work, ignore_errors=True)

    if args.flamegraph:
        print(f"flame graphs: {', '.join(map(str, raw_files))}")
        return 0
    total, inclusive, own = aggregate(raw_files, "dicom_node/")
    _, inclusive_all, _ = aggregate(raw_files, "")
    if not total:
        print("no samples recorded", file=sys.stderr)
        return 1
    kinds = {"gil": "holding the GIL", "active": "py-spy active", "idle": "all threads, waits too"}
    report = [f"receiver samples: {total} ({kinds[args.mode]}, {args.rate}/s)"]
    report.append(f"\ninclusive, dicom_node/ functions (top {args.top})")
    report += [f"{100 * c / total:6.1f} %  {name}" for name, c in inclusive.most_common(args.top)]
    report.append(f"\nself (leaf frame), any code (top {args.top})")
    report += [f"{100 * c / total:6.1f} %  {name}" for name, c in own.most_common(args.top)]
    report.append(f"\ninclusive, any code (top {args.top})")
    report += [
        f"{100 * c / total:6.1f} %  {name}" for name, c in inclusive_all.most_common(args.top)
    ]
    text = "\n".join(report)
    print(text)
    summary = args.out / f"ingest_profile_{tag}_summary.txt"
    summary.write_text(text + "\n")
    print(f"\nraw stacks: {', '.join(map(str, raw_files))}\nsummary: {summary}")
    return 0


def bench_ingest_send(
    node: bench_ingest.NodeReceiver, paths: list[Path], associations: int
) -> None:
    """storescu over ``associations`` processes (contiguous quarters, as bench_ingest splits)."""
    n = len(paths)
    chunks = [
        paths[i * n // associations : (i + 1) * n // associations] for i in range(associations)
    ]
    env = dict(os.environ, TCP_NODELAY="1")
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-R",
                "-aet",
                "BENCH",
                "-aec",
                node.aet,
                "127.0.0.1",
                str(node.port),
                *map(str, chunk),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
        if chunk
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or b"E:" in err:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-300:]}")


if __name__ == "__main__":
    sys.exit(main())
