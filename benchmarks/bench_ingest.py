"""Ingest benchmark: the node against Orthanc and DCMTK storescp, side by side, in one run.

Sends a generated 300-slice 512x512 CT (about 158 MB, cached under ``benchmarks/.cache``) with
DCMTK ``storescu`` (TCP_NODELAY=1) to

* the node (``dicom-node serve``, fsync on, default settings unless ``--receivers``),
* Orthanc (durable: it fdatasyncs every stored file; TCP_NODELAY=1 in its environment),
* DCMTK ``storescp`` (TCP_NODELAY=1; it never fsyncs),
* for reference, a minimal pynetdicom SCP writing raw bytes + fsync (``minimal_scp.py``): the
  floor any pynetdicom receiver pays before validation, indexing and duplicate handling,

over one association and over four concurrent associations (4 storescu processes x 75 files),
for several rounds in a rotating order, and prints instances/s, MB/s, sender and receiver CPU and
the same-round ratios node/Orthanc and node/storescp as median (min-max).

Wall time runs from the start of the first storescu until the last one exits (association set-up
included). Before every run the receiver's storage is emptied (the node is restarted on a fresh
data directory) and ``sync`` is run. Every run is checked: all storescu processes exit 0 and the
receiver holds exactly the instances sent.

Targets (issue 2): one association >= 250 instances/s per receiver process; four concurrent
senders >= 1.5x Orthanc's durable ingest and within 2.5x of storescp.

    .venv/bin/python benchmarks/bench_ingest.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import ct_phantom  # noqa: E402
from tests.peers import NodeProcess, Orthanc, StoreSCP, wait_until  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_ONE_ASSOCIATION = 250  # instances/s, per receiver process
TARGET_VS_ORTHANC = 1.5  # four concurrent senders: node rate / Orthanc rate
TARGET_VS_STORESCP = 2.5  # four concurrent senders: node time / storescp time


# -- process CPU ---------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    for tid in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            out.extend(_descendants(int(child)))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """user+sys CPU of the processes (all threads), read from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# -- receivers -----------------------------------------------------------------------------------


class Receiver:
    name = "?"
    aet = "?"
    port = 0

    def start(self) -> None: ...
    def reset(self) -> None: ...
    def stop(self) -> None: ...

    def pids(self) -> list[int]:
        return []

    def count(self) -> int:
        raise NotImplementedError


class NodeReceiver(Receiver):
    """``dicom-node serve`` on a fresh data directory for every run."""

    aet = "AINODE"

    def __init__(self, workdir: Path, *, receivers: int | None, fsync: bool = True, label: str | None = None) -> None:
        self.workdir = workdir
        self.receivers = receivers
        self.fsync = fsync
        self.name = label or "node" + (f" x{receivers}" if receivers else "")
        self.node: NodeProcess | None = None
        self._run = 0

    def _start_fresh(self) -> None:
        self._run += 1
        data = self.workdir / f"run{self._run}"
        env = {
            "DICOM_NODE_AE_TITLE": self.aet,
            "DICOM_NODE_HTTP_PORT": "0",
            "DICOM_NODE_STABLE_SECONDS": "3600",  # no study completes during the measurement
            "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
            "DICOM_NODE_SCP__MIN_FREE_BYTES": str(256 * 2**20),
            "DICOM_NODE_SCP__FSYNC": "true" if self.fsync else "false",
            "DICOM_NODE_LOG__LEVEL": "WARNING",
        }
        if self.receivers:
            env["DICOM_NODE_SCP__RECEIVERS"] = str(self.receivers)
        self.node = NodeProcess(data, env)
        self.node.env["DICOM_NODE_HTTP_PORT"] = "0"
        self.node.start()
        self.port = self.node.dicom_port
        time.sleep(1.0)  # let the receiver processes finish importing

    def start(self) -> None:
        self._start_fresh()

    def reset(self) -> None:
        self.stop()
        self._start_fresh()

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
            shutil.rmtree(self.node.data_dir, ignore_errors=True)
            self.node = None

    def pids(self) -> list[int]:
        assert self.node is not None and self.node.proc is not None
        return _descendants(self.node.proc.pid)

    def count(self) -> int:
        assert self.node is not None
        with sqlite3.connect(self.node.data_dir / "state.sqlite") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


