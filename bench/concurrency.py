"""Throughput and latency under concurrent streamed sessions, per backend and policy, side by side.

    python bench/concurrency.py [--backends hf vllm] [--policies llm entropy spec]
                                [--concurrency 1 4 16 64] [--requests 2] [--rounds 3] [--out docs]

Starts one split deployment per backend at once (both engine services, the orchestrator and a
private redis-server, as separate processes, the trained default pair), then runs interleaved
rounds: in each round every (backend, policy, concurrency) cell, in an order shuffled per round,
opens `concurrency` client threads that each stream `requests` generations back to back on
held-out problems. Per cell: tokens/s (answer tokens over the cell's wall time), answers/s (the
measure when the policies write answers of different lengths: the verbose LLM writes about twice the
tokens R-Stitch does), time to first token, inter-token latency (client side, between Deltas) and
time per output token (a generation's time after its first token over its other tokens) p50/p99,
accuracy; how busy each engine's
step loop was (busy seconds over the cell's wall time, from Info) and its mean batch; and where a
generation's time went (the sessions' Stats: forwards, engine queues, RPC, store, switches, the
rest). Reported: the median over rounds, with the min-max spread of tokens/s. Writes
concurrency.md/.json/.png under --out.
"""

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import grpc
import psutil
from tqdm import tqdm

from orchestrator.engine_client import GrpcEngineClient
from rstitch import RStitchClient
from rstitch.local import LocalDeployment
from training.task import heldout, score

TAU = 0.05  # the orchestrator's default (docs/tradeoff.md)
ROLES = ("slm", "llm")
STAT_FIELDS = [f for f in __import__("rstitch.v1.orchestrator_pb2", fromlist=["Stats"]).Stats.DESCRIPTOR.fields
               if f.name.endswith("_ms")]
# Where a generation's time goes, from its Stats: (label, fields summed); "rest" is the latency left over.
TIME_PARTS = [("forward", ("slm_forward_ms", "llm_forward_ms")), ("queue", ("slm_queue_ms", "llm_queue_ms")),
              ("rpc", ("rpc_ms",)), ("store", ("store_ms",))]


def one_generation(client, problem, policy: str, max_new_tokens: int) -> dict:
    started = last = time.monotonic()
    record = {"tokens": 0, "ttft_s": None, "gaps_s": [], "tpot_s": None, "correct": False, "error": None,
              "stats": None}
    try:
        for event in client.stream(problem.question, policy=policy, max_new_tokens=max_new_tokens,
                                   **({"tau": TAU} if policy == "entropy" else {})):
            kind = event.WhichOneof("event")
            if kind == "delta":
                now = time.monotonic()
                if record["ttft_s"] is None:
                    record["ttft_s"] = now - started
                else:
                    record["gaps_s"].append(now - last)
                last = now
                record["tokens"] += len(event.delta.span.token_ids)
            elif kind == "finished":
                if record["tokens"] > 1:
                    record["tpot_s"] = (last - started - record["ttft_s"]) / (record["tokens"] - 1)
                record["correct"] = score(event.finished.text, problem)
                record["stats"] = {f.name: getattr(event.finished.stats, f.name) for f in STAT_FIELDS}
    except grpc.RpcError as e:
        record["error"] = f"{e.code().name}: {e.details()}"
    return record


def engine_load(engines) -> dict:
    return {role: client.info() for role, client in engines.items()}


