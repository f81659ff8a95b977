"""How the loop reaches an engine: over gRPC, or by calling an in-process Engine directly.

Both raise common.errors classes, so the stitching loop is the same code for either transport.
"""

import logging
import threading
import time

import grpc

from common.errors import CACHE_LEN_KEY, RETRYABLE_KEY, from_status
from common.grpc_server import CHANNEL_OPTIONS
from common.telemetry import traced_channel
from rstitch.security import ClientTLS, channel
from rstitch.v1 import engine_pb2 as pb
from rstitch.v1 import engine_pb2_grpc

log = logging.getLogger(__name__)


class LocalEngineClient:
    """Calls an Engine object in this process (benchmarks, evaluation, rollouts)."""

    def __init__(self, engine):
        self.engine = engine
        self.address = f"in-process:{engine.role}"

    def prefill(self, req: pb.PrefillRequest, timeout=None) -> pb.PrefillResponse:
        return self.engine.prefill(req)

    def decode(self, req: pb.DecodeRequest, timeout=None) -> pb.DecodeResponse:
        return self.engine.decode(req)

    def stream_span(self, req: pb.PrefillRequest, timeout=None):
        """Yields each committed token (a CommittedToken) as it is chosen; returns the response."""
        for event in self.engine.stream_span(pb.StreamSpanRequest(prefill=req)):
            if event.HasField("done"):
                return event.done
            yield event.token

    def rollback(self, req: pb.RollbackRequest, timeout=None) -> pb.RollbackResponse:
        return self.engine.rollback(req)

    def release(self, req: pb.ReleaseRequest, timeout=None) -> pb.ReleaseResponse:
        return self.engine.release(req)

    def info(self, timeout=None) -> pb.InfoResponse:
        return self.engine.info()

    def tokenizer_files(self, timeout=None) -> pb.GetTokenizerResponse:
        return self.engine.tokenizer_files()

    def close(self):
        pass


# gRPC's default reconnect backoff grows to 2 minutes; an engine that restarts should be found again
# within a second, while the loop's own retries (loop.retrying) bound how long a call waits.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


class GrpcEngineClient:
    def __init__(self, address: str, tls: ClientTLS | None = None):
        self.address = address
        self._channel = channel(address, tls, options=CHANNEL_OPTIONS + RECONNECT_OPTIONS)
        self._stub = engine_pb2_grpc.EngineStub(traced_channel(self._channel))
        self._down_since: float | None = None  # one log line when the engine goes away, one when it is back
        self._health_lock = threading.Lock()

    def answering(self) -> bool:
        """False from a call that found the engine unreachable until a call is answered again."""
        return self._down_since is None

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            try:  # a call fails at once with the channel's last connection error: a refused certificate, say
                self._stub.Info(pb.InfoRequest(), timeout=5)
            except grpc.RpcError as e:
                # What a TLS server's refusal looks like from here: it hangs up, and only its own log says why.
                hint = (" (the engine hung up: it may serve TLS, or want a client certificate it trusts; its log says "
                        "which)") if e.details().endswith("Socket closed") else ""
                raise ConnectionError(f"engine at {self.address} did not answer within {timeout:.0f} s: "
                                      f"{e.details()}{hint}") from None

    def _call(self, method, req, timeout):
        try:
            response = method(req, timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None
        if self._down_since is not None:
            self._came_back()
        return response

    def stream_span(self, req, timeout=None):
        """Yields each committed token (a CommittedToken) as the engine streams it; returns the
        PrefillResponse that ends the stream."""
        call = self._stub.StreamSpan(pb.StreamSpanRequest(prefill=req), timeout=timeout)
        try:
            for event in call:
                if event.HasField("done"):
                    if self._down_since is not None:
                        self._came_back()
                    return event.done
                yield event.token
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()  # a reader that stopped early ends the span on the engine (no-op once it ended)
        raise from_status(grpc.StatusCode.UNAVAILABLE, f"{self.address}: the span's stream ended before its end")

    def _error(self, e: grpc.RpcError):
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            self._went_down(e.details())
        trailing = dict(e.trailing_metadata() or ())
        cache_len = int(trailing[CACHE_LEN_KEY]) if CACHE_LEN_KEY in trailing else None
        return from_status(e.code(), f"{self.address}: {e.details()}", cache_len, RETRYABLE_KEY in trailing)

    def _went_down(self, why: str) -> None:
        with self._health_lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("engine %s is unreachable: %s", self.address, why)

    def _came_back(self) -> None:
        with self._health_lock:
            if self._down_since is not None:
                log.info("engine %s answers again after %.1f s", self.address, time.monotonic() - self._down_since)
                self._down_since = None

    def prefill(self, req, timeout=None):
        return self._call(self._stub.Prefill, req, timeout)

    def decode(self, req, timeout=None):
        return self._call(self._stub.Decode, req, timeout)

    def rollback(self, req, timeout=None):
        return self._call(self._stub.Rollback, req, timeout)

    def release(self, req, timeout=None):
        return self._call(self._stub.Release, req, timeout)

    def info(self, timeout=None):
        return self._call(self._stub.Info, pb.InfoRequest(), timeout)

    def tokenizer_files(self, timeout=None):
        return self._call(self._stub.GetTokenizer, pb.GetTokenizerRequest(), timeout)

    def close(self):
        self._channel.close()
