"""What the vllm engines alone cost R-Stitch against LLM-only under concurrency, per backend variant, side by side.

    git show REV:engine/vllm_backend.py > /tmp/vllm_backend_before.py   # a variant to compare with
    python bench/vllm_spans.py --variants before=/tmp/vllm_backend_before.py after=engine/vllm_backend.py \\
                               [--concurrency 1 16 64] [--rounds 3] [--problems 16]

1. Records the engine calls the orchestrator makes for held-out problems, in process on the hf backend
   (greedy: every backend then decodes exactly these spans): R-Stitch (entropy policy, tau 0.05) on both
   engines, and LLM-only on the LLM.
2. Replays them on one vllm engine per variant and role (a module file defining VLLMEngine): per pattern
   (the SLM's R-Stitch calls, the LLM's R-Stitch calls, LLM-only), `concurrency` sessions at once, each
   replaying one recorded generation. One engine steps at a time (two in-process vLLM engines stepping
   together crash); rounds are interleaved, the variants' order alternating.

Reports answer tokens/s per cell (median, min-max), each variant's step counters where it has them, and
the engine seconds per answer token of R-Stitch (its SLM and LLM replays) over LLM-only's: what the
engines alone allow R-Stitch, before RPC, the orchestrator and Redis take their share.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TAU = 0.05  # the orchestrator's default (docs/tradeoff.md)
PATTERNS = {"rstitch-slm": "slm", "rstitch-llm": "llm", "llm-only": "llm"}


@dataclass
class Trace:
    """One pattern's recorded calls: per generation, its (kind, request) calls in order; and the answer
    tokens its spans committed over all generations."""
    generations: list[list] = field(default_factory=list)
    committed: int = 0


def record(problems: int, max_new_tokens: int) -> dict[str, Trace]:
    from engine.default_models import default_model_path
    from engine.hf import HFEngine
    from orchestrator.engine_client import LocalEngineClient
    from orchestrator.service import Orchestrator
    from orchestrator.store import MemorySessionStore
    from rstitch.v1 import orchestrator_pb2 as opb
    from training.task import heldout

    class Recording(LocalEngineClient):
        def __init__(self, engine, calls: list, trace: Trace):
            super().__init__(engine)
            self.calls, self.trace = calls, trace

        def stream_span(self, req, timeout=None):
            self.calls.append(("prefill", req))
            out = yield from super().stream_span(req, timeout)
            self.trace.committed += len(out.span.token_ids)
            return out

        def prefill(self, req, timeout=None):
            self.calls.append(("prefill", req))
            out = super().prefill(req, timeout)
            self.trace.committed += len(out.span.token_ids)
            return out

        def release(self, req, timeout=None):
            self.calls.append(("release", req))
            return super().release(req, timeout)

    engines = {role: HFEngine(default_model_path(role), role=role) for role in ("slm", "llm")}
    traces = {name: Trace() for name in PATTERNS}
    for policy, names in ((opb.POLICY_ENTROPY, {"slm": "rstitch-slm", "llm": "rstitch-llm"}),
                          (opb.POLICY_LLM, {"slm": None, "llm": "llm-only"})):
        calls = {role: [] for role in engines}
        clients = {role: Recording(engines[role], calls[role], traces[names[role]] if names[role] else Trace())
                   for role in engines}
        orchestrator = Orchestrator(clients["slm"], clients["llm"], MemorySessionStore())
        for problem in heldout(problems):
            orchestrator.complete(opb.GenerationSpec(text=problem.question, policy=policy, tau=TAU,
                                                     max_new_tokens=max_new_tokens))
        for role, name in names.items():
            generations = defaultdict(list)
            for kind, req in calls[role]:
                generations[req.session_id].append((kind, req))
            if name:
                traces[name].generations = list(generations.values())
    return traces


def replay(engine, calls: list, tag: str) -> int:
    """One recorded generation on `engine` under fresh session ids; the tokens its spans committed."""
    committed = 0
    for kind, recorded in calls:
        req = type(recorded)()
        req.CopyFrom(recorded)
        req.session_id += tag
        if kind == "prefill":
            committed += len(engine.prefill(req).span.token_ids)
        else:
            engine.release(req)
    return committed


def run_cell(engine, generations: list, concurrency: int, tag: str) -> dict:
    """`concurrency` sessions at once, each replaying one generation: committed tokens/s, and the
    engine's step counters over the cell."""
    counts = [0] * concurrency

    def session(i):
        counts[i] = replay(engine, generations[i % len(generations)], f"-{tag}-{i}")

    threads = [threading.Thread(target=session, args=(i,)) for i in range(concurrency)]
    before = engine.load()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = engine.load()
    steps = after.get("steps", 0) - before.get("steps", 0)
    return {"tokens_per_s": sum(counts) / wall, "steps": steps,
            "tokens_per_step": (after.get("step_tokens", 0) - before.get("step_tokens", 0)) / max(1, steps),
            "ms_per_step": 1e3 * (after.get("busy_seconds", 0) - before.get("busy_seconds", 0)) / max(1, steps)}


