"""Source trees' split deployments on the vllm backend side by side: R-Stitch against LLM-only, and where the CPU goes.

    rsync -a --exclude .git ./ /tmp/before/ && git show REV:engine/vllm_backend.py > /tmp/before/engine/vllm_backend.py
    python bench/vllm_ab.py --trees before=/tmp/before after=. [--concurrency 1 16 64] [--rounds 3]

Starts one split deployment (both engine services on --backend vllm, the orchestrator, a private
redis-server; bench/concurrency.py's settings) per tree, each service run from its tree's directory,
then runs bench/concurrency.py's cells (streamed sessions on held-out problems) for the llm and entropy
policies, in an order shuffled per round, so that every tree sees the same machine load. Prints, per
cell, answer tokens/s (median, min-max over the rounds), R-Stitch over LLM-only, and the CPU time per
answer token of each process (engine services, orchestrator, the benchmark's own client threads): on a
machine whose cores all processes share, that sum is what sets the throughput under load.
"""

import argparse
import os
import random
import statistics
import sys
from contextlib import ExitStack, chdir
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil
from concurrency import run_cell  # bench/concurrency.py, beside this file

from orchestrator.engine_client import GrpcEngineClient
from rstitch.local import LocalDeployment
from training.task import heldout

POLICIES = ("llm", "entropy")
PROCESSES = ("slm", "llm", "orchestrator", "client")


@dataclass
class Deployed:
    address: str
    engines: dict  # role -> GrpcEngineClient (bench/concurrency.py reads their Info)
    processes: dict  # PROCESSES -> psutil.Process


def deploy(stack: ExitStack, tree: Path, log_dir: Path) -> Deployed:
    engine = ["--backend", "vllm", "--kv-budget-mb", "256"]
    log_dir.mkdir()
    with chdir(tree):  # `python -m slm_service` and the others import the tree they start in
        d = stack.enter_context(LocalDeployment(slm_args=engine, llm_args=engine, log_dir=log_dir,
                                                orchestrator_args=["--max-sessions", "128", "--max-queue", "128"],
                                                env={"PYTHONPATH": str(tree)}))
    pids = {"slm": d.slm.process.pid, "llm": d.llm.process.pid, "orchestrator": d.orchestrator.process.pid,
            "client": os.getpid()}
    return Deployed(d.address, {"slm": GrpcEngineClient(d.slm.address), "llm": GrpcEngineClient(d.llm.address)},
                    {name: psutil.Process(pid) for name, pid in pids.items()})


def measured_cell(deployed: Deployed, policy: str, concurrency: int, args, problems, round_: int) -> dict:
    result = run_cell(deployed.address, deployed.engines, deployed.processes, policy, concurrency, args.requests,
                      problems, args.seed + round_, args.max_new_tokens)
    if result["errors"]:
        print(f"{policy} x{concurrency}: errors {result['errors']}", file=sys.stderr)
    # CPU ms per answer token: cores x wall seconds over the tokens
    return {"tokens_per_s": result["tokens_per_s"],
            "cpu_ms": {name: 1e3 * cores / max(result["tokens_per_s"], 1e-9)
                       for name, cores in result["cpu_cores"].items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trees", nargs="+", required=True, help="NAME=DIR: a source tree to deploy")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--requests", type=int, default=2, help="generations each session streams back to back")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.trees)}
    problems = heldout(200)
    cells = [(tree, policy, c) for tree in trees for policy in POLICIES for c in args.concurrency]
    results: dict = {cell: [] for cell in cells}
    with ExitStack() as stack:
        logs = Path(stack.enter_context(TemporaryDirectory(prefix="rstitch-vllm-ab-")))
        deployed = {name: deploy(stack, tree, logs / name) for name, tree in trees.items()}
        rng = random.Random(args.seed)
        for round_ in range(args.rounds):
            for cell in rng.sample(cells, len(cells)):
                tree, policy, c = cell
                results[cell].append(measured_cell(deployed[tree], policy, c, args, problems, round_))
                print(f"round {round_} {cell}: {results[cell][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr,
                      flush=True)
    print(table(results, trees, args))


def table(results: dict, trees: dict, args) -> str:
    command = " ".join(["python", *sys.argv])
    lines = [(f"`{command}` ({os.uname().nodename}): answer tokens/s, median (min-max) over {args.rounds} interleaved "
              "rounds; CPU ms per answer token of each process (median over the rounds)."), "",
             f"| tree | policy | sessions | tokens/s | R-Stitch / LLM-only | CPU ms/token: {' / '.join(PROCESSES)} "
             "| sum |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for tree in trees:
        for c in args.concurrency:
            llm = statistics.median(r["tokens_per_s"] for r in results[(tree, "llm", c)])
            for policy in POLICIES:
                runs = results[(tree, policy, c)]
                speeds = [r["tokens_per_s"] for r in runs]
                cpu = {name: statistics.median(r["cpu_ms"][name] for r in runs) for name in PROCESSES}
                lines.append(f"| {tree} | {policy} | {c} | {statistics.median(speeds):.0f} ({min(speeds):.0f}-"
                             f"{max(speeds):.0f}) | {statistics.median(speeds) / llm:.2f} | "
                             + " / ".join(f"{cpu[name]:.2f}" for name in PROCESSES) + f" | {sum(cpu.values()):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
