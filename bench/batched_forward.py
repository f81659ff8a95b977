"""Throughput of the batched runner against one plain forward at a time (the hf engine today).

    python bench/batched_forward.py [--concurrency 1 16 64] [--new-tokens 32] [--rounds 3] [--threads 2]

N greedy decoders on the trained LLM (engine.default_models.default_model_path("llm"), float32), each
prefilling its own prompt and then decoding --new-tokens tokens (EOS ignored, so every run does the
same work):
  plain:  one DynamicCache per decoder, forwards one at a time, round robin over the decoders (what
          HFEngine's model lock does with N concurrent sessions);
  runner: N threads, each calling BatchedRunner.forward for its prefill and every token, so the
          forwards are shared.
tok/s counts decoded tokens over the wall time of the whole run, prefills included. Both modes must
decode the same tokens. Rounds interleave the modes (A/B, then B/A); the table shows medians.
Prints a table; writes nothing.
"""

import argparse
import os
import random
import statistics
import threading
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from engine.default_models import build_tokenizer, default_model_path
from engine.kv_pool import KVPool
from engine.scheduler import BatchedRunner


def prompts(n: int) -> list[list[int]]:
    """Problems of the trained pair's task (training/task.py shape), in its chat template."""
    rng, tokenizer = random.Random(0), build_tokenizer()
    texts = [f"({rng.randint(1, 99)}*{rng.randint(2, 9)}-{rng.randint(1, 99)})*{rng.randint(2, 9)}" for _ in range(n)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


@torch.inference_mode()
def run_plain(model, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    caches = [DynamicCache(config=model.config) for _ in batch]
    nexts = [int(model(input_ids=torch.tensor([p]), cache=c, use_cache=True).logits[0, -1].argmax())
             for p, c in zip(batch, caches)]
    out = [[t] for t in nexts]
    for _ in range(new_tokens - 1):
        for i, cache in enumerate(caches):
            logits = model(input_ids=torch.tensor([[out[i][-1]]]), cache=cache, use_cache=True).logits
            out[i].append(int(logits[0, -1].argmax()))
    return out


def run_batched(runner: BatchedRunner, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in batch]
    start = threading.Barrier(len(batch))

    def decode(i: int) -> None:
        slot = runner.pool.allocate()
        try:
            start.wait()
            prompt = batch[i]
            logits = runner.forward(slot, 0, prompt).logits
            for _ in range(new_tokens):
                out[i].append(int(logits[-1].argmax()))
                if len(out[i]) < new_tokens:
                    logits = runner.forward(slot, len(prompt) + len(out[i]) - 1, out[i][-1:]).logits
        finally:
            runner.pool.free(slot)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def timed(fn, *args):
    began = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_path("llm")
    load = lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()  # noqa: E731
    plain_model, runner_model = load(), load()  # two copies: the plain one keeps transformers' sdpa
    pool = KVPool.for_model(runner_model, budget_tokens=max(args.concurrency) * 256, max_context=256)
    rates: dict[tuple[str, int], list[float]] = {}
    steps: dict[int, list[float]] = {}
    with BatchedRunner(runner_model, pool) as runner:
        run_batched(runner, prompts(4), 4)  # warm-up: first-call costs out of the table
        run_plain(plain_model, prompts(1), 4)
        for round_ in range(args.rounds):
            for n in args.concurrency:
                batch, tokens = prompts(n), n * args.new_tokens
                modes = ["plain", "runner"] if round_ % 2 == 0 else ["runner", "plain"]
                outputs = {}
                for mode in modes:
                    before = runner.stats.steps
                    if mode == "plain":
                        outputs[mode], seconds = timed(run_plain, plain_model, batch, args.new_tokens)
                    else:
                        outputs[mode], seconds = timed(run_batched, runner, batch, args.new_tokens)
                        steps.setdefault(n, []).append(tokens / (runner.stats.steps - before))
                    rates.setdefault((mode, n), []).append(tokens / seconds)
                if outputs["plain"] != outputs["runner"]:
                    raise SystemExit(f"concurrency {n}: the runner decoded other tokens than the plain forwards")
    print(f"trained LLM {path.name}, float32, {args.threads} torch threads, {os.cpu_count()} CPUs, "
          f"{args.new_tokens} new tokens per decoder, median of {args.rounds} interleaved rounds; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| decoders | plain forwards tok/s | batched runner tok/s | speedup | runner: decoded tokens per forward |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.concurrency:
        plain, batched = statistics.median(rates[("plain", n)]), statistics.median(rates[("runner", n)])
        print(f"| {n} | {plain:,.0f} | {batched:,.0f} | {batched / plain:.1f}x | "
              f"{statistics.median(steps[n]):.1f} |")


if __name__ == "__main__":
    main()
