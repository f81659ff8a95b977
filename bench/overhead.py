"""Orchestration overhead of the split deployment against the same loop in-process.

    python bench/overhead.py [--rounds N] [--max-new-tokens N] [--out docs/overhead]

in-process: Orchestrator over LocalEngineClient(HFEngine) and a MemorySessionStore, in this process.
split:      LocalDeployment: slm_service, llm_service, orchestrator and redis-server as separate
            processes on loopback; RStitchClient.complete over gRPC.

Both modes run the very same generations (same models, prompts, policy, tau, max_new_tokens, one
torch thread per engine) and must produce identical token ids. The modes alternate run by run
(A/B, then B/A in the next round) so that machine noise hits both alike and the ratio is paired.
Two model pairs: the project's tiny default pair (per-token cost ~1-4 ms, so per-span costs show)
and a larger random pair whose forward passes dominate (what the 3% target is about).
Writes OUT.md (tables, command, machine) and OUT.png (latency split into engine time and the rest).
"""

import argparse
import datetime
import itertools
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.default_models import build_tokenizer, tiny_model_path
from engine.hf import HFEngine
from orchestrator.engine_client import GrpcEngineClient, LocalEngineClient
from orchestrator.policies import LLM, SLM
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore, RedisSessionStore
from rstitch.client import RStitchClient, make_spec
from rstitch.local import LocalDeployment
from rstitch.v1 import orchestrator_pb2 as opb

PROMPTS = ["Hello there", "What is 2+2?", "Tell me a story", "Why is the sky blue?"]
POLICIES = [("entropy", 0.3), ("llm", None)]  # (policy, tau): R-Stitch, and one span as a baseline
# Larger random pair: an LLM ~30 ms/token on one core, so forward passes dominate every span.
LARGER = {
    "slm": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, seed=1),
    "llm": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=2, seed=2),
}


