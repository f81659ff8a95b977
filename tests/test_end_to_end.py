"""The deployment as a user runs it: slm_service, llm_service, orchestrator and redis-server as
separate processes on free loopback ports, driven through the rstitch CLI and the Python client."""

import json
import os
import subprocess
import sys

import grpc
import pytest
import redis

from rstitch import RStitchClient
from rstitch.local import LocalDeployment
from rstitch.v1 import orchestrator_pb2 as opb

from .conftest import PROMPTS


@pytest.fixture(scope="module")
def deployment(redis_server, model_paths, tmp_path_factory):
    with LocalDeployment(redis=redis_server.url, slm_args=["--model", str(model_paths["slm"])],
                         llm_args=["--model", str(model_paths["llm"])], log_dir=tmp_path_factory.mktemp("logs")) as d:
        yield d


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "rstitch.cli", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"rstitch {' '.join(args)} failed: {proc.stderr}")
    return proc


def generate_json(deployment, prompt, *options):
    out = cli("generate", "--orchestrator", deployment.address, "--max-new-tokens", "40", "--json", *options, prompt)
    return json.loads(out.stdout)


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_cli_policies_agree_at_the_extremes(deployment, prompt):
    llm = generate_json(deployment, prompt, "--policy", "llm")
    slm = generate_json(deployment, prompt, "--policy", "slm")
    at_zero = generate_json(deployment, prompt, "--policy", "entropy", "--tau", "0")
    at_one = generate_json(deployment, prompt, "--policy", "entropy", "--tau", "1")
    slm_kept = [i for i, s in enumerate(at_zero["sources"]) if s == "slm"]
    assert all(at_zero["entropies"][i] == 0.0 for i in slm_kept)
    if not slm_kept:
        assert at_zero["token_ids"] == llm["token_ids"]
    assert at_one["token_ids"] == slm["token_ids"]
    assert set(llm["sources"]) == {"llm"} and set(at_one["sources"]) == {"slm"}


def test_cli_router_policy_with_a_router_file(deployment, engines, tmp_path):
    """`--policy router --router FILE` sends the file; an always-keep router writes the SLM's answer,
    an always-switch one the entropy policy's (the deployment's own router was trained for another SLM)."""
    from orchestrator.router import Router

    paths = {}
    for choice in ("keep", "switch"):
        paths[choice] = tmp_path / f"{choice}.safetensors"
        paths[choice].write_bytes(Router.constant(engines["slm"].info().hidden_size, switch=choice == "switch").to_bytes())
    keep = generate_json(deployment, PROMPTS[1], "--policy", "router", "--tau", "0.3", "--router", str(paths["keep"]))
    switch = generate_json(deployment, PROMPTS[1], "--policy", "router", "--tau", "0.3", "--router",
                           str(paths["switch"]))
    assert keep["token_ids"] == generate_json(deployment, PROMPTS[1], "--policy", "slm")["token_ids"]
    assert keep["stats"]["router_kept_tokens"] > 0
    entropy = generate_json(deployment, PROMPTS[1], "--policy", "entropy", "--tau", "0.3")
    assert (switch["token_ids"], switch["sources"]) == (entropy["token_ids"], entropy["sources"])


def test_cli_json_has_everything_a_script_needs(deployment):
    out = generate_json(deployment, PROMPTS[1], "--tau", "0.3")
    for key in ("session_id", "text", "prompt_token_ids", "token_ids", "sources", "entropies", "stats"):
        assert key in out
    assert len(out["token_ids"]) == len(out["sources"]) == len(out["entropies"]) > 0
    assert out["stats"]["slm_tokens"] + out["stats"]["llm_tokens"] == len(out["token_ids"])
    assert out["stats"]["switches"] >= 1 and out["stats"]["latency_ms"] > 0


def test_cli_plain_output_is_the_text(deployment):
    plain = cli("generate", "--orchestrator", deployment.address, "--max-new-tokens", "20", "--tau", "0.3", PROMPTS[2])
    as_json = generate_json(deployment, PROMPTS[2], "--tau", "0.3", "--max-new-tokens", "20")
    assert plain.stdout == as_json["text"] + "\n"
    assert "switches" in plain.stderr


