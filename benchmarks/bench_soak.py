"""Load/soak benchmark: four storescu senders against a real node for N minutes while jobs run.

Starts ``dicom-node serve`` on a fresh data directory (embedded broker and one embedded worker by
default, or ``--broker redis`` with a private ``redis-server`` on a free loopback port), then runs
``--senders`` concurrent DCMTK ``storescu`` loops for ``--minutes``. Every send is one whole small
CT study (``--slices`` x ``--matrix``, generated once by ``dicom-node synth``'s phantom code) with
fresh Study/Series/SOP Instance UIDs, so every send makes a new study and a new job. A study
matches a routing rule that runs ``lung-nodules`` in the worker while fewer than
``--model-backlog`` such studies are unfinished; the others match no rule and end ``skipped`` at
the edge. The worker is thus busy all along, its queue stays bounded, and the edge takes the
full load.

While the senders run it samples, every ``--sample-seconds``, the RSS (VmRSS) and CPU of every
node process (main, receivers, embedded workers and their Celery children, labelled by role) and
the state database's counters. After the senders stop it waits for every study to be completed
and its job to end, then prints instances/s (overall and per minute), RSS per process over time
with a flatness verdict, and checks:

* every storescu run exited 0 without an error line;
* zero lost instances: every study holds exactly the instances sent (state database), and the
  spool holds one file per indexed instance;
* every study sent is in exactly one terminal state (done, failed, skipped or cancelled; no job
  left waiting, queued, running or delivering);
* RSS is flat: every long-lived process's peak RSS in the last quarter of the soak is less than
  10 % or less than 20 MB above its peak in the second quarter (after warm-up: imports, the
  model loaded), and no main, receiver or worker process was replaced;
* the node was still up at the end and stopped with exit status 0.

It exits 1 when a check fails. ``--ratio-rounds K`` (default 3, 0 skips it) first measures, with
the same code and sender set-up as ``bench_ingest.py``'s four-association case (a 300-slice
512x512 CT split over four storescu processes, node restarted on a fresh data directory per
run), the ingest rate of the node against ``minimal_scp.py``, the minimal durable pynetdicom SCP,
and prints their same-round ratio as median (min-max). Target (issue 19): >= 0.9.

Everything binds 127.0.0.1; the whole run is bounded by ``--hard-limit-minutes`` and stops every
process it started (by PID) on the way out.

    .venv/bin/python benchmarks/bench_soak.py --minutes 20 --ratio-rounds 5
    .venv/bin/python benchmarks/bench_soak.py --minutes 20 --broker redis --ratio-rounds 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import bench_ingest, ct_phantom  # noqa: E402
from tests.peers import NodeProcess, RedisServer  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AET = "AINODE"

TARGET_RATIO = 0.9
"""Node ingest rate / minimal pynetdicom SCP rate, four associations (issue 19)."""
FLAT_PERCENT = 10.0
FLAT_MB = 20.0
"""RSS is flat when the peak of the last quarter exceeds that of the second by less than either."""
TERMINAL = ("done", "failed", "skipped", "cancelled")

# Template UIDs and their replacements have one fixed length (2.25 + a 38-digit integer, below
# 2**128 as PS3.5 B.2 requires), so a new study is the template's bytes with UIDs swapped:
# no re-encoding, element lengths unchanged.
_UID_LOW = 10**37
_UID_SPAN = 9 * 10**37
DESCRIPTION_SKIP = b"SOAK QUICK"
DESCRIPTION_MODEL = b"SOAK MODEL"
"""StudyDescription of the template and of the studies that run the model (same length)."""


def new_uid() -> str:
    return f"2.25.{_UID_LOW + secrets.randbelow(_UID_SPAN)}"


# -- the study template --------------------------------------------------------------------------


@dataclass
class StudyTemplate:
    """A small CT study in memory whose UIDs are swapped for fresh ones on every send."""

    blobs: list[bytes]
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: list[str]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs)

    def instantiate(self, out_dir: Path, study: str, *, run_model: bool) -> list[Path]:
        """Write a new study with Study Instance UID ``study`` (and fresh other UIDs)."""
        swaps = [
            (self.study_uid.encode(), study.encode()),
            (self.series_uid.encode(), new_uid().encode()),
            (self.frame_uid.encode(), new_uid().encode()),
        ]
        if run_model:
            swaps.append((DESCRIPTION_SKIP, DESCRIPTION_MODEL))
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (blob, sop) in enumerate(zip(self.blobs, self.sop_uids, strict=True)):
            data = blob.replace(sop.encode(), new_uid().encode())
            for old, new in swaps:
                data = data.replace(old, new)
            path = out_dir / f"{i:04d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        return paths


def template_from(sources: list[Path], folder: Path) -> StudyTemplate:
    """A template from one series' files: written to ``folder`` (once) with fixed-length UIDs
    and StudyDescription ``SOAK QUICK``, then read back and checked."""
    import pydicom

    info_path = folder / "template.json"
    if not info_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        study, series, frame = new_uid(), new_uid(), new_uid()
        names, sops = [], []
        for i, source in enumerate(sources):
            ds = pydicom.dcmread(source)
            sop = new_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop)
            ds.StudyDescription = DESCRIPTION_SKIP.decode()
            name = f"t{i:04d}.dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            names.append(name)
            sops.append(sop)
        info = {"files": names, "study": study, "series": series, "frame": frame, "sops": sops}
        info_path.write_text(json.dumps(info))
    info = json.loads(info_path.read_text())
    template = StudyTemplate(
        blobs=[(folder / name).read_bytes() for name in info["files"]],
        study_uid=info["study"],
        series_uid=info["series"],
        frame_uid=info["frame"],
        sop_uids=info["sops"],
    )
    # The byte swap must give valid, distinct instances: check one instantiation.
    with tempfile.TemporaryDirectory() as tmp:
        study = new_uid()
        paths = template.instantiate(Path(tmp), study, run_model=True)
        first, last = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1])
        assert first.StudyInstanceUID == last.StudyInstanceUID == study
        assert first.SOPInstanceUID != last.SOPInstanceUID or len(paths) == 1
        assert first.SOPInstanceUID == first.file_meta.MediaStorageSOPInstanceUID
        assert first.StudyDescription == DESCRIPTION_MODEL.decode()
        first.pixel_array  # noqa: B018 - decodes: the pixel data survived the swap
    return template


def load_template(
    slices: int, matrix: int, seed: int = 19, *, slice_thickness: float = 2.5
) -> StudyTemplate:
    """The soak study: generated once under ``benchmarks/.cache`` and reused."""
    suffix = "" if slice_thickness == 2.5 else f"-t{slice_thickness:g}"
    folder = CACHE / f"soak-{slices}x{matrix}-s{seed}{suffix}"
    sources: list[Path] = []
    if not (folder / "template.json").exists():
        from dicom_node.synth import PhantomSpec, make_phantom
        from dicom_node.synth.series import write_series

        # A whole chest in a small matrix: ~360 mm field of view, 2.5 mm slices by default (the
        # series selection accepts up to 3 mm and needs 16 slices; the detector's validated
        # input range is narrower, see workers/models/weights/lung_nodules_fp.json).
        spec = PhantomSpec(
            seed=seed,
            slices=slices,
            matrix=matrix,
            pixel_spacing=round(360.0 / matrix, 3),
            slice_thickness=slice_thickness,
            nodules=3,
        )
        sources = write_series(make_phantom(spec), folder / "synth").paths
    template = template_from(sources, folder)
    shutil.rmtree(folder / "synth", ignore_errors=True)
    return template


# -- the node's processes ------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _cmdline(pid: int) -> list[str]:
    return [a for a in _read(f"/proc/{pid}/cmdline").split("\0") if a]


def node_processes(main_pid: int) -> dict[str, int]:
    """The node's process tree, labelled by role: main, receiver-N, resource-tracker,
    ``<worker name>`` (an embedded ``dicom-node worker``), ``<worker name>-childN`` (its Celery
    pool processes), anything else ``<parent label>/<comm>``."""
    parents = _parents()
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    labels = {main_pid: "main"} if main_pid in parents else {}
    receivers = 0
    queue = [main_pid]
    while queue:
        parent = queue.pop(0)
        kids = sorted(children.get(parent, []))
        pool = 0
        for pid in kids:
            cmd = _cmdline(pid)
            text = " ".join(cmd)
            parent_label = labels[parent]
            if parent_label == "main" and "resource_tracker" in text:
                label = "resource-tracker"
            elif parent_label == "main" and "spawn_main" in text:
                label = f"receiver-{receivers}"
                receivers += 1
            elif parent_label == "main" and "worker" in cmd and "--name" in cmd:
                label = (
                    cmd[cmd.index("--name") + 1] if cmd.index("--name") + 1 < len(cmd) else "worker"
                )
            elif (
                parent_label.startswith("embedded")
                and "-" not in parent_label
                and cmd
                and (cmd == _cmdline(parent) or "celery" in text or "dicom_node" in text)
            ):
                label = f"{parent_label}-child{pool}"
                pool += 1
            else:
                comm = _read(f"/proc/{pid}/comm").strip() or "?"
                label = f"{parent_label}/{comm}"
            labels[pid] = label
            queue.append(pid)
    return {label: pid for pid, label in labels.items()}


def rss_and_cpu(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, user+system CPU ticks) of a process, or None once it is gone."""
    status = _read(f"/proc/{pid}/status")
    stat = _read(f"/proc/{pid}/stat")
    if not status or not stat:
        return None
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    fields = stat.rsplit(")", 1)[1].split()
    return rss, int(fields[11]) + int(fields[12])


