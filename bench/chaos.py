"""Faults under load: every component killed repeatedly while many sessions stream, and nothing is lost.

    python bench/chaos.py [--duration 300] [--sessions 32] [--seed 0] [--gap 10 30] [--down 2 5] [--out docs]

Starts the split deployment as separate processes, the trained default pair: Redis with AOF
(appendfsync always), two replicas of each engine and two orchestrator replicas (every one given
every engine replica). Then two phases:

- chaos: `sessions` client threads, each its own RStitchClient on an address that reaches both
  orchestrator replicas, stream generations back to back: held-out problems, every policy, greedy
  and seeded sampling mixed (each request drawn from the seed). Meanwhile, on a schedule drawn from
  the same seed, every `--gap` seconds a fault thread kills one component with SIGKILL (an SLM or
  LLM replica, an orchestrator replica, Redis; or two at once: any two, or Redis with an
  orchestrator replica) and restarts it `--down` seconds later (again, as a supervisor would, when
  it exits while starting). A fault waits until every replica of the services it hits is healthy
  again, so that outages are the ones named. The first faults go
  through every kind once, in a drawn order; the phase lasts `--duration` seconds and at least until
  every kind has happened. Every process's RSS is sampled each second.
- reference: the same requests, the same threads, no faults.

Checked: no generation failed; each one's tokens, sources and finish reason equal the reference's
(so every token arrived exactly once, in order) and its streamed text equals its final text; the
store holds exactly one session per request (none lost, none run twice), finished, with the tokens
the client received. Counted: faults by kind, the clients' re-attaches, re-prefilled sessions
(prefill beyond the reference's), what the orchestrators' logs say they retried; latency p50/p99
with and without faults; each component's RSS. Writes chaos.md, chaos.json and chaos.png under
--out; exits non-zero when a check fails. The same harness, shorter, is tests/test_chaos.py.
"""

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import redis
from tqdm import tqdm

from rstitch import RStitchClient
from rstitch.local import LocalDeployment, Redis
from rstitch.v1 import orchestrator_pb2 as opb
from training.task import heldout

POLICIES = ["entropy", "llm", "slm", "spec", "random", "router"]
KINDS = ["slm", "llm", "orchestrator", "redis", "two at once", "redis+orchestrator"]
MAX_NEW_TOKENS = 96  # the trained pair answers in about 36 tokens; sampled answers may run longer
ENGINE_ARGS = ["--kv-budget-mb", "256"]  # room for 64 sessions of a full context on each replica
CALL_TIMEOUT_S = 600  # a generation's deadline, re-attaches included: far above any fault's length
MAX_STARTS = 10  # of a restarted process that keeps exiting while starting
# What the orchestrators log when they ride through a fault (orchestrator/engine_client.py, replicas.py,
# service.py, leases.py), counted over the whole run.
LOG_EVENTS = {"engine outages seen": "is unreachable: ",
              "sessions moved to another engine replica": "is unreachable, moved to",
              "sessions taken over from a dead orchestrator replica": "took over session",
              "lease renewals that failed": "could not renew the lease"}


@dataclass
class Config:
    duration_s: float = 300
    sessions: int = 32
    seed: int = 0
    gap_s: tuple[float, float] = (10, 30)  # from one kill to the next
    down_s: tuple[float, float] = (2, 5)  # between a kill and the restart
    lease_s: float = 10  # the orchestrators' --lease (their default)
    retry_s: float = 30  # the clients' retry_s (their default)
    progress: bool = True


# --- requests and their outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    worker: int
    index: int
    prompt: str
    options: dict


def make_request(seed: int, worker: int, index: int, questions: list[str]) -> Request:
    """The index-th request of a worker: the same in the chaos and the reference phase."""
    rng = random.Random(f"{seed}/{worker}/{index}")
    options = {"policy": rng.choice(POLICIES), "max_new_tokens": MAX_NEW_TOKENS, "seed": rng.randrange(2**63)}
    if rng.random() < 0.5:  # seeded sampling; the other half greedy
        options.update(temperature=rng.choice([0.6, 1.0]), top_p=rng.choice([0.9, 1.0]))
    return Request(worker, index, rng.choice(questions), options)


