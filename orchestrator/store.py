"""Session state: Redis in deployment, an in-process map when no Redis is given.

Per session, a hash `rstitch:{id}:meta` (the request as resolved, status, stats, each engine's
synced cache length, the role that writes next, lease epoch and owner, cancel flag), a list
`rstitch:{id}:log` of SpanRecord protos, one entry per span, and `rstitch:{id}:lease`, which exists
while a replica drives the session. The braces are a Redis Cluster hash tag: a session's keys live
on one shard, so a Lua script can touch them together.

Leases: the replica that creates or takes over a session holds epoch N; taking over increments the
epoch, and every write carries its writer's epoch and is refused (Fenced) once another replica has
taken the session over. A log write also names the index it appends at, so a write retried after a
lost reply is applied once.
"""

import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from rstitch.v1 import orchestrator_pb2 as opb

from .policies import LLM, SLM

RUNNING, FAILED = str(opb.STATUS_RUNNING).encode(), str(opb.STATUS_FAILED).encode()
ABANDONED_TTL_S = 24 * 3600


class StoreUnavailable(Exception):
    pass


class Fenced(Exception):
    """Another replica took the session over: this one must stop writing it."""


class LeaseHeld(Exception):
    def __init__(self, session_id: str, remaining_s: float):
        super().__init__(f"session {session_id} is driven by another replica (lease ends in {remaining_s:.1f} s)")
        self.remaining_s = remaining_s


class NotResumable(Exception):
    pass


class SessionExists(Exception):
    """A new session was given the id of one the store holds (a client repeating a Generate)."""


@dataclass
class Lease:
    session_id: str
    epoch: int


class SessionStore(ABC):
    def __init__(self, ttl_s: int = 24 * 3600, lease_s: float = 10.0):
        self.ttl_s = ttl_s  # a finished session expires this long after its end
        self.lease_s = lease_s

    def _ttl(self, running: bool) -> int:
        # A running session lives at least a day past its last write: long enough for a replica to
        # resume it, short enough that one nobody resumes does not stay forever.
        return max(self.ttl_s, ABANDONED_TTL_S) if running else self.ttl_s

    # --- what a store provides (each call atomic) ---------------------------------------------

    @abstractmethod
    def _create(self, session_id: str, fields: dict) -> None:
        """New session at epoch 1, lease held; raises SessionExists, changing nothing, if the id is taken."""

    @abstractmethod
    def _write(self, lease: Lease, index: int, record: bytes | None, fields: dict, hold: bool) -> bool:
        """Fenced by epoch: put `record` at log position `index` (unless already there), set fields,
        renew the lease (hold) or drop it; returns the cancel flag."""

    @abstractmethod
    def acquire(self, session_id: str, owner: str) -> Lease:
        """Take over a running or failed session whose lease has lapsed (raises LeaseHeld, NotResumable,
        or KeyError for an unknown one)."""

    @abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Extend the lease; False once another replica holds the session."""

    @abstractmethod
    def _load(self, session_id: str) -> tuple[dict[str, bytes], list[bytes]]:
        """The hash (empty if none) and the log."""

    @abstractmethod
    def _flag_cancel(self, session_id: str) -> None: ...

    # --- sessions -----------------------------------------------------------------------------

    def create(self, header: opb.Session, owner: str, first_role: int) -> Lease:
        self._create(header.session_id, {"header": header.SerializeToString(), "status": opb.STATUS_RUNNING,
                                         "stats": b"", "synced_slm": 0, "synced_llm": 0, "next_role": first_role,
                                         "owner": owner, "epoch": 1})
        return Lease(header.session_id, 1)

    def append(self, lease: Lease, index: int, record: opb.SpanRecord, synced: dict, stats: opb.Stats,
               next_role: int, replicas: dict | None = None) -> bool:
        """Log span number `index` (one round trip). Returns whether a cancel was requested."""
        return self._write(lease, index, record.SerializeToString(), cursor_fields(synced, stats, next_role, replicas),
                           hold=True)

    def finish(self, lease: Lease, status: int, reason: int, stats: opb.Stats, text: str, error: str = "") -> None:
        fields = {"status": status, "finish_reason": reason, "stats": stats.SerializeToString(),
                  "text": text.encode(), "error": error.encode()}
        self._write(lease, -1, None, fields, hold=False)

    def request_cancel(self, session_id: str) -> int | None:
        """Flag a running session for cancellation; returns its status, None if unknown."""
        fields, _ = self._load(session_id)
        if not fields:
            return None
        status = int(fields["status"])
        if status == opb.STATUS_RUNNING:
            self._flag_cancel(session_id)
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
        session.slm_replica = fields.get("slm_replica", b"").decode()
        session.llm_replica = fields.get("llm_replica", b"").decode()
        session.spans.extend(opb.SpanRecord.FromString(r) for r in log)
        return session

    def cursor(self, session_id: str) -> dict:
        """Where the loop stands: each engine's synced length and replica, and the role that writes next."""
        fields, _ = self._load(session_id)
        replicas = {role: fields[name].decode() for role, name in ((SLM, "slm_replica"), (LLM, "llm_replica"))
                    if fields.get(name)}
        return {"synced": {SLM: int(fields["synced_slm"]), LLM: int(fields["synced_llm"])},
                "next_role": int(fields["next_role"]), "replicas": replicas}

    def describe(self) -> str:
        return type(self).__name__


