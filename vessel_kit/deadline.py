"""``Deadline``: a ``time.monotonic()`` end time that measures the work rate as work is done.

The engine asks it before each pass whether the pass would still fit (``would_overrun``) and
reports finished work (``record``), which raises ``TimeoutError`` once the time is past. It is
thread-safe: several devices record into one deadline. Progress display is not its concern.

Example::

    deadline = Deadline(time.monotonic() + 600, total=1500)
    if not deadline.would_overrun(500):
        ...  # do the work, calling deadline.record(n) as tiles finish
"""

from __future__ import annotations

import threading
import time

__all__ = ["Deadline", "DeadlineWarning"]


class DeadlineWarning(UserWarning):
    """Work (axes of a volume) was left out so that inference ends before its deadline."""


class Deadline:
    """An optional end time (``at``, a ``time.monotonic()`` time; None: no deadline), the
    ``total`` tiles planned (for the message) and the tiles recorded since it was made.

    Example::

        clock = Deadline(time.monotonic() + 60, total=100)
        clock.record(10)  # TimeoutError once the minute is past
    """

    def __init__(self, at: float | None, total: int) -> None:
        self.at, self.total = at, total
        self.started = time.monotonic()
        self.done = 0
        self._lock = threading.Lock()

    def would_overrun(self, units: int) -> bool:
        """Whether ``units`` more, at the rate so far, would end past the deadline (False before
        any unit is done: the first pass always starts)."""
        if self.at is None or self.done == 0:
            return False
        now = time.monotonic()
        return now + units * (now - self.started) / self.done > self.at

    def record(self, units: int) -> None:
        """Count ``units`` as done; TimeoutError if the deadline has passed."""
        with self._lock:
            self.done += units
        if self.at is not None and time.monotonic() > self.at:
            raise TimeoutError(f"inference passed its deadline after {self.done} of {self.total} tiles")