# -- the state database --------------------------------------------------------------------------


class StateReader:
    """Read-only queries on the node's SQLite state database (WAL: never blocks the node)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)

    def counters(self) -> dict[str, int]:
        with contextlib.closing(self._connect()) as conn:
            out = {
                "instances": conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0],
                "studies": conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0],
                "dirty": conn.execute("SELECT COUNT(*) FROM studies WHERE dirty").fetchone()[0],
            }
            for state, n in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                out[f"job:{state}"] = n
        return out

    def studies(self) -> dict[str, dict[str, Any]]:
        """Per Study Instance UID: instances indexed, dirty flag, jobs (version, state)."""
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute("SELECT id, study_instance_uid, dirty FROM studies").fetchall()
            counts = dict(
                conn.execute("SELECT study_id, COUNT(*) FROM instances GROUP BY study_id")
            )
            jobs: dict[int, list[tuple[int, str, str | None]]] = defaultdict(list)
            for study_id, version, state, model in conn.execute(
                "SELECT study_id, study_version, state, model FROM jobs ORDER BY study_version"
            ):
                jobs[study_id].append((version, state, model))
        return {
            uid: {"instances": counts.get(sid, 0), "dirty": bool(dirty), "jobs": jobs.get(sid, [])}
            for sid, uid, dirty in rows
        }

    def instance_paths(self) -> list[str]:
        with contextlib.closing(self._connect()) as conn:
            return [p for (p,) in conn.execute("SELECT path FROM instances")]

    def job_seconds(self, model: str) -> list[float]:
        """Wall time from start to finish of the finished jobs of ``model``."""
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT (julianday(finished_at) - julianday(started_at)) * 86400 FROM jobs "
                "WHERE model = ? AND started_at IS NOT NULL AND finished_at IS NOT NULL",
                (model,),
            ).fetchall()
        return [r[0] for r in rows if r[0] is not None]


# -- senders -------------------------------------------------------------------------------------


@dataclass
class Send:
    sender: int
    study_uid: str
    files: int
    started: float
    ended: float
    ok: bool
    error: str = ""


@dataclass
class Senders:
    """``count`` threads, each running one storescu after the other until ``deadline``."""

    template: StudyTemplate
    port: int
    count: int
    workdir: Path
    model_backlog: int
    timeout: float
    sends: list[Send] = field(default_factory=list)
    model_studies: set[str] = field(default_factory=set)
    _model_open: set[str] = field(default_factory=set)
    _procs: set[subprocess.Popen[bytes]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, deadline: float) -> None:
        for i in range(self.count):
            t = threading.Thread(
                target=self._loop, args=(i, deadline), name=f"sender-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def refresh(self, reader: StateReader) -> None:
        """Forget the model studies whose jobs have ended (frees a slot of the backlog)."""
        with self._lock:
            open_now = set(self._model_open)
        if not open_now:
            return
        studies = reader.studies()
        ended = {
            uid
            for uid in open_now
            if (got := studies.get(uid))
            and not got["dirty"]
            and got["jobs"]
            and all(state in TERMINAL for _v, state, _m in got["jobs"])
        }
        with self._lock:
            self._model_open -= ended

    def kill(self) -> None:
        """Stop now (hard limit or Ctrl-C): no new sends, running storescu killed."""
        self._stop.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _loop(self, index: int, deadline: float) -> None:
        env = dict(os.environ, TCP_NODELAY="1")
        folder = self.workdir / f"sender{index}"
        while time.monotonic() < deadline and not self._stop.is_set():
            study = new_uid()
            # Keep the worker busy without an ever-growing queue: a study runs the model while
            # fewer than model_backlog model studies are unfinished.
            with self._lock:
                run_model = len(self._model_open) < self.model_backlog
                if run_model:
                    self._model_open.add(study)
                    self.model_studies.add(study)
            paths = self.template.instantiate(folder, study, run_model=run_model)
            cmd = [
                "storescu",
                "-R",
                "-aet",
                f"SOAK{index}",
                "-aec",
                AET,
                "127.0.0.1",
                str(self.port),
            ]
            started = time.monotonic()
            proc = subprocess.Popen(
                [*cmd, *map(str, paths)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            with self._lock:
                self._procs.add(proc)
            try:
                _, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            with self._lock:
                self._procs.discard(proc)
            text = err.decode(errors="replace")
            ok = proc.returncode == 0 and "E:" not in text
            send = Send(
                index,
                study,
                len(paths),
                started,
                time.monotonic(),
                ok,
                "" if ok else text.strip()[-300:],
            )
            with self._lock:
                self.sends.append(send)


# -- sampling ------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    procs: dict[str, tuple[int, int, int]]
    """label -> (pid, VmRSS KiB, CPU ticks)"""
    counters: dict[str, int]


class Sampler:
    def __init__(
        self, main_pid: int, reader: StateReader, interval: float, extra: dict[str, int]
    ) -> None:
        self.main_pid = main_pid
        self.reader = reader
        self.interval = interval
        self.extra = extra
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> Sample:
        procs = {}
        for label, pid in {**node_processes(self.main_pid), **self.extra}.items():
            got = rss_and_cpu(pid)
            if got is not None:
                procs[label] = (pid, *got)
        try:
            counters = self.reader.counters()
        except sqlite3.Error:
            counters = {}
        s = Sample(time.monotonic(), procs, counters)
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


# -- report --------------------------------------------------------------------------------------


def _mb(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def _at(samples: list[Sample], t: float) -> Sample:
    return min(samples, key=lambda s: abs(s.t - t))


def _cpu(a: Sample, b: Sample, edge: bool) -> float:
    """CPU (% of one core) of the edge processes (main, receivers) or of the worker side."""
    ticks = 0
    for label, (pid, _rss, cpu) in b.procs.items():
        before = a.procs.get(label)
        is_edge = label == "main" or label.startswith(("receiver", "resource-tracker"))
        if before and before[0] == pid and label != "redis-server" and is_edge == edge:
            ticks += cpu - before[2]
    return 100 * ticks / CLK_TCK / max(b.t - a.t, 1e-6)


def print_rates(sends: list[Send], samples: list[Sample], t0: float, t1: float) -> None:
    ok = [s for s in sends if s.ok]
    wall = max(s.ended for s in sends) - t0 if sends else 0.0
    total = sum(s.files for s in ok)
    rate = total / wall if wall else 0.0
    print(
        f"\nsoak: {len(ok)} studies ({total} instances) sent in {wall:.0f} s: {rate:.1f} instances/s"
    )
    print(
        f"{'minute':>6} {'sent inst/s':>11} {'indexed inst/s':>14} {'studies':>8} {'jobs open':>9} "
        f"{'jobs ended':>10} {'edge CPU %':>10} {'worker CPU %':>12}"
    )
    minutes = max(1, round((t1 - t0) / 60))
    for m in range(minutes):
        a = t0 + 60 * m
        b = t1 if m == minutes - 1 else a + 60  # the last row takes the tail
        sent = sum(s.files for s in ok if a <= s.ended < b or (m == minutes - 1 and s.ended >= b))
        sa, sb = _at(samples, a), _at(samples, b)
        dt = max(sb.t - sa.t, 1e-6)
        indexed = sb.counters.get("instances", 0) - sa.counters.get("instances", 0)
        jobs = [(k[4:], v) for k, v in sb.counters.items() if k.startswith("job:")]
        open_jobs = sum(v for k, v in jobs if k not in TERMINAL)
        ended = sum(v for k, v in jobs if k in TERMINAL)
        print(
            f"{m + 1:>6} {sent / max(b - a, 1e-6):>11.1f} {indexed / dt:>14.1f} "
            f"{sb.counters.get('studies', 0):>8} {open_jobs:>9} {ended:>10} "
            f"{_cpu(sa, sb, True):>10.0f} {_cpu(sa, sb, False):>12.0f}"
        )


def rss_report(samples: list[Sample], t0: float, t1: float) -> list[str]:
    """Print RSS per process over the soak; returns the failures (growth, replaced processes)."""
    soak = [s for s in samples if t0 - 1 <= s.t <= t1 + 1] or samples
    seen = Counter(label for s in soak for label in s.procs)
    labels = [lab for lab, n in seen.items() if n >= 0.5 * len(soak)]
    transient = sorted(set(seen) - set(labels))
    step = max(60.0, 60.0 * round((t1 - t0) / 60 / 5))
    marks = [("start", soak[0])]
    t = t0 + step
    while t < t1 - step / 2:
        marks.append((f"{(t - t0) / 60:.0f} min", _at(soak, t)))
        t += step
    marks.append(("end", soak[-1]))
    width = max(9, *(len(lab) for lab in labels))
    print(f"\nRSS (VmRSS, MB) per node process, {len(soak)} samples")
    print(f"{'':<8}" + "".join(f"{lab:>{width + 1}}" for lab in labels))
    for name, s in marks:
        cells = [_mb(s.procs[lab][1]) if lab in s.procs else "-" for lab in labels]
        print(f"{name:<8}" + "".join(f"{c:>{width + 1}}" for c in cells))
    maxes = [_mb(max(s.procs[lab][1] for s in soak if lab in s.procs)) for lab in labels]
    print(f"{'max':<8}" + "".join(f"{c:>{width + 1}}" for c in maxes))
    if transient:
        print(f"  short-lived processes (not judged): {', '.join(transient)}")
    failures = []
    # Peak of the second quarter against peak of the last quarter: a worker's RSS swings with
    # each job, so single samples at the marks would judge the swing, not the trend.
    span = t1 - t0

    def peak(lab: str, lo: float, hi: float) -> int | None:
        got = [s.procs[lab][1] for s in soak if lab in s.procs and lo <= (s.t - t0) / span <= hi]
        return max(got) if got else None

    for lab in labels:
        a, b = peak(lab, 0.25, 0.5), peak(lab, 0.75, 1.0)
        if a is None or b is None:
            continue
        pids = {s.procs[lab][0] for s in soak if lab in s.procs}
        if len(pids) > 1:
            msg = f"{lab}: replaced during the soak ({len(pids)} PIDs)"
            if "-child" in lab or lab == "redis-server":
                print(f"  note: {msg}")  # a recycled pool process is Celery's business
                continue
            failures.append(msg)
        growth_mb, growth_pct = (b - a) / 1024, 100 * (b - a) / a if a else 0.0
        flat = growth_mb < FLAT_MB or growth_pct < FLAT_PERCENT
        verdict = "flat" if flat else "GROWING"
        print(
            f"  {lab:<{width}} peak 25-50 % {a / 1024:.0f} MB -> peak 75-100 % {b / 1024:.0f} MB: "
            f"{growth_mb:+.1f} MB ({growth_pct:+.1f} %): {verdict}"
        )
        if not flat:
            failures.append(
                f"{lab}: RSS peak grew {growth_mb:+.1f} MB ({growth_pct:+.1f} %) after the 25 % mark"
            )
    return failures


def write_csv(path: Path, samples: list[Sample], t0: float) -> None:
    """One row per process per sample: seconds since the senders started, label, pid, RSS, CPU."""
    with path.open("w") as fh:
        fh.write("seconds,process,pid,rss_kib,cpu_seconds\n")
        for s in samples:
            for label, (pid, rss, ticks) in sorted(s.procs.items()):
                fh.write(f"{s.t - t0:.1f},{label},{pid},{rss},{ticks / CLK_TCK:.2f}\n")
    print(f"  samples written to {path}")


def check_studies(
    reader: StateReader, sends: list[Send], spool: Path
) -> tuple[list[str], Counter[str]]:
    """Zero lost instances, one terminal state per study, spool files = index rows."""
    failures: list[str] = []
    studies = reader.studies()
    states: Counter[str] = Counter()
    lost = extra = missing = split = no_job = open_jobs = 0
    for send in sends:
        got = studies.get(send.study_uid)
        if got is None:
            missing += 1 if send.ok else 0
            continue
        if send.ok and got["instances"] < send.files:
            lost += send.files - got["instances"]
        if got["instances"] > send.files:
            extra += got["instances"] - send.files
        jobs = got["jobs"]
        if not jobs:
            no_job += 1
            continue
        if len(jobs) > 1:
            split += 1
        if any(state not in TERMINAL for _v, state, _m in jobs) or got["dirty"]:
            open_jobs += 1
            continue
        states[jobs[-1][1]] += 1
    unknown = len(set(studies) - {s.study_uid for s in sends})
    if missing:
        failures.append(f"{missing} studies sent successfully are not in the state database")
    if lost:
        failures.append(f"{lost} instances acknowledged by the node are missing from its index")
    if extra:
        failures.append(f"{extra} instances indexed beyond those sent")
    if no_job:
        failures.append(f"{no_job} studies have no job")
    if open_jobs:
        failures.append(f"{open_jobs} studies are not in a terminal state")
    if unknown:
        failures.append(f"{unknown} studies in the database were never sent")
    if split:
        print(
            f"  note: {split} studies were completed more than once (a pause longer than the "
            "quiet period split them)"
        )
    paths = reader.instance_paths()
    files = sum(1 for p in spool.rglob("*.dcm") if ".tmp" not in p.parts)
    absent = sum(1 for p in paths if not (spool / p).is_file())
    if absent or files != len(paths):
        failures.append(
            f"spool: {files} files for {len(paths)} index rows, {absent} rows without a file"
        )
    print(
        f"  index: {len(paths)} instances; spool: {files} files; "
        f"sent OK: {sum(s.files for s in sends if s.ok)} instances in {sum(1 for s in sends if s.ok)} studies"
    )
    return failures, states


# -- phases --------------------------------------------------------------------------------------


def ratio_phase(rounds: int, slices: int, work: Path) -> list[float]:
    """bench_ingest's four-association case, node vs minimal pynetdicom SCP, same rounds."""
    files = ct_phantom.generate(bench_ingest.CACHE / f"synth{slices}", slices=slices)
    node = bench_ingest.NodeReceiver(work / "ratio-node", receivers=None)
    minimal = bench_ingest.MinimalScpReceiver(work / "ratio-minimal")
    receivers: list[bench_ingest.Receiver] = [node, minimal]
    ratios = []
    try:
        for r in receivers:
            r.start()
        for r in receivers:  # warm-up: page cache, imports, first-connection costs
            bench_ingest.send(r, files, 1)
        for rnd in range(rounds):
            order = receivers[rnd % 2 :] + receivers[: rnd % 2]
            runs = {r.name: bench_ingest.send(r, files, 4) for r in order}
            ratio = runs[minimal.name].wall / runs[node.name].wall
            ratios.append(ratio)
            print(
                f"[ratio round {rnd + 1}] node {runs[node.name].wall:.2f} s "
                f"({runs[node.name].inst_per_s:.0f} inst/s, recv CPU {runs[node.name].receiver_cpu:.1f} s)  "
                f"minimal {runs[minimal.name].wall:.2f} s ({runs[minimal.name].inst_per_s:.0f} inst/s, "
                f"recv CPU {runs[minimal.name].receiver_cpu:.1f} s)  ratio {ratio:.2f}",
                flush=True,
            )
    finally:
        for r in receivers:
            with contextlib.suppress(Exception):
                r.stop()
    return ratios


