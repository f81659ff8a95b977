"""What the orchestrator reports about generations: Prometheus metrics and the trace of each one.

The trace of a generation is the orchestrator's server span of the Generate (or Resume) call: it
carries the session id and policy, and one `rstitch.switch` event per switch; the engine calls
under it are client spans (common.telemetry). The latencies a client sees (time to first token,
inter-token latency, end-to-end) are measured on the event stream itself, by `timed`, for gRPC
and HTTP requests alike.
"""

import time
from collections.abc import Iterator

from opentelemetry import trace
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from rstitch.v1 import orchestrator_pb2 as opb

from .loop import Observer, Switch
from .policies import ROLE_NAMES

TOKENS = Counter("rstitch_tokens", "Answer tokens written, by model", ["model"])
PREFILL_TOKENS = Counter("rstitch_prefill_tokens", "Tokens sent to an engine that had not seen them, by model",
                         ["model"])
SWITCHES = Counter("rstitch_switches", "Changes of the writing model, by direction", ["direction"])
SPAN_TOKENS = Histogram("rstitch_span_tokens", "Answer tokens per engine span, by model", ["model"],
                        buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
SWITCH_LATENCY = Histogram("rstitch_switch_latency_seconds",
                           "From the gate decision to the incoming model's first token, by direction", ["direction"],
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
# Named as vLLM's vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds and
# vllm:e2e_request_latency_seconds, so that dashboards built for vLLM read ours; by api ("grpc", "http").
# Buckets reach down to a millisecond: a token of a small model on a CPU takes a few.
TIME_TO_FIRST_TOKEN = Histogram("rstitch_time_to_first_token_seconds",
                                "From a generation's request to its first answer token, by api", ["api"],
                                buckets=(.001, .0025, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5,
                                         7.5, 10, 20, 40, 80, 160, 640))
INTER_TOKEN_LATENCY = Histogram("rstitch_inter_token_latency_seconds",
                                "Between consecutive answer tokens of a generation, by api", ["api"],
                                buckets=(.0005, .001, .0025, .005, .01, .025, .05, .075, .1, .15, .2, .3, .4, .5,
                                         .75, 1, 2.5, 5, 10, 20, 40, 80))
E2E_LATENCY = Histogram("rstitch_e2e_request_latency_seconds",
                        "From a generation's request to its end, for generations that finish, by api", ["api"],
                        buckets=(.01, .025, .05, .1, .3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120,
                                 240, 480, 960, 1920, 7680))
# The labelled children, looked up once (a lookup costs more than the increment).
_BY_ROLE = {role: (TOKENS.labels(name), SPAN_TOKENS.labels(name), PREFILL_TOKENS.labels(name))
            for role, name in ROLE_NAMES.items()}
_BY_DIRECTION = {}


def timed(events: Iterator[opb.GenerateResponse], api: str) -> Iterator[opb.GenerateResponse]:
    """A generation's events (Orchestrator.generate's), passed on as they come while their latencies
    are recorded under `api`, from when the first event is asked for (validation, admission and the
    store's write included). Closing it closes `events`: a caller that goes away still stops the
    generation."""
    first_token, between_tokens, end_to_end = (metric.labels(api) for metric in
                                               (TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_LATENCY))
    started = time.perf_counter()
    last_token = None
    try:
        for event in events:
            now = time.perf_counter()
            if event.HasField("delta") and event.delta.span.token_ids:
                if last_token is None:
                    first_token.observe(now - started)
                else:
                    between_tokens.observe(now - last_token)
                last_token = now
            elif event.HasField("finished"):
                end_to_end.observe(now - started)
            yield event
    finally:
        events.close()


class GenerationTelemetry(Observer):
    """Counts what the loop reports and marks the switches on the generation's span."""

    def __init__(self, span: trace.Span):
        self.span = span

    @classmethod
    def start(cls, session: opb.Session) -> "GenerationTelemetry":
        """For a generation run under the current span (the Generate or Resume call's)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"rstitch.session_id": session.session_id,
                                 "rstitch.policy": opb.Policy.Name(session.spec.policy).removeprefix("POLICY_").lower(),
                                 "rstitch.tau": session.tau, "rstitch.max_new_tokens": session.max_new_tokens})
        return cls(span)

    def committed(self, role, tokens):
        total, per_span, _ = _BY_ROLE[role]
        total.inc(tokens)
        per_span.observe(tokens)

    def prefilled(self, role, tokens):
        _BY_ROLE[role][2].inc(tokens)

    def switched(self, switch: Switch):
        direction = switch.direction
        if direction not in _BY_DIRECTION:
            _BY_DIRECTION[direction] = SWITCHES.labels(direction), SWITCH_LATENCY.labels(direction)
        count, latency = _BY_DIRECTION[direction]
        count.inc()
        latency.observe(switch.latency_s)
        if self.span.is_recording():
            attributes = {"rstitch.switch.direction": switch.direction, "rstitch.switch.position": switch.position,
                          "rstitch.switch.prefill_tokens": switch.prefill_tokens,
                          "rstitch.switch.latency_ms": switch.latency_s * 1e3}
            if switch.entropy is not None:
                attributes["rstitch.switch.entropy"] = switch.entropy
            self.span.add_event("rstitch.switch", attributes)


class OrchestratorCollector:
    """The orchestrator's load, read at scrape time."""

    def __init__(self, orchestrator):
        self.admission = orchestrator.admission

    def collect(self):
        active = GaugeMetricFamily("rstitch_sessions_active", "Generations this replica is driving (or following)")
        active.add_metric([], self.admission.active)
        queued = GaugeMetricFamily("rstitch_queue_depth", "Generations waiting for a slot (--max-sessions)")
        queued.add_metric([], self.admission.waiting)
        return [active, queued]