def build_larger(out: Path) -> dict[str, Path]:
    """Random Qwen2 models on the default tokenizer (stitching needs one tokenizer for both)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    paths = {}
    for role, shape in LARGER.items():
        shape = dict(shape)
        torch.manual_seed(shape.pop("seed"))
        # Tied embeddings make logits scale with sqrt(hidden) * init: scale init down to keep the tiny
        # pair's spread of entropies (0.5 at hidden 64), else every token is confident and nothing switches.
        init = 0.5 * math.sqrt(64 / shape["hidden_size"])
        config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                             initializer_range=init, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape)
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        paths[role] = out / role
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return paths


def run_once(mode, call, prompt, policy, tau, max_new):
    """One generation; returns the wall time seen by the caller and what the session recorded."""
    started = time.perf_counter()
    session = call(prompt, policy, tau, max_new)
    wall = (time.perf_counter() - started) * 1e3
    if session.status != opb.STATUS_FINISHED:
        sys.exit(f"{mode}: session {session.session_id} ended {opb.Status.Name(session.status)}: {session.error}")
    s = session.stats
    return dict(wall=wall, engine=s.slm_forward_ms + s.llm_forward_ms, spans=s.spans, switches=s.switches,
                tokens=s.slm_tokens + s.llm_tokens, ids=[t for span in session.spans for t in span.token_ids])


def rtt_ms(op, n=300) -> float:
    for _ in range(20):
        op()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        op()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def bench_pair(name, paths, args, rows, costs):
    print(f"[{name}] loading in-process engines, starting the split deployment ...", flush=True)
    local_engines = [LocalEngineClient(HFEngine(paths[r], role=r, threads=1)) for r in ("slm", "llm")]
    threads = ["--threads", "1"]
    with LocalDeployment(slm_args=[*threads, "--model", str(paths["slm"])],
                         llm_args=[*threads, "--model", str(paths["llm"])]) as dep, RStitchClient(dep.address) as client:
        if not dep.redis_url:
            sys.exit("no redis-server on PATH (or REDIS_URL): the split mode would not use Redis")
        orchestrators = {
            "in-process": Orchestrator(*local_engines, MemorySessionStore()),
            # The split deployment's engines, driven from this process without Redis: separates the cost
            # of engine RPCs from that of the orchestrator being a service with its state in Redis.
            "gRPC engines": Orchestrator(GrpcEngineClient(dep.slm.address), GrpcEngineClient(dep.llm.address),
                                         MemorySessionStore()),
        }
        modes = {m: (lambda p, pol, tau, n, o=o: o.complete(make_spec(p, policy=pol, tau=tau, max_new_tokens=n)))
                 for m, o in orchestrators.items()}
        modes["split"] = lambda p, pol, tau, n: client.complete(p, policy=pol, tau=tau, max_new_tokens=n)
        cases = [(pol, tau, p) for pol, tau in POLICIES for p in PROMPTS]
        results = {(pol, p): {m: [] for m in modes} for pol, _, p in cases}
        reference = {}
        for rnd in range(args.rounds + 1):  # round 0 is warm-up and is not kept
            started = time.perf_counter()
            for i, (pol, tau, prompt) in enumerate(cases):
                k = (rnd + i) % len(modes)  # rotate which mode goes first, so order effects average out
                for mode in [*modes][k:] + [*modes][:k]:
                    r = run_once(mode, modes[mode], prompt, pol, tau, args.max_new_tokens)
                    ref = reference.setdefault((pol, prompt), r["ids"])
                    if r["ids"] != ref:
                        sys.exit(f"MISMATCH [{name}] {pol} {prompt!r}: {mode} produced {r['ids']}, expected {ref}")
                    if rnd:
                        results[(pol, prompt)][mode].append(r)
            label = "warm-up" if rnd == 0 else f"round {rnd}/{args.rounds}"
            print(f"[{name}] {label} done in {time.perf_counter() - started:.1f} s", flush=True)

        # Floors for the per-span costs, measured directly on the running deployment.
        grpc_engine = GrpcEngineClient(dep.slm.address)
        store = RedisSessionStore(dep.redis_url)
        record, synced, stats = opb.SpanRecord(source=SLM, token_ids=[5]), {SLM: 1, LLM: 1}, opb.Stats()
        lease, index = store.create(opb.Session(session_id="bench-rtt"), "bench", SLM), itertools.count()
        costs[name] = dict(grpc=rtt_ms(lambda: grpc_engine.info(timeout=5)),
                           redis=rtt_ms(lambda: store.append(lease, next(index), record, synced, stats, SLM)))
        grpc_engine.close()
        for pool in orchestrators["gRPC engines"].pools.values():
            pool.close()

    for pol, tau in POLICIES:
        per_prompt = [results[(pol, p)] for p in PROMPTS]
        # Per generation: each prompt's median over rounds, averaged over prompts.
        avg = {m: {key: statistics.fmean(statistics.median(r[key] for r in runs[m]) for runs in per_prompt)
                   for key in ("wall", "engine", "tokens", "spans", "switches")} for m in modes}
        paired = [(runs["in-process"][j]["wall"], runs["split"][j]["wall"])
                  for runs in per_prompt for j in range(args.rounds)]
        rows.append(dict(pair=name, policy=pol if tau is None else f"{pol} tau={tau}", avg=avg,
                         ratio=statistics.median(b / a for a, b in paired), n=len(paired)))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    import grpc
    import transformers
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; nproc {os.cpu_count()} "
            f"({cpu}); Linux {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, grpcio {grpc.__version__}, redis-server {redis}")


def write_markdown(path: Path, rows, costs, args, command):
    lines = [
        "# Orchestration overhead: split deployment vs in-process",
        "",
        f"Made by `{command}`: {args.rounds} rounds after a warm-up round; in every round each generation runs "
        "once per mode, back to back, the first mode rotating.",
        "",
        f"Machine: {machine()}.",
        "",
        "Modes: *in-process* (Orchestrator, LocalEngineClient engines and MemorySessionStore in one process), "
        "*gRPC engines* (that orchestrator in the benchmark's process, driving the split deployment's engine "
        "services, no Redis), *split* (LocalDeployment: engines, orchestrator and redis-server as separate "
        "processes, called with RStitchClient.complete). One torch thread per engine in every mode; all modes "
        "produced identical token ids in every run.",
        "",
        f"Per generation: a prompt's median over rounds, averaged over the {len(PROMPTS)} prompts; "
        f"max_new_tokens {args.max_new_tokens}. *Engine* is the engines' own time as they report it "
        "(Stats.slm_forward_ms + llm_forward_ms). *split / in-process* is the median over the paired runs.",
        "",
        "| model pair | policy | tokens | spans | switches | engine ms in-process / split | in-process ms "
        "| gRPC engines ms | split ms | split / in-process |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        loc, hyb, spl = (r["avg"][m] for m in ("in-process", "gRPC engines", "split"))
        lines.append(
            f"| {r['pair']} | {r['policy']} | {loc['tokens']:.1f} | {loc['spans']:.1f} | {loc['switches']:.1f} "
            f"| {loc['engine']:.1f} / {spl['engine']:.1f} | {loc['wall']:.1f} | {hyb['wall']:.1f} "
            f"| {spl['wall']:.1f} | {r['ratio']:.3f} |")
    lines += [
        "",
        "Where the split mode's extra time goes, in ms per span (each span is one engine Prefill/Decode call "
        "and one Redis append on the critical path; a generation adds the client's Complete call, two Release "
        "calls and reading the session back). The columns add up to the total: *engine forward slower* is "
        "the rise of the engines' own reported time when they run behind a gRPC server; *engine calls over "
        "gRPC* is the rest of gRPC engines minus in-process; *orchestrator as a service + Redis* is split "
        "minus gRPC engines.",
        "",
        "| model pair | policy | extra per span | engine forward slower | engine calls over gRPC "
        "| orchestrator as a service + Redis |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        loc, hyb, spl = (r["avg"][m] for m in ("in-process", "gRPC engines", "split"))
        other = {m: a["wall"] - a["engine"] for m, a in r["avg"].items()}
        n = loc["spans"]
        lines.append(
            f"| {r['pair']} | {r['policy']} | {(spl['wall'] - loc['wall']) / n:.2f} "
            f"| {(spl['engine'] - loc['engine']) / n:.2f} "
            f"| {(other['gRPC engines'] - other['in-process']) / n:.2f} "
            f"| {(other['split'] - other['gRPC engines']) / n:.2f} |")
    lines += [
        "",
        "Floors, measured directly on the running deployment (median of 300 calls):",
        "",
        "| model pair | engine gRPC round trip (Info) ms | Redis span append ms |",
        "|---|--:|--:|",
    ]
    for name, c in costs.items():
        lines.append(f"| {name} | {c['grpc']:.3f} | {c['redis']:.3f} |")
    lines += ["", f"![latency split into engine time and the rest]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 5), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        mine = [r for r in rows if r["pair"] == pair]
        labels, engine, other = [], [], []
        for r in mine:
            for mode, a in r["avg"].items():
                labels.append(f"{mode}\n{r['policy']}")
                engine.append(a["engine"])
                other.append(a["wall"] - a["engine"])
        x = list(range(len(labels)))
        ax.bar(x, engine, color="#4c72b0", label="engines' own forward time")
        ax.bar(x, other, bottom=engine, color="#dd8452", label="everything else")
        per = len(mine[0]["avg"])
        for i, r in enumerate(mine):
            split = r["avg"]["split"]["wall"]
            ax.annotate(f"x{r['ratio']:.3f}", (per * i + per - 1, split), ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("ms per generation")
        ax.set_title(f"{pair} model pair (split / in-process above the split bars)", fontsize=10)
        ax.margins(y=0.15)
        # Below the axes: inside, it would cover the ratio labels of tall bars.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="measured rounds (after one warm-up round)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--pairs", nargs="+", choices=["tiny", "larger"], default=["tiny", "larger"])
    p.add_argument("--out", default="docs/overhead", help="writes OUT.md and OUT.png")
    args = p.parse_args()
    command = shlex.join(["python", "bench/overhead.py", *sys.argv[1:]])
    torch.set_num_threads(1)  # the split engines get --threads 1: same arithmetic, same cost per forward
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, costs = [], {}
    with tempfile.TemporaryDirectory(prefix="rstitch-bench-") as tmp:
        for name in args.pairs:
            if name == "tiny":
                paths = {r: tiny_model_path(r) for r in ("slm", "llm")}
            else:
                print("[larger] building the larger random pair ...", flush=True)
                paths = build_larger(Path(tmp))
            bench_pair(name, paths, args, rows, costs)
    write_markdown(out.with_suffix(".md"), rows, costs, args, command)
    plot(out.with_suffix(".png"), rows)
    for r in rows:
        walls = "  ".join(f"{m} {a['wall']:.1f} ms" for m, a in r["avg"].items())
        print(f"{r['pair']:>6} {r['policy']:<16} {walls}  split/in-process {r['ratio']:.3f}")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