def write_config(path: Path) -> None:
    """One rule: studies described ``SOAK MODEL`` run lung-nodules; the rest match nothing."""
    path.write_text(
        "[[routes]]\n"
        'name = "soak-model"\n'
        'modality = ["CT"]\n'
        f'study_description = "^{DESCRIPTION_MODEL.decode()}$"\n'
        'models = ["lung-nodules"]\n'
    )


def soak_phase(args: argparse.Namespace, work: Path) -> list[str]:
    template = load_template(args.slices, args.matrix)
    print(
        f"soak study: {len(template.blobs)} instances, {template.nbytes / 1e6:.1f} MB; every "
        f"study runs lung-nodules while fewer than {args.model_backlog} such studies are "
        "unfinished; the others are skipped at the edge"
    )
    config = work / "soak.toml"
    write_config(config)
    env = {
        "DICOM_NODE_AE_TITLE": AET,
        "DICOM_NODE_STABLE_SECONDS": str(args.stable_seconds),
        "DICOM_NODE_WORKER__EMBEDDED_WORKERS": str(args.workers),
        "DICOM_NODE_SCP__MIN_FREE_BYTES": str(256 * 2**20),
        "DICOM_NODE_LOG__LEVEL": "WARNING",
    }
    if args.receivers:
        env["DICOM_NODE_SCP__RECEIVERS"] = str(args.receivers)
    redis: RedisServer | None = None
    extra: dict[str, int] = {}
    if args.broker == "redis":
        redis = RedisServer(work / "redis").start()
        env["DICOM_NODE_BROKER_URL"] = redis.url
        assert redis.proc is not None
        extra["redis-server"] = redis.proc.pid
    node = NodeProcess(work / "node", env, config=config)
    senders: Senders | None = None
    sampler: Sampler | None = None
    failures: list[str] = []
    try:
        node.start()
        assert node.proc is not None
        time.sleep(3.0)  # receivers and workers finish importing before the clock starts
        reader = StateReader(node.data_dir / "state.sqlite")
        sampler = Sampler(node.proc.pid, reader, args.sample_seconds, extra)
        sampler.start()
        senders = Senders(
            template,
            node.dicom_port,
            args.senders,
            work / "send",
            args.model_backlog,
            args.send_timeout,
        )
        t0 = time.monotonic()
        t1 = t0 + 60 * args.minutes
        print(
            f"{args.senders} senders for {args.minutes:g} min (node log: {node.log_path})",
            flush=True,
        )
        senders.start(t1)
        next_note = t0 + 60
        while senders.running():
            time.sleep(1.0)
            with contextlib.suppress(sqlite3.Error):
                senders.refresh(reader)
            if time.monotonic() >= next_note:
                next_note += 60
                c = sampler.samples[-1].counters if sampler.samples else {}
                print(f"  {(time.monotonic() - t0) / 60:.0f} min: {c}", flush=True)
        senders.join()
        t_end = time.monotonic()
        sampler.sample()
        print(
            f"senders stopped after {(t_end - t0) / 60:.1f} min; waiting for every job to end",
            flush=True,
        )

        sent_uids = {s.study_uid for s in senders.sends}

        def settled() -> bool:
            studies = reader.studies()
            for uid in sent_uids:
                got = studies.get(uid)
                if got is None or got["dirty"] or not got["jobs"]:
                    if got is None and not any(s.ok for s in senders.sends if s.study_uid == uid):
                        continue  # a failed send that stored nothing
                    return False
                if any(state not in TERMINAL for _v, state, _m in got["jobs"]):
                    return False
            return True

        drain_deadline = time.monotonic() + 60 * args.drain_minutes
        while not settled():
            if time.monotonic() > drain_deadline:
                failures.append(
                    f"jobs still open {args.drain_minutes:g} min after the senders stopped"
                )
                break
            if node.proc.poll() is not None:
                break
            time.sleep(2.0)
        t_drained = time.monotonic()
        sampler.stop()
        sampler.sample()
        print(f"drained {t_drained - t_end:.0f} s after the senders stopped")

        print_rates(senders.sends, sampler.samples, t0, t_end)
        if args.csv:
            write_csv(args.csv, sampler.samples, t0)
        bad = [s for s in senders.sends if not s.ok]
        if bad:
            failures.append(
                f"{len(bad)} of {len(senders.sends)} storescu runs failed, e.g.: {bad[0].error}"
            )
        failures += rss_report(sampler.samples, t0, t_end)
        last = sampler.samples[-1]
        after = "  after drain: " + ", ".join(
            f"{lab} {_mb(v[1])}" for lab, v in last.procs.items() if "/" not in lab
        )
        print(after + " MB")
        seconds = reader.job_seconds("lung-nodules")
        if seconds:
            print(
                f"\nlung-nodules jobs: {len(seconds)}, start->finish median "
                f"{statistics.median(seconds):.1f} s (max {max(seconds):.1f} s)"
            )
        print("\nchecks")
        study_failures, states = check_studies(reader, senders.sends, node.data_dir / "spool")
        failures += study_failures
        print(f"  terminal states: {dict(states)}")
        if node.proc.poll() is not None:
            failures.append(f"the node exited during the soak (status {node.proc.returncode})")
    finally:
        if senders is not None:
            senders.kill()
        if sampler is not None:
            sampler.stop()
        code = node.stop(timeout=60)
        if code not in (0, None):
            failures.append(f"dicom-node serve stopped with status {code}")
        if redis is not None:
            redis.stop()
    log = node.log()
    errors = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln]
    if errors:
        print(f"  node log: {len(errors)} ERROR/Traceback lines, first: {errors[0][:200]}")
    return failures


