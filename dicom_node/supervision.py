"""Keeping ``dicom-node serve``'s child processes tied to it: they die with it, and the ones
that die alone are restarted, a bounded number of times.

A child left running after the node was SIGKILLed (OOM killer, ``docker kill``) would keep the
DICOM port and the spool, and the restarted node could not start. Linux delivers a chosen
signal to a process when its parent dies (``prctl(PR_SET_PDEATHSIG)``, prctl(2)); each child
asks for it first thing, then checks that the parent it was started by is still its parent, in
case the parent died before the request (the race prctl(2) describes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def die_with_parent(expected_parent: int, sig: int = signal.SIGTERM) -> None:
    """Have this process receive ``sig`` when its parent ends; exit now if it already has.

    Call it first thing in a child process. Elsewhere than Linux it does nothing (the parent's
    orderly stop still stops its children).
    """
    libc = _load_libc()
    if libc is None:
        return
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent:
        # The parent died before the request: nobody will stop this child. Exit at once (not
        # by signal: between fork and exec the parent's Python handlers would swallow it).
        os._exit(1)


def parent_death_hook(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``subprocess.Popen(preexec_fn=...)`` that ties the child to the calling process.

    libc is loaded here, in the parent: the hook runs between fork and exec, where loading a
    library is not safe. The signal is kept across ``exec`` (it is reset only for set-user-ID
    programs). It is delivered when the *thread* that started the child ends, so start
    children from a thread that lives as long as they should.
    """
    parent = os.getpid()
    _load_libc()
    return lambda: die_with_parent(parent, sig)


class RestartBudget:
    """At most ``limit`` restarts in any ``window`` seconds; beyond that, a crash loop."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float | None = None) -> bool:
        """Record a restart about to happen; False when it would exceed the budget."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True