def cursor_fields(synced: dict, stats: opb.Stats, next_role: int, replicas: dict | None = None) -> dict:
    """Where the loop stands, as the session's hash keeps it beside the log."""
    fields = {"stats": stats.SerializeToString(), "synced_slm": synced[SLM], "synced_llm": synced[LLM],
              "next_role": next_role}
    for role, name in ((SLM, "slm_replica"), (LLM, "llm_replica")):
        if replicas and role in replicas:
            fields[name] = replicas[role].encode()
    return fields


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _keys(session_id):
    return [f"rstitch:{{{session_id}}}:{name}" for name in ("meta", "log", "lease")]


# KEYS: meta, log, lease. ARGV: ttl s, lease ms, field/value... Returns 0, changing nothing, if the session exists.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], 1, 'PX', ARGV[2])
return 1
"""

# KEYS: meta, log, lease. ARGV: epoch, index (-1: no record), record, lease ms (0: drop), ttl s, field/value...
WRITE = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[1] then return redis.error_reply('FENCED session now at epoch ' .. tostring(epoch)) end
local index = tonumber(ARGV[2])
if index >= 0 then
  local n = redis.call('LLEN', KEYS[2])
  if n == index then
    redis.call('RPUSH', KEYS[2], ARGV[3])
  elseif n ~= index + 1 then
    return redis.error_reply('GAP the log holds ' .. n .. ' spans, the writer appends span ' .. index)
  end
end
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
if tonumber(ARGV[4]) > 0 then redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4]) else redis.call('DEL', KEYS[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return redis.call('HGET', KEYS[1], 'cancel')
"""

