"""Tracing and metrics of a real deployment: the three services as processes export their spans over
OTLP/gRPC to a real TraceService receiver on loopback, and serve Prometheus metrics over HTTP."""

import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from rstitch import RStitchClient
from rstitch.local import LocalDeployment, free_port

TAU = 0.3
SERVICES = {"orchestrator": "rstitch-orchestrator", "slm": "rstitch-slm", "llm": "rstitch-llm"}
ENGINE_CALLS = {"rstitch.v1.Engine/Prefill", "rstitch.v1.Engine/Decode", "rstitch.v1.Engine/StreamSpan",
                "rstitch.v1.Engine/Rollback", "rstitch.v1.Engine/Release"}


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps (service.name, span) for every span exported to it."""

    def __init__(self):
        self.spans, self.lock = [], threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes)["service.name"]
                self.spans += [(service, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace_roots(self) -> list:
        with self.lock:
            return [(service, span) for service, span in self.spans if not span.parent_span_id]

    def trace(self, trace_id: bytes) -> list:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    receiver = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver
    server.stop(0)


@pytest.fixture(scope="module")
def deployment(receiver, model_paths, tmp_path_factory):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    ports = {name: free_port() for name in SERVICES}
    with LocalDeployment(redis=None, env=env, log_dir=tmp_path_factory.mktemp("logs"),
                         slm_args=["--model", str(model_paths["slm"]), "--metrics-port", str(ports["slm"])],
                         llm_args=["--model", str(model_paths["llm"]), "--metrics-port", str(ports["llm"])],
                         orchestrator_args=["--metrics-port", str(ports["orchestrator"])]) as d:
        d.metrics_ports = ports
        yield d


@pytest.fixture(scope="module")
def generation(deployment):
    """The deployment's one generation: stitched, with several switches."""
    with RStitchClient(deployment.address) as client:
        result = client.generate("What is 7*8?", tau=TAU, max_new_tokens=40)
    assert result.stats["switches"] >= 2, result.stats
    return result


def _generation_trace(receiver, session_id, timeout=15.0):
    """The root spans of the session's generation and every span of its trace, once all have arrived
    (each engine call's server span, and nothing new for half a second)."""
    deadline, seen = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        roots = [s for service, s in receiver.trace_roots() if service == SERVICES["orchestrator"]
                 and _attributes(s.attributes).get("rstitch.session_id") == session_id]
        spans = receiver.trace(roots[0].trace_id) if roots else []
        kinds = [s.kind for _, s in spans]
        if roots and kinds.count(trace_pb2.Span.SPAN_KIND_SERVER) == kinds.count(trace_pb2.Span.SPAN_KIND_CLIENT) + 1 \
                and len(spans) == seen:
            return roots, spans
        seen = len(spans)
        time.sleep(0.5)
    raise AssertionError(f"the trace of session {session_id} did not arrive within {timeout} s "
                         f"({len(receiver.spans)} spans received)")


