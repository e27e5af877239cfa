"""Automatic routing from Orthanc to the dicom-node AI node, as an Orthanc Python plugin.

Needs Orthanc 1.10 or later with the Python plugin (tested with Orthanc 1.10.1 and the plugin 4.0
of Debian 12, ``apt-get install orthanc-python``; in the ``orthancteam/orthanc`` image,
``PYTHON_PLUGIN_ENABLED=true``), loaded by the configuration option ``"PythonScript"`` with an
absolute path (``orthanc-python.json`` next to this file).

It routes exactly like ``autoroute.lua`` and keeps its state in the same user metadata, so a site
can switch between the two scripts (never load both: every study would be sent twice):

- When a study becomes stable (no new instance for ``StableAge`` seconds), the series that match
  the filter below are sent to the node, registered in ``DicomModalities`` under ``TARGET``. The
  node's own output (``NEVER_ROUTE`` modalities, or a first instance matching ``OUR_MARKS``) is
  never sent, and a series already sent is sent again only if it gained instances since.
- ``AiNodeRouted`` (series): the instance count sent, written only once the store job succeeded.
- ``AiNodePending`` (study): ``"<attempts> <next attempt, Unix time>"`` while the node has not
  accepted the study. Declare both in the configuration:
  ``"UserMetadata": { "AiNodeRouted": 1024, "AiNodePending": 1025 }``.

What the Lua script cannot do on Orthanc 1.10 this plugin does: a thread of its own looks at the
queue every ``TICK`` seconds and sends each study whose time has come again, with exponential
back-off (``RETRY_FIRST`` doubling up to ``RETRY_MAX``) until a store job succeeds, whether or
not anything else happens in Orthanc. When one study gets through, every waiting study is tried
at once. On start-up the queue is rebuilt from ``AiNodePending``, so it survives a restart.

Orthanc's change callback only hands study IDs to that thread: it never waits on the network.
Store jobs are asynchronous Orthanc jobs (visible under *Jobs* in Orthanc Explorer); at most
``BATCH`` run at once. Logs name Orthanc's opaque identifiers only, never patient data.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
import time
from typing import Any

import orthanc

# ---------------------------------------------------------------------------------- settings
TARGET = "ainode"  # the node's name in "DicomModalities"
MODALITIES = {"CT"}  # series modalities to route, e.g. {"CT", "MR"}
BODY_PART: str | None = None  # regular expression searched in BodyPartExamined; None = any
MIN_INSTANCES = 1  # skip series with fewer instances (e.g. 16 to skip scouts)
NEVER_ROUTE = {"SR", "SEG", "KO", "PR", "RTSTRUCT", "DOC"}
OUR_MARKS = {  # a series is the node's own output when any of these match
    "Manufacturer": r"^dicom-node$",  # (regular expressions on the first instance's tags)
    "SeriesDescription": r"^AI:",
    "ContentCreatorName": r"^dicom-node$",
}
ROUTED = "AiNodeRouted"  # series user metadata (see above)
PENDING = "AiNodePending"  # study user metadata (see above)
RETRY_FIRST = 10  # seconds before the first retry of a study the node did not take
RETRY_MAX = 600  # back-off ceiling, seconds
TICK = 5  # seconds between two looks at the queue
BATCH = 10  # at most this many store jobs running at once (and started per tick)
# ---------------------------------------------------------------------------------------------

PAGE = 1000  # studies per REST page when the queue is rebuilt at start-up
JOB_POLL = 1  # seconds between two looks at the running store jobs, while there are any


def log(message: str) -> None:
    orthanc.LogWarning("dicom-node auto-route: " + message)


def get_json(uri: str) -> Any:
    return json.loads(orthanc.RestApiGet(uri))


def metadata(path: str, name: str) -> str | None:
    """A user metadata value of a resource, or None (GET .../metadata/{missing} is an error)."""
    try:
        if name not in get_json(path + "/metadata"):
            return None
        value = orthanc.RestApiGet(f"{path}/metadata/{name}")
    except Exception:  # the resource was deleted meanwhile
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def matches(value: Any, pattern: str | None) -> bool:
    return value is not None and pattern is not None and re.search(pattern, str(value)) is not None


def is_our_output(modality: str, tags: dict[str, Any]) -> bool:
    if modality in NEVER_ROUTE:
        return True
    return any(matches(tags.get(keyword), pattern) for keyword, pattern in OUR_MARKS.items())


def wanted(modality: str, tags: dict[str, Any], count: int) -> bool:
    if modality not in MODALITIES or count < MIN_INSTANCES:
        return False
    return BODY_PART is None or matches(str(tags.get("BodyPartExamined", "")).upper(), BODY_PART)


def delay(attempts: int) -> int:
    return int(min(RETRY_FIRST * 2 ** max(attempts - 1, 0), RETRY_MAX))


def series_to_send(study_id: str) -> dict[str, int] | None:
    """Series ID -> instance count of what the node should get now; None if the study is gone."""
    try:
        all_series = get_json(f"/studies/{study_id}/series")
    except Exception:
        return None
    send = {}
    for series in all_series:
        instances = series["Instances"]
        if not instances:
            continue
        modality = series["MainDicomTags"].get("Modality", "")
        first = get_json(f"/instances/{instances[0]}/simplified-tags")
        if is_our_output(modality, first):
            continue  # the node's own result (or another derived object): never sent back
        if not wanted(modality, first, len(instances)):
            continue
        if metadata(f"/series/{series['ID']}", ROUTED) != str(len(instances)):
            send[series["ID"]] = len(instances)
    return send


class Router:
    """The retry queue and the thread that works it; Orthanc's callback only feeds ``stable``."""

    def __init__(self) -> None:
        self.stable: queue.Queue[str | None] = queue.Queue()
        self.waiting: dict[str, tuple[int, float]] = {}  # study -> (attempts, due), = PENDING
        self.jobs: dict[str, tuple[str, dict[str, int]]] = {}  # job -> (study, series to mark)
        self.in_flight: dict[str, str] = {}  # study -> job
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    # -- Orthanc's side ------------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="dicom-node-autoroute", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.stable.put(None)  # wake the thread
        if self.thread is not None:
            self.thread.join(timeout=TICK + 5)

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.reload()
        except Exception as exc:
            log(f"could not read the retry queue back ({type(exc).__name__})")
        next_tick = time.monotonic()
        while not self.stopping.is_set():
            try:
                study = self.stable.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                study = None
            try:
                if study is not None:
                    self.route(study)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK
                    self.tick()
            except Exception as exc:  # keep the thread alive; Orthanc may be shutting down
                log(f"routing step failed ({type(exc).__name__}); trying again later")
            if self.jobs:  # a running store job is looked at again soon
                next_tick = min(next_tick, time.monotonic() + JOB_POLL)

    def reload(self) -> None:
        """Rebuild the queue from PENDING: one metadata read per study, in pages."""
        since = 0
        while not self.stopping.is_set():
            ids = get_json(f"/studies?since={since}&limit={PAGE}")
            for study_id in ids:
                value = metadata(f"/studies/{study_id}", PENDING)
                if value is not None:
                    attempts = re.match(r"\d+", value)
                    self.waiting[study_id] = (int(attempts.group()) if attempts else 0, 0.0)
            since += PAGE
            if len(ids) < PAGE:
                break
        if self.waiting:
            log(f"{len(self.waiting)} studies not yet accepted by {TARGET}: sending them again")

    def tick(self) -> None:
        got_through = False
        for job_id in list(self.jobs):
            got_through = self.check(job_id) or got_through
        now = time.time()
        if got_through:  # the node takes studies again: whatever waits goes now
            self.waiting = {study: (attempts, now) for study, (attempts, _) in self.waiting.items()}
        due = sorted(
            (entry[1], study)
            for study, entry in self.waiting.items()
            if study not in self.in_flight and entry[1] <= now
        )
        for _, study in due[: max(0, BATCH - len(self.jobs))]:
            self.route(study)

    def route(self, study_id: str) -> None:
        if study_id in self.in_flight:
            return  # its job will report; the study is looked at again then
        send = series_to_send(study_id)
        if not send:
            self.forget(study_id)
            return
        attempts = self.waiting.get(study_id, (0, 0.0))[0]
        # Pending before the job starts: a crash or restart while it runs still retries the study.
        self.remember(study_id, attempts, time.time() + delay(attempts + 1))
        request = {"Resources": sorted(send), "Asynchronous": True, "Permissive": False}
        try:
            answer = json.loads(
                orthanc.RestApiPost(f"/modalities/{TARGET}/store", json.dumps(request))
            )
        except Exception:  # e.g. TARGET missing from DicomModalities
            self.failed(study_id, "could not start a store job")
            return
        self.jobs[answer["ID"]] = (study_id, send)
        self.in_flight[study_id] = answer["ID"]
        log(
            f"study {study_id}: sending {len(send)} series to {TARGET} "
            f"(job {answer['ID']}, attempt {attempts + 1})"
        )

    def check(self, job_id: str) -> bool:
        """Look at one running store job; True when it succeeded."""
        try:
            state = get_json(f"/jobs/{job_id}").get("State")
        except Exception:
            state = "Failure"  # gone from Orthanc's job history
        if state not in ("Success", "Failure"):
            return False  # Pending, Running, Paused, Retry
        study_id, send = self.jobs.pop(job_id)
        self.in_flight.pop(study_id, None)
        if state == "Failure":
            self.failed(study_id, f"job {job_id} could not send the study")
            return False
        for series_id, count in send.items():
            with contextlib.suppress(Exception):  # the series was deleted meanwhile
                orthanc.RestApiPut(f"/series/{series_id}/metadata/{ROUTED}", str(count))
        log(f"study {study_id}: accepted by {TARGET} (job {job_id})")
        # Done, unless instances arrived while the job ran: then those series go now.
        self.waiting.pop(study_id, None)
        self.route(study_id)
        return True

    def failed(self, study_id: str, why: str) -> None:
        attempts = self.waiting.get(study_id, (0, 0.0))[0] + 1
        wait = delay(attempts)
        self.remember(study_id, attempts, time.time() + wait)
        log(f"study {study_id}: {why} to {TARGET} (attempt {attempts}); next attempt in {wait} s")

    def remember(self, study_id: str, attempts: int, due: float) -> None:
        self.waiting[study_id] = (attempts, due)
        try:
            orthanc.RestApiPut(f"/studies/{study_id}/metadata/{PENDING}", f"{attempts} {int(due)}")
        except Exception:
            self.waiting.pop(study_id, None)  # the study was deleted meanwhile

    def forget(self, study_id: str) -> None:
        self.waiting.pop(study_id, None)
        if metadata(f"/studies/{study_id}", PENDING) is not None:
            with contextlib.suppress(Exception):
                orthanc.RestApiDelete(f"/studies/{study_id}/metadata/{PENDING}")


ROUTER = Router()


def on_change(change_type: Any, level: Any, resource_id: str) -> None:
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        ROUTER.stable.put(resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        ROUTER.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        ROUTER.stop()


orthanc.RegisterOnChangeCallback(on_change)
