"""Per-session KV caches under one token budget, with least-recently-used eviction."""

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from common.errors import (
    CacheMismatch,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    KVExhausted,
    SessionBusy,
    SessionNotFound,
)


@dataclass(eq=False)
class Session:
    id: str
    state: Any = None  # the backend's cache object; None until the first forward
    length: int = 0  # tokens held in the cache
    in_use: bool = False
    release_when_done: bool = False  # released while its call ran: freed when the call ends
    last_used: float = field(default_factory=time.monotonic)


class SessionTable:
    """Thread-safe session map. One call at a time per session; the budget counts cached tokens.

    A session that has no call in flight can be evicted to make room for another; its next call
    then gets NOT_FOUND and the caller re-prefills it from its own log.
    """

    def __init__(self, capacity_tokens: int, max_sessions: int = 0):
        if capacity_tokens <= 0:
            raise ValueError("the KV budget must hold at least one token")
        self.capacity = capacity_tokens
        self.max_sessions = max_sessions  # 0: as many as the KV budget holds
        # The backend's hook for a session leaving the table (its cache memory goes back to a pool).
        self.on_remove: Callable[[Session], None] = lambda session: None
        self.used = 0
        self.evictions = 0
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @contextmanager
    def checkout(self, session_id: str, base_len: int | None, create: bool = False):
        """Hold the session for one call; base_len None skips the length check (Rollback)."""
        if not session_id:
            raise InvalidRequest("session_id is empty")
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                if not create:
                    raise SessionNotFound(
                        f"session {session_id!r} is not on this engine (never prefilled, released, or evicted "
                        "under KV pressure); prefill it again from base_len 0",
                        cache_len=0,
                    )
                if self.max_sessions and len(self._sessions) >= self.max_sessions:
                    self._evict_one(f"the engine holds {len(self._sessions)} sessions, its limit (--max-sessions)")
                session = self._sessions[session_id] = Session(session_id)
            if session.in_use:
                raise SessionBusy(f"session {session_id!r} has another call in flight on this engine")
            if base_len is not None and session.length != base_len:
                raise CacheMismatch(
                    f"session {session_id!r}: caller assumed a cache of {base_len} tokens, the engine holds "
                    f"{session.length}; roll back or prefill from the real length",
                    cache_len=session.length,
                )
            session.in_use = True
            self._sessions.move_to_end(session_id)
        try:
            yield session
        except Exception as e:
            # A contract error leaves the cache as it was; anything else may have left it half-updated,
            # so drop it and let the caller re-prefill. A session that never held a token goes too.
            if not isinstance(e, EngineError) or session.length == 0:
                self._drop(session)
            raise
        finally:
            session.in_use = False
            session.last_used = time.monotonic()
            if session.release_when_done:
                self._drop(session)

    def grow(self, session: Session, n: int) -> None:
        """Reserve room for n more tokens in `session`, evicting idle sessions if needed."""
        with self._lock:
            if session.length + n > self.capacity:
                raise KVExhausted(
                    f"session needs {session.length + n} cached tokens but the whole KV budget is {self.capacity}"
                )
            while self.used + n > self.capacity:
                self._evict_one(f"KV budget full: {self.used} of {self.capacity} tokens held")
            self.used += n
            session.length += n

    def shrink(self, session: Session, length: int) -> None:
        with self._lock:
            self.used -= session.length - length
            session.length = length

    def release(self, session_id: str) -> bool:
        """Free the session's cache; one with a call in flight (a cancelled stream the engine has not
        stopped yet, say) is freed when that call ends."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            if session.in_use:
                session.release_when_done = True
            else:
                self._remove(session)
            return True

    def _evict_one(self, why: str) -> None:
        """Drop the least recently used idle session (caller holds the lock)."""
        victim = next((s for s in self._sessions.values() if not s.in_use), None)
        if victim is None:
            raise EngineOverloaded(f"{why}, all by sessions with calls in flight; retry later")
        self._remove(victim)
        self.evictions += 1

    def _drop(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.id) is session:
                self._remove(session)

    def _remove(self, session: Session) -> None:
        self.on_remove(session)
        del self._sessions[session.id]
        self.used -= session.length
        session.state = None
        session.length = 0