@dataclass
class Outcome:
    request: Request
    started: float  # seconds since the phase began
    ended: float = 0.0
    first_token: float | None = None
    session_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    text: str = ""
    streamed_text: str = ""  # the Deltas' text, joined
    finish_reason: str = ""
    reattaches: int = 0
    prefill_tokens: int = 0
    error: str = ""


def run_one(client: RStitchClient, request: Request, session_id: str, t0: float, arrivals: list[float]) -> Outcome:
    outcome, pieces = Outcome(request, time.monotonic() - t0, session_id=session_id), []

    def on_text(source, text):
        now = time.monotonic() - t0
        outcome.first_token = outcome.first_token or now
        arrivals.append(now)
        pieces.append(text)

    try:
        result = client.generate(request.prompt, on_text=on_text, session_id=session_id, **request.options)
    except grpc.RpcError as e:
        outcome.error = f"{e.code().name}: {e.details()}"
    else:
        outcome.token_ids, outcome.sources = result.token_ids, result.sources
        outcome.text, outcome.finish_reason, outcome.reattaches = result.text, result.finish_reason, result.reattaches
        outcome.prefill_tokens = result.stats["slm_prefill_tokens"] + result.stats["llm_prefill_tokens"]
    outcome.streamed_text = "".join(pieces)
    outcome.ended = time.monotonic() - t0
    return outcome


def run_workers(address: str, config: Config, questions: list[str], phase: str, go_on, t0: float):
    """Starts config.sessions threads streaming requests back to back while go_on(worker, index), each under
    a session id naming its phase and request; returns the threads, and the lists they fill: outcomes, and
    the arrival time of every piece of text."""
    outcomes, arrivals = [], []

    def worker(number):
        with RStitchClient(address, timeout=CALL_TIMEOUT_S, retry_s=config.retry_s) as client:
            for index in itertools.count():
                if not go_on(number, index):
                    return
                request = make_request(config.seed, number, index, questions)
                outcomes.append(run_one(client, request, f"{phase}-{number}-{index}", t0, arrivals))

    threads = [threading.Thread(target=worker, args=(n,), name=f"client-{n}") for n in range(config.sessions)]
    for thread in threads:
        thread.start()
    return threads, outcomes, arrivals


# --- the deployment and its faults -----------------------------------------------------------------------


class Component:
    """One process of the deployment, as a fault target."""

    def __init__(self, name: str, kill, start, wait, process):
        self.name, self.kind = name, name.split("#")[0]
        self.kill, self.start, self.wait, self._process = kill, start, wait, process

    @property
    def pid(self) -> int:
        return self._process().pid


def components(deployment: LocalDeployment, store: Redis) -> dict[str, Component]:
    found = {"redis": Component("redis", store.kill, store.start, lambda: None, lambda: store.process)}
    for kind, services in (("slm", deployment.slms), ("llm", deployment.llms), ("orchestrator", deployment.orchestrators)):
        for number, service in enumerate(services, 1):
            found[f"{kind}#{number}"] = Component(f"{kind}#{number}", lambda s=service: s.stop(sig_kill=True),
                                                  service.start, lambda s=service: s.wait(timeout=180),
                                                  lambda s=service: s.process)
    return found


@dataclass
class Fault:
    kind: str
    victims: list[str]
    gap_s: float
    down_s: float
    killed_at: float = 0.0  # seconds since the chaos phase began
    restarted_at: float = 0.0
    back_at: float = 0.0  # every victim healthy again
    failed_starts: int = 0  # restarts that exited while starting, and were started again


