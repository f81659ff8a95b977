"""Accuracy against latency: every policy on held-out problems, through the real services.

    python bench/tradeoff.py [--problems N] [--out docs/tradeoff]
    python bench/tradeoff.py --sampled [--seeds 3] [--out docs/tradeoff-sampled]

--sampled decodes with temperature 0.6 and top-p 0.95 (what the DeepSeek-R1-Distill family
recommends) for every method, each problem once per seed; the table gives the mean over seeds with
its spread (min-max), the plot error bars. Without it, greedy, and also the entropy analysis.

Starts the default deployment (both engine services, the orchestrator and a private redis-server
as separate processes), runs every method on the same held-out problems one generation at a
time (batch 1, as in the paper), the methods taking turns problem by problem so machine drift hits
them alike, and writes:
  docs/tradeoff.md    the table (paper Table 1 / Tables 5-14) and the entropy analysis (section 3.2.1)
  docs/tradeoff.png   accuracy against mean latency, one curve per method (paper Figure 4)
  docs/entropy.png    the entropy analysis (paper Figure 3)
  docs/tradeoff.json  every number the tables were made from
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from rstitch import RStitchClient
from rstitch.local import LocalDeployment
from training.task import heldout, score

TAUS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3]
SLM_PROBABILITIES = [0.1, 0.3, 0.5, 0.7, 0.9]
LOW_ENTROPY = 0.1
WINDOW = 5  # tokens before (and including) the first harmful token, as in the paper's Figure 3c
SAMPLING = {"temperature": 0.6, "top_p": 0.95}


def routers():
    """The committed R-Stitch+ routers (models/rstitch-router*.safetensors): the default one and the
    others of its lambda sweep (docs/router.md)."""
    from engine.default_models import trained_models_dir
    from orchestrator.router import Router

    seen = set()
    for path in sorted(trained_models_dir().glob("rstitch-router*.safetensors")):
        data = path.read_bytes()
        if data not in seen:  # the default router is a copy of one of the sweep's
            seen.add(data)
            about = Router.from_bytes(data).about
            start = " imitation" if "imitation" in about else ""  # warm-started from a fixed tau
            yield f"router lam={about['lambda']}{start}", {"policy": "router", "tau": about["tau"], "router": data}


def methods():
    yield "llm", {"policy": "llm"}
    yield "slm", {"policy": "slm"}
    yield "spec k=4", {"policy": "spec", "draft_tokens": 4}
    for p in SLM_PROBABILITIES:
        yield f"random p={p}", {"policy": "random", "slm_probability": p}
    for tau in TAUS:
        yield f"entropy tau={tau}", {"policy": "entropy", "tau": tau}
    yield from routers()


def run_one(client, problem, i, options, max_new_tokens, seed=0, sampled=False):
    """The generation of the i-th problem, with seed seed*100000+i (random routing's draws, and with
    `sampled` the SAMPLING draws)."""
    draws = {**(SAMPLING if sampled else {}), "seed": seed * 100_000 + i}
    started = time.perf_counter()
    result = client.generate(problem.question, max_new_tokens=max_new_tokens, **options, **draws)
    return {"latency_ms": (time.perf_counter() - started) * 1e3, "correct": score(result.text, problem),
            "token_ids": result.token_ids, "sources": result.sources, "entropies": result.entropies,
            "prompt_token_ids": result.prompt_token_ids, "text": result.text, "stats": result.stats}


def summarize_seeds(name, runs_by_seed, llm_by_seed):
    """summarize() per seed, then the mean of each number with its min and max over the seeds."""
    per_seed = [summarize(name, runs, llm) for runs, llm in zip(runs_by_seed, llm_by_seed)]
    row = {"method": name, "seeds": len(per_seed)}
    for key in per_seed[0]:
        if key != "method":
            values = [r[key] for r in per_seed]
            row[key], row[key + "_min"], row[key + "_max"] = statistics.fmean(values), min(values), max(values)
    return row


def summarize(name, runs, llm):
    stats = [r["stats"] for r in runs]
    mean = lambda key: statistics.fmean(s[key] for s in stats)  # noqa: E731
    row = {
        "method": name,
        "accuracy": 100 * statistics.fmean(r["correct"] for r in runs),
        "latency_ms": statistics.fmean(r["latency_ms"] for r in runs),
        "llm_tokens": mean("llm_tokens"), "slm_tokens": mean("slm_tokens"),
        "total_tokens": mean("llm_tokens") + mean("slm_tokens"), "switches": mean("switches"),
    }
    if llm is not None:
        row["speedup"] = llm["latency_ms"] / row["latency_ms"]
        row["token_reduction"] = 100 * (1 - row["total_tokens"] / llm["total_tokens"])
    if sum(s["drafted_tokens"] for s in stats):
        row["acceptance"] = 100 * sum(s["accepted_tokens"] for s in stats) / sum(s["drafted_tokens"] for s in stats)
    return row


def first_harmful(client, problem, slm, max_new_tokens, decode) -> int | None:
    """The first SLM token whose inclusion flips the LLM's answer from right to wrong (paper 3.2.1):
    the LLM finishes the SLM's answer cut after each token in turn. Before the SLM's first departure
    from the worked solution every prefix is a right one, so the search starts there."""
    text = decode(slm["token_ids"])
    start = next((i for i, (a, b) in enumerate(zip(text, problem.solution)) if a != b), min(len(text), len(problem.solution)))
    for i in range(start, len(slm["token_ids"])):
        prefix = slm["token_ids"][: i + 1]
        finished = client.generate(slm["prompt_token_ids"] + prefix, policy="llm", max_new_tokens=max_new_tokens)
        if not score(decode(prefix) + finished.text, problem):
            return i
    return None


def entropy_analysis(client, problems, slm_runs, llm_runs, max_new_tokens, decode):
    """Mean entropy of right vs wrong SLM answers, share of low-entropy tokens, and the entropy
    around the first harmful token against the overall mean."""
    all_entropies = [h for r in slm_runs for h in r["entropies"]]
    right = [statistics.fmean(r["entropies"]) for r in slm_runs if r["correct"] and r["entropies"]]
    wrong = [statistics.fmean(r["entropies"]) for r in slm_runs if not r["correct"] and r["entropies"]]
    harmful = []  # (entropy of the harmful token, mean entropy of the window ending at it)
    cases = [(p, s) for p, s, big in zip(problems, slm_runs, llm_runs) if big["correct"] and not s["correct"]]
    for problem, slm in tqdm(cases, desc="first harmful tokens", file=sys.stderr):
        i = first_harmful(client, problem, slm, max_new_tokens, decode)
        if i is not None:
            window = slm["entropies"][max(0, i - WINDOW + 1): i + 1]
            harmful.append((slm["entropies"][i], statistics.fmean(window), i))
    return {
        "slm_tokens": len(all_entropies),
        "mean_entropy_all": statistics.fmean(all_entropies),
        "mean_entropy_correct": statistics.fmean(right) if right else None,
        "mean_entropy_incorrect": statistics.fmean(wrong) if wrong else None,
        "solutions_correct": len(right), "solutions_incorrect": len(wrong),
        "share_low_entropy": 100 * sum(h <= LOW_ENTROPY for h in all_entropies) / len(all_entropies),
        "harmful_cases": len(cases), "harmful_found": len(harmful),
        "harmful_token_entropy": statistics.fmean(h[0] for h in harmful) if harmful else None,
        "harmful_window_entropy": statistics.fmean(h[1] for h in harmful) if harmful else None,
        "harmful": harmful, "all_entropies": all_entropies, "correct_means": right, "incorrect_means": wrong,
    }


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def write_table(rows, analysis, args, info, path):
    lines = [
        "# Accuracy against latency on the trained pair",
        "",
        f"Made by `{' '.join(['python', 'bench/tradeoff.py', *sys.argv[1:]])}` on {info['date']} "
        f"({info['machine']}). {args.problems} held-out problems, greedy, batch 1, one generation at a time "
        "through the split deployment (engine services, orchestrator, Redis; gRPC). Latency is the client's "
        "wall time per problem; tokens are means per problem; speedup and token reduction are against LLM-only.",
        "",
        "| method | accuracy % | latency ms | speedup | LLM tokens | SLM tokens | total tokens | token reduction % "
        "| switches | spec acceptance % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.1f} | {r['latency_ms']:.1f} | {fmt(r.get('speedup'), 2)}x "
                     f"| {r['llm_tokens']:.1f} | {r['slm_tokens']:.1f} | {r['total_tokens']:.1f} "
                     f"| {fmt(r.get('token_reduction'))} | {r['switches']:.1f} | {fmt(r.get('acceptance'))} |")
    a = analysis
    lines += [
        "",
        f"spec equals LLM-only token for token on {info['spec_equal']} of {args.problems} problems.",
        "",
        "![accuracy against latency](tradeoff.png)",
        "",
        "## Entropy analysis (paper section 3.2.1, Figure 3) on the SLM's own answers",
        "",
        f"- Mean token entropy of correct SLM solutions: {fmt(a['mean_entropy_correct'], 4)} "
        f"({a['solutions_correct']} solutions); of incorrect ones: {fmt(a['mean_entropy_incorrect'], 4)} "
        f"({a['solutions_incorrect']}).",
        f"- Share of SLM tokens with entropy <= {LOW_ENTROPY}: {a['share_low_entropy']:.1f}% of {a['slm_tokens']}.",
        f"- First harmful token (the first SLM token whose inclusion makes the LLM's continuation wrong), on the "
        f"{a['harmful_cases']} problems the LLM gets right and the SLM wrong ({a['harmful_found']} located): "
        f"its own entropy averages {fmt(a['harmful_token_entropy'], 4)}, the {WINDOW} tokens ending at it "
        f"{fmt(a['harmful_window_entropy'], 4)}, against {a['mean_entropy_all']:.4f} over all SLM tokens.",
        "",
        "![entropy analysis](entropy.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(rows, out, sampled: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    labels = {"entropy": "R-Stitch (entropy, fixed tau)", "random": "random routing",
              "router": "R-Stitch+ (router, lambda sweep)"}
    spread = lambda rs, key: [[r[key] - r[key + "_min"] for r in rs], [r[key + "_max"] - r[key] for r in rs]]  # noqa: E731
    for prefix, style in (("entropy", "o-"), ("random", "s--"), ("router", "^-")):
        pts = sorted((r for r in rows if r["method"].startswith(prefix)), key=lambda r: r["latency_ms"])
        ax.errorbar([r["latency_ms"] for r in pts], [r["accuracy"] for r in pts], fmt=style, label=labels[prefix],
                    xerr=spread(pts, "latency_ms"), yerr=spread(pts, "accuracy"), capsize=2)
        for r in pts:
            ax.annotate(r["method"].split(" ", 1)[1], (r["latency_ms"], r["accuracy"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    for r in rows:
        if r["method"] in ("llm", "slm", "spec k=4"):
            ax.errorbar(r["latency_ms"], r["accuracy"], xerr=spread([r], "latency_ms"), yerr=spread([r], "accuracy"),
                        fmt="*", markersize=12, capsize=2,
                        label=f"{r['method']}-only" if r["method"] != "spec k=4" else "speculative (k=4)")
    ax.set_xscale("log")  # speculative decoding can be several times LLM-only; R-Stitch's points stay apart
    ax.set_xlabel("mean latency per problem (ms, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    seeds = rows[0]["seeds"]
    ax.set_title("Accuracy against latency (batch 1, split deployment" +
                 (f";\nsampled, {seeds} seeds, min-max)" if sampled else ")"), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def plot_entropy(a, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].boxplot([a["correct_means"] or [0], a["incorrect_means"] or [0]], tick_labels=["correct", "incorrect"])
    axes[0].set_title("(a) mean token entropy per SLM solution")
    axes[1].hist(a["all_entropies"], bins=50, log=True)
    axes[1].set_title("(b) SLM token entropies (log count)")
    axes[1].set_xlabel("normalized entropy")
    bars = [a["mean_entropy_all"], a["harmful_window_entropy"] or 0, a["harmful_token_entropy"] or 0]
    axes[2].bar(["all tokens", f"{WINDOW} tokens ending\nat first harmful", "first harmful\ntoken"], bars)
    axes[2].set_title("(c) entropy around the first harmful token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=200, help="held-out problems per method")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sampled", action="store_true", help=f"decode with {SAMPLING}, --seeds times")
    parser.add_argument("--seeds", type=int, default=3, help="with --sampled: runs of every method, seed 0..N-1")
    parser.add_argument("--out", help="path prefix of the outputs (default docs/tradeoff, or docs/tradeoff-sampled)")
    args = parser.parse_args(argv)
    out = Path(args.out or ("docs/tradeoff-sampled" if args.sampled else "docs/tradeoff"))
    out.parent.mkdir(parents=True, exist_ok=True)
    problems = heldout(args.problems)
    all_methods = list(methods())
    seeds = list(range(args.seeds)) if args.sampled else [0]
    print("starting the deployment...", file=sys.stderr)
    with LocalDeployment() as deployment, RStitchClient(deployment.address) as client:
        client.generate(problems[0].question, policy="entropy")  # warm-up
        runs = {name: [[] for _ in seeds] for name, _ in all_methods}
        with tqdm(total=len(all_methods) * len(problems) * len(seeds), desc="generations", file=sys.stderr) as bar:
            for seed in seeds:
                bar.set_postfix_str(f"seed {seed}")
                for i, problem in enumerate(problems):  # every method on a problem in turn: drift hits all alike
                    for name, options in all_methods:
                        runs[name][seed].append(run_one(client, problem, i, options, args.max_new_tokens, seed,
                                                        args.sampled))
                        bar.update()
        analysis = None if args.sampled else entropy_analysis(client, problems, runs["slm"][0], runs["llm"][0],
                                                              args.max_new_tokens, _decode)
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, "
                   f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "spec_equal": sum(s["token_ids"] == big["token_ids"] for s, big in zip(runs["spec k=4"][0], runs["llm"][0])),
    }
    llm = [summarize("llm", r, None) for r in runs["llm"]]
    rows = [summarize_seeds(name, runs[name], llm) for name, _ in all_methods]
    if args.sampled:
        write_sampled_table(rows, args, info, out.with_suffix(".md"))
    else:
        write_table(rows, analysis, args, info, out.with_suffix(".md"))
    plot(rows, out, args.sampled)
    if analysis is not None:
        plot_entropy(analysis, out.parent / "entropy.png")
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows, "analysis": analysis and {
        k: v for k, v in analysis.items() if k not in ("all_entropies",)}}, indent=1))
    print(out.with_suffix(".md").read_text())
    if not args.sampled and info["spec_equal"] != args.problems:
        sys.exit(f"spec differed from LLM-only on {args.problems - info['spec_equal']} problems")


def _decode(ids):
    from engine.default_models import build_tokenizer

    return build_tokenizer().decode(ids, skip_special_tokens=True)


def write_sampled_table(rows, args, info, path):
    lines = [
        "# Accuracy against latency on the trained pair, sampled",
        "",
        f"Made by `{' '.join(['python', 'bench/tradeoff.py', *sys.argv[1:]])}` on {info['date']} "
        f"({info['machine']}). {args.problems} held-out problems, temperature {SAMPLING['temperature']}, top-p "
        f"{SAMPLING['top_p']}, {args.seeds} seeds (every method on one problem in turn), "
        "batch 1, one generation at a time through the split deployment. Each number is the mean over the seeds, "
        "with its spread (min-max) for accuracy and latency; speedup and token reduction are against LLM-only "
        "of the same seed.",
        "",
        "| method | accuracy % (min-max) | latency ms (min-max) | speedup | LLM tokens | SLM tokens | total tokens "
        "| token reduction % | switches | spec acceptance % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.1f} ({r['accuracy_min']:.1f}-{r['accuracy_max']:.1f}) "
                     f"| {r['latency_ms']:.1f} ({r['latency_ms_min']:.1f}-{r['latency_ms_max']:.1f}) "
                     f"| {fmt(r.get('speedup'), 2)}x | {r['llm_tokens']:.1f} | {r['slm_tokens']:.1f} "
                     f"| {r['total_tokens']:.1f} | {fmt(r.get('token_reduction'))} | {r['switches']:.1f} "
                     f"| {fmt(r.get('acceptance'))} |")
    lines += ["", f"![accuracy against latency, sampled]({path.with_suffix('.png').name})"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
