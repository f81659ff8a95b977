"""Tracing and metrics shared by all three services: OpenTelemetry over OTLP, Prometheus over HTTP.

Tracing is configured by the standard OTEL_* environment variables and is on only when an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and neither
OTEL_SDK_DISABLED=true nor OTEL_TRACES_EXPORTER=none says otherwise. Off, no SDK is installed, the
gRPC channels are not intercepted and the spans below are the API's no-op ones.

The trace context travels in gRPC metadata (W3C traceparent): the orchestrator's engine calls are
client spans, and each engine opens a server span per call under them.
"""

import logging
import os
import time

import grpc
from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, Histogram, start_http_server

from . import flags

log = logging.getLogger(__name__)

tracer = trace.get_tracer("rstitch")
_enabled = False

RPC_SECONDS = Histogram("rstitch_rpc_seconds", "Server-side duration of gRPC calls", ["method", "code"],
                        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
UNTRACED = ("/grpc.",)  # health checks and reflection: probes, not work


def tracing_configured(env=os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if (env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup_tracing(default_service_name: str) -> bool:
    """Install an SDK TracerProvider exporting over OTLP if the environment asks for tracing."""
    global _enabled
    if not tracing_configured():
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(BatchSpanProcessor(_exporter()))  # flushed at exit
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info("tracing on: %s exports over OTLP (sampler %s)", resource.attributes[SERVICE_NAME],
             os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"))
    return True


def _exporter():
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol.startswith("http"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            return OTLPSpanExporter()
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s needs opentelemetry-exporter-otlp-proto-http; "
                        "exporting over OTLP/gRPC instead", protocol)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()  # endpoint, headers, TLS (http:// means plaintext) from OTEL_EXPORTER_OTLP_*


def tracing_enabled() -> bool:
    return _enabled


def record_span(name: str, start_ns: int, end_ns: int, parent=None, **attributes) -> None:
    """A span for an interval that has already passed (e.g. a wait), under the current span or, from
    another thread, under the context `parent` (context.get_current() where the work was asked for)."""
    if _enabled:
        tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes).end(end_time=end_ns)


def current_context():
    """The trace context of this thread, to record spans under from another one (record_span)."""
    return context.get_current()


# --- metrics ------------------------------------------------------------------------------------


def add_telemetry_args(parser) -> None:
    parser.add_argument("--metrics-port", type=flags.port,
                        default=flags.env_default(parser, "--metrics-port", "RSTITCH_METRICS_PORT", flags.port, 0),
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (0: off; env "
                             "RSTITCH_METRICS_PORT); tracing is set by the standard OTEL_* variables")


def serve_metrics(host: str, port: int, *collectors) -> int | None:
    """Serve /metrics on host:port (0: off) with the given scrape-time collectors; returns the port.
    host may be an IPv6 address in brackets, as gRPC takes it. OSError: the port cannot be bound."""
    if not port:
        return None
    try:
        start_http_server(port, addr=host.removeprefix("[").removesuffix("]"))
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port} (--metrics-port): {e.strerror or e}") from None
    for collector in collectors:  # only now: a start that failed leaves the registry as it was
        REGISTRY.register(collector)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port


# --- gRPC ---------------------------------------------------------------------------------------


def _attach(parent):
    return context.attach(parent) if parent is not None else None


def _detach(token):
    if token is not None:
        context.detach(token)


class ServerTelemetry(grpc.ServerInterceptor):
    """Times every call by method and status code; with tracing on, opens a server span per call
    (health and reflection aside) under the caller's trace context from the metadata."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, servicer_context):
                call = _ObservedCall(details, request)
                token, failed = _attach(call.context), True
                try:
                    response = inner(request, servicer_context)
                    failed = False
                    return response
                finally:
                    _detach(token)
                    call.end(servicer_context, failed)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        inner_stream = handler.unary_stream

        def stream(request, servicer_context):
            call = _ObservedCall(details, request)
            events = inner_stream(request, servicer_context)
            yield from call.stream(events, servicer_context)

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                    handler.response_serializer)


class _ObservedCall:
    """One server call: its timer, and with tracing on its server span and that span's context."""

    def __init__(self, details, request):
        self.name = details.method.lstrip("/")
        self.start = time.perf_counter()
        self.span = self.context = None
        if _enabled and not details.method.startswith(UNTRACED):
            parent = propagate.extract(dict(details.invocation_metadata or ()))
            self.span = tracer.start_span(self.name, context=parent, kind=SpanKind.SERVER,
                                          attributes={"rpc.system": "grpc", "rpc.method": self.name})
            if getattr(request, "session_id", ""):
                self.span.set_attribute("rstitch.session_id", request.session_id)
            self.context = trace.set_span_in_context(self.span, parent)

    def stream(self, events, servicer_context):
        """The handler's events, its context attached only while it runs, never across a yield."""
        failed = True
        try:
            while True:
                token = _attach(self.context)
                try:
                    event = next(events)
                except StopIteration:
                    break
                finally:
                    _detach(token)
                yield event
            failed = False
        finally:
            token = _attach(self.context)
            try:
                getattr(events, "close", lambda: None)()  # a caller that left: the handler's clean-up runs now
            finally:
                _detach(token)
                self.end(servicer_context, failed)

    def end(self, servicer_context, failed: bool) -> None:
        code = servicer_context.code() or (grpc.StatusCode.OK if not failed else grpc.StatusCode.UNKNOWN
                                           if servicer_context.is_active() else grpc.StatusCode.CANCELLED)
        RPC_SECONDS.labels(self.name, code.name).observe(time.perf_counter() - self.start)
        if self.span is not None:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                details = servicer_context.details() or code.name
                self.span.set_status(Status(StatusCode.ERROR, details.decode(errors="replace")
                                            if isinstance(details, bytes) else details))
            self.span.end()


class _ClientTracing(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """A client span per call (a stream's lasts until its last event), its context sent along in the metadata."""

    def intercept_unary_unary(self, continuation, details, request):
        span, traced = _client_span(details)
        try:
            outcome = continuation(traced, request)
            _record_code(span, outcome.code(), outcome.details())
            return outcome
        finally:
            span.end()

    def intercept_unary_stream(self, continuation, details, request):
        span, traced = _client_span(details)
        return _TracedStream(span, continuation(traced, request))


def _client_span(details):
    """A client span for the call, and the call's details with the span's context in the metadata."""
    name = details.method.lstrip("/") if isinstance(details.method, str) else details.method.decode().lstrip("/")
    span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes={"rpc.system": "grpc", "rpc.method": name})
    carrier = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, details._replace(metadata=list(details.metadata or ()) + list(carrier.items()))


class _TracedStream:
    """A stream's events, its client span ended with the last one (or the error); cancellable like the call."""

    def __init__(self, span, call):
        self.span, self.call, self.open = span, call, True

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.call)
        except StopIteration:
            self._end(grpc.StatusCode.OK, "")
            raise
        except grpc.RpcError as e:
            self._end(e.code(), e.details())
            raise

    def cancel(self) -> bool:
        self._end(grpc.StatusCode.CANCELLED, "the reader stopped early")
        return self.call.cancel()

    def _end(self, code, details) -> None:
        if self.open:
            self.open = False
            _record_code(self.span, code, details)
            self.span.end()


def _record_code(span, code: grpc.StatusCode, details: str | None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, details or code.name))


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """The channel as is, or, with tracing on, one that makes a client span of every call and sends
    its context along."""
    return grpc.intercept_channel(channel, _ClientTracing()) if _enabled else channel