# KEYS: meta, lease. ARGV: owner, lease ms, RUNNING, FAILED. Returns {outcome, epoch or lease ms left}.
ACQUIRE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status ~= ARGV[3] and status ~= ARGV[4] then return {'ended', tonumber(status)} end
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {'held', left} end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'status', ARGV[3], 'error', '')
redis.call('SET', KEYS[2], epoch, 'PX', ARGV[2])
return {'acquired', epoch}
"""

# KEYS: meta, lease. ARGV: epoch, lease ms.
RENEW = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""


class RedisSessionStore(SessionStore):
    def __init__(self, url: str, retry_s: float = 30.0, **kwargs):
        import redis

        super().__init__(**kwargs)
        self.url = _redacted(url)  # for messages and logs
        self.retry_s = retry_s  # how long a running session's writes wait for Redis to come back
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._script_error = redis.ResponseError
        self._scripts = {name: self._redis.register_script(src)
                         for name, src in (("create", CREATE), ("write", WRITE), ("acquire", ACQUIRE),
                                           ("renew", RENEW))}

    def _call(self, op, retry_s: float = 0.0):
        """Run op; on a lost connection, try again with backoff for up to retry_s (writes are idempotent)."""
        give_up, pause = time.monotonic() + retry_s, 0.05
        while True:
            try:
                return op()
            except self._errors as e:
                if time.monotonic() + pause > give_up:
                    raise StoreUnavailable(f"Redis at {self.url} is unreachable: {e}") from None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def ping(self) -> None:
        self._call(self._redis.ping)

    def _create(self, session_id, fields):
        args = [self._ttl(running=True), int(self.lease_s * 1e3)]
        for name, value in fields.items():
            args += [name, value]
        if not self._call(lambda: self._scripts["create"](keys=_keys(session_id), args=args)):
            raise SessionExists(session_id)

    def _write(self, lease, index, record, fields, hold):
        args = [lease.epoch, index, record or b"", int(self.lease_s * 1e3) if hold else 0, self._ttl(running=hold)]
        for name, value in fields.items():
            args += [name, value]
        try:
            return bool(self._call(lambda: self._scripts["write"](keys=_keys(lease.session_id), args=args),
                                   self.retry_s))
        except self._script_error as e:
            if str(e).startswith("FENCED"):
                raise Fenced(f"session {lease.session_id}: {e}") from None
            raise

    def acquire(self, session_id, owner):
        meta, _, lease = _keys(session_id)
        outcome, value = self._call(lambda: self._scripts["acquire"](
            keys=[meta, lease], args=[owner, int(self.lease_s * 1e3), RUNNING, FAILED]))
        return _acquired(session_id, outcome.decode(), value)

    def renew(self, lease):
        meta, _, key = _keys(lease.session_id)
        return bool(self._call(lambda: self._scripts["renew"](keys=[meta, key],
                                                                args=[lease.epoch, int(self.lease_s * 1e3)])))

    def _load(self, session_id):
        meta, log, _ = _keys(session_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(meta).lrange(log, 0, -1)
        fields, records = self._call(pipe.execute)
        return {k.decode(): v for k, v in fields.items()}, records

    def _flag_cancel(self, session_id):
        self._call(lambda: self._redis.hset(_keys(session_id)[0], "cancel", 1))

    def ttl(self, session_id) -> int:
        return self._call(lambda: self._redis.ttl(_keys(session_id)[0]))

    def describe(self):
        return f"Redis at {self.url}"


def _acquired(session_id: str, outcome: str, value) -> Lease:
    if outcome == "acquired":
        return Lease(session_id, int(value))
    if outcome == "held":
        raise LeaseHeld(session_id, int(value) / 1e3)
    if outcome == "ended":
        status = opb.Status.Name(int(value)).removeprefix("STATUS_").lower()
        raise NotResumable(f"session {session_id} has ended ({status})")
    raise KeyError(session_id)


class MemorySessionStore(SessionStore):
    """Everything in this process: lost on restart, not shared between replicas. For a laptop."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._meta: dict[str, dict[str, bytes]] = {}
        self._logs: dict[str, list[bytes]] = {}
        self._expiry: dict[str, float] = {}
        self._lease_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def _create(self, session_id, fields):
        with self._lock:
            self._expire()
            if session_id in self._meta:
                raise SessionExists(session_id)
            self._meta[session_id], self._logs[session_id] = {}, []
            self._set(session_id, fields, hold=True)

    def _set(self, session_id, fields, hold):
        now = time.monotonic()
        self._meta[session_id].update({k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()})
        self._lease_until[session_id] = now + self.lease_s if hold else 0.0
        self._expiry[session_id] = now + self._ttl(running=hold)

    def _write(self, lease, index, record, fields, hold):
        with self._lock:
            self._expire()
            meta = self._meta.get(lease.session_id, {})
            if meta.get("epoch") != str(lease.epoch).encode():
                raise Fenced(f"session {lease.session_id} is now at epoch {meta.get('epoch')}")
            log = self._logs[lease.session_id]
            if index >= 0 and len(log) == index:
                log.append(record)
            self._set(lease.session_id, fields, hold)
            return meta.get("cancel") == b"1"

    def acquire(self, session_id, owner):
        with self._lock:
            self._expire()
            meta = self._meta.get(session_id)
            if meta is None:
                return _acquired(session_id, "missing", 0)
            if meta["status"] not in (RUNNING, FAILED):
                return _acquired(session_id, "ended", meta["status"])
            left = self._lease_until[session_id] - time.monotonic()
            if left > 0:
                return _acquired(session_id, "held", left * 1e3)
            epoch = int(meta["epoch"]) + 1
            self._set(session_id, {"epoch": epoch, "owner": owner, "status": opb.STATUS_RUNNING, "error": b""}, True)
            return Lease(session_id, epoch)

    def renew(self, lease):
        with self._lock:
            if self._meta.get(lease.session_id, {}).get("epoch") != str(lease.epoch).encode():
                return False
            self._lease_until[lease.session_id] = time.monotonic() + self.lease_s
            return True

    def _load(self, session_id):
        with self._lock:
            self._expire()
            return dict(self._meta.get(session_id, {})), list(self._logs.get(session_id, []))

    def _flag_cancel(self, session_id):
        with self._lock:
            self._meta[session_id]["cancel"] = b"1"

    def _expire(self):
        now = time.monotonic()
        for session_id in [s for s, t in self._expiry.items() if t < now]:
            for table in (self._meta, self._logs, self._expiry, self._lease_until):
                table.pop(session_id, None)

    def describe(self):
        return "an in-process store (sessions are lost when this process stops)"


# Writes of all sessions, off their loops' critical path (each session has at most one in flight).
_WRITERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="journal")


class Journal:
    """One replica's writes to one session, under the lease it holds.

    A span's append runs behind the loop, while the engines already work on the next span: the log
    may trail the tokens a client has seen by a span, which Resume re-derives (decoding is
    deterministic). Appends stay in order (one in flight; the next waits for it), and what an append
    raised (Fenced, StoreUnavailable) or answered (a cancel request) reaches the loop at its next
    span boundary, one span late. `close()` waits for the last one.
    """

    def __init__(self, store: SessionStore, lease: Lease):
        self.store, self.lease = store, lease
        self._in_flight: Future | None = None
        self._cancel = False

    def log(self, progress, record: opb.SpanRecord) -> bool:
        """Append a span of `progress` (a loop.Progress) with where the loop stands; returns the cancel
        flag as the last finished append saw it."""
        index = progress.logged if record.token_ids else -1  # empty spans change the cursor only
        waited = time.perf_counter()
        self.close()
        progress.stats.store_ms += (time.perf_counter() - waited) * 1e3
        fields = cursor_fields(progress.synced, progress.stats, progress.role, progress.replicas)
        self._in_flight = _WRITERS.submit(self.store._write, self.lease, index, record.SerializeToString(), fields,
                                          True)
        progress.logged += index >= 0
        return self._cancel

    def close(self) -> None:
        """Wait for the append in flight; raises what it raised."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            self._cancel |= in_flight.result()
