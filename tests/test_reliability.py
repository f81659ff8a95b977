"""Fault injection on real processes: engines, orchestrator replicas and Redis are killed (or paused)
mid-session, and the session's final answer must equal the undisturbed one."""

import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from itertools import islice

import grpc
import pytest
import redis

from rstitch import RStitchClient, make_spec
from rstitch.client import GenerationResult, RetriesExhausted, _gather
from rstitch.local import LocalDeployment, Redis, Service, free_port
from rstitch.v1 import orchestrator_pb2 as opb

PROMPT = "x"  # the tiny pair writes 185 (random) and 300 (entropy) tokens for it before EOS
# Many short spans (a few ms each), so that a fault injected after the first one lands mid-session.
RANDOM = dict(policy="random", slm_probability=0.5, seed=7, max_new_tokens=300)
ENTROPY = dict(policy="entropy", tau=0.3, max_new_tokens=300)
REPLICA_ARGS = ["--lease", "1", "--engine-retry", "60", "--redis-retry", "30"]


@pytest.fixture(scope="module")
def aof_redis():
    server = Redis(appendonly=True)  # appendfsync always: what Redis acknowledged is on disk
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(aof_redis, model_paths, tmp_path_factory):
    """Two engines, two orchestrator replicas on the same Redis; yields (deployment, second replica)."""
    with LocalDeployment(redis=aof_redis.url, slm_args=["--model", str(model_paths["slm"])],
                         llm_args=["--model", str(model_paths["llm"])], orchestrator_args=REPLICA_ARGS,
                         log_dir=tmp_path_factory.mktemp("logs")) as deployment:
        with second_replica(deployment, aof_redis.url) as second:
            yield deployment, second


