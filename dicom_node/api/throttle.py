"""Back-off for failed logins, per client address, in bounded memory.

An address may fail :attr:`LoginThrottle.free_failures` times; each further failure makes it
wait twice as long as the last (1 s, 2 s, 4 s ... up to ``max_lockout``), during which every
request from it is answered 429 with ``Retry-After``. A successful login clears the address.
Failures are forgotten after ``window`` seconds without one. The table keeps at most
``max_addresses`` entries and drops the least recently seen first, so a flood of addresses
costs bounded memory (at worst, dropped addresses start over).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_ADDRESSES = 10_000


@dataclass
class _Entry:
    failures: int = 0
    last_failure: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Failure counts and lock-outs per client address (thread-safe)."""

    def __init__(
        self,
        free_failures: int = 5,
        max_lockout: float = 300.0,
        *,
        window: float | None = None,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.max_lockout = max_lockout
        self.window = window if window is not None else max(900.0, 2 * max_lockout)
        self.max_addresses = max_addresses
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, address: str) -> int:
        """Seconds the address must still wait (0: it may try)."""
        with self._lock:
            entry = self._entries.get(address)
            if entry is None:
                return 0
            remaining = entry.blocked_until - self.clock()
            return math.ceil(remaining) if remaining > 0 else 0

    def failed(self, address: str) -> int:
        """Count a failed login; returns the lock-out it starts (s), 0 while failures are free."""
        now = self.clock()
        with self._lock:
            entry = self._entries.pop(address, None)
            if entry is None or now - entry.last_failure > self.window:
                entry = _Entry()
            entry.failures += 1
            entry.last_failure = now
            excess = entry.failures - self.free_failures
            lockout = min(self.max_lockout, 2.0 ** (excess - 1)) if excess > 0 else 0.0
            entry.blocked_until = now + lockout
            self._entries[address] = entry  # most recent last
            while len(self._entries) > self.max_addresses:
                self._entries.popitem(last=False)
            return math.ceil(lockout)

    def succeeded(self, address: str) -> None:
        """A successful login clears the address's failures."""
        with self._lock:
            self._entries.pop(address, None)