class OrthancReceiver(Receiver):
    name = "Orthanc"

    def __init__(self, workdir: Path) -> None:
        self.orthanc = Orthanc(workdir, aet="ORTHANC", extra={"OverwriteInstances": False})
        self.aet = "ORTHANC"

    def start(self) -> None:
        self.orthanc.start()
        self.port = self.orthanc.dicom_port

    def reset(self) -> None:
        self.orthanc.clear()
        wait_until(lambda: self.count() == 0, 60, message="Orthanc emptied")

    def stop(self) -> None:
        self.orthanc.stop()

    def pids(self) -> list[int]:
        assert self.orthanc.proc is not None
        return [self.orthanc.proc.pid]

    def count(self) -> int:
        return int(self.orthanc.get("/statistics").json()["CountInstances"])


class StoreScpReceiver(Receiver):
    name = "storescp"

    def __init__(self, workdir: Path) -> None:
        self.scp = StoreSCP(workdir, aet="STORESCP")
        self.aet = "STORESCP"

    def start(self) -> None:
        self.scp.start()
        self.port = self.scp.port

    def reset(self) -> None:
        for p in self.scp.received:
            p.unlink()

    def stop(self) -> None:
        self.scp.stop()

    def pids(self) -> list[int]:
        assert self.scp.proc is not None
        return [self.scp.proc.pid]

    def count(self) -> int:
        return len(self.scp.received)


class MinimalScpReceiver(Receiver):
    """``benchmarks/minimal_scp.py``: pynetdicom writing raw bytes + fsync (the framework floor)."""

    name = "pynetdicom-min"
    aet = "MINSCP"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.out = workdir / "received"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from tests.peers import free_port, port_open

        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "minimal_scp.py"), str(self.port), str(self.out)],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), 30, message="minimal pynetdicom SCP")

    def reset(self) -> None:
        for p in self.out.glob("*.dcm"):
            p.unlink()

    def stop(self) -> None:
        from tests.peers import stop_process

        stop_process(self.proc, timeout=10)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def count(self) -> int:
        return len(list(self.out.glob("*.dcm")))


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    receiver: str
    associations: int
    wall: float
    sender_cpu: float
    receiver_cpu: float
    load: float
    files: int
    nbytes: int

    @property
    def inst_per_s(self) -> float:
        return self.files / self.wall

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.wall / 1e6


