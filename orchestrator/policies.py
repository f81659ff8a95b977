"""Which engine writes next, and under which span rule (the orchestrator's policies)."""

from abc import ABC, abstractmethod

from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

SLM, LLM = opb.SOURCE_SLM, opb.SOURCE_LLM
ROLE_NAMES = {SLM: "slm", LLM: "llm"}


class Policy(ABC):
    first: int

    @abstractmethod
    def rule(self, role: int) -> epb.SpanRule:
        """The gate part of the span rule for `role` (the loop adds max_tokens and stop ids)."""

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


def make_policy(policy: int, tau: float) -> Policy:
    if policy == opb.POLICY_ENTROPY:
        return EntropyPolicy(tau)
    if policy == opb.POLICY_LLM:
        return SingleModelPolicy(LLM)
    if policy == opb.POLICY_SLM:
        return SingleModelPolicy(SLM)
    raise ValueError(f"unknown policy {policy}")