def load_variant(name: str, path: Path):
    """A module file defining VLLMEngine, imported as a module of the engine package (its relative
    imports are this tree's engine modules)."""
    spec = importlib.util.spec_from_file_location(f"engine._bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "engine"
    spec.loader.exec_module(module)
    return module


def engine_seconds_ratio(results: dict, traces: dict[str, Trace], variant: str, concurrency: int) -> float:
    """Engine seconds per answer token of R-Stitch (its SLM's and LLM's replays) over LLM-only's."""
    seconds = {p: traces[p].committed / statistics.median(r["tokens_per_s"] for r in results[(variant, p, concurrency)])
               for p in traces}
    answer = traces["rstitch-slm"].committed + traces["rstitch-llm"].committed
    llm_only = seconds["llm-only"] / traces["llm-only"].committed
    return (seconds["rstitch-slm"] + seconds["rstitch-llm"]) / answer / llm_only


def report(results: dict, traces: dict[str, Trace], variants: list[str], args) -> str:
    command = " ".join(["python", *sys.argv])
    lines = [(f"`{command}`: committed tokens/s, median (min-max) over {args.rounds} interleaved rounds; with the "
              "variant's step counters (Info) where it has them: tokens fed per step, ms per step."), "",
             "| pattern | sessions | " + " | ".join(variants) + " |", "|---|--:|" + "--:|" * len(variants)]
    for pattern in traces:
        for c in args.concurrency:
            cells = []
            for variant in variants:
                runs = results[(variant, pattern, c)]
                speeds = [r["tokens_per_s"] for r in runs]
                cell = f"{statistics.median(speeds):.0f} ({min(speeds):.0f}-{max(speeds):.0f})"
                if any(r["steps"] for r in runs):
                    cell += (f"; {statistics.median(r['tokens_per_step'] for r in runs):.0f} tok, "
                             f"{statistics.median(r['ms_per_step'] for r in runs):.1f} ms")
                cells.append(cell)
            lines.append(f"| {pattern} | {c} | " + " | ".join(cells) + " |")
    lines += ["", "Engine seconds per answer token, R-Stitch over LLM-only (below 1: R-Stitch's engines are cheaper):",
              "", "| sessions | " + " | ".join(variants) + " |", "|--:|" + "--:|" * len(variants)]
    for c in args.concurrency:
        lines.append(f"| {c} | " + " | ".join(f"{engine_seconds_ratio(results, traces, v, c):.2f}" for v in variants)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["current=engine/vllm_backend.py"],
                   help="NAME=FILE: a vllm backend module file to run")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--problems", type=int, default=16, help="held-out problems recorded (sessions cycle over them)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--kv-budget-mb", type=float, default=256)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    variants = dict(v.split("=", 1) for v in args.variants)
    traces = record(args.problems, args.max_new_tokens)
    from engine.default_models import default_model_path

    engines = {}
    for name, path in variants.items():
        backend = load_variant(name, Path(path))
        for role in ("slm", "llm"):
            engines[(name, role)] = backend.VLLMEngine(default_model_path(role), role=role,
                                                       kv_budget_mb=args.kv_budget_mb)
    results = defaultdict(list)
    order = list(variants)
    for round_ in range(args.rounds):
        for pattern, role in PATTERNS.items():
            for c in args.concurrency:
                for name in order:
                    results[(name, pattern, c)].append(
                        run_cell(engines[(name, role)], traces[pattern].generations, c,
                                 f"{round_}-{name}-{pattern}-{c}"))
        order.reverse()
    print(report(results, traces, list(variants), args))


if __name__ == "__main__":
    main()
