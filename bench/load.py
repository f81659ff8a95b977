"""A bounded load test: many concurrent streamed sessions against the split deployment.

    python bench/load.py [--concurrency 64] [--duration 180] [--warmup 20] [--out docs]
    python bench/load.py --orchestrator HOST:PORT [--pid orchestrator=PID ...]

Starts the default deployment (both engine services, the orchestrator and a private redis-server as
separate processes; or attaches to a running orchestrator), then keeps `concurrency` sessions open
at once: each worker thread streams one generation after another (policy entropy) on held-out
problems. Every second it samples the RSS of every process (/proc/PID/status) and the engines' KV
usage (their Info RPC). Figures cover the `duration` seconds after the warm-up; errors count over
the whole run. Writes load.md, load.json and load.png under --out, and exits non-zero if any
generation failed (an RPC error, finish reason error, or no tokens).
"""

import argparse
import json
import math
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import grpc

from rstitch import RStitchClient
from rstitch.local import LocalDeployment, Redis
from rstitch.v1 import engine_pb2, engine_pb2_grpc
from rstitch.v1 import orchestrator_pb2 as opb
from training.task import heldout, score


def one_generation(client, problem, args, t0) -> dict:
    started = time.monotonic()
    record = {"start": started - t0, "tokens": 0, "ttft_s": None, "code": None, "message": "", "correct": False}
    finish = None
    try:
        options = {"policy": "entropy", "tau": args.tau, "max_new_tokens": args.max_new_tokens}
        for event in client.stream(problem.question, **options):
            kind = event.WhichOneof("event")
            if kind == "delta":
                record["ttft_s"] = record["ttft_s"] or time.monotonic() - started
                record["tokens"] += len(event.delta.span.token_ids)
            elif kind == "finished":
                finish = opb.FinishReason.Name(event.finished.finish_reason).removeprefix("FINISH_REASON_").lower()
                record["correct"] = score(event.finished.text, problem)
        if finish in (None, "error", "cancelled") or record["tokens"] == 0:
            record["code"], record["message"] = "BAD_RESULT", f"finish reason {finish}, {record['tokens']} tokens"
    except grpc.RpcError as e:
        record["code"], record["message"] = e.code().name, e.details()
    record["latency_s"] = time.monotonic() - started
    record["end"] = record["start"] + record["latency_s"]
    return record


def worker(client, problems, seed, args, t0, stop, records, seen_errors):
    rng = random.Random(seed)
    while not stop.is_set():
        record = one_generation(client, rng.choice(problems), args, t0)
        records.append(record)  # list.append is atomic
        if record["code"]:
            error = f"{record['code']}: {record['message']}"
            if error not in seen_errors:  # each distinct error once
                seen_errors.add(error)
                sys.stderr.write(f"error: {error}\n")
            stop.wait(0.1)  # no busy loop against a failing service


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def sampler(pids, engines, t0, stop, samples, records):
    stubs = {name: engine_pb2_grpc.EngineStub(grpc.insecure_channel(address)) for name, address in engines.items()}
    next_at = time.monotonic()
    while not stop.is_set():
        row = {"t": time.monotonic() - t0, "completed": len(records),
               "rss_mb": {name: rss_mb(pid) for name, pid in pids.items()}, "kv": {}}
        for name, stub in stubs.items():
            try:
                info = stub.Info(engine_pb2.InfoRequest(), timeout=1)
                row["kv"][name] = {"used": info.kv_used_tokens, "capacity": info.kv_capacity_tokens,
                                   "sessions": info.sessions}
            except grpc.RpcError:
                row["kv"][name] = None
        samples.append(row)
        next_at += 1
        stop.wait(max(0.0, next_at - time.monotonic()))


def pct(values, p):  # nearest rank
    return sorted(values)[max(0, math.ceil(p / 100 * len(values)) - 1)] if values else None


