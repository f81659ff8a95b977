"""Which distribution should R-Stitch's entropy gate read when decoding samples? An experiment.

    python bench/gate_distribution.py [--problems 100] [--seeds 3] [--out docs/sampling-gate]

The engines sample from the tempered, truncated distribution (temperature 0.6, top-p 0.95 here). The
gate can read the entropy of the model's own distribution p (what the paper measures: the model's
uncertainty) or of the distribution it samples from. This runs the entropy policy at several tau
with each, on the trained pair in-process (one generation at a time; the same problems, seeds and
draws for both), and reports accuracy, the LLM's share of tokens, switches and latency. The serving
engines read p; the "sampled" variant swaps the entropy of each sampled row for that of its sampling
distribution in this process only.
"""

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from engine import sampling
from engine.default_models import default_model_path
from engine.hf import HFEngine
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch.v1 import orchestrator_pb2 as opb
from training.task import heldout, score

TAUS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
SAMPLING = dict(temperature=0.6, top_p=0.95)


@contextmanager
def gate_reads_the_sampling_distribution():
    """engine.sampling.choose with each sampled row's entropy that of its sampling distribution."""
    real = sampling.choose

    def choose(logits, vocab_size, rows):
        choice = real(logits, vocab_size, rows)
        picked = [i for i, row in enumerate(rows) if sampling.sampled(row.sampling)]
        if picked:
            probs = sampling.sampling_probs(logits[picked, :vocab_size].float(), [rows[i].sampling for i in picked])
            plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
            entropy = (-plogp.sum(-1) / torch.log(torch.tensor(float(vocab_size)))).clamp(0, 1).tolist()
            for i, h in zip(picked, entropy):
                choice.entropies[i] = h
        return choice

    sampling.choose = choose
    try:
        yield
    finally:
        sampling.choose = real


def run(orchestrator, problems, tau, seed, bar):
    rows = []
    for i, problem in enumerate(problems):
        spec = opb.GenerationSpec(text=problem.question, policy=opb.POLICY_ENTROPY, tau=tau, max_new_tokens=64,
                                  seed=seed * 100_000 + i, **SAMPLING)
        started = time.perf_counter()
        session = orchestrator.complete(spec)
        rows.append({"correct": score(session.text, problem), "latency_ms": (time.perf_counter() - started) * 1e3,
                     "llm": session.stats.llm_tokens, "tokens": session.stats.llm_tokens + session.stats.slm_tokens,
                     "switches": session.stats.switches})
        bar.update()
    return {"accuracy": 100 * statistics.fmean(r["correct"] for r in rows),
            "llm_share": 100 * sum(r["llm"] for r in rows) / sum(r["tokens"] for r in rows),
            "switches": statistics.fmean(r["switches"] for r in rows),
            "latency_ms": statistics.fmean(r["latency_ms"] for r in rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/sampling-gate"))
    args = parser.parse_args(argv)
    engines = {role: HFEngine(default_model_path(role), role=role, threads=1) for role in ("slm", "llm")}
    orchestrator = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                                MemorySessionStore())
    problems = heldout(args.problems)
    results = {}  # (variant, tau) -> per-seed summaries
    with tqdm(total=2 * len(TAUS) * args.seeds * len(problems), file=sys.stderr) as bar:
        for seed in range(args.seeds):
            for tau in TAUS:  # the two variants back to back: machine drift hits both alike
                results.setdefault(("model", tau), []).append(run(orchestrator, problems, tau, seed, bar))
                with gate_reads_the_sampling_distribution():
                    results.setdefault(("sampled", tau), []).append(run(orchestrator, problems, tau, seed, bar))
    write(results, args)


def write(results, args):
    command = " ".join(["python", "bench/gate_distribution.py", *sys.argv[1:]])
    lines = ["| gate reads | tau | accuracy % (min-max over seeds) | LLM share of tokens % | switches | latency ms |",
             "|---|--:|--:|--:|--:|--:|"]
    for (variant, tau), runs in results.items():
        mean = lambda key: statistics.fmean(r[key] for r in runs)  # noqa: E731
        accuracies = [r["accuracy"] for r in runs]
        lines.append(f"| {'the model' if variant == 'model' else 'the sampling distribution'} | {tau} "
                     f"| {mean('accuracy'):.1f} ({min(accuracies):.1f}-{max(accuracies):.1f}) | {mean('llm_share'):.1f} "
                     f"| {mean('switches'):.1f} | {mean('latency_ms'):.1f} |")
    table = "\n".join(lines)
    args.out.with_suffix(".md").write_text(
        f"`{command}`: {args.problems} held-out problems x {args.seeds} seeds, trained pair in-process, temperature "
        f"{SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, entropy policy.\n\n{table}\n")
    _plot(results, args.out.with_suffix(".png"), command)
    print(table)


def _plot(results, path, command):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for variant, style, label in (("model", "o-", "gate reads the model's distribution"),
                                  ("sampled", "s--", "gate reads the sampling distribution")):
        pts = [(statistics.fmean(r["llm_share"] for r in runs), statistics.fmean(r["accuracy"] for r in runs), tau)
               for (v, tau), runs in results.items() if v == variant]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for x, y, tau in pts:
            ax.annotate(f"tau={tau}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="LLM share of answer tokens (%)", ylabel="held-out accuracy (%)",
           title="Entropy gate under sampling (T=0.6, top-p 0.95)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, command, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
