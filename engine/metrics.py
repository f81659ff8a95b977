"""What an engine reports to Prometheus, read at scrape time."""


class EngineCollector:
    """An engine's KV cache and load, read at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sessions, admission, load = self.engine.sessions, self.engine.admission, self.engine.load()
        for kind, name, doc, value in (
            (CounterMetricFamily, "rstitch_engine_steps", "Steps (forwards) the engine's loop ran", load.get("steps", 0)),
            (CounterMetricFamily, "rstitch_engine_step_tokens", "Tokens those steps fed (over steps: the mean batch)",
             load.get("step_tokens", 0)),
            (CounterMetricFamily, "rstitch_engine_busy_seconds", "Seconds the engine's loop spent in steps (over wall "
                                                                  "time: how loaded it is)", load.get("busy_seconds", 0)),
            (CounterMetricFamily, "rstitch_engine_forward_seconds", "Of those, seconds in forwards",
             load.get("forward_seconds", 0)),
            (GaugeMetricFamily, "rstitch_kv_used_tokens", "Tokens held in the KV caches", sessions.used),
            (GaugeMetricFamily, "rstitch_kv_capacity_tokens", "Tokens the KV budget holds", sessions.capacity),
            (CounterMetricFamily, "rstitch_kv_evictions", "Sessions evicted to make room", sessions.evictions),
            (GaugeMetricFamily, "rstitch_sessions_active", "Sessions holding a KV cache", len(sessions)),
            (GaugeMetricFamily, "rstitch_queue_depth", "Prefill/Decode calls in flight (running or waiting for "
                                                       "the model)", admission.active + admission.waiting),
        ):
            family = kind(name, doc, labels=["model"])
            family.add_metric([self.engine.role], value)
            yield family