def summarize(records, samples, args):
    lo, hi = args.warmup, args.warmup + args.duration
    done = [r for r in records if lo <= r["end"] <= hi and not r["code"]]
    latency, ttft = [r["latency_s"] * 1e3 for r in done], [r["ttft_s"] * 1e3 for r in done]
    summary = {
        "completed": len(done), "started": len(records),
        "errors": dict(Counter(r["code"] for r in records if r["code"])),
        "error_examples": sorted({f"{r['code']}: {r['message']}" for r in records if r["code"]})[:10],
        "generations_per_s": len(done) / args.duration, "tokens_per_s": sum(r["tokens"] for r in done) / args.duration,
        "mean_tokens": statistics.fmean(r["tokens"] for r in done) if done else None,
        "accuracy": 100 * statistics.fmean(r["correct"] for r in done) if done else None,
        "latency_ms": {"p50": pct(latency, 50), "p90": pct(latency, 90), "p99": pct(latency, 99),
                       "max": max(latency, default=None)},
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "memory": {}, "kv": {},
    }
    steady = [s for s in samples if lo <= s["t"] <= hi]
    for name in (samples[0]["rss_mb"] if samples else {}):
        series = [(s["t"], s["rss_mb"][name]) for s in steady if s["rss_mb"][name] is not None]
        half = [(t, v) for t, v in series if t >= lo + args.duration / 2]
        slope = statistics.linear_regression(*zip(*half)).slope * 60 if len(half) > 2 else None
        summary["memory"][name] = {"start": series[0][1], "peak": max(v for _, v in series), "end": series[-1][1],
                                   "second_half_mb_per_min": slope} if series else None
    for name in (samples[0]["kv"] if samples else {}):
        kv = [s["kv"][name] for s in steady if s["kv"].get(name)]
        summary["kv"][name] = {"peak_used": max(k["used"] for k in kv), "capacity": kv[0]["capacity"],
                               "peak_sessions": max(k["sessions"] for k in kv), "end_sessions": kv[-1]["sessions"],
                               "missed_samples": len(steady) - len(kv)} if kv else None
    return summary


def fmt(value, digits=0):
    return "-" if value is None else f"{value:.{digits}f}"


def write_markdown(summary, info, args, path):
    s, lat, ttft = summary, summary["latency_ms"], summary["ttft_ms"]
    engine_workers = f", {args.engine_workers} gRPC workers per engine" if args.engine_workers else ""
    errors = ", ".join(f"{code} {n}" for code, n in s["errors"].items()) or "0"
    lines = [
        "# Load test: concurrent sessions on the split deployment", "",
        f"Made by `{' '.join(['python', 'bench/load.py', *sys.argv[1:]])}` on {info['date']} ({info['machine']}). "
        f"{args.concurrency} sessions open at once for {args.duration:g} s after a {args.warmup:g} s warm-up "
        f"({info['target']}{engine_workers}); each worker streams one generation after another on random held-out "
        f"problems (policy entropy, tau {args.tau or 'default'}, at most {args.max_new_tokens} new tokens). Figures "
        "cover the steady-state window only; errors count over the whole run.", "",
        "| completed | errors | generations/s | tokens/s | latency p50 / p90 / p99 / max ms | TTFT p50 / p99 ms "
        "| mean tokens | accuracy % |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| {s['completed']} | {errors} | {s['generations_per_s']:.2f} | {s['tokens_per_s']:.1f} "
        f"| {fmt(lat['p50'])} / {fmt(lat['p90'])} / {fmt(lat['p99'])} / {fmt(lat['max'])} "
        f"| {fmt(ttft['p50'])} / {fmt(ttft['p99'])} | {fmt(s['mean_tokens'], 1)} | {fmt(s['accuracy'], 1)} |",
        *(["", "Errors (distinct messages, at most 10):", ""] if s["errors"] else []),
        *[f"- {example}" for example in s["error_examples"]], "",
        "Resident memory (VmRSS) per process: at the start of the window, its peak, at its end, and the trend "
        "(least-squares slope) over the window's second half; bounded means no trend.", "",
        "| process | start MB | peak MB | end MB | 2nd-half trend MB/min |", "|---|--:|--:|--:|--:|",
    ]
    for name, m in s["memory"].items():
        lines.append(f"| {name} | " + (f"{m['start']:.1f} | {m['peak']:.1f} | {m['end']:.1f} "
                                      f"| {fmt(m['second_half_mb_per_min'], 2)} |" if m else "- | - | - | - |"))
    if any(s["kv"].values()):
        lines += ["", "Engines' KV caches (their Info RPC, sampled every second with a 1 s deadline; a busy engine may "
                  "miss samples):", "", "| engine | peak KV tokens used | KV capacity | peak sessions cached "
                  "| sessions at end | samples missed |", "|---|--:|--:|--:|--:|--:|"]
        lines += [f"| {name} | {k['peak_used']} | {k['capacity']} | {k['peak_sessions']} | {k['end_sessions']} "
                  f"| {k['missed_samples']} |" for name, k in s["kv"].items() if k]
    lines += ["", "![memory and throughput over time](load.png)"]
    path.write_text("\n".join(lines) + "\n")