def send(receiver: Receiver, files: list[Path], associations: int) -> Run:
    """storescu -> receiver over ``associations`` concurrent associations; checked."""
    receiver.reset()
    subprocess.run(["sync"], check=True)
    time.sleep(0.3)
    chunks = [files[i::associations] for i in range(associations)] if associations > 1 else [files]
    # Contiguous quarters, as a modality splitting a series would send them.
    if associations > 1:
        n = len(files)
        chunks = [files[i * n // associations : (i + 1) * n // associations] for i in range(associations)]
    env = dict(os.environ, TCP_NODELAY="1")
    pids = receiver.pids()
    cpu0 = cpu_seconds(pids)
    load = loadavg()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-R", "-aet", "BENCH", "-aec", receiver.aet, "127.0.0.1", str(receiver.port), *map(str, chunk)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    sender_cpu = 0.0
    failures = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sender_cpu += usage.ru_utime + usage.ru_stime
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode != 0 or "E:" in err:
            failures.append(err.strip()[-500:])
    wall = time.perf_counter() - started
    receiver_cpu = cpu_seconds(pids) - cpu0
    if failures:
        raise RuntimeError(f"{receiver.name}: storescu failed: {failures[0]}")
    got = receiver.count()
    if got != len(files):
        raise RuntimeError(f"{receiver.name}: {got} instances stored, {len(files)} sent")
    return Run(
        receiver=receiver.name,
        associations=associations,
        wall=wall,
        sender_cpu=sender_cpu,
        receiver_cpu=receiver_cpu,
        load=load,
        files=len(files),
        nbytes=sum(p.stat().st_size for p in files),
    )


# -- report --------------------------------------------------------------------------------------


def _mmm(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


@dataclass
class Table:
    associations: int
    rounds: list[dict[str, Run]] = field(default_factory=list)

    def print(self, node_names: list[str]) -> None:
        names = list(self.rounds[0])
        print(f"\n300-slice CT, {self.associations} association(s), {len(self.rounds)} rounds")
        print(
            f"{'receiver':<14} {'wall s':>18} {'inst/s':>7} {'MB/s':>6} {'send CPU':>9} {'recv CPU':>9} "
            f"{'recv ms/inst':>12}"
        )
        for name in names:
            runs = [r[name] for r in self.rounds]
            wall = statistics.median(r.wall for r in runs)
            print(
                f"{name:<14} {_mmm([r.wall for r in runs]):>18} {runs[0].files / wall:>7.0f} "
                f"{runs[0].nbytes / wall / 1e6:>6.0f} {statistics.median(r.sender_cpu for r in runs):>9.2f} "
                f"{statistics.median(r.receiver_cpu for r in runs):>9.2f} "
                f"{1000 * statistics.median(r.receiver_cpu for r in runs) / runs[0].files:>12.2f}"
            )
        for node in node_names:
            for peer in ("Orthanc", "storescp", "pynetdicom-min"):
                if peer not in names:
                    continue
                speedup = [r[peer].wall / r[node].wall for r in self.rounds]
                print(f"  {node} speed / {peer} speed, same round: {_mmm(speedup)}")
        loads = [r.load for rnd in self.rounds for r in rnd.values()]
        print(f"  1-min load average before the runs: {min(loads):.2f}-{max(loads):.2f}")
        for node in node_names:
            self._targets(node, names)

    def _targets(self, node: str, names: list[str]) -> None:
        """The issue's targets, judged on medians and same-round ratios."""
        runs = [r[node] for r in self.rounds]
        if self.associations == 1:
            rate = runs[0].files / statistics.median(r.wall for r in runs)
            verdict = "met" if rate >= TARGET_ONE_ASSOCIATION else "NOT met"
            print(f"  target {node}: >= {TARGET_ONE_ASSOCIATION} inst/s over one association: {rate:.0f} ({verdict})")
            return
        if "Orthanc" in names:
            ratio = statistics.median(r["Orthanc"].wall / r[node].wall for r in self.rounds)
            verdict = "met" if ratio >= TARGET_VS_ORTHANC else "NOT met"
            print(f"  target {node}: >= {TARGET_VS_ORTHANC}x Orthanc's rate: {ratio:.2f}x ({verdict})")
        if "storescp" in names:
            ratio = statistics.median(r[node].wall / r["storescp"].wall for r in self.rounds)
            verdict = "met" if ratio <= TARGET_VS_STORESCP else "NOT met"
            print(f"  target {node}: within {TARGET_VS_STORESCP}x of storescp's time: {ratio:.2f}x ({verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument(
        "--node-receivers",
        default="default",
        help="comma list of receiver-process counts for node variants ('default' = settings default)",
    )
    parser.add_argument(
        "--only",
        default="node,orthanc,storescp,pynetdicom-min",
        help="comma list of receivers: node, orthanc, storescp, pynetdicom-min",
    )
    parser.add_argument("--associations", default="1,4", help="comma list, e.g. 1,4")
    parser.add_argument("--no-fsync", action="store_true", help="node without fsync (diagnostic only)")
    args = parser.parse_args(argv)

    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} not found; run scripts/bootstrap --test", file=sys.stderr)
            return 2
    files = ct_phantom.generate(CACHE / f"synth{args.slices}", slices=args.slices)
    total = sum(p.stat().st_size for p in files)
    print(f"study: {len(files)} files, {total / 1e6:.1f} MB; cores: {os.cpu_count()}; load: {Path('/proc/loadavg').read_text().strip()}")

    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    receivers: list[Receiver] = []
    node_names: list[str] = []
    try:
        if "node" in only:
            for spec in args.node_receivers.split(","):
                n = None if spec == "default" else int(spec)
                r = NodeReceiver(work / f"node{spec}", receivers=n, fsync=not args.no_fsync)
                receivers.append(r)
                node_names.append(r.name)
        if "orthanc" in only:
            receivers.append(OrthancReceiver(work / "orthanc"))
        if "storescp" in only:
            receivers.append(StoreScpReceiver(work / "storescp"))
        if "pynetdicom-min" in only:
            receivers.append(MinimalScpReceiver(work / "minimal"))
        for r in receivers:
            r.start()
        # One warm-up run each (page cache, imports, first-connection costs).
        for r in receivers:
            send(r, files, 1)
        tables = []
        for assoc in [int(a) for a in args.associations.split(",")]:
            table = Table(assoc)
            for rnd in range(args.rounds):
                order = receivers[rnd % len(receivers):] + receivers[: rnd % len(receivers)]
                results = {}
                for r in order:
                    results[r.name] = send(r, files, assoc)
                table.rounds.append({r.name: results[r.name] for r in receivers})
                line = "  ".join(f"{n} {run.wall:.2f}s" for n, run in table.rounds[-1].items())
                print(f"[{assoc} assoc, round {rnd + 1}] {line}", flush=True)
            tables.append(table)
        for table in tables:
            table.print(node_names)
    finally:
        for r in receivers:
            try:
                r.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {r.name}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
