"""Which engine writes next, and under which span rule (the orchestrator's policies)."""

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from common.draws import ROUTE, uniform
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

SLM, LLM = opb.SOURCE_SLM, opb.SOURCE_LLM
ROLE_NAMES = {SLM: "slm", LLM: "llm"}


class Policy(ABC):
    first: int

    @abstractmethod
    def rule(self, role: int, position: int, remaining: int) -> epb.SpanRule:
        """The span rule for `role` writing from answer token `position` on: gate, and max_tokens as a
        cap (0: none). The loop caps max_tokens by the `remaining` answer length and adds the stop ids."""

    @abstractmethod
    def next(self, role: int, span: epb.Span, position: int) -> int:
        """The role that writes answer token `position`, after `role` produced `span`.

        A policy's choices depend only on these arguments, so a session resumed from its log by
        another replica continues exactly as it would have."""

    def keeps(self, span: epb.Span, position: int) -> bool:
        """Whether the SLM's gated candidate (answer token `position`) is kept after all: R-Stitch+."""
        return False


class EntropyPolicy(Policy):
    """R-Stitch: the SLM drives; an SLM token with H > tau is discarded and the LLM writes that
    position; the LLM keeps writing until a token with H <= tau, which it keeps, then hands back."""

    first = SLM

    def __init__(self, tau: float):
        self.tau = tau

    def rule(self, role, position, remaining):
        gate = epb.GATE_STOP_ABOVE if role == SLM else epb.GATE_STOP_AT_OR_BELOW
        return epb.SpanRule(gate=gate, tau=self.tau)

    def next(self, role, span, position):
        if span.stop_reason == epb.STOP_REASON_GATE:
            return LLM if role == SLM else SLM
        return role


# (hidden state, entropy, answer position) -> True when the LLM should write that token.
Decide = Callable[[np.ndarray, float, int], bool]


class RouterPolicy(EntropyPolicy):
    """R-Stitch+ (Algorithm 1, lines 11-19): at an SLM token with H > tau a router reads the SLM's
    hidden state there and either hands the position to the LLM, as R-Stitch would, or keeps the
    SLM's token and lets the SLM go on. The LLM's side is R-Stitch's."""

    def __init__(self, tau: float, decide: Decide):
        super().__init__(tau)
        self.decide = decide

    def rule(self, role, position, remaining):
        rule = super().rule(role, position, remaining)
        rule.return_hidden = role == SLM
        return rule

    def keeps(self, span, position):
        hidden = np.frombuffer(span.candidate.hidden, dtype="<f4")
        return not self.decide(hidden, span.candidate.entropy, position)


class SingleModelPolicy(Policy):
    """LLM-only or SLM-only decoding over the very same engines."""

    def __init__(self, role: int):
        self.first = role

    def rule(self, role, position, remaining):
        return epb.SpanRule()

    def next(self, role, span, position):
        return role


class RandomPolicy(Policy):
    """The paper's random-routing baseline: answer token i goes to the SLM with probability p, by the
    session's draw for (seed, i, routing). A run of equal draws is decoded as one span, so routing stays
    per token while the engines still decode spans."""

    def __init__(self, slm_probability: float, seed: int):
        self.p = slm_probability
        self.seed = seed
        self.first = self._draw(0)

    def _draw(self, position: int) -> int:
        return SLM if uniform(self.seed, position, ROUTE) < self.p else LLM

    def rule(self, role, position, remaining):
        run = 1
        while run < remaining and self._draw(position + run) == role:
            run += 1
        return epb.SpanRule(max_tokens=run)

    def next(self, role, span, position):
        return self._draw(position)


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
    if policy == opb.POLICY_ROUTER:
        from .router import Router
        return RouterPolicy(session.tau, Router.from_bytes(session.spec.router).switches)
    raise ValueError(f"unknown policy {policy}")