# -- main ----------------------------------------------------------------------------------------


class HardLimit(BaseException):
    """Raised in the main thread when --hard-limit-minutes is up."""


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise HardLimit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the senders run")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu loops")
    parser.add_argument("--slices", type=int, default=40, help="slices per soak study")
    parser.add_argument("--matrix", type=int, default=128, help="rows = columns of the soak study")
    parser.add_argument(
        "--model-backlog",
        type=int,
        default=2,
        help="a study runs lung-nodules in the worker while fewer than this many such studies are "
        "unfinished; the others match no rule and end skipped at the edge (0: none)",
    )
    parser.add_argument(
        "--stable-seconds", type=float, default=3.0, help="DICOM_NODE_STABLE_SECONDS"
    )
    parser.add_argument("--workers", type=int, default=1, help="embedded worker processes")
    parser.add_argument(
        "--receivers", type=int, default=None, help="receiver processes (default: node's)"
    )
    parser.add_argument("--broker", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--send-timeout", type=float, default=300.0, help="per storescu run, s")
    parser.add_argument(
        "--drain-minutes", type=float, default=20.0, help="max wait for jobs to end"
    )
    parser.add_argument(
        "--ratio-rounds", type=int, default=3, help="node/minimal-SCP rounds (0: skip)"
    )
    parser.add_argument("--ratio-slices", type=int, default=300)
    parser.add_argument("--no-soak", action="store_true", help="only the ratio phase")
    parser.add_argument(
        "--hard-limit-minutes",
        type=float,
        default=None,
        help="abort everything after this long (default: minutes + drain + 30)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (node data, logs)"
    )
    parser.add_argument("--csv", type=Path, help="write every RSS/CPU sample to this CSV file")
    args = parser.parse_args(argv)

    for tool in ("storescu", *(["redis-server"] if args.broker == "redis" else [])):
        if shutil.which(tool) is None:
            print(f"{tool} not found; run scripts/bootstrap --test", file=sys.stderr)
            return 2
    limit = args.hard_limit_minutes or (args.minutes + args.drain_minutes + 30)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(60 * limit))
    print(
        f"cores: {os.cpu_count()}; load: {Path('/proc/loadavg').read_text().strip()}; hard limit {limit:g} min"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    failures: list[str] = []
    ratios: list[float] = []
    try:
        if args.ratio_rounds > 0:
            ratios = ratio_phase(args.ratio_rounds, args.ratio_slices, work)
        if not args.no_soak:
            failures += soak_phase(args, work)
    except HardLimit:
        failures.append(f"hard limit of {limit:g} min reached")
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if ratios:
        m = statistics.median(ratios)
        verdict = "met" if m >= TARGET_RATIO else "NOT met"
        print(
            f"\ningest ratio node / minimal pynetdicom SCP, {args.ratio_slices}-slice CT, 4 associations, "
            f"{len(ratios)} rounds: {bench_ingest._mmm(ratios)}; target >= {TARGET_RATIO}: {verdict}"
        )
        if m < TARGET_RATIO:
            failures.append(f"ingest ratio {m:.2f} below {TARGET_RATIO}")
    print(f"load at the end: {Path('/proc/loadavg').read_text().strip()}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
