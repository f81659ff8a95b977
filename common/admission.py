"""Bounded concurrency with a bounded wait queue (engines and the orchestrator)."""

import threading
from contextlib import contextmanager


class Overloaded(Exception):
    """The limit and the queue are both full: the caller should come back later."""


class QueueTimeout(Exception):
    """Waited in the queue until the request's deadline."""


class Admission:
    """At most `limit` holders at once and `queue` more waiting; anyone past that is turned away."""

    def __init__(self, limit: int, queue: int, what: str):
        if limit < 1 or queue < 0:
            raise ValueError(f"{what}: the limit must be >= 1 and the queue >= 0, got {limit} and {queue}")
        self.limit, self.queue, self.what = limit, queue, what
        self.active = self.waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, timeout: float | None = None):
        with self._cond:
            if self.active >= self.limit:
                if self.waiting >= self.queue:
                    raise Overloaded(f"{self.what} is at its limits: {self.active} running (limit {self.limit}) "
                                     f"and {self.waiting} queued (limit {self.queue}); retry later")
                self.waiting += 1
                try:
                    if not self._cond.wait_for(lambda: self.active < self.limit, timeout):
                        raise QueueTimeout(f"waited {timeout:.1f} s for a free slot on {self.what}")
                finally:
                    self.waiting -= 1
            self.active += 1
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                self._cond.notify()
