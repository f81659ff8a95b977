"""Rollouts for router training: the real stitching loop (orchestrator/loop.py::stitch) on
in-process engines, with the router's action sampled at every uncertain SLM token and every
engine call's time estimated by the engines' latency models (paper section 3.3: measuring wall
time per trajectory is noisy and slow; the fitted model is neither)."""

import random
from dataclasses import dataclass, field

import numpy as np

from engine.latency import LatencyModel
from orchestrator.engine_client import LocalEngineClient
from orchestrator.loop import Budget, Progress, stitch
from orchestrator.policies import LLM, SLM, RouterPolicy
from orchestrator.router import Router
from orchestrator.text import encode_prompt
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .task import Problem, score


@dataclass
class Decision:
    features: np.ndarray
    switch: bool
    logp: float  # log-probability of the action under the router that sampled it


@dataclass
class Trajectory:
    problem: Problem
    text: str
    correct: bool
    latency_ms: float  # estimated by the latency models
    decisions: list[Decision] = field(default_factory=list)


class SampledRouter:
    """A router whose action is drawn from its switch probability, and remembered for the update."""

    def __init__(self, router: Router, rng: random.Random):
        self.router, self.rng = router, rng
        self.decisions: list[Decision] = []

    def __call__(self, hidden: np.ndarray, entropy: float, position: int) -> bool:
        p = self.router.switch_probability(hidden, entropy, position)
        switch = self.rng.random() < p
        chosen = p if switch else 1.0 - p
        self.decisions.append(Decision(self.router.features(hidden, entropy, position), switch,
                                       float(np.log(max(chosen, 1e-12)))))
        return switch


class MeteredEngine(LocalEngineClient):
    """An in-process engine client that adds up the latency model's estimate of every call."""

    def __init__(self, engine, latency: LatencyModel):
        super().__init__(engine)
        self.latency = latency
        self.ms = 0.0

    def prefill(self, req, timeout=None):
        out = super().prefill(req, timeout)
        self.ms += self.latency.call_ms(req.base_len, len(req.token_ids), out.span.timings.forwards)
        return out

    def decode(self, req, timeout=None):
        out = super().decode(req, timeout)
        self.ms += self.latency.call_ms(req.base_len, 0, out.span.timings.forwards)
        return out

    def stream_span(self, req, timeout=None):  # how the loop calls an engine for a span
        out = yield from super().stream_span(req, timeout)
        self.ms += self.latency.call_ms(req.base_len, len(req.token_ids), out.span.timings.forwards)
        return out


class NoJournal:
    """Rollouts keep nothing: their spans are read off the Progress at the end."""

    def log(self, progress, record) -> bool:
        return False


class Roller:
    """Runs trajectories of one engine pair."""

    def __init__(self, engines: dict, latencies: dict, tokenizer, max_new_tokens: int = 128):
        self.engines, self.latencies, self.tokenizer = engines, latencies, tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos = sorted({t for e in engines.values() for t in e.info().eos_token_ids})
        self._count = 0

    def prompt(self, problem: Problem) -> list[int]:
        return encode_prompt(self.tokenizer, opb.GenerationSpec(text=problem.question))

    def run(self, problem: Problem, tau: float, decide) -> Trajectory:
        """One generation of `problem` under the router policy with `decide` at uncertain SLM tokens."""
        self._count += 1
        session_id = f"rollout-{self._count}"
        clients = {SLM: MeteredEngine(self.engines["slm"], self.latencies["slm"]),
                   LLM: MeteredEngine(self.engines["llm"], self.latencies["llm"])}
        progress = Progress(session_id, self.prompt(problem), self.max_new_tokens, self.eos)
        try:
            for _ in stitch(progress, RouterPolicy(tau, decide), clients, NoJournal(), Budget()):
                pass
        finally:
            for client in clients.values():
                client.release(epb.ReleaseRequest(session_id=session_id))
        text = self.tokenizer.decode(progress.tokens, skip_special_tokens=True)
        return Trajectory(problem, text, score(text, problem), sum(c.ms for c in clients.values()))