def render(spans) -> str:
    """The trace as an indented tree: service, span name, the attributes worth reading, duration."""
    children = {}
    for service, span in spans:
        children.setdefault(span.parent_span_id, []).append((service, span))
    lines = []

    def walk(parent, depth):
        for service, span in sorted(children.get(parent, []), key=lambda x: x[1].start_time_unix_nano):
            attrs = {k.removeprefix("rstitch."): v for k, v in _attributes(span.attributes).items()
                     if k.startswith("rstitch.") and k != "rstitch.session_id"}
            shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in attrs.items())
            ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
            lines.append(f"{'  ' * depth}{service} {span.name} {ms:.1f}ms {shown}".rstrip())
            for event in span.events:
                ev = {k.removeprefix("rstitch.switch."): v for k, v in _attributes(event.attributes).items()}
                lines.append(f"{'  ' * (depth + 1)}* {event.name} " + " ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items()))
            walk(span.span_id, depth + 1)

    walk(b"", 0)
    return "\n".join(lines)


def test_one_trace_per_generation_with_every_switch(receiver, generation):
    stats = generation.stats
    roots, spans = _generation_trace(receiver, generation.session_id)
    print(render(spans))
    assert len(roots) == 1
    root = roots[0]
    assert root.name == "rstitch.v1.Orchestrator/Generate" and root.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert _attributes(root.attributes)["rstitch.policy"] == "entropy"
    assert [s for _, s in spans if not s.parent_span_id] == [root]
    by_id = {s.span_id: (service, s) for service, s in spans}

    # Every engine call is a client span under the root; each engine's server span hangs under its call.
    clients = [s for service, s in spans if s.kind == trace_pb2.Span.SPAN_KIND_CLIENT]
    assert {s.name for s in clients} <= ENGINE_CALLS and len(clients) >= stats["spans"]
    assert all(s.parent_span_id == root.span_id for s in clients)
    servers = [(service, s) for service, s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER and s is not root]
    assert sorted(by_id[s.parent_span_id][1].span_id for _, s in servers) == sorted(c.span_id for c in clients)
    assert all(by_id[s.parent_span_id][1].name == s.name for _, s in servers)
    assert {service for service, _ in servers} == {SERVICES["slm"], SERVICES["llm"]}

    # Inside the engines: the wait for the model, the prefill forward, the span decode.
    inner = {}
    for service, s in spans:
        if s.name.startswith("engine."):
            parent_service, parent = by_id[s.parent_span_id]
            assert parent_service == service and parent.kind == trace_pb2.Span.SPAN_KIND_SERVER
            inner.setdefault(parent.span_id, set()).add(s.name)
    for _, s in servers:
        if s.name in ("rstitch.v1.Engine/Prefill", "rstitch.v1.Engine/Decode", "rstitch.v1.Engine/StreamSpan"):
            assert {"engine.queue", "engine.decode"} <= inner[s.span_id]
            if s.name != "rstitch.v1.Engine/StreamSpan":  # a stream prefills when the engine lacks tokens
                assert ("engine.prefill" in inner[s.span_id]) == (s.name == "rstitch.v1.Engine/Prefill")

    # Every switch is an event on the root, with what triggered it and what it cost.
    switches = [_attributes(e.attributes) for e in root.events if e.name == "rstitch.switch"]
    assert len(switches) == stats["switches"]
    for i, switch in enumerate(switches):
        assert switch["rstitch.switch.direction"] == ("slm->llm" if i % 2 == 0 else "llm->slm")
        assert 0 <= switch["rstitch.switch.position"] < len(generation.token_ids)
        entropy = switch["rstitch.switch.entropy"]
        assert entropy > TAU if switch["rstitch.switch.direction"] == "slm->llm" else entropy <= TAU
        assert switch["rstitch.switch.prefill_tokens"] >= 1
        assert switch["rstitch.switch.latency_ms"] > 0
    positions = [s["rstitch.switch.position"] for s in switches]
    assert positions == sorted(positions)
    for position, switch in zip(positions, switches):  # the LLM writes the gated position
        if switch["rstitch.switch.direction"] == "slm->llm":
            assert generation.sources[position] == "llm"


def _scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _total(samples, name, **labels):
    """The sum over the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_after_a_generation(deployment, generation):
    stats = generation.stats
    orchestrator = _scrape(deployment.metrics_ports["orchestrator"])
    for model in ("slm", "llm"):
        assert _total(orchestrator, "rstitch_tokens_total", model=model) == stats[f"{model}_tokens"]
        assert _total(orchestrator, "rstitch_prefill_tokens_total", model=model) == stats[f"{model}_prefill_tokens"]
    assert _total(orchestrator, "rstitch_span_tokens_count") == stats["spans"]
    by_direction = {d: _total(orchestrator, "rstitch_switches_total", direction=d) for d in ("slm->llm", "llm->slm")}
    assert sum(by_direction.values()) == stats["switches"] and by_direction["slm->llm"] >= 1
    for direction, count in by_direction.items():
        assert _total(orchestrator, "rstitch_switch_latency_seconds_count", direction=direction) == count
    assert _total(orchestrator, "rstitch_rpc_seconds_count", method="rstitch.v1.Orchestrator/Generate",
                  code="OK") == 1
    assert orchestrator[("rstitch_sessions_active", ())] == 0 and orchestrator[("rstitch_queue_depth", ())] == 0

    for role in ("slm", "llm"):
        engine = _released(deployment.metrics_ports[role])
        assert _total(engine, "rstitch_rpc_seconds_count", method="rstitch.v1.Engine/StreamSpan", code="OK") >= 1
        assert _total(engine, "rstitch_rpc_seconds_count", method="rstitch.v1.Engine/Release", code="OK") == 1
        labels = (("model", role),)
        assert engine[("rstitch_kv_capacity_tokens", labels)] > 0
        assert engine[("rstitch_kv_used_tokens", labels)] == 0  # released at the end of the generation
        assert engine[("rstitch_kv_evictions_total", labels)] == 0
        assert engine[("rstitch_sessions_active", labels)] == 0
        assert engine[("rstitch_queue_depth", labels)] == 0


def _released(port: int, timeout_s: float = 10.0) -> dict:
    """The engine's metrics once the orchestrator's Release has arrived (it is sent behind the answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = _scrape(port)
        done = _total(metrics, "rstitch_rpc_seconds_count", method="rstitch.v1.Engine/Release", code="OK") >= 1
        if done or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


@pytest.mark.parametrize("env, on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_tracing_is_on_only_when_the_environment_asks(env, on):
    from common.telemetry import tracing_configured

    assert tracing_configured(env) == on
