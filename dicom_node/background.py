"""One daemon thread per component of ``dicom-node serve`` (probes, retention, alerts): the
start/stop they share, so each component only says what one round does (``_run``)."""

from __future__ import annotations

import threading


class BackgroundThread:
    """Runs :meth:`_run` in a daemon thread from :meth:`start` until :meth:`stop`.

    ``_run`` watches ``self._stop`` (a :class:`threading.Event`) and returns when it is set;
    ``stop`` waits ``join_timeout`` seconds for that, then leaves the daemon to end with the
    process (a round in flight, e.g. a probe of a slow PACS, is not cut short)."""

    thread_name = "background"
    join_timeout = 10.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout)

    def _run(self) -> None:
        raise NotImplementedError