@contextmanager
def second_replica(deployment: LocalDeployment, redis_url: str):
    """Another orchestrator replica over the deployment's engines and the same Redis."""
    second = Service("orchestrator#2", ["--slm", deployment.slm.address, "--llm", deployment.llm.address,
                                        "--redis", redis_url, *REPLICA_ARGS], free_port(),
                     deployment.log_dir, dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        second.wait()
        yield second
    finally:
        second.stop()


def started(client: RStitchClient, options: dict, after_span_of: str | None = None):
    """A stream that has delivered its Started event and first token (and, with `after_span_of`, a
    whole span of that model: a token of the other model came after it), and what it delivered."""
    stream = client.stream(PROMPT, **options)
    got = _gather(islice(stream, 2), GenerationResult())
    while after_span_of and not (after_span_of in got.sources[:-1] and got.sources[-1] != after_span_of):
        _gather(islice(stream, 1), got)
    return stream, got


def restart(service: Service) -> None:
    service.stop(sig_kill=True)
    service.start()


def assert_same_answer(got: GenerationResult, want: GenerationResult):
    assert got.token_ids == want.token_ids
    assert got.sources == want.sources
    assert got.finish_reason == want.finish_reason


@pytest.mark.parametrize("victim", ["slm", "llm"])
def test_engine_killed_and_restarted_mid_session(cluster, victim):
    deployment, _ = cluster
    engine = getattr(deployment, victim)
    with RStitchClient(deployment.address) as client:
        want = client.generate(PROMPT, **ENTROPY)
        stream, got = started(client, ENTROPY, after_span_of=victim)  # the engine holds the session
        restart(engine)  # the orchestrator sees UNAVAILABLE, backs off, then NOT_FOUND: re-prefill
        _gather(stream, got)
    engine.wait()
    assert_same_answer(got, want)
    # The restarted engine was sent the whole sequence again, not just the tokens it had not seen.
    assert got.stats[f"{victim}_prefill_tokens"] > want.stats[f"{victim}_prefill_tokens"]
    # The orchestrator said once that the engine went away and once that it came back.
    log = deployment.orchestrator.log.read_text()
    assert log.count(f"engine {engine.address} is unreachable") == 1, log[-3000:]
    assert log.count(f"engine {engine.address} answers again after") == 1, log[-3000:]


def test_orchestrator_killed_client_resumes_on_another_replica(cluster):
    deployment, second = cluster
    with RStitchClient(deployment.address) as first, RStitchClient(second.address) as other:
        want = first.generate(PROMPT, **RANDOM)
        stream, got = started(first, RANDOM)
        deployment.orchestrator.stop(sig_kill=True)
        with pytest.raises(grpc.RpcError) as broken:
            _gather(stream, got)  # whatever still arrives before the stream breaks
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        received = len(got.token_ids)
        assert 0 < received < len(want.token_ids)
        rest = other.resume(got.session_id, received)  # follows until the dead replica's lease lapses
        stored = other.session(got.session_id)
    deployment.orchestrator.start()
    deployment.orchestrator.wait()
    assert got.token_ids + rest.token_ids == want.token_ids  # nothing twice, nothing missing
    assert got.sources + rest.sources == want.sources
    assert [t for span in stored.spans for t in span.token_ids] == want.token_ids
    assert stored.status == opb.STATUS_FINISHED


def test_resume_after_a_kill_mid_span_delivers_every_streamed_token_once(cluster):
    """The client holds streamed tokens of a span the log does not have yet; Resume skips exactly those."""
    deployment, second = cluster
    slm_only = dict(policy="slm", max_new_tokens=300)  # one span: the whole answer
    with RStitchClient(deployment.address) as first, RStitchClient(second.address) as other:
        want = first.generate(PROMPT, **slm_only)
        stream = first.stream(PROMPT, **slm_only)
        got = _gather(islice(stream, 11), GenerationResult())  # Started and 10 tokens of the span
        deployment.orchestrator.stop(sig_kill=True)
        assert len(got.token_ids) == 10 and not other.session(got.session_id).spans  # nothing logged yet
        rest = other.resume(got.session_id, len(got.token_ids))
    deployment.orchestrator.start()
    deployment.orchestrator.wait()
    assert got.token_ids + rest.token_ids == want.token_ids  # nothing twice, nothing missing
    assert "".join(text for _, text in got.pieces + rest.pieces) == want.text


def owner_pid(redis_url: str, session_id: str) -> int:
    """The process of the orchestrator replica that holds the session's lease (owner: host-pid-suffix)."""
    owner = redis.Redis.from_url(redis_url).hget(f"rstitch:{{{session_id}}}:meta", "owner").decode()
    return int(owner.rsplit("-", 2)[1])


def test_client_fails_over_by_itself(cluster, aof_redis):
    """One client address that reaches both replicas: generate() re-attaches with Resume on its own when the
    replica driving its session is killed mid-stream."""
    deployment, second = cluster
    replicas = [deployment.orchestrator, second]
    with RStitchClient(deployment.address) as client:
        want = client.generate(PROMPT, **RANDOM)
    session_id, killed = uuid.uuid4().hex, []

    def kill_its_replica(source, text):
        if not killed:
            killed.append(next(r for r in replicas if r.process.pid == owner_pid(aof_redis.url, session_id)))
            killed[0].stop(sig_kill=True)

    with RStitchClient(f"ipv4:{second.address},{deployment.orchestrator.address}") as client:
        got = client.generate(PROMPT, on_text=kill_its_replica, session_id=session_id, **RANDOM)
    killed[0].start()
    killed[0].wait()
    assert_same_answer(got, want)
    assert got.reattaches >= 1


def test_a_generation_rides_through_a_restart_of_its_only_orchestrator(cluster):
    """The client reaches one replica only; it is killed mid-stream and back a second later (plus its start-up):
    the client waits for it, re-attaches, and gets the rest of the answer exactly once."""
    deployment, _ = cluster
    orchestrator = deployment.orchestrator
    restarted = []

    def kill_and_restart(source, text):
        if not restarted:
            orchestrator.stop(sig_kill=True)
            restarted.append(threading.Timer(1.0, orchestrator.start))
            restarted[0].start()

    with RStitchClient(orchestrator.address) as client:
        want = client.generate(PROMPT, **RANDOM)
        got = client.generate(PROMPT, on_text=kill_and_restart, **RANDOM)
    restarted[0].join()
    orchestrator.wait()
    assert_same_answer(got, want)
    assert "".join(text for _, text in got.pieces) == want.text  # each piece once
    assert got.reattaches >= 1


def test_a_generation_whose_start_failed_is_started_once(cluster, aof_redis):
    """Redis is down when Generate arrives: the call fails before any Started event, so the client cannot know
    whether the session was created. It attaches with Resume (UNAVAILABLE while Redis is down, then NOT_FOUND:
    never created), only then calls Generate again under the same id, and the store ends up with one session."""
    deployment, _ = cluster
    before = stored_session_ids(aof_redis.url)
    with RStitchClient(deployment.address) as client:
        want = client.generate(PROMPT, **RANDOM)
        aof_redis.kill()
        back = threading.Timer(1.5, aof_redis.start)
        back.start()
        got = client.generate(PROMPT, **RANDOM)
        back.join()
    assert_same_answer(got, want)
    assert got.reattaches >= 2  # Resume at least once, then Generate
    assert stored_session_ids(aof_redis.url) - before == {want.session_id, got.session_id}


def test_a_generate_under_an_existing_session_id_attaches_to_it(cluster):
    deployment, _ = cluster
    session_id = uuid.uuid4().hex
    with RStitchClient(deployment.address) as client:
        first = client.generate(PROMPT, session_id=session_id, **RANDOM)
        again = client.generate(PROMPT, session_id=session_id, **RANDOM)
        request = opb.GenerateRequest(spec=make_spec(PROMPT, **RANDOM), session_id=session_id)
        with pytest.raises(grpc.RpcError) as exists:
            list(client._stub.Generate(request))
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS and "Resume" in exists.value.details()
    assert (again.session_id, again.token_ids, again.text) == (session_id, first.token_ids, first.text)


def test_with_no_orchestrator_the_client_gives_up_after_retry_s():
    with RStitchClient(f"127.0.0.1:{free_port()}", retry_s=1) as client:
        started = time.monotonic()
        with pytest.raises(RetriesExhausted) as gave_up:
            client.generate(PROMPT, max_new_tokens=5)
        waited = time.monotonic() - started
    assert 1 <= waited < 4
    assert gave_up.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "gave up after" in gave_up.value.details() and gave_up.value.session_id in gave_up.value.details()


def stored_session_ids(redis_url: str) -> set[str]:
    keys = redis.Redis.from_url(redis_url).scan_iter("rstitch:{*}:meta")
    return {key.decode().removeprefix("rstitch:{").removesuffix("}:meta") for key in keys}


def test_a_paused_replica_cannot_write_after_another_took_over(cluster):
    deployment, second = cluster
    paused = deployment.orchestrator.process
    with RStitchClient(deployment.address) as first, RStitchClient(second.address) as other:
        want = first.generate(PROMPT, **RANDOM)
        stream, got = started(first, RANDOM)
        os.kill(paused.pid, signal.SIGSTOP)  # alive but silent: its lease lapses, another replica takes over
        try:
            rest = other.resume(got.session_id, len(got.token_ids))
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        with pytest.raises(grpc.RpcError) as fenced:
            _gather(stream, got)  # the woken replica's next write is refused
        assert fenced.value.code() == grpc.StatusCode.ABORTED and "Resume" in fenced.value.details()
        stored = other.session(got.session_id)
    assert [t for span in stored.spans for t in span.token_ids] == want.token_ids
    assert stored.status == opb.STATUS_FINISHED
    assert stored.stats.slm_tokens + stored.stats.llm_tokens == len(want.token_ids)
    assert len(rest.token_ids) > 0


def test_redis_killed_and_restarted_mid_session_loses_nothing(cluster, aof_redis):
    deployment, _ = cluster
    with RStitchClient(deployment.address) as client:
        before = client.complete(PROMPT, **dict(RANDOM, max_new_tokens=20))
        want = client.generate(PROMPT, **RANDOM)
        stream, got = started(client, RANDOM)
        aof_redis.kill()
        time.sleep(0.5)  # the orchestrator's writes fail meanwhile and are retried
        aof_redis.start()
        _gather(stream, got)
        assert client.session(before.session_id) == before  # acknowledged before the crash: still there
        stored = client.session(got.session_id)
    assert_same_answer(got, want)
    assert [t for span in stored.spans for t in span.token_ids] == want.token_ids


def test_while_redis_is_down_requests_fail_with_unavailable(cluster, aof_redis):
    deployment, _ = cluster
    with RStitchClient(deployment.address, timeout=30, retry_s=0) as client:  # what the server answers, at once
        session_id = client.generate(PROMPT, max_new_tokens=5).session_id
        aof_redis.kill()
        try:
            for call in (lambda: client.session(session_id), lambda: client.generate(PROMPT, max_new_tokens=5)):
                with pytest.raises(grpc.RpcError) as down:
                    call()
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "Redis" in down.value.details() and "unreachable" in down.value.details()
        finally:
            aof_redis.start()
        assert deployment.orchestrator.process.poll() is None
        deadline = time.monotonic() + 10
        while True:  # back as soon as Redis is
            try:
                assert client.session(session_id).status == opb.STATUS_FINISHED
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