def fault_schedule(seed: int, names: list[str], gap_s, down_s):
    """Faults drawn from the seed: the first len(KINDS) go through every kind once, then any kind."""
    rng = random.Random(f"faults/{seed}")
    first = rng.sample(KINDS, len(KINDS))
    of_kind = lambda kind: [n for n in names if n.startswith(kind)]  # noqa: E731
    for number in itertools.count():
        kind = first[number] if number < len(first) else rng.choice(KINDS)
        if kind == "two at once":
            victims = rng.sample(names, 2)
        elif kind == "redis+orchestrator":
            victims = ["redis", rng.choice(of_kind("orchestrator"))]
        else:
            victims = [rng.choice(of_kind(kind))]
        yield Fault(kind, victims, rng.uniform(*gap_s), rng.uniform(*down_s))


def inject_faults(targets: dict[str, Component], config: Config, t0: float, faults: list[Fault], say) -> None:
    """Kill components on the seeded schedule, a fault's gap after the previous kill, for the phase's duration
    and at least until every kind of fault has happened once; each restart runs behind, `down_s` after its kill.
    A fault waits until every replica of the services it hits is healthy: one fault, one outage."""
    healthy = {name: threading.Event() for name in targets}
    for event in healthy.values():
        event.set()
    restarts = []
    for fault in fault_schedule(config.seed, sorted(targets), config.gap_s, config.down_s):
        kill_at = (faults[-1].killed_at if faults else 0.0) + fault.gap_s
        if {f.kind for f in faults} >= set(KINDS) and kill_at > config.duration_s:
            break
        time.sleep(max(0.0, t0 + kill_at - time.monotonic()))
        hit = {targets[name].kind for name in fault.victims}
        for name in (n for n, target in targets.items() if target.kind in hit):
            while not healthy[name].wait(1.0):
                for thread in restarts:  # one that failed raises here, instead of leaving this wait endless
                    if not thread.is_alive():
                        thread.result()
        fault.killed_at = time.monotonic() - t0
        for name in fault.victims:
            healthy[name].clear()
            targets[name].kill()
        say(f"{fault.killed_at:6.1f} s  killed {' and '.join(fault.victims)} ({fault.kind})")
        faults.append(fault)
        restarts.append(Background(restart, targets, fault, healthy, t0, say))
        restarts[-1].start()
    for thread in restarts:
        thread.result()


def restart(targets: dict[str, Component], fault: Fault, healthy: dict[str, threading.Event], t0: float, say) -> None:
    """Restart the fault's victims after its down time and wait until they are healthy. One that exits while
    starting (an orchestrator refuses to start while Redis is down) is started again, as a supervisor would."""
    time.sleep(fault.down_s)
    for name in fault.victims:
        targets[name].start()
    fault.restarted_at = time.monotonic() - t0
    for name in fault.victims:
        for attempt in itertools.count(1):
            try:
                targets[name].wait()
                break
            except RuntimeError as e:  # it exited
                if attempt == MAX_STARTS:
                    raise
                fault.failed_starts += 1
                say(f"{time.monotonic() - t0:6.1f} s  {name} exited while starting, started again: "
                    f"{str(e).strip().splitlines()[-1][:160]}")
                time.sleep(1.0)
                targets[name].start()
        healthy[name].set()
    fault.back_at = time.monotonic() - t0
    say(f"{fault.back_at:6.1f} s  {' and '.join(fault.victims)} healthy again")


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # gone: killed, not yet restarted
        return None
    return None


def sample_memory(targets: dict[str, Component], t0: float, stop: threading.Event, samples: list) -> None:
    """(seconds, component, pid, RSS MB) for every live process, each second, until stop."""
    while not stop.wait(1.0):
        for name, target in targets.items():
            pid = target.pid
            rss = rss_mb(pid)
            if rss is not None:
                samples.append((round(time.monotonic() - t0, 2), name, pid, round(rss, 1)))


# --- the two phases ---------------------------------------------------------------------------------------


