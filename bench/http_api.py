"""What the HTTP door costs: the OpenAI-compatible API against the gRPC API, at 1 and 16 concurrent streamed sessions.

    python bench/http_api.py [--sessions 1 16] [--requests 4] [--rounds 5] [--max-new-tokens 64] [--out docs]

Starts one deployment (both engine services, the orchestrator with --http-port, a private redis-server;
the trained default pair), then runs interleaved rounds: in each round every (api, sessions) cell, in an
order shuffled per round, opens `sessions` client threads that each stream `requests` generations back
to back, the same held-out problems for both APIs (R-Stitch at the orchestrator's tau, greedy, so both
do the very same work). gRPC through RStitchClient.stream; HTTP through the real `openai` client's
streamed chat completions. Client-side, per generation: time to first token, end-to-end latency and the
gaps between tokens. Per cell and round: their medians; reported: the median over rounds and its
min-max spread, and HTTP minus gRPC at the same concurrency: added latency per request (end to end,
and to the first token) and per token (inter-token). Writes http.md/.json/.png under --out.
"""

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc
import openai
from tqdm import tqdm

from rstitch import RStitchClient
from rstitch.local import LocalDeployment, free_port
from training.task import heldout

APIS = ("grpc", "http")
METRICS = ("e2e_ms", "ttft_ms", "itl_ms")