def plot(records, samples, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, work) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in samples[0]["rss_mb"]:
        mem.plot([s["t"] for s in samples], [s["rss_mb"][name] for s in samples], label=name)
    mem.set_ylabel("RSS (MB)")
    mem.set_title(f"{args.concurrency} concurrent sessions: resident memory per process")
    mem.legend(fontsize=8)
    ends = sorted(r["end"] for r in records if not r["code"])
    work.plot(ends, range(1, len(ends) + 1), color="tab:blue", label="completed generations")
    work.set_ylabel("completed generations")
    rate = work.twinx()
    starts = range(0, max(5, int(args.warmup + args.duration)) - 4, 5)
    bins = [sum(t <= e < t + 5 for e in ends) / 5 for t in starts]
    rate.step([*starts, starts[-1] + 5], [*bins, bins[-1]], where="post", color="tab:orange",
              label="generations/s (5 s bins)")
    rate.set_ylabel("generations/s")
    rate.set_ylim(bottom=0)
    work.set_xlabel("seconds since the load started (shaded: warm-up, dotted: end of the window)")
    for ax in (mem, work):
        ax.axvspan(0, args.warmup, color="grey", alpha=0.15)
        ax.axvline(args.warmup + args.duration, color="grey", linestyle=":")
        ax.grid(alpha=0.3)
    work.legend(handles=work.get_lines()[:1] + rate.get_lines(), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(address, pids, engines, args):
    problems, records, samples = heldout(), [], []
    stop_work, stop_sampling = threading.Event(), threading.Event()
    with RStitchClient(address, timeout=args.timeout) as client:
        client.generate(problems[0].question, policy="entropy")  # first call: connections, caches
        t0 = time.monotonic()
        threads = [threading.Thread(target=sampler, args=(pids, engines, t0, stop_sampling, samples, records))]
        seen_errors = set()
        threads += [threading.Thread(target=worker, args=(client, problems, seed, args, t0, stop_work, records,
                                                          seen_errors))
                    for seed in range(args.seed, args.seed + args.concurrency)]
        for thread in threads:
            thread.start()
        end, last = args.warmup + args.duration, (0, 0)
        while (elapsed := time.monotonic() - t0) < end:
            time.sleep(min(5, end - elapsed))
            now, n = time.monotonic() - t0, len(records)
            errors = sum(1 for r in records if r["code"])
            print(f"{now:6.0f} s  {'warm-up' if (last[0] + now) / 2 < args.warmup else 'measuring'}  finished {n}  "
                  f"errors {errors}  {(n - last[1]) / (now - last[0]):.2f} gen/s", file=sys.stderr)
            last = (now, n)
        stop_work.set()
        print("draining the sessions still open...", file=sys.stderr)
        for thread in threads[1:]:
            thread.join()
        stop_sampling.set()
        threads[0].join()
    return records, samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64, help="sessions open at once")
    parser.add_argument("--duration", type=float, default=180, help="seconds measured, after the warm-up")
    parser.add_argument("--warmup", type=float, default=20, help="seconds of load before measuring")
    parser.add_argument("--tau", type=float, help="entropy threshold (default: the orchestrator's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300, help="deadline of each generation, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-workers", type=int, help="gRPC worker threads of each engine (default: theirs)")
    parser.add_argument("--orchestrator", help="HOST:PORT of a running orchestrator instead of a local deployment")
    parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID",
                        help="with --orchestrator: a process whose memory to sample (repeatable)")
    parser.add_argument("--out", default="docs", help="directory for load.md, load.json, load.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.orchestrator:
        pids = {name: int(pid) for name, pid in (p.split("=", 1) for p in args.pid)}
        records, samples = run(args.orchestrator, pids, {}, args)
        target = f"attached to {args.orchestrator}"
    else:
        print("starting the deployment...", file=sys.stderr)
        with ExitStack() as stack:
            redis = Redis() if shutil.which("redis-server") else None
            if redis:
                stack.callback(redis.stop)
            # Room for every session at once (the orchestrator sizes its gRPC workers from this).
            engine_args = ["--workers", str(args.engine_workers)] if args.engine_workers else []
            d = stack.enter_context(LocalDeployment(
                redis=redis.url if redis else None, slm_args=engine_args, llm_args=engine_args,
                orchestrator_args=["--max-sessions", str(max(64, args.concurrency))]))
            print(f"service logs: {d.log_dir}", file=sys.stderr)
            pids = {"slm_service": d.slm.process.pid, "llm_service": d.llm.process.pid,
                    "orchestrator": d.orchestrator.process.pid}
            if redis:
                pids["redis-server"] = redis.process.pid
            records, samples = run(d.address, pids, {"slm_service": d.slm.address, "llm_service": d.llm.address}, args)
        target = "local deployment: default models, private redis-server" if redis else "local deployment, no Redis"
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "target": target,
        "machine": f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, "
                   f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
    }
    summary = summarize(records, samples, args)
    write_markdown(summary, info, args, out / "load.md")
    plot(records, samples, args, out / "load.png")
    (out / "load.json").write_text(json.dumps({"info": info, "settings": vars(args), "summary": summary,
                                               "samples": samples}, indent=1))
    print((out / "load.md").read_text())
    if summary["errors"]:
        sys.exit(f"{sum(summary['errors'].values())} generations failed: {summary['errors']}")


if __name__ == "__main__":
    main()
