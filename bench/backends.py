"""hf vs vllm engine backends at 1 and 16 concurrent sessions, side by side in one run.

    python bench/backends.py [--model PATH] [--tokens N] [--rounds N] [--out docs/backends]

Each session prefills its own prompt and decodes one span of N tokens (greedy, no gate) through the
engine in-process (Engine.prefill, the same call the gRPC servicer makes); C sessions run at once
from C threads. Both backends must produce the same tokens. Reports decoded tokens/s over all
sessions and per-session latency (median, max), best of --rounds. Writes OUT.md and OUT.png.
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.default_models import default_model_path  # noqa: E402
from rstitch.v1 import engine_pb2 as pb  # noqa: E402


def prompts(n: int) -> list[list[int]]:
    return [[3, *(5 + (i * 7 + j) % 90 for j in range(12 + i % 5)), 4] for i in range(n)]


def run(engine, concurrency: int, tokens: int, tag: str):
    def one(i, prompt):
        start = time.perf_counter()
        span = engine.prefill(pb.PrefillRequest(session_id=f"{tag}-{i}", token_ids=prompt,
                                                rule=pb.SpanRule(max_tokens=tokens))).span
        engine.release(pb.ReleaseRequest(session_id=f"{tag}-{i}"))
        return time.perf_counter() - start, list(span.token_ids)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda a: one(*a), enumerate(prompts(concurrency))))
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    return {"tok_s": sum(len(r[1]) for r in results) / wall, "p50": statistics.median(latencies),
            "max": max(latencies), "outputs": [r[1] for r in results]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(default_model_path("llm")))
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--out", default="docs/backends")
    args = p.parse_args(argv)

    from engine.hf import HFEngine
    from engine.vllm_backend import VLLMEngine

    engines = {"hf": HFEngine(args.model, role="llm", kv_budget_mb=64),
               "vllm": VLLMEngine(args.model, role="llm", kv_budget_mb=64)}
    rows = {}
    for c in args.concurrency:
        for name, engine in engines.items():
            run(engine, c, 4, f"warm-{name}-{c}")
            best = None
            for r in range(args.rounds):
                result = run(engine, c, args.tokens, f"{name}-{c}-{r}")
                if best is None or result["tok_s"] > best["tok_s"]:
                    best = result
            rows[name, c] = best
        assert rows["hf", c]["outputs"] == rows["vllm", c]["outputs"], "the backends disagree"

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    lines = [
        "# Engine backends: hf vs vllm", "",
        f"`{command}` — {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, model `{Path(args.model).name}`, {args.tokens} tokens per session, best of "
        f"{args.rounds}, float32, in-process engines (no gRPC). Both backends produced identical tokens.", "",
        "| backend | sessions at once | tokens/s (all sessions) | latency p50 (s) | latency max (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for (name, c), r in rows.items():
        lines.append(f"| {name} | {c} | {r['tok_s']:.0f} | {r['p50']:.3f} | {r['max']:.3f} |")
    lines += ["", "hf serves concurrent sessions one forward at a time (a lock around the model); vllm puts "
              "all running sessions' tokens into the same step (continuous batching). On a tiny model on 2 CPU "
              "cores per-step overheads dominate; the numbers are not a GPU serving measurement. torch intra-op threads "
              f"(hf's) after the run: {__import__('torch').get_num_threads()}.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.38
    for k, name in enumerate(engines):
        xs = [i + (k - 0.5) * width for i in range(len(args.concurrency))]
        axes[0].bar(xs, [rows[name, c]["tok_s"] for c in args.concurrency], width, label=name)
        axes[1].bar(xs, [rows[name, c]["p50"] for c in args.concurrency], width, label=name)
    for ax, title in zip(axes, ("tokens/s, all sessions", "latency per session, p50 (s)")):
        ax.set_xticks(range(len(args.concurrency)), [f"{c} at once" for c in args.concurrency])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(command, fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
