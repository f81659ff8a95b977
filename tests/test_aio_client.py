"""The asyncio client (rstitch.aio.AsyncRStitchClient) against a real deployment of the tiny pair: the
same answers as the synchronous client, many generations on one event loop at once, and a generation
that rides through the kill -9 and restart of its orchestrator."""

import asyncio

import grpc
import pytest

from rstitch import RStitchClient
from rstitch.aio import AsyncRStitchClient
from rstitch.local import LocalDeployment
from rstitch.v1 import orchestrator_pb2 as opb

from .conftest import PROMPTS


@pytest.fixture(scope="module")
def deployment(model_paths, tmp_path_factory):
    # A short lease: the restarted orchestrator takes over the killed one's session a second later.
    with LocalDeployment(slm_args=["--model", str(model_paths["slm"])], llm_args=["--model", str(model_paths["llm"])],
                         orchestrator_args=["--lease", "1"], log_dir=tmp_path_factory.mktemp("aio-logs")) as d:
        yield d


@pytest.fixture(scope="module")
def sync_client(deployment):
    with RStitchClient(deployment.address, timeout=60) as client:
        yield client


def run(coroutine_function, deployment, **client_options):
    """coroutine_function(client) on a fresh event loop, with a client made inside it."""
    async def main():
        async with AsyncRStitchClient(deployment.address, timeout=60, **client_options) as client:
            return await coroutine_function(client)

    return asyncio.run(main())


def test_every_method_answers_as_the_synchronous_clients(deployment, sync_client):
    expected = sync_client.generate(PROMPTS[1], max_new_tokens=16)

    async def calls(client):
        pieces = []
        result = await client.generate(PROMPTS[1], max_new_tokens=16, on_text=lambda source, text: pieces.append(text))
        events = [event async for event in client.stream(PROMPTS[1], max_new_tokens=16)]
        completed = await client.complete(PROMPTS[1], max_new_tokens=16)
        stored = await client.session(result.session_id)
        resumed = await client.resume(result.session_id, received_tokens=5)
        return result, pieces, events, completed, stored, resumed, await client.cancel(result.session_id)

    result, pieces, events, completed, stored, resumed, cancelled = run(calls, deployment)
    assert (result.token_ids, result.sources, result.text) == (expected.token_ids, expected.sources, expected.text)
    assert "".join(pieces) == result.text
    assert [t for e in events if e.HasField("delta") for t in e.delta.span.token_ids] == expected.token_ids
    assert [t for span in completed.spans for t in span.token_ids] == expected.token_ids
    assert stored.session_id == result.session_id and stored.status == opb.STATUS_FINISHED
    assert resumed.token_ids == expected.token_ids[5:]
    assert cancelled == opb.STATUS_FINISHED  # cancelling a finished session changes nothing


def test_many_generations_share_one_event_loop(deployment, sync_client):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]

    async def all_at_once(client):
        return await asyncio.gather(*(client.generate(p, policy="llm", max_new_tokens=12) for p in prompts))

    results = run(all_at_once, deployment)
    assert len({r.session_id for r in results}) == len(prompts)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == sync_client.generate(prompt, policy="llm", max_new_tokens=12).token_ids


def test_errors_are_the_servers_status(deployment):
    async def bad(client):
        await client.generate(PROMPTS[0], policy="spec", draft_tokens=65)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        run(bad, deployment)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_generation_rides_through_a_restart_of_its_orchestrator(deployment, sync_client):
    expected = sync_client.generate(PROMPTS[4], max_new_tokens=200)
    assert len(expected.token_ids) > 40
    orchestrator = deployment.orchestrator

    def kill_once(source, text, seen=[]):  # noqa: B006 - counts the calls of this one test
        seen.append(text)
        if len(seen) == 10:
            orchestrator.stop(sig_kill=True)
            orchestrator.start()

    async def generate(client):
        return await client.generate(PROMPTS[4], max_new_tokens=200, on_text=kill_once)

    result = run(generate, deployment)
    assert result.reattaches >= 1
    assert (result.token_ids, result.text) == (expected.token_ids, expected.text)