def test_token_id_prompts_are_accepted(deployment):
    out = generate_json(deployment, "3,48,81,8,4", "--token-ids", "--tau", "0.3")
    assert out["prompt_token_ids"] == [3, 48, 81, 8, 4]


def test_redis_log_equals_what_the_client_received(deployment):
    with RStitchClient(deployment.address) as client:
        received = client.generate(PROMPTS[3], tau=0.3, max_new_tokens=60)
        stored = client.session(received.session_id)
    r = redis.Redis.from_url(deployment.redis_url)
    log = [opb.SpanRecord.FromString(b) for b in r.lrange(f"rstitch:{{{received.session_id}}}:log", 0, -1)]
    assert [t for s in log for t in s.token_ids] == received.token_ids
    assert [{opb.SOURCE_SLM: "slm", opb.SOURCE_LLM: "llm"}[s.source] for s in log for _ in s.token_ids] == received.sources
    assert list(stored.spans) == log and stored.status == opb.STATUS_FINISHED
    assert stored.text == received.text
    assert int(r.hget(f"rstitch:{{{received.session_id}}}:meta", "status")) == opb.STATUS_FINISHED
    assert r.ttl(f"rstitch:{{{received.session_id}}}:log") > 0  # finished sessions expire


# Requests the server refuses (values the CLI refuses itself, such as --tau 1.5: tests/test_cli.py).
@pytest.mark.parametrize("args, code, message", [
    (["--token-ids", "5,999"], "INVALID_ARGUMENT", "outside the vocabulary"),
    (["--max-new-tokens", "100000", "hi"], "RESOURCE_EXHAUSTED", "above this server's limit"),
    (["--policy", "spec", "--draft-tokens", "500", "hi"], "INVALID_ARGUMENT", "draft_tokens 500 is too many"),
    (["--policy", "router", "hi"], "FAILED_PRECONDITION", "the router policy needs a router"),
    (["--policy", "router", "--router", "README.md", "hi"], "INVALID_ARGUMENT", "not a safetensors file"),
])
def test_bad_requests_get_a_clear_status(deployment, args, code, message):
    proc = cli("generate", "--orchestrator", deployment.address, *args, check=False)
    assert proc.returncode == 1
    assert code in proc.stderr and message in proc.stderr


def test_unknown_sessions_are_not_found(deployment):
    with RStitchClient(deployment.address) as client:
        for call in (client.session, client.cancel):
            with pytest.raises(grpc.RpcError) as e:
                call("no-such-session")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_services_expose_health_and_reflection(deployment):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for address, service in ((deployment.address, "rstitch.v1.Orchestrator"),
                             (deployment.slm.address, "rstitch.v1.Engine")):
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            assert service in [s.name for s in reply.list_services_response.service]


def test_orchestrator_refuses_engines_with_different_tokenizers(deployment, foreign_tokenizer_model, tmp_path):
    from rstitch.local import Service, free_port

    foreign = Service("slm_service", ["--model", str(foreign_tokenizer_model)], free_port(), tmp_path)
    try:
        foreign.wait()
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "--slm", foreign.address, "--llm",
                               deployment.llm.address, "--port", "0"], capture_output=True, text=True, timeout=120)
    finally:
        foreign.stop()
    assert proc.returncode != 0
    assert "do not share a tokenizer" in proc.stderr


def test_plain_output_highlights_llm_tokens_on_a_terminal():
    from rstitch.cli import LLM_STYLE, RESET, render
    from rstitch.client import GenerationResult

    result = GenerationResult(text="ab", pieces=[("slm", "a"), ("llm", "b")])
    assert render(result, color=True) == f"a{LLM_STYLE}b{RESET}"
    assert render(result, color=False) == "ab"


def test_demo_runs_a_stitched_generation_and_stops_everything():
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.run([sys.executable, "-m", "rstitch.cli", "demo", "--max-new-tokens", "30"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "sessions in redis://127.0.0.1:" in proc.stderr  # a private redis-server was started
    assert "switches" in proc.stdout and "SLM" in proc.stdout
