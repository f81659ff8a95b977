"""Several replicas of one engine: sessions stay on the replica that holds their KV cache.

Each replica is addressed on its own (a list of addresses, or a host name that resolves to several,
such as a Kubernetes headless Service). A new session goes to the replica this orchestrator drives
the fewest sessions on; the session's replica is kept in its store record, so whichever
orchestrator replica drives the session next uses the same engine replica. When that replica stops
answering and another one does, the session moves there and is prefilled again from its log.
"""

import itertools
import logging
import socket
import threading
import time
from collections import Counter

from common.errors import EngineUnavailable, SessionNotFound

log = logging.getLogger(__name__)


def expand(addresses: list[str]) -> list[str]:
    """host:port entries, a host resolving to several IPs giving one entry per IP (headless Services)."""
    replicas = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            # IPv4 only: "localhost" also resolving to ::1 is one server, not two replicas.
            ips = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), socket.AF_INET,
                                                                     socket.SOCK_STREAM)})
        except (OSError, ValueError):
            ips = []
        if len(ips) > 1:
            replicas += [f"{ip}:{port}" for ip in ips]
        else:
            replicas.append(address)
    return list(dict.fromkeys(replicas))


class EnginePool:
    """The replicas of one engine role, with what this orchestrator drives on each."""

    DOWN_S = 5.0  # a replica that failed is not offered new sessions for this long

    def __init__(self, addresses: list[str], connect, resolve_every_s: float = 10.0):
        self.addresses, self.connect, self.resolve_every_s = addresses, connect, resolve_every_s
        self.clients: dict[str, object] = {}
        self.active: Counter[str] = Counter()
        self._down_until: dict[str, float] = {}
        self._turn = itertools.count()  # breaks ties, so idle replicas take turns
        self._lock = threading.Lock()
        self._resolved_at = -float("inf")
        self._refresh()

    @classmethod
    def of(cls, engine) -> "EnginePool":
        """A pool of one, around an engine client that already exists (in-process engines, tests)."""
        if isinstance(engine, EnginePool):
            return engine
        return cls([engine.address], lambda address: engine, resolve_every_s=float("inf"))

    def _refresh(self) -> None:
        if time.monotonic() - self._resolved_at < self.resolve_every_s:
            return
        self._resolved_at = time.monotonic()
        current = expand(self.addresses)
        for address in current:
            self.client(address)
        with self._lock:  # replicas gone from DNS: forget them once no session of ours is on them
            for address in [a for a in self.clients if a not in current and self.active[a] <= 0]:
                self.clients.pop(address).close()

    def client(self, address: str):
        with self._lock:
            if address not in self.clients:
                self.clients[address] = self.connect(address)
            return self.clients[address]

    def any(self):
        return next(iter(self.clients.values()))

    def pick(self) -> str:
        """The replica for a new session: the least busy of those not recently failed (any, when all were)."""
        self._refresh()
        with self._lock:
            return self._least_busy(self._not_failed() or list(self.clients))

    def fail_over(self, address: str) -> str | None:
        """Another replica for a session whose replica stopped answering: one that answers; None while none does
        (the session then waits for its own with backoff, rather than moving between dead replicas)."""
        with self._lock:
            self._down_until[address] = time.monotonic() + self.DOWN_S
            others = [a for a in self._not_failed() if a != address and _answering(self.clients[a])]
            return self._least_busy(others) if others else None

    def _not_failed(self) -> list[str]:
        """Replicas not failed in the last DOWN_S seconds (after that, new sessions try a failed one again)."""
        now = time.monotonic()
        return [a for a in self.clients if self._down_until.get(a, 0) <= now]

    def _least_busy(self, candidates: list[str]) -> str:
        turn = next(self._turn)
        return min(candidates, key=lambda a: (self.active[a], (candidates.index(a) - turn) % len(candidates)))

    def count(self, address: str, change: int) -> None:
        """Sessions this orchestrator drives on the replica: +1 when one starts, -1 when it ends."""
        with self._lock:
            self.active[address] += change

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _answering(client) -> bool:
    """gRPC engine clients know whether their engine answered their last call; in-process engines always do."""
    return getattr(client, "answering", lambda: True)()


class PinnedEngine:
    """One session's engine of one role: calls go to the replica named in progress.replicas."""

    def __init__(self, pool: EnginePool, progress, role: int):
        self.pool, self.progress, self.role = pool, progress, role

    @property
    def address(self) -> str:
        return self.progress.replicas[self.role]

    def _call(self, method: str, req, timeout):
        address = self.address
        try:
            return getattr(self.pool.client(address), method)(req, timeout=timeout)
        except EngineUnavailable:
            self._fail_over(address)

    def stream_span(self, req, timeout=None):
        address = self.address
        try:
            return (yield from self.pool.client(address).stream_span(req, timeout=timeout))
        except EngineUnavailable:
            self._fail_over(address)

    def _fail_over(self, address: str):
        """Move the session to another replica and have the loop prefill it there, or, with no other
        replica, let the loop retry this one with backoff."""
        other = self.pool.fail_over(address)
        if other is None:
            raise
        self.move(other)
        log.warning("session %s: engine replica %s is unreachable, moved to %s", self.progress.session_id,
                    address, other)
        raise SessionNotFound(f"{address} is unreachable; the session moved to {other}", cache_len=0) from None

    def move(self, address: str) -> None:
        self.pool.count(self.address, -1)
        self.pool.count(address, +1)
        self.progress.replicas[self.role] = address

    def prefill(self, req, timeout=None):
        return self._call("prefill", req, timeout)

    def decode(self, req, timeout=None):
        return self._call("decode", req, timeout)

    def rollback(self, req, timeout=None):
        return self._call("rollback", req, timeout)

    def release(self, req, timeout=None):
        return self.pool.client(self.address).release(req, timeout=timeout)