class Timer:
    """The client-side times of one streamed generation, from the request to each token."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.ttft_s, self.gaps_s, self.tokens = None, [], 0

    def token(self) -> None:
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - self.started
        else:
            self.gaps_s.append(now - self.last)
        self.last, self.tokens = now, self.tokens + 1

    def record(self, text: str) -> dict:
        return {"e2e_s": time.perf_counter() - self.started, "ttft_s": self.ttft_s, "gaps_s": self.gaps_s,
                "tokens": self.tokens, "text": text, "error": None}


def over_grpc(client: RStitchClient, question: str, max_new_tokens: int) -> dict:
    timer, text = Timer(), ""
    for event in client.stream(question, max_new_tokens=max_new_tokens):
        if event.HasField("delta"):
            for _ in event.delta.span.token_ids:
                timer.token()
        elif event.HasField("finished"):
            text = event.finished.text
    return timer.record(text)


def over_http(client: openai.OpenAI, model: str, question: str, max_new_tokens: int) -> dict:
    timer, pieces = Timer(), []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                max_tokens=max_new_tokens, stream=True):
        for _ in chunk.rstitch["sources"]:
            timer.token()
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
    return timer.record("".join(pieces))


def run_cell(target: dict, api: str, sessions: int, questions: list[str], max_new_tokens: int) -> list[dict]:
    """`sessions` threads, each streaming its share of `questions` back to back; a record per generation."""
    records: list[dict] = []

    def session(mine: list[str]) -> None:
        if api == "grpc":
            with RStitchClient(target["grpc"], timeout=600) as client:
                generate = lambda q: over_grpc(client, q, max_new_tokens)  # noqa: E731
                records.extend(_guarded(generate, q) for q in mine)
        else:
            with openai.OpenAI(base_url=target["http"], api_key="unused", max_retries=0, timeout=600) as client:
                records.extend(_guarded(lambda q: over_http(client, target["model"], q, max_new_tokens), q)
                               for q in mine)

    share = len(questions) // sessions
    threads = [threading.Thread(target=session, args=(questions[i * share:(i + 1) * share],))
               for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def _guarded(generate, question: str) -> dict:
    try:
        return generate(question) | {"question": question}
    except (grpc.RpcError, openai.APIError) as e:
        return {"question": question, "error": f"{type(e).__name__}: {e}"}


def medians(records: list[dict]) -> dict:
    """One cell in one round: the median of each latency, in ms."""
    ok = [r for r in records if not r["error"]]
    return {"e2e_ms": 1e3 * statistics.median(r["e2e_s"] for r in ok),
            "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in ok if r["ttft_s"] is not None),
            "itl_ms": 1e3 * statistics.median(g for r in ok for g in r["gaps_s"]),
            "tokens": sum(r["tokens"] for r in ok), "errors": len(records) - len(ok)}


def summarize(rounds: dict, sessions: list[int]) -> dict:
    """Per (api, sessions) the median over rounds and its spread; per sessions HTTP - gRPC, paired by round."""
    table = {}
    for cell, per_round in rounds.items():
        table[cell] = {m: _spread([r[m] for r in per_round]) for m in METRICS}
        table[cell]["errors"] = sum(r["errors"] for r in per_round)
    for c in sessions:
        pairs = list(zip(rounds[("http", c)], rounds[("grpc", c)]))
        table[("added", c)] = {m: _spread([h[m] - g[m] for h, g in pairs]) for m in METRICS}
    return table


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_markdown(table: dict, args, mismatches: int, path: Path) -> None:
    cell = lambda s: f"{s['median']:.2f} ({s['min']:.2f} to {s['max']:.2f})"  # noqa: E731
    lines = ["# HTTP vs gRPC: what the OpenAI-compatible door adds", "",
             f"`{' '.join(['python', *sys.argv])}` on {platform.node()} "
             f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC); trained pair, R-Stitch (entropy, the "
             f"orchestrator's tau), greedy, up to {args.max_new_tokens} tokens, {args.requests} generation(s) per "
             f"session, {args.rounds} interleaved round(s). Client-side times in ms: the median over rounds of "
             "each round's median (min to max over rounds). `added`: HTTP minus gRPC in the same round.", "",
             "| api | sessions | end-to-end | to first token | between tokens | errors |", "|---|--:|--:|--:|--:|--:|"]
    for c in args.sessions:
        for api in (*APIS, "added"):
            row = table[(api, c)]
            lines.append(f"| {api} | {c} | {cell(row['e2e_ms'])} | {cell(row['ttft_ms'])} | {cell(row['itl_ms'])} "
                         f"| {row.get('errors', '')} |")
    lines += ["", f"Answers that differed between the APIs (same question, same round): {mismatches}."]
    path.write_text("\n".join(lines) + "\n")


def plot(table: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"e2e_ms": "end-to-end", "ttft_ms": "time to first token", "itl_ms": "between tokens"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    width = 0.38
    for ax, metric in zip(axes, METRICS):
        for i, api in enumerate(APIS):
            rows = [table[(api, c)][metric] for c in args.sessions]
            xs = [x + (i - 0.5) * width for x in range(len(args.sessions))]
            ax.bar(xs, [r["median"] for r in rows], width, label=api, capsize=3,
                   yerr=[[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]])
        ax.set_xticks(range(len(args.sessions)), [f"{c} session{'s' * (c > 1)}" for c in args.sessions])
        ax.set(ylabel="ms (client side)", title=titles[metric])
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def count_mismatches(results: dict, sessions: list[int]) -> int:
    """Generations whose text differs between the APIs, same round and question (the work must be the same)."""
    mismatches = 0
    for c in sessions:
        for grpc_round, http_round in zip(results[("grpc", c)], results[("http", c)]):
            texts = {r["question"]: r.get("text") for r in grpc_round}
            mismatches += sum(texts.get(r["question"]) != r.get("text") for r in http_round)
    return mismatches


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sessions", nargs="+", type=int, default=[1, 16])
    p.add_argument("--requests", type=int, default=4, help="generations each session streams back to back")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    problems = heldout(200)
    cells = [(api, c) for api in APIS for c in args.sessions]
    results: dict = {cell: [] for cell in cells}
    http_port = free_port()
    serving = ["--http-port", str(http_port), "--max-sessions", "64"]
    with tempfile.TemporaryDirectory(prefix="rstitch-http-bench-") as logs, \
            LocalDeployment(log_dir=logs, orchestrator_args=serving) as d:
        target = {"grpc": d.address, "http": f"http://127.0.0.1:{http_port}/v1"}
        with openai.OpenAI(base_url=target["http"], api_key="unused") as client:
            target["model"] = client.models.list().data[0].id
        rng = random.Random(args.seed)
        for c in args.sessions:  # a warm-up per concurrency, not measured
            for api in APIS:
                run_cell(target, api, c, [q.question for q in rng.sample(problems, c)], args.max_new_tokens)
        with tqdm(total=len(cells) * args.rounds, desc="cells") as bar:
            for _ in range(args.rounds):
                questions = {c: [q.question for q in rng.sample(problems, c * args.requests)] for c in args.sessions}
                for api, c in rng.sample(cells, len(cells)):
                    results[(api, c)].append(run_cell(target, api, c, questions[c], args.max_new_tokens))
                    bar.update()
    table = summarize({cell: [medians(r) for r in per_round] for cell, per_round in results.items()}, args.sessions)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http.json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]),
         "table": {"/".join(map(str, k)): v for k, v in table.items()}}, indent=1))
    write_markdown(table, args, count_mismatches(results, args.sessions), args.out / "http.md")
    plot(table, args, args.out / "http.png")
    print((args.out / "http.md").read_text())


if __name__ == "__main__":
    main()
