"""Which engine writes next, and under which span rule (the orchestrator's policies)."""

import random
from abc import ABC, abstractmethod

from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

SLM, LLM = opb.SOURCE_SLM, opb.SOURCE_LLM
ROLE_NAMES = {SLM: "slm", LLM: "llm"}


class Policy(ABC):
    first: int

    @abstractmethod
    def rule(self, role: int) -> epb.SpanRule:
        """The span rule for `role`: gate, and max_tokens as a cap (0: none). The loop caps max_tokens
        by what is left of the answer and adds the stop ids."""

    @abstractmethod
    def next(self, role: int, span: epb.Span) -> int:
        """The role that writes after `role` produced `span`."""


class EntropyPolicy(Policy):
    """R-Stitch: the SLM drives; an SLM token with H > tau is discarded and the LLM writes that
    position; the LLM keeps writing until a token with H <= tau, which it keeps, then hands back."""

    first = SLM

    def __init__(self, tau: float):
        self.tau = tau

    def rule(self, role):
        gate = epb.GATE_STOP_ABOVE if role == SLM else epb.GATE_STOP_AT_OR_BELOW
        return epb.SpanRule(gate=gate, tau=self.tau)

    def next(self, role, span):
        if span.stop_reason == epb.STOP_REASON_GATE:
            return LLM if role == SLM else SLM
        return role


class SingleModelPolicy(Policy):
    """LLM-only or SLM-only decoding over the very same engines."""

    def __init__(self, role: int):
        self.first = role

    def rule(self, role):
        return epb.SpanRule()

    def next(self, role, span):
        return role


class RandomPolicy(Policy):
    """The paper's random-routing baseline: every token goes to the SLM with probability p, drawn
    from a seeded generator. A run of equal draws is decoded as one span, so routing stays per token
    while the engines still decode spans."""

    MAX_RUN = 1 << 16  # with p = 0 or 1 a run never ends by itself

    def __init__(self, slm_probability: float, seed: int):
        self.p = slm_probability
        self._rng = random.Random(seed)
        self.first = self._following = self._draw()

    def _draw(self) -> int:
        return SLM if self._rng.random() < self.p else LLM

    def rule(self, role):
        run = 1
        self._following = self._draw()
        while self._following == role and run < self.MAX_RUN:
            run += 1
            self._following = self._draw()
        return epb.SpanRule(max_tokens=run)

    def next(self, role, span):
        return self._following


def make_policy(session: opb.Session) -> Policy:
    """The policy of a session whose request was resolved (defaults applied)."""
    policy = session.spec.policy
    if policy == opb.POLICY_ENTROPY:
        return EntropyPolicy(session.tau)
    if policy == opb.POLICY_LLM:
        return SingleModelPolicy(LLM)
    if policy == opb.POLICY_SLM:
        return SingleModelPolicy(SLM)
    if policy == opb.POLICY_RANDOM:
        return RandomPolicy(session.slm_probability, session.spec.seed)
    raise ValueError(f"unknown policy {policy}")
