"""Session state: Redis in deployment, an in-process map when no Redis is given.

Per session, a hash `rstitch:{id}:meta` (the request as resolved, status, stats, each engine's
synced cache length, cancel flag) and a list `rstitch:{id}:log` of SpanRecord protos, one entry
per span. The braces are a Redis Cluster hash tag: both keys of a session live on one shard.
"""

import threading
from abc import ABC, abstractmethod

from rstitch.v1 import orchestrator_pb2 as opb

from .policies import LLM, SLM


class StoreUnavailable(Exception):
    pass


class SessionStore(ABC):
    def __init__(self, finished_ttl_s: int = 24 * 3600):
        self.finished_ttl_s = finished_ttl_s

    # --- what a store provides ----------------------------------------------------------------

    @abstractmethod
    def _apply(self, session_id: str, fields: dict, record: bytes | None = None, read: str | None = None,
               ttl_s: int | None = None):
        """Atomically: set hash fields, append a log record, expire; return field `read`."""

    @abstractmethod
    def _load(self, session_id: str) -> tuple[dict[str, bytes], list[bytes]]:
        """The hash (empty if none) and the log."""

    # --- sessions -----------------------------------------------------------------------------

    def create(self, header: opb.Session) -> None:
        self._apply(header.session_id, {"header": header.SerializeToString(), "status": opb.STATUS_RUNNING,
                                        "stats": b"", "synced_slm": 0, "synced_llm": 0})

    def append(self, session_id: str, record: opb.SpanRecord, synced: dict, stats: opb.Stats) -> bool:
        """Log one span (one round trip). Returns whether a cancel was requested."""
        fields = {"stats": stats.SerializeToString(), "synced_slm": synced[SLM], "synced_llm": synced[LLM]}
        body = record.SerializeToString() if record.token_ids else None
        return bool(self._apply(session_id, fields, body, read="cancel"))

    def finish(self, session_id: str, status: int, reason: int, stats: opb.Stats, text: str, error: str = "") -> None:
        fields = {"status": status, "finish_reason": reason, "stats": stats.SerializeToString(),
                  "text": text.encode(), "error": error.encode()}
        self._apply(session_id, fields, ttl_s=self.finished_ttl_s)

    def request_cancel(self, session_id: str) -> int | None:
        """Flag a running session for cancellation; returns its status, None if unknown."""
        fields, _ = self._load(session_id)
        if not fields:
            return None
        status = int(fields["status"])
        if status == opb.STATUS_RUNNING:
            self._apply(session_id, {"cancel": 1})
        return status

    def get(self, session_id: str) -> opb.Session | None:
        fields, log = self._load(session_id)
        if not fields:
            return None
        session = opb.Session.FromString(fields["header"])
        session.status = int(fields["status"])
        session.stats.ParseFromString(fields.get("stats", b""))
        session.finish_reason = int(fields.get("finish_reason", 0))
        session.text = fields.get("text", b"").decode()
        session.error = fields.get("error", b"").decode()
        session.spans.extend(opb.SpanRecord.FromString(r) for r in log)
        return session

    def describe(self) -> str:
        return type(self).__name__


def _meta(session_id):
    return f"rstitch:{{{session_id}}}:meta"


def _log(session_id):
    return f"rstitch:{{{session_id}}}:log"


class RedisSessionStore(SessionStore):
    def __init__(self, url: str, **kwargs):
        import redis

        super().__init__(**kwargs)
        self.url = url
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._errors = (redis.ConnectionError, redis.TimeoutError)

    def ping(self) -> None:
        try:
            self._redis.ping()
        except self._errors as e:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable: {e}") from None

    def _apply(self, session_id, fields, record=None, read=None, ttl_s=None):
        pipe = self._redis.pipeline(transaction=True)
        if fields:
            pipe.hset(_meta(session_id), mapping=fields)
        if record is not None:
            pipe.rpush(_log(session_id), record)
        if read:
            pipe.hget(_meta(session_id), read)
        if ttl_s:
            pipe.expire(_meta(session_id), ttl_s)
            pipe.expire(_log(session_id), ttl_s)
        try:
            results = pipe.execute()
        except self._errors as e:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable: {e}") from None
        return results[-1 - 2 * bool(ttl_s)] if read else None

    def _load(self, session_id):
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(_meta(session_id))
        pipe.lrange(_log(session_id), 0, -1)
        try:
            fields, log = pipe.execute()
        except self._errors as e:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable: {e}") from None
        return {k.decode(): v for k, v in fields.items()}, log

    def describe(self):
        return f"Redis at {self.url}"


class MemorySessionStore(SessionStore):
    """Everything in this process: lost on restart, not shared between replicas. For a laptop."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._meta: dict[str, dict[str, bytes]] = {}
        self._logs: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()

    def _apply(self, session_id, fields, record=None, read=None, ttl_s=None):
        # TTLs are not applied: an in-process store lives only as long as the process.
        with self._lock:
            meta = self._meta.setdefault(session_id, {})
            meta.update({k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()})
            if record is not None:
                self._logs.setdefault(session_id, []).append(record)
            return meta.get(read) if read else None

    def _load(self, session_id):
        with self._lock:
            return dict(self._meta.get(session_id, {})), list(self._logs.get(session_id, []))

    def describe(self):
        return "an in-process store (sessions are lost when this process stops)"