class Background(threading.Thread):
    """A thread whose exception is raised again by result()."""

    def __init__(self, target, *args):
        super().__init__(daemon=True)
        self.work, self.args, self.error = target, args, None

    def run(self):
        try:
            self.work(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error


def chaos_phase(address: str, targets: dict[str, Component], config: Config, questions: list[str]) -> dict:
    t0 = time.monotonic()
    faults, samples, over, sampled = [], [], threading.Event(), threading.Event()
    threads, outcomes, arrivals = run_workers(address, config, questions, "chaos", lambda w, i: not over.is_set(), t0)
    sampler = Background(sample_memory, targets, t0, sampled, samples)
    sampler.start()
    try:
        with tqdm(total=round(config.duration_s), desc="chaos", unit="s", disable=not config.progress) as bar:
            injector = Background(inject_faults, targets, config, t0, faults, bar.write if config.progress else print)
            injector.start()
            while injector.is_alive():
                injector.join(1.0)
                bar.n = round(time.monotonic() - t0)
                bar.set_postfix(generations=len(outcomes), faults=len(faults), errors=sum(bool(o.error) for o in outcomes),
                                reattaches=sum(o.reattaches for o in outcomes))
    finally:  # also on Ctrl-C: no new generations
        over.set()
        sampled.set()
    for thread in threads:  # each finishes the generation it is in
        thread.join()
    sampler.result()
    injector.result()
    return {"seconds": time.monotonic() - t0, "outcomes": outcomes, "arrivals": arrivals, "faults": faults,
            "samples": samples}


def reference_phase(address: str, config: Config, questions: list[str], chaos: list[Outcome]) -> list[Outcome]:
    """The chaos phase's requests again, each worker the same ones in the same order, without faults."""
    counts = Counter(o.request.worker for o in chaos)
    t0 = time.monotonic()
    threads, outcomes, _ = run_workers(address, config, questions, "reference", lambda w, i: i < counts[w], t0)
    with tqdm(total=len(chaos), desc="reference", unit="gen", disable=not config.progress) as bar:
        while any(thread.is_alive() for thread in threads):
            time.sleep(0.5)
            bar.update(len(outcomes) - bar.n)
    return outcomes


# --- checks and counts --------------------------------------------------------------------------------------


def stored_session_ids(redis_url: str) -> set[str]:
    store = redis.Redis.from_url(redis_url)
    keys = (key.decode() for key in store.scan_iter("rstitch:{*}:meta", count=1000))
    return {re.fullmatch(r"rstitch:\{(.*)\}:meta", key).group(1) for key in keys}


def check_store(address: str, redis_url: str, outcomes: list[Outcome]) -> dict:
    """What the store holds after the chaos phase: exactly the sessions the clients ran, finished, each with the
    tokens its client received."""
    stored = stored_session_ids(redis_url)
    ran = {o.session_id for o in outcomes}
    unfinished = log_differs = 0
    with RStitchClient(address) as client:
        for outcome in outcomes:
            if outcome.error:
                continue
            session = client.session(outcome.session_id)
            unfinished += session.status != opb.STATUS_FINISHED
            log_differs += [t for span in session.spans for t in span.token_ids] != outcome.token_ids
    return {"sessions in the store that no generation asked for": len(stored - ran),
            "generations without their session in the store (lost)": len(ran - stored),
            "sessions not finished in the store": unfinished,
            "sessions whose stored log differs from what their client received": log_differs}


def difference(got: Outcome, ref: Outcome) -> dict | None:
    """Where a chaos generation's answer first departs from its reference's; None where it does not."""
    if (got.token_ids, got.sources, got.finish_reason) == (ref.token_ids, ref.sources, ref.finish_reason):
        return None
    at = next((i for i, pair in enumerate(zip(zip(got.token_ids, got.sources), zip(ref.token_ids, ref.sources)))
               if pair[0] != pair[1]), min(len(got.token_ids), len(ref.token_ids)))
    return {"session_id": got.session_id, "options": got.request.options, "reattaches": got.reattaches,
            "position": at, "tokens": [len(got.token_ids), len(ref.token_ids)],
            "got": list(zip(got.token_ids, got.sources))[at:at + 4], "want": list(zip(ref.token_ids, ref.sources))[at:at + 4],
            "finish": [got.finish_reason, ref.finish_reason]}


def compare(chaos: list[Outcome], reference: list[Outcome]) -> tuple[dict, dict, list]:
    """(checks, counts, differences): each chaos generation against the same request's reference generation."""
    want = {(o.request.worker, o.request.index): o for o in reference}
    checks = Counter({"generations that failed (chaos phase)": sum(bool(o.error) for o in chaos),
                      "generations that failed (reference phase)": sum(bool(o.error) for o in reference)})
    counts, differences = Counter(), []
    for got in (o for o in chaos if not o.error):
        ref = want[(got.request.worker, got.request.index)]
        differences += filter(None, [difference(got, ref)])
        checks["generations whose tokens, sources or finish differ from the reference"] = len(differences)
        checks["tokens received twice (beyond the reference's count)"] += max(0, len(got.token_ids) - len(ref.token_ids))
        checks["tokens never received (below the reference's count)"] += max(0, len(ref.token_ids) - len(got.token_ids))
        checks["generations whose streamed text is not their final text"] += got.streamed_text != got.text
        counts["generations re-prefilled (more prefill than the reference)"] += got.prefill_tokens > ref.prefill_tokens
        counts["tokens prefilled again"] += max(0, got.prefill_tokens - ref.prefill_tokens)
    counts["generations that re-attached"] = sum(o.reattaches > 0 for o in chaos)
    counts["re-attaches (client calls after a broken one)"] = sum(o.reattaches for o in chaos)
    return dict(checks), dict(counts), differences


def log_counts(log_dir: Path) -> dict:
    """What the orchestrators' logs say they rode through (all replicas, all restarts)."""
    text = "".join(path.read_text(errors="replace") for path in sorted(log_dir.glob("orchestrator*.log")))
    return {label: text.count(marker) for label, marker in LOG_EVENTS.items()}


def pct(values: list[float], p: float) -> float | None:  # nearest rank
    return sorted(values)[max(0, math.ceil(p / 100 * len(values)) - 1)] if values else None


def latency_rows(chaos: dict, reference: list[Outcome]) -> dict:
    """Generation latency and time to first token, p50/p99 (seconds), without and with faults."""
    windows = [(f.killed_at, f.back_at) for f in chaos["faults"]]
    hit = lambda o: any(o.started < end and o.ended > start for start, end in windows)  # noqa: E731
    done = [o for o in chaos["outcomes"] if not o.error]
    groups = {"reference phase (no faults)": reference, "chaos phase, all": done,
              "chaos phase, away from faults": [o for o in done if not hit(o)],
              "chaos phase, overlapping a fault": [o for o in done if hit(o)],
              "chaos phase, re-attached": [o for o in done if o.reattaches]}
    rows = {}
    for name, outcomes in groups.items():
        latencies = [o.ended - o.started for o in outcomes]
        ttfts = [o.first_token - o.started for o in outcomes if o.first_token is not None]
        rows[name] = {"generations": len(outcomes), "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99),
                      "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99)}
    return rows


def memory_rows(samples: list) -> dict:
    """Per component: processes seen (restarts), peak RSS, and over its longest-lived process the median RSS of
    the first and of the last quarter of its samples (a leak shows as growth)."""
    rows = {}
    for name in sorted({s[1] for s in samples}):
        by_pid = {}
        for _, _, pid, rss in (s for s in samples if s[1] == name):
            by_pid.setdefault(pid, []).append(rss)
        longest = max(by_pid.values(), key=len)
        quarter = max(1, len(longest) // 4)
        rows[name] = {"processes": len(by_pid), "peak_mb": max(max(v) for v in by_pid.values()),
                      "longest_lived_s": len(longest), "first_quarter_mb": sorted(longest[:quarter])[quarter // 2],
                      "last_quarter_mb": sorted(longest[-quarter:])[quarter // 2]}
    return rows


# --- the run and its report --------------------------------------------------------------------------------


def run(config: Config, log_dir: Path) -> dict:
    """Start the deployment, run both phases, stop everything; the report (see write_markdown)."""
    questions = [problem.question for problem in heldout()]
    store = Redis(appendonly=True)
    try:
        with LocalDeployment(redis=store.url, slm_args=ENGINE_ARGS, llm_args=ENGINE_ARGS,
                             orchestrator_args=["--lease", str(config.lease_s)], log_dir=log_dir,
                             slm_replicas=2, llm_replicas=2, orchestrator_replicas=2) as deployment:
            chaos = chaos_phase(deployment.address, components(deployment, store), config, questions)
            store_checks = check_store(deployment.address, store.url, chaos["outcomes"])
            reference = reference_phase(deployment.address, config, questions, chaos["outcomes"])
    finally:
        store.stop()
    checks, counts, differences = compare(chaos["outcomes"], reference)
    checks.update(store_checks)
    faults = chaos["faults"]
    seconds = math.ceil(chaos["seconds"])
    per_second = Counter(int(t) for t in chaos["arrivals"])
    errors = Counter(o.error[:200] for o in chaos["outcomes"] + reference if o.error)
    return {"config": asdict(config), "seconds": chaos["seconds"], "generations": len(chaos["outcomes"]),
            "tokens": sum(len(o.token_ids) for o in chaos["outcomes"]),
            "passed": not any(checks.values()), "checks": checks, "errors": errors.most_common(10),
            "differences": differences[:10],
            "faults_by_kind": {kind: sum(f.kind == kind for f in faults) for kind in KINDS},
            "faults": [asdict(f) for f in faults],
            "counts": {**counts, **log_counts(log_dir),
                       "restarted processes that exited while starting": sum(f.failed_starts for f in faults)},
            "latency": latency_rows(chaos, reference), "memory": memory_rows(chaos["samples"]),
            "timeline": {"pieces_per_s": [per_second[s] for s in range(seconds)], "rss": chaos["samples"]}}


def table(header: list[str], rows, text_columns: int = 1) -> list[str]:
    """A Markdown table: the first text_columns left-aligned, the others (numbers) right-aligned."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns),
            *(f"| {' | '.join(map(str, row))} |" for row in rows), ""]


def setup_text(report: dict) -> str:
    c = report["config"]
    return (f"Made by `{report['command']}` on {report['date']} ({report['machine']}). Timeline: `chaos.png`; "
            "every number: `chaos.json`.\n\n"
            "The split deployment as separate processes (trained default pair): Redis with AOF (appendfsync always), "
            f"two replicas of each engine (`{' '.join(ENGINE_ARGS)}`), two orchestrator replicas (`--lease "
            f"{c['lease_s']:g}`, other flags at their defaults). {c['sessions']} client threads, each an "
            f"`RStitchClient` (retry_s {c['retry_s']:g}) on the address of both orchestrators, streamed generations "
            f"back to back for {report['seconds']:.0f} s: held-out problems, policies {', '.join(POLICIES)}, half "
            f"greedy and half seeded sampling. A kill every {c['gap_s'][0]:g}-{c['gap_s'][1]:g} s (schedule seed "
            f"{c['seed']}; SIGKILL), each restarted {c['down_s'][0]:g}-{c['down_s'][1]:g} s later; a fault waits until "
            "every replica of the services it hits is healthy. Then the same requests again without faults: the "
            "reference.\n")


def write_markdown(report: dict, path: Path) -> None:
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "# Faults under load (issue 19)", "", setup_text(report),
        f"## Result: {'passed' if report['passed'] else 'FAILED'}", "",
        f"{report['generations']} generations, {report['tokens']} tokens received, {len(report['faults'])} faults.",
        "", *table(["check", "count"], report["checks"].items()),
        *(table(["most frequent errors", "count"], report["errors"]) if report["errors"] else []),
        "## Faults", "", *table(["kind", "count"], report["faults_by_kind"].items()),
        *table(["components killed", "kind", "at (s)", "down (s)", "healthy again after (s)"],
               ([", ".join(f["victims"]), f["kind"], f"{f['killed_at']:.1f}", f"{f['restarted_at'] - f['killed_at']:.1f}",
                 f"{f['back_at'] - f['killed_at']:.1f}"] for f in report["faults"]), text_columns=2),
        "## What riding through took", "", *table(["count", "value"], report["counts"].items()),
        "## Latency (s)", "",
        *table(["generations", "n", "p50", "p99", "TTFT p50", "TTFT p99"],
               ([name, r["generations"], fmt(r["p50_s"]), fmt(r["p99_s"]), fmt(r["ttft_p50_s"]), fmt(r["ttft_p99_s"])]
                for name, r in report["latency"].items())),
        "## Memory (RSS, MB)", "",
        *table(["component", "processes (restarts + 1)", "peak", "longest-lived process: first quarter",
                "last quarter"],
               ([name, m["processes"], f"{m['peak_mb']:.0f}", f"{m['first_quarter_mb']:.0f}",
                 f"{m['last_quarter_mb']:.0f}"] for name, m in report["memory"].items())),
        "![timeline](chaos.png)", "",
    ]
    path.write_text("\n".join(lines))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (flow, memory) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=[3, 2])
    flow.plot(report["timeline"]["pieces_per_s"], color="black", linewidth=0.8)
    colours = dict(zip(KINDS, plt.get_cmap("tab10").colors))
    for fault in report["faults"]:
        for axes in (flow, memory):
            axes.axvspan(fault["killed_at"], fault["back_at"], color=colours[fault["kind"]], alpha=0.25, linewidth=0)
        flow.annotate(", ".join(fault["victims"]), (fault["killed_at"], 1.0), xycoords=("data", "axes fraction"),
                      rotation=90, fontsize=7, va="top", ha="right")
    flow.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[k], alpha=0.4) for k in KINDS], labels=KINDS,
                fontsize=8, loc="lower right", title="fault (kill to healthy again)", title_fontsize=8)
    flow.set_ylabel("answer text pieces received / s\n(all clients; ~1 token each)")
    flow.set_title(f"{report['config']['sessions']} streamed sessions under SIGKILLs: {report['generations']} "
                   f"generations, {'nothing lost, duplicated or changed' if report['passed'] else 'CHECKS FAILED'}")
    for name in sorted({s[1] for s in report["timeline"]["rss"]}):
        points = [(t, rss) for t, n, _, rss in report["timeline"]["rss"] if n == name]
        memory.plot(*zip(*points), ".", markersize=2, label=name)
    memory.set_ylabel("RSS (MB)")
    memory.set_xlabel("seconds since the chaos phase began")
    memory.legend(fontsize=7, ncol=4, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=Config.duration_s, help="seconds of faults (at least one of "
                                                                               "each kind)")
    p.add_argument("--sessions", type=int, default=Config.sessions, help="concurrent streamed sessions")
    p.add_argument("--seed", type=int, default=Config.seed, help="of the requests and of the fault schedule")
    p.add_argument("--gap", type=float, nargs=2, default=Config.gap_s, metavar=("MIN", "MAX"),
                   help="seconds from one kill to the next")
    p.add_argument("--down", type=float, nargs=2, default=Config.down_s, metavar=("MIN", "MAX"),
                   help="seconds from a kill to the restart")
    p.add_argument("--lease", type=float, default=Config.lease_s, help="the orchestrators' --lease")
    p.add_argument("--out", type=Path, default=Path("docs"), help="where chaos.md/.json/.png go")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = Config(duration_s=args.duration, sessions=args.sessions, seed=args.seed, gap_s=tuple(args.gap),
                    down_s=tuple(args.down), lease_s=args.lease)
    log_dir = Path(tempfile.mkdtemp(prefix="rstitch-chaos-logs-"))
    print(f"service logs in {log_dir}", file=sys.stderr)
    report = run(config, log_dir)
    report["command"] = " ".join(["python bench/chaos.py", *(sys.argv[1:] if argv is None else argv)])
    report["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(report))
    write_markdown(report, args.out / "chaos.md")
    plot(report, args.out / "chaos.png")
    print((args.out / "chaos.md").read_text())
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
