"""Errors an engine raises, each carrying the gRPC status the caller sees (common.grpc_server.guarded).

The same classes are raised by in-process engines and rebuilt from gRPC errors by the orchestrator's
engine client, so the stitching loop handles both transports with one set of except clauses.
"""

import grpc

CACHE_LEN_KEY = "rstitch-cache-len"
# Trailing metadata on a RESOURCE_EXHAUSTED that will pass (a full queue), unlike one that will not
# (a session larger than the whole KV budget).
RETRYABLE_KEY = "rstitch-retryable"


class EngineError(Exception):
    code = grpc.StatusCode.INTERNAL
    retryable = False  # the same call may succeed a little later

    def __init__(self, message: str, cache_len: int | None = None):
        super().__init__(message)
        self.cache_len = cache_len

    def trailing_metadata(self) -> list[tuple[str, str]]:
        """What the caller needs to repair: the engine's real cache length, whether to retry."""
        metadata = [(CACHE_LEN_KEY, str(self.cache_len))] if self.cache_len is not None else []
        return metadata + [(RETRYABLE_KEY, "1")] if self.retryable else metadata


class InvalidRequest(EngineError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class SessionNotFound(EngineError):
    code = grpc.StatusCode.NOT_FOUND


class CacheMismatch(EngineError):
    """The caller's base_len is not the engine's cache length; cache_len holds the real one."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SessionBusy(EngineError):
    code = grpc.StatusCode.ABORTED
    retryable = True


class KVExhausted(EngineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class EngineOverloaded(EngineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class EngineUnavailable(EngineError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


# Callers name sessions with short ids (the orchestrator makes 32 hex digits); a longer one is a mistake,
# refused before it is echoed into an error message or metadata.
MAX_SESSION_ID_CHARS = 256


def validate_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidRequest("session_id is empty")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidRequest(f"session_id has {len(session_id)} characters; ids are at most {MAX_SESSION_ID_CHARS}")


BY_CODE = {cls.code: cls for cls in (InvalidRequest, SessionNotFound, CacheMismatch, SessionBusy, KVExhausted,
                                     EngineUnavailable)}


def from_status(code: grpc.StatusCode, message: str, cache_len: int | None = None, retryable: bool = False
                ) -> EngineError:
    cls = EngineOverloaded if retryable and code == EngineOverloaded.code else BY_CODE.get(code, EngineError)
    error = cls(message, cache_len)
    error.code = code  # e.g. DEADLINE_EXCEEDED or CANCELLED keep their own code
    return error
