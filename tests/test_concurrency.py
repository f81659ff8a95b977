"""Batching changes nothing in the result: held-out problems run 16 at once through the orchestrator
give exactly the tokens of the same problems run one at a time, on either backend, while the engines
really did share forwards between sessions."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.default_models import default_model_path
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch.v1 import orchestrator_pb2 as opb
from training.task import heldout

from .conftest import make_engine


def shared_forwards(engine) -> bool:
    if engine.backend == "hf":
        return engine.runner.stats.tokens > engine.runner.stats.steps  # some step carried several sessions
    return engine.peak_batch > 1


# On vllm only LLM-only runs here: two in-process vLLM engines stepping at the same time on their
# threads share vLLM's global forward context (KeyError on a layer of the other model, or a native
# abort); deployed, each engine is its own process. tests/test_vllm_backend.py runs 16 concurrent
# gated spans on one vLLM engine.
@pytest.mark.parametrize("backend, policy", [("hf", opb.POLICY_ENTROPY), ("hf", opb.POLICY_SPEC), ("hf", opb.POLICY_LLM),
                                             ("vllm", opb.POLICY_LLM)])
def test_sixteen_sessions_at_once_equal_one_at_a_time(backend, policy, request):
    engines = request.getfixturevalue("vllm_engines") if backend == "vllm" else {
        role: make_engine("hf", default_model_path(role), role=role, kv_budget_mb=16) for role in ("slm", "llm")}
    orchestrator = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                                MemorySessionStore())
    problems = heldout(16)

    def answer(problem):
        session = orchestrator.complete(opb.GenerationSpec(text=problem.question, policy=policy, max_new_tokens=48))
        assert session.status == opb.STATUS_FINISHED, session.error
        return [(t, s.source) for s in session.spans for t in s.token_ids]

    alone = [answer(p) for p in problems]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(answer, problems))
    assert together == alone
    assert shared_forwards(engines["llm"])  # every policy here runs the LLM