PROCESSES = ("slm", "llm", "orchestrator", "redis", "client")  # "client": this benchmark's own process


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU time (user + system, all threads) each process has used so far."""
    return {name: sum(process.cpu_times()[:2]) for name, process in processes.items()}


def run_cell(address: str, engines: dict, processes: dict[str, psutil.Process], policy: str, concurrency: int,
             requests: int, problems, seed: int, max_new: int) -> dict:
    """One cell; cpu_cores: the CPU each of `processes` used over it, in cores (CPU seconds / wall seconds)."""
    rng = random.Random(seed)
    work = [[rng.choice(problems) for _ in range(requests)] for _ in range(concurrency)]
    records: list[dict] = []

    def session(mine):
        with RStitchClient(address, timeout=600) as client:
            for problem in mine:
                records.append(one_generation(client, problem, policy, max_new))

    threads = [threading.Thread(target=session, args=(mine,)) for mine in work]
    before, cpu_before = engine_load(engines), cpu_seconds(processes)
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    after, cpu_after = engine_load(engines), cpu_seconds(processes)
    ok = [r for r in records if not r["error"]]
    ttft = [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None]
    gaps = [g * 1e3 for r in ok for g in r["gaps_s"]]
    tpot = [r["tpot_s"] * 1e3 for r in ok if r["tpot_s"] is not None]
    engines_busy = {role: {"busy": (after[role].busy_seconds - before[role].busy_seconds) / wall,
                           "forward": (after[role].forward_seconds - before[role].forward_seconds) / wall,
                           "batch": (after[role].step_tokens - before[role].step_tokens)
                           / max(1, after[role].steps - before[role].steps),
                           "fed": (after[role].step_tokens - before[role].step_tokens)
                           / max(1, sum(r["tokens"] for r in records))} for role in engines}
    latency = statistics.fmean(r["stats"]["latency_ms"] for r in ok) if ok else math.nan
    parts = {label: statistics.fmean(sum(r["stats"][f] for f in fields) for r in ok) if ok else math.nan
             for label, fields in TIME_PARTS}
    parts["rest"] = latency - sum(parts.values())
    return {"tokens_per_s": sum(r["tokens"] for r in ok) / wall, "answers_per_s": len(ok) / wall,
            "wall_s": wall, "generations": len(records),
            "engines": engines_busy, "latency_ms": latency, "time_ms": parts,
            "cpu_cores": {name: (cpu_after[name] - cpu_before[name]) / wall for name in processes},
            "errors": sorted({r["error"] for r in records if r["error"]}),
            "accuracy": 100 * statistics.fmean(r["correct"] for r in ok) if ok else None,
            "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)}, "itl_ms": {"p50": pct(gaps, 50), "p99": pct(gaps, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)}}


def pct(values, p):  # nearest rank
    return sorted(values)[max(0, math.ceil(p / 100 * len(values)) - 1)] if values else None


def deployments(stack: ExitStack, backends, log_root: Path) -> dict[str, tuple[str, dict, dict]]:
    """Per backend: the orchestrator's address, clients of its two engines (for their load) and its processes
    (for their CPU time)."""
    out = {}
    for backend in backends:
        engine = ["--backend", backend, "--kv-budget-mb", "256"]  # room for 64 sessions of a full context (hf: one slot each)
        (log_root / backend).mkdir()
        d = stack.enter_context(LocalDeployment(slm_args=engine, llm_args=engine, log_dir=log_root / backend,
                                                orchestrator_args=["--max-sessions", "128", "--max-queue", "128"]))
        engines = {"slm": GrpcEngineClient(d.slm.address), "llm": GrpcEngineClient(d.llm.address)}
        for client in engines.values():
            stack.callback(client.close)
        pids = {"slm": d.slm.process.pid, "llm": d.llm.process.pid, "orchestrator": d.orchestrator.process.pid,
                "redis": d.redis_server.process.pid, "client": os.getpid()}
        out[backend] = (d.address, engines, {name: psutil.Process(pid) for name, pid in pids.items()})
    return out


def summarize(results: dict) -> dict:
    """The median over rounds of each metric, per cell; tokens/s also min and max."""
    table = {}
    for cell, rounds in results.items():
        median = lambda key, sub=None: statistics.median(  # noqa: E731
            [r[key][sub] if sub else r[key] for r in rounds if (r[key][sub] if sub else r[key]) is not None] or [math.nan])
        speeds = [r["tokens_per_s"] for r in rounds]
        answers = [r["answers_per_s"] for r in rounds]
        table[cell] = {"tokens_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
                       "answers_per_s": statistics.median(answers), "answers_min": min(answers),
                       "answers_max": max(answers),
                       "tokens_per_answer": sum(r["tokens_per_s"] * r["wall_s"] for r in rounds)
                       / max(1, sum(r["answers_per_s"] * r["wall_s"] for r in rounds)),
                       "busy": {role: statistics.median(r["engines"][role]["busy"] for r in rounds) for role in ROLES},
                       "forward": {role: statistics.median(r["engines"][role]["forward"] for r in rounds)
                                   for role in ROLES},
                       "batch": {role: statistics.median(r["engines"][role]["batch"] for r in rounds) for role in ROLES},
                       "fed": {role: statistics.median(r["engines"][role]["fed"] for r in rounds) for role in ROLES},
                       "cpu_cores": {name: statistics.median(r["cpu_cores"][name] for r in rounds)
                                     for name in PROCESSES},
                       "latency_ms": statistics.median(r["latency_ms"] for r in rounds),
                       "time_ms": {part: statistics.median(r["time_ms"][part] for r in rounds)
                                   for part in rounds[0]["time_ms"]},
                       "accuracy": median("accuracy"), "ttft_p50": median("ttft_ms", "p50"),
                       "ttft_p99": median("ttft_ms", "p99"), "itl_p50": median("itl_ms", "p50"),
                       "itl_p99": median("itl_ms", "p99"), "tpot_p50": median("tpot_ms", "p50"),
                       "tpot_p99": median("tpot_ms", "p99"), "errors": sum(len(r["errors"]) for r in rounds)}
    return table


READING = "## Reading"


def write_markdown(table: dict, args, path: Path) -> None:
    lines = ["# Concurrency: tokens/s and latency under concurrent streamed sessions", "",
             f"`{' '.join(['python', *sys.argv])}` on {platform.node()} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC); "
             f"split deployment with Redis, trained pair, {args.requests} generations per session, {args.rounds} "
             "interleaved rounds, median (min-max). Client-side times: ITL between Deltas, TPOT per token after the first.", "",
             "| backend | policy | sessions | tokens/s | x 1 session | x LLM-only | answers/s | x LLM-only "
             "| tokens/answer | TTFT p50/p99 ms | ITL p50/p99 ms | TPOT p50/p99 ms | accuracy % | errors |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for (backend, policy, c), row in sorted(table.items()):
        one = table.get((backend, policy, args.concurrency[0]), {}).get("tokens_per_s") or math.nan
        llm = {key: value or math.nan for key, value in table.get((backend, "llm", c), {}).items()}
        lines.append(f"| {backend} | {policy} | {c} | {row['tokens_per_s']:.0f} ({row['min']:.0f}-{row['max']:.0f}) "
                     f"| {row['tokens_per_s'] / one:.2f} | {row['tokens_per_s'] / llm.get('tokens_per_s', math.nan):.2f} "
                     f"| {row['answers_per_s']:.2f} ({row['answers_min']:.2f}-{row['answers_max']:.2f}) "
                     f"| {row['answers_per_s'] / llm.get('answers_per_s', math.nan):.2f} | {row['tokens_per_answer']:.1f} "
                     f"| {row['ttft_p50']:.0f} / {row['ttft_p99']:.0f} | {row['itl_p50']:.1f} / {row['itl_p99']:.1f} "
                     f"| {row['tpot_p50']:.1f} / {row['tpot_p99']:.1f} | {row['accuracy']:.1f} | {row['errors']} |")
    lines += ["", "Where the time goes: each engine's step loop busy (share of the cell's wall time; in brackets "
              "the share in forwards, the rest being token choice and bookkeeping), its mean batch (tokens per "
              "step) and the tokens it fed per answer token (prefill and decode); a generation's mean latency and "
              "its parts from the sessions' Stats "
              "(forward: the engines' own time in forwards and token choice for it; queue: waiting for a step; "
              "rpc: engine calls' time outside the engines; store: waiting for Redis; rest: the orchestrator's "
              "own work, client-side streaming and switches' decisions).", "",
              "| backend | policy | sessions | SLM busy / batch / fed | LLM busy / batch / fed | latency ms | forward "
              "| queue | rpc | store | rest |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for (backend, policy, c), row in sorted(table.items()):
        t = row["time_ms"]
        engines = " | ".join(f"{row['busy'][r]:.0%} ({row['forward'][r]:.0%}) / {row['batch'][r]:.1f} / "
                             f"{row['fed'][r]:.2f}" for r in ROLES)
        lines.append(f"| {backend} | {policy} | {c} | {engines} | {row['latency_ms']:.0f} | "
                     + " | ".join(f"{t[part]:.0f}" for part in ("forward", "queue", "rpc", "store", "rest")) + " |")
    lines += ["", f"CPU cores each process used over the cell (CPU seconds / wall seconds; this machine has "
              f"{os.cpu_count()}): the engines, the orchestrator, redis-server and the benchmark's client threads.",
              "", "| backend | policy | sessions | " + " | ".join(PROCESSES) + " | total |",
              "|---|---|--:|" + "--:|" * (len(PROCESSES) + 1)]
    for (backend, policy, c), row in sorted(table.items()):
        cores = row["cpu_cores"]
        lines.append(f"| {backend} | {policy} | {c} | " + " | ".join(f"{cores[n]:.2f}" for n in PROCESSES)
                     + f" | {sum(cores.values()):.2f} |")
    path.write_text("\n".join(lines) + "\n" + kept_reading(path))


def kept_reading(path: Path) -> str:
    """The hand-written reading of a run (from READING on) survives the tables being rewritten."""
    text = path.read_text() if path.exists() else ""
    return "\n" + (text[text.index(READING):] if READING in text else f"{READING}\n\n(not written for this run yet)\n")


def plot(table: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.backends), figsize=(6 * len(args.backends), 9), squeeze=False)
    for column, backend in enumerate(args.backends):
        for ax, key, low, high, label in ((axes[0][column], "tokens_per_s", "min", "max", "answer tokens/s"),
                                          (axes[1][column], "answers_per_s", "answers_min", "answers_max", "answers/s")):
            for policy in args.policies:
                rows = [table[(backend, policy, c)] for c in args.concurrency]
                ax.errorbar(args.concurrency, [r[key] for r in rows], marker="o", label=policy, capsize=3,
                            yerr=[[r[key] - r[low] for r in rows], [r[high] - r[key] for r in rows]])
            ax.set(xscale="log", xlabel="concurrent sessions", ylabel=label, title=f"backend {backend}")
            ax.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    p.add_argument("--policies", nargs="+", default=["llm", "entropy", "spec"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=2, help="generations each session streams back to back")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128, help="the verbose LLM's answers run to ~100 tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    problems = heldout(200)
    cells = [(b, pol, c) for b in args.backends for pol in args.policies for c in args.concurrency]
    results: dict = {cell: [] for cell in cells}
    with ExitStack() as stack:
        targets = deployments(stack, args.backends, Path(stack.enter_context(_tmpdir())))
        rng = random.Random(args.seed)
        with tqdm(total=len(cells) * args.rounds, desc="cells") as bar:
            for round_ in range(args.rounds):
                for cell in rng.sample(cells, len(cells)):
                    backend, policy, c = cell
                    address, engines, processes = targets[backend]
                    results[cell].append(run_cell(address, engines, processes, policy, c, args.requests, problems,
                                                  args.seed + round_, args.max_new_tokens))
                    bar.update()
    table = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "concurrency.json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "cells": {"/".join(map(str, k)): v for k, v in results.items()}},
        indent=1))
    write_markdown(table, args, args.out / "concurrency.md")
    plot(table, args, args.out / "concurrency.png")
    print((args.out / "concurrency.md").read_text())


def _tmpdir():
    import tempfile
    return tempfile.TemporaryDirectory(prefix="rstitch-concurrency-")


if __name__ == "__main__":
    main()
