"""Several replicas of an engine: sessions spread over them, stay on the one holding their cache, and
move to another (re-prefilled from the log) when theirs is killed."""

import os
from itertools import islice

import pytest

from orchestrator.replicas import EnginePool
from rstitch import RStitchClient
from rstitch.client import GenerationResult, _gather
from rstitch.local import LocalDeployment, Service, free_port

PROMPT = "x"  # the tiny pair writes 300 tokens in ~200 spans for it (policy entropy, tau 0.3)
ENTROPY = dict(policy="entropy", tau=0.3, max_new_tokens=300)


@pytest.fixture(scope="module")
def replicated(redis_server, model_paths, tmp_path_factory):
    """One SLM engine, two LLM engine replicas, and an orchestrator given both LLM addresses;
    yields (orchestrator, SLM engine, LLM replicas)."""
    with LocalDeployment(redis=redis_server.url, slm_args=["--model", str(model_paths["slm"])],
                         llm_args=["--model", str(model_paths["llm"])],
                         log_dir=tmp_path_factory.mktemp("logs")) as deployment:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        second = Service("llm_service#2", ["--model", str(model_paths["llm"])], free_port(), deployment.log_dir, env)
        orchestrator = Service("orchestrator#replicas", [
            "--slm", deployment.slm.address, "--llm", f"{deployment.llm.address},{second.address}",
            "--redis", redis_server.url, "--engine-retry", "60"], free_port(), deployment.log_dir, env)
        try:
            second.wait()
            orchestrator.wait()
            yield orchestrator, deployment.slm, [deployment.llm, second]
        finally:
            orchestrator.stop()
            second.stop()


def test_new_sessions_spread_over_the_replicas(replicated):
    orchestrator, slm, replicas = replicated
    with RStitchClient(orchestrator.address) as client:
        sessions = [client.complete(PROMPT, **dict(ENTROPY, max_new_tokens=20)) for _ in range(4)]
    assert sorted(s.llm_replica for s in sessions) == sorted([r.address for r in replicas] * 2)
    assert {s.slm_replica for s in sessions} == {slm.address}


def test_a_killed_replica_moves_its_sessions_to_another(replicated):
    orchestrator, _, replicas = replicated
    with RStitchClient(orchestrator.address) as client:
        want = client.generate(PROMPT, **ENTROPY)
        stream = client.stream(PROMPT, **ENTROPY)
        got = _gather(islice(stream, 2), GenerationResult())
        while not ("llm" in got.sources[:-1] and got.sources[-1] == "slm"):  # an LLM span ended: the LLM
            _gather(islice(stream, 1), got)                                # replica holds the session now
        holder = client.session(got.session_id).llm_replica
        victim = next(r for r in replicas if r.address == holder)
        victim.stop(sig_kill=True)
        _gather(stream, got)
        stored = client.session(got.session_id)
    victim.start()
    victim.wait()
    assert got.token_ids == want.token_ids and got.sources == want.sources
    assert stored.llm_replica != holder and stored.llm_replica in {r.address for r in replicas}
    assert got.stats["llm_prefill_tokens"] > want.stats["llm_prefill_tokens"]  # re-prefilled on the other


def test_a_name_resolving_to_several_addresses_gives_one_replica_each(monkeypatch):
    answers = {"engines-headless": ["10.0.0.7", "10.0.0.8"], "localhost": ["127.0.0.1"]}
    monkeypatch.setattr("socket.getaddrinfo", lambda host, port, family, kind: [
        (family, kind, 6, "", (ip, port)) for ip in answers[host]])
    pool = EnginePool(["engines-headless:50052", "localhost:50051"], connect=lambda address: address)
    assert list(pool.clients) == ["10.0.0.7:50052", "10.0.0.8:50052", "localhost:50051"]
    pool.count("10.0.0.7:50052", +1)
    assert pool.pick() in ("10.0.0.8:50052", "localhost:50051")  # not the busy one
    assert pool.fail_over("10.0.0.8:50052") == "localhost:50051"
