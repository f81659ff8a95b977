"""R-Stitch+: the DAPO objective by hand, the router file, and the router policy's wiring."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.default_models import default_router_path, trained_models_dir
from orchestrator.engine_client import LocalEngineClient
from orchestrator.loop import Budget, Progress, stitch
from orchestrator.policies import LLM, SLM, RouterPolicy
from orchestrator.router import Router
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb
from training.dapo import RouterNet, dapo_loss, group_advantages, reward
from training.rollouts import NoJournal

from .conftest import PROMPTS

# --- the objective ------------------------------------------------------------------------------

def test_dapo_loss_on_a_hand_computed_example():
    # Four actions (from any trajectories: token-level normalization averages over all of them).
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.0])
    advantage = torch.tensor([1.0, 1.0, -1.0, 2.0])
    logp_old = torch.log(torch.tensor([0.4, 0.6, 0.2, 0.9]))
    logp_new = (logp_old + torch.log(ratio)).requires_grad_()
    loss = dapo_loss(logp_new, logp_old, advantage, eps_low=0.2, eps_high=0.28)
    # min(r*A, clip(r, 0.8, 1.28)*A): 1.28 (clipped high), 0.5, -0.8 (clipped low), 2.0 -> mean 0.745.
    assert loss.item() == pytest.approx(-(1.28 + 0.5 - 0.8 + 2.0) / 4, abs=1e-6)
    loss.backward()
    # The clipped actions give no gradient; the others d(-r*A/4)/d(logp) = -r*A/4.
    assert logp_new.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 0.0, -2.0 / 4], abs=1e-6)


def test_group_advantages_are_normalized_within_the_group():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]).tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])
    adv = group_advantages([0.9, 0.7, 0.0])
    assert adv.mean() == pytest.approx(0.0, abs=1e-9) and adv.std() == pytest.approx(1.0)
    assert group_advantages([0.5, 0.5, 0.5]) is None  # no signal: dropped (dynamic sampling)
    # Centered only (the default): millisecond differences among right answers stay small next to
    # a wrong answer's, which std scaling would blow up to the same size.
    assert group_advantages([0.9, 0.8, 0.9, 0.8], scale=False).tolist() == pytest.approx([0.05, -0.05, 0.05, -0.05])
    assert group_advantages([0.9, 0.8, 0.9, 0.8]).tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0])


def test_latency_is_only_penalized_when_the_answer_is_right():
    assert reward(True, 100.0, lam=0.002) == pytest.approx(0.8)
    assert reward(False, 100.0, lam=0.002) == 0.0
    assert reward(False, 10.0, lam=0.002) == reward(False, 1000.0, lam=0.002)


# --- the router and its file --------------------------------------------------------------------

def test_the_trained_network_exports_to_the_same_router():
    torch.manual_seed(0)
    net = RouterNet(hidden_size=8, units=5)
    features = np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32) * 3 + 1
    net.standardize_from(features)
    router = Router.from_bytes(net.export({"tau": 0.1}).to_bytes())
    expected = torch.sigmoid(net.logits(torch.as_tensor(features))).detach().numpy()
    position_scale = router.position_scale
    got = [router.switch_probability(x[:8], float(x[8]), x[9] * position_scale) for x in features]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert router.parameters == 5 * 10 + 5 + 5 + 1 and router.about == {"tau": 0.1}


@pytest.mark.parametrize("data, message", [
    (b"", "not a safetensors file"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", "not a safetensors file"),
    (b"x" * ((1 << 20) + 1), "at most"),
])
def test_a_file_that_is_not_a_router_is_refused_clearly(data, message):
    with pytest.raises(ValueError, match=message):
        Router.from_bytes(data)


def test_a_router_file_of_another_format_is_refused():
    from safetensors.numpy import save

    data = save({"w1": np.zeros((2, 5), np.float32)}, metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="format is 'something-else'"):
        Router.from_bytes(data)


def router_file(dtype=None, metadata=None, **replace) -> bytes:
    """A valid 8-input router's file, its tensors cast to `dtype` (a torch dtype) or replaced."""
    from safetensors.torch import save as save_torch

    router = Router.constant(hidden_size=6, switch=True)
    tensors = {name: torch.as_tensor(getattr(router, name)) for name in ("w1", "b1", "w2", "b2")}
    tensors = {name: t.to(dtype) if dtype is not None else t for name, t in tensors.items()}
    tensors.update({name: torch.as_tensor(value) for name, value in replace.items()})
    return save_torch(tensors, metadata={"format": "rstitch-router/1", "position_scale": "64.0", **(metadata or {})})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_router_saved_in_any_float_dtype_loads_and_decides_alike(dtype):
    router = Router.from_bytes(router_file(dtype))
    assert router.w1.dtype == np.float32 and router.hidden_size == 6
    assert router.switches(np.ones(6, np.float32), 0.5, 3)  # the bias of 30 survives every dtype exactly
    assert float(router.b2[0]) == 30.0


