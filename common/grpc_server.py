"""Starting a gRPC server with the standard health service and reflection, and the one wrapper that
turns what a servicer method raises into a gRPC status (shared by all services)."""

import functools
import inspect
import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .telemetry import ServerTelemetry

log = logging.getLogger(__name__)

# Tokenizer files of real models are several MB; spans and prompts stay far below this.
MAX_MESSAGE_BYTES = 64 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class _Unparsable:
    def __init__(self, error: Exception):
        self.error = error


class RefuseUnparsableRequests(grpc.ServerInterceptor):
    """Bytes that do not parse as the method's request (corrupt protobuf, invalid UTF-8 in a string)
    are the caller's mistake: INVALID_ARGUMENT, where grpc itself would log a traceback and answer
    INTERNAL "Exception deserializing request!"."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler  # no method here (UNIMPLEMENTED), or not ours: none of our methods streams requests
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        parse, behaviour = handler.request_deserializer, getattr(handler, kind)

        def tolerant_parse(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - whatever the parser raises, the bytes were bad
                return _Unparsable(e)

        def checked(request, context):
            if isinstance(request, _Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request does not parse as {handler_call_details.method}'s request message: "
                              f"{str(request.error)[:200]}")
            return behaviour(request, context)

        return handler._replace(request_deserializer=tolerant_parse, **{kind: checked})


def start_server(add_servicers, service_names: list[str], host: str, port: int, max_workers: int = 16,
                 credentials: grpc.ServerCredentials | None = None, interceptors=()):
    """Serve on host:port (port 0 picks one), over TLS when given credentials; returns (server, bound port).
    Health says SERVING. Every call is timed (and traced, when tracing is on) before other interceptors."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=CHANNEL_OPTIONS,
                         interceptors=[ServerTelemetry(), RefuseUnparsableRequests(), *interceptors])
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def serve_until_signalled(server, grace_s: float = 5, also_stop=()) -> None:
    """Block until SIGTERM or SIGINT, then let in-flight calls finish for up to grace_s; the
    `also_stop` callables (other servers of the process) stop meanwhile, not after."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    stopped = server.stop(grace=grace_s)
    for other in also_stop:
        other()
    stopped.wait()


def guarded(method):
    """A servicer method (unary, or a generator for a server stream) whose errors become statuses: an
    exception carrying a grpc.StatusCode in `code` (the engines' EngineError, the orchestrator's
    RequestError) aborts with that code, its message and its `trailing_metadata()`; anything else is a
    bug, logged with its traceback and answered INTERNAL, never taking the service down. A stream stops
    at once when its caller has gone, and closes what it streams from so that its clean-up runs."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            events = method(self, request, context)
            try:
                for event in events:
                    if not context.is_active():  # cancelled or disconnected
                        return
                    yield event
            except Exception as e:
                _abort(context, method.__name__, e)
            finally:
                events.close()
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort(context, method.__name__, e)
    return unary


def _abort(context, method_name: str, error: Exception):
    code = getattr(error, "code", None)
    if isinstance(code, grpc.StatusCode):
        metadata = getattr(error, "trailing_metadata", None)
        if metadata is not None:
            context.set_trailing_metadata(metadata())
        context.abort(code, str(error))
    log.error("%s failed", method_name, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"{method_name} failed: {error!r}")
