"""Faults under load: a minute of bench/chaos.py (every kind of kill at least once, 8 streamed sessions),
and regression tests for what its runs found on the server side."""

import time
from itertools import islice

import pytest

from bench.chaos import KINDS, Config, run
from common.errors import EngineUnavailable
from engine.hf import HFEngine
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator, RequestError, Settings
from orchestrator.store import MemorySessionStore, StoreUnavailable
from rstitch import RStitchClient
from rstitch.client import GenerationResult, _gather
from rstitch.local import LocalDeployment
from rstitch.v1 import orchestrator_pb2 as opb

# The most a process of each kind may hold (RSS) over the run: about twice what they hold at rest, so that a
# leak of the session state a fault leaves behind (leases, caches, channels) would cross it.
MEMORY_BOUND_MB = {"slm": 1024, "llm": 1024, "orchestrator": 768, "redis": 256}


def test_a_minute_of_faults_under_load_loses_nothing(tmp_path):
    report = run(Config(duration_s=60, sessions=8, seed=1, gap_s=(2, 5), down_s=(1, 2), lease_s=2, progress=False),
                 tmp_path)
    assert all(report["faults_by_kind"][kind] >= 1 for kind in KINDS), report["faults_by_kind"]
    assert report["passed"], (report["checks"], report["errors"], report["differences"])
    assert report["counts"]["generations that re-attached"] > 0  # the faults reached clients mid-stream
    for name, memory in report["memory"].items():
        assert memory["peak_mb"] < MEMORY_BOUND_MB[name.split("#")[0]], (name, memory)


# --- found by bench/chaos.py ------------------------------------------------------------------------------------

PROMPT = "x"  # the tiny pair writes 300 tokens in ~200 spans for it (policy entropy, tau 0.3)
ENTROPY = dict(policy="entropy", tau=0.3, max_new_tokens=300)


@pytest.fixture(scope="module")
def two_llm_replicas(redis_server, model_paths, tmp_path_factory):
    with LocalDeployment(redis=redis_server.url, slm_args=["--model", str(model_paths["slm"])],
                         llm_args=["--model", str(model_paths["llm"])], llm_replicas=2,
                         log_dir=tmp_path_factory.mktemp("logs")) as deployment:
        yield deployment


def test_a_session_waits_for_its_engine_when_every_replica_of_it_is_killed(two_llm_replicas):
    """Both LLM replicas die at once: the session used to move from one dead replica to the other until its
    repairs ran out ("could not be brought in sync after 3 tries"); it now waits for one to come back."""
    deployment = two_llm_replicas
    with RStitchClient(deployment.address) as client:
        want = client.generate(PROMPT, **ENTROPY)
        stream = client.stream(PROMPT, **ENTROPY)
        got = _gather(islice(stream, 2), GenerationResult())
        while not ("llm" in got.sources[:-1] and got.sources[-1] == "slm"):  # an LLM replica holds the session
            _gather(islice(stream, 1), got)
        for replica in deployment.llms:
            replica.stop(sig_kill=True)
        time.sleep(1)
        for replica in deployment.llms:
            replica.start()
        _gather(stream, got)
    for replica in deployment.llms:
        replica.wait()
    assert (got.token_ids, got.sources, got.finish_reason) == (want.token_ids, want.sources, want.finish_reason)


class Death:
    """When one orchestrator replica dies: right after it logged a span that `last(record)` picks."""

    def __init__(self, last):
        self.last, self.dead = last, False

    def link(self, target, error):
        """The replica's link to a store or an engine: every call raises `error` once the replica is dead."""
        return Link(target, self, error)


class Link:
    def __init__(self, target, death: Death, error):
        self.target, self.death, self.error = target, death, error

    def __getattr__(self, name):
        attribute = getattr(self.target, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self.death.dead:
                raise self.error("this orchestrator replica is dead")
            result = attribute(*args, **kwargs)
            if name == "_write" and args[2]:  # a span logged (store._write(lease, index, record, ...))
                self.death.dead = self.death.last(opb.SpanRecord.FromString(args[2]))
            return result
        return call


@pytest.fixture(scope="module")
def self_speculative(model_paths, engines):
    """The tiny LLM drafting for itself (a second engine of it in the SLM's role): every draft is kept."""
    return {"slm": HFEngine(model_paths["llm"], role="slm"), "llm": engines["llm"]}


@pytest.mark.parametrize("pair, kept", [("engines", False), ("self_speculative", True)],
                         ids=["no-draft-kept", "every-draft-kept"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 4}], ids=["greedy", "sampled"])
def test_a_speculative_round_taken_over_between_its_two_spans_continues_exactly(request, sampling, pair, kept):
    """A round logs the SLM's kept drafts, then the LLM's token. A replica that died between the two left the
    LLM's cache at the sequence's end in its cursor: its successor's verify fed only the drafts (sampled: refused
    by the engine, the session failed; greedy: the verdict read the LLM's choices one position off). And with
    drafts kept, the log ends with them: the successor began the next round there, cutting the rounds otherwise
    than an undisturbed run (so the LLM's token after the drafts became the SLM's; sampled: another token)."""
    engines = request.getfixturevalue(pair)
    store, logged = MemorySessionStore(lease_s=0.2), []

    def round_drafted(record):  # a round's SLM span, with or without kept drafts, after the first round
        logged.append(record.source)
        return logged[-1] == opb.SOURCE_SLM and opb.SOURCE_LLM in logged and bool(record.token_ids) == kept

    death = Death(round_drafted)
    dying = Orchestrator(*(death.link(LocalEngineClient(engines[role]), EngineUnavailable) for role in ("slm", "llm")),
                         death.link(store, StoreUnavailable), Settings(engine_retry_s=0))
    successor = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]), store)
    spec = opb.GenerationSpec(text=PROMPT, policy=opb.POLICY_SPEC, max_new_tokens=60, **sampling)
    want = _gather(successor.generate(spec), GenerationResult())
    got = GenerationResult()
    with pytest.raises(RequestError):
        _gather(dying.generate(spec), got)
    assert death.dead
    rest = _gather(successor.resume(got.session_id, len(got.token_ids)), GenerationResult())
    assert got.token_ids + rest.token_ids == want.token_ids
    assert got.sources + rest.sources == want.sources  # the rounds as an undisturbed run cuts them
    assert rest.finish_reason == want.finish_reason
    stored = successor.session(got.session_id)
    assert [t for span in stored.spans for t in span.token_ids] == want.token_ids
    assert stored.stats.slm_tokens + stored.stats.llm_tokens == len(want.token_ids)