@pytest.mark.parametrize("replace, metadata, message", [
    ({"w1": torch.zeros(4, 8, dtype=torch.int32)}, {}, "tensor 'w1' has dtype I32"),
    ({"b1": torch.zeros(4, dtype=torch.bool)}, {}, "tensor 'b1' has dtype BOOL"),
    ({"w1": torch.zeros(4, 8, 1)}, {}, "inconsistent shapes"),
    ({"w1": torch.zeros(32)}, {}, "inconsistent shapes"),
    ({"w1": torch.zeros(0, 8), "b1": torch.zeros(0), "w2": torch.zeros(1, 0)}, {}, "units >= 1"),
    ({}, {"position_scale": "inf"}, "positive finite"),
    ({}, {"position_scale": "nan"}, "positive finite"),
    ({}, {"position_scale": "0"}, "positive finite"),
])
def test_a_router_with_bad_weights_is_refused_naming_what_is_wrong(replace, metadata, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Router.from_bytes(router_file(metadata=metadata, **replace))


def test_the_committed_router_reads_the_trained_slm():
    import json

    router = Router.from_bytes(default_router_path().read_bytes())
    slm = json.loads((trained_models_dir() / "rstitch-slm" / "config.json").read_text())
    assert router.hidden_size == slm["hidden_size"]
    assert router.about["command"].startswith("python -m training.dapo")


# --- the policy, wired through the orchestrator -------------------------------------------------

def run(orchestrator, prompt, policy, tau, router=b""):
    session = orchestrator.complete(opb.GenerationSpec(text=prompt, policy=policy, tau=tau, max_new_tokens=40,
                                                       router=router))
    tokens = [t for s in session.spans for t in s.token_ids]
    sources = [s.source for s in session.spans for _ in s.token_ids]
    return session, tokens, sources


@pytest.fixture
def hidden_size(engines):
    return engines["slm"].info().hidden_size


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_a_router_that_always_keeps_equals_tau_one(orchestrator, hidden_size, prompt):
    tau = 0.3  # the tiny SLM is uncertain often at this tau: the router is consulted
    keep = Router.constant(hidden_size, switch=False).to_bytes()
    session, tokens, sources = run(orchestrator, prompt, opb.POLICY_ROUTER, tau, keep)
    _, slm_only, _ = run(orchestrator, prompt, opb.POLICY_ENTROPY, 1.0)
    assert tokens == slm_only and set(sources) == {SLM}
    assert session.stats.router_kept_tokens > 0 and session.stats.switches == 0


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_a_router_that_always_switches_equals_the_entropy_policy(orchestrator, hidden_size, prompt):
    tau = 0.3
    switch = Router.constant(hidden_size, switch=True).to_bytes()
    session, tokens, sources = run(orchestrator, prompt, opb.POLICY_ROUTER, tau, switch)
    entropy, stitched, stitched_sources = run(orchestrator, prompt, opb.POLICY_ENTROPY, tau)
    assert (tokens, sources) == (stitched, stitched_sources)
    assert session.stats.switches == entropy.stats.switches > 0 and LLM in sources
    assert session.stats.router_kept_tokens == 0


def test_the_router_reads_the_slm_hidden_state_at_each_gated_token(engines, hidden_size):
    seen = []

    def every_other(hidden, entropy, position):
        seen.append((hidden.copy(), entropy, position))
        return len(seen) % 2 == 0

    progress = Progress("router-probe", [3, 48, 81, 8, 92, 80, 77, 90, 77, 6, 4], 40, [])
    clients = {SLM: LocalEngineClient(engines["slm"]), LLM: LocalEngineClient(engines["llm"])}
    for _ in stitch(progress, RouterPolicy(0.3, every_other), clients, NoJournal(), Budget()):
        pass
    for client in clients.values():
        client.release(epb.ReleaseRequest(session_id="router-probe"))
    assert len(seen) >= 4 and progress.stats.router_kept_tokens == (len(seen) + 1) // 2
    assert progress.stats.gated_tokens == len(seen) // 2
    positions = [position for _, _, position in seen]
    assert positions == sorted(set(positions)) and positions[-1] < len(progress.tokens)
    for k, (hidden, entropy, position) in enumerate(seen):
        assert hidden.shape == (hidden_size,) and np.isfinite(hidden).all() and entropy > 0.3
        # A kept token stays the SLM's, with its entropy; a switched position is written by the LLM.
        if k % 2:
            assert progress.sources[position] == LLM
        else:
            assert progress.sources[position] == SLM and progress.entropies[position] == pytest.approx(entropy)
    assert len({h.tobytes() for h, _, _ in seen}) == len(seen)  # a fresh state at every token


@pytest.mark.parametrize("candidate, max_tokens, reason", [
    (7, 10, epb.STOP_REASON_UNSPECIFIED),  # the SLM goes on
    (2, 10, epb.STOP_REASON_STOP_TOKEN),  # a kept EOS ends the answer
    (7, 3, epb.STOP_REASON_MAX_TOKENS),  # the kept token fills the span
])
def test_a_kept_candidate_ends_the_span_as_the_engine_would(candidate, max_tokens, reason):
    from orchestrator.loop import with_candidate_kept

    rule = epb.SpanRule(gate=epb.GATE_STOP_ABOVE, tau=0.1, max_tokens=max_tokens, stop_token_ids=[2])
    span = epb.Span(token_ids=[5, 6], entropies=[0.0, 0.05], stop_reason=epb.STOP_REASON_GATE,
                    candidate=epb.Candidate(token_id=candidate, entropy=0.6, hidden=b"\0" * 8))
    kept = with_candidate_kept(span, rule)
    assert list(kept.token_ids) == [5, 6, candidate] and kept.entropies[-1] == pytest.approx(0.6)
    assert not kept.HasField("candidate") and kept.stop_reason == reason
    assert span.HasField("candidate")  # the engine's answer is left as it came


# --- training -----------------------------------------------------------------------------------

def test_training_command_writes_a_loadable_router_and_its_curves(tmp_path):
    out = tmp_path / "router.safetensors"
    subprocess.run([sys.executable, "-m", "training.dapo", "--fast", "--steps", "2", "--batch", "2", "--group", "3",
                    "--validation", "2", "--out", str(out)], check=True, timeout=600, capture_output=True)
    router = Router.from_bytes(out.read_bytes())
    assert router.about["steps"] == 2 and "--fast" in router.about["command"]
    import json

    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["history"]) == 2 and record["parameters"] == router.parameters
    assert {"router tau=0.02", "entropy tau=0.02"} <= set(record["validation"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_imitation_warm_start_fits_fixed_threshold_routing():
    import statistics

    from engine.default_models import build_tokenizer
    from training.dapo import FixedTau, imitate, load_pair
    from training.rollouts import Roller
    from training.task import training_problems

    engines, latencies = load_pair(fast=True)
    roller, stream = Roller(engines, latencies, build_tokenizer(), max_new_tokens=16), training_problems(seed=5)
    problems = [next(stream) for _ in range(40)]
    net = RouterNet(engines["slm"].info().hidden_size)
    probe = FixedTau(net.export({}), tau=2.0)  # never switches: the SLM's own entropies, to pick a teacher
    for problem in problems:
        roller.run(problem, 0.0, probe)
    teacher_tau = statistics.median(float(f[-2]) for f in probe.features)
    stats = imitate(net, roller, problems, 0.0, teacher_tau, {})
    assert stats["imitation_tokens"] >= 30 and 0.2 < stats["imitation_switch_share"] < 0.8
    assert stats["imitation_agreement"] >= 0.9  # the network can read the threshold off its entropy input
    teacher = FixedTau(net.export({}), teacher_tau)
    for problem in problems:
        roller.run(problem, 0.0, teacher)
    router = net.export({})
    agree = [router.switches(f[:-2], float(f[-2]), round(float(f[-1]) * router.position_scale)) == s
             for f, s in zip(teacher.features, teacher.switch)]
    assert sum(agree) >= 0.9 * len(agree)  # the deployed form (standardization folded in) routes as the teacher


def test_rollouts_charge_every_engine_call_to_the_trajectory():
    from engine.default_models import build_tokenizer
    from training.dapo import always_switch, load_pair
    from training.rollouts import Roller
    from training.task import training_problems

    engines, latencies = load_pair(fast=True)  # unit costs: 1 per LLM token, 0.2 per SLM token
    roller, problem = Roller(engines, latencies, build_tokenizer(), max_new_tokens=16), next(training_problems(seed=7))
    slm_only, llm_only = roller.run(problem, 1.0, always_switch), roller.run(problem, 0.0, always_switch)
    # The loop streams its spans: each streamed forward is charged, not only Prefill/Decode calls (the
    # tiny pair writes all 16 tokens here, each a forward of one token after the prompt's prefill).
    assert slm_only.latency_ms >= 0.2 * 16 * 0.99 and llm_only.latency_ms > 4 * slm_only.latency_ms
