"""Train one model of the pair on the arithmetic task, save it, and report held-out accuracy.

    python -m training.train --role slm --out models/rstitch-slm --max-steps 1000
    python -m training.train --role llm --out models/rstitch-llm --minutes 27
    python -m training.train --role llm --out models/rstitch-llm --minutes 5 --resume --lr 3e-4
    python -m training.train --fast --out /tmp/tiny          # seconds; for the test suite

Both models use the engine's character-level tokenizer and chat template, so a prompt is exactly
what `rstitch generate "(69*4-13)*3"` sends; the loss covers the solution and <eos> only.

The SLM learns the concise solution. The LLM learns the verbose worked solution from an empty
answer, and, in CONCISE_SHARE of its examples, the concise solution continued from a random point
(the loss on what follows that point only): the position where R-Stitch hands it an SLM's partial
solution. So LLM-only answers are verbose, and a stitched answer stays concise.
"""

import argparse
import json
import math
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.default_models import build_tokenizer

from .decode import greedy
from .task import heldout, score, training_problems

# Layer count sets the per-token decode cost on a CPU: the LLM has 3x the SLM's layers, each twice
# as wide. Full multi-head attention (kv heads = heads) as in the measured runs.
SHAPES = {
    "slm": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    "llm": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
    "fast": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
}
SEEDS = {"slm": 1, "llm": 2, "fast": 3}
WARMUP_STEPS = 100
MAX_NEW_TOKENS = 128  # the longest worked solution is under 75 characters
CONCISE_SHARE = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--role", choices=["slm", "llm"], default="slm")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--minutes", type=float, help="wall-clock training budget (the LR schedule follows it)")
    p.add_argument("--max-steps", type=int, help="step budget (the LR schedule follows it)")
    p.add_argument("--resume", action="store_true", help="continue training the checkpoint in --out")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (resuming: try 3e-4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval", type=int, default=300, help="held-out problems to evaluate at the end")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fast", action="store_true", help="a tiny model, a few steps, 5 problems evaluated")
    args = p.parse_args(argv)
    if args.fast:
        args.max_steps, args.minutes, args.batch, args.eval = args.max_steps or 5, None, 8, 5
    if args.minutes is None and args.max_steps is None:
        p.error("give --minutes and/or --max-steps")
    return args


def new_model(shape_name: str, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = SHAPES[shape_name]
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
        num_key_value_heads=shape["num_attention_heads"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape,
    )
    torch.manual_seed(SEEDS[shape_name])
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def example(problem, tokenizer, role: str, rng: random.Random) -> tuple[list[int], list[int]]:
    """One problem's ids and labels (-100 where there is no loss) for a model of this role."""
    prompt = prompt_ids(tokenizer, problem.question)
    verbose = role == "llm" and rng.random() >= CONCISE_SHARE
    answer = tokenizer(problem.worked if verbose else problem.solution, add_special_tokens=False)["input_ids"]
    answer += [tokenizer.eos_token_id]
    given = rng.randint(1, len(answer) - 1) if role == "llm" and not verbose else 0  # the SLM's partial solution
    return prompt + answer, [-100] * (len(prompt) + given) + answer[given:]


def make_batch(problems, tokenizer, role: str, rng: random.Random):
    """Right-padded ids and labels; labels are -100 on the prompt, any given prefix and the padding.

    No attention mask is needed: attention is causal, so padding after a sequence never reaches it.
    """
    rows = [example(p, tokenizer, role, rng) for p in problems]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for _, r in rows])
    return ids, labels


def evaluate(model, tokenizer, n: int, given=lambda i, p: "", show: int = 3) -> tuple[float, float]:
    """Held-out accuracy and mean answer length in tokens (characters, on this tokenizer), with exact
    greedy decoding one problem at a time (float32, KV cache); given(i, p) is a start of the answer
    handed to the model."""
    model.eval()
    right, length = 0, 0
    for i, p in enumerate(tqdm(heldout(n), desc="held-out", mininterval=5, file=sys.stdout)):
        start = given(i, p)
        ids = prompt_ids(tokenizer, p.question) + tokenizer(start, add_special_tokens=False)["input_ids"]
        new = greedy(model, ids, MAX_NEW_TOKENS, tokenizer.eos_token_id)
        text = start + tokenizer.decode(new)
        right, length = right + score(text, p), length + len(ids) - len(prompt_ids(tokenizer, p.question)) + len(new)
        if i < show:
            tqdm.write(f"  {p.question} -> {text[:80]!r} ({'right' if score(text, p) else 'wrong, ' + str(p.answer)})",
                       file=sys.stdout)
    return right / n, length / n


def concise_start(i: int, problem) -> str:
    """A concise partial solution cut at a random point, as R-Stitch hands the LLM an SLM's answer."""
    return problem.solution[:random.Random(i).randint(1, len(problem.solution) - 1)]


def measure(model, tokenizer, args) -> dict:
    """Held-out accuracy and answer length; for the LLM also when continuing a concise start."""
    accuracy, length = evaluate(model, tokenizer, args.eval)
    name = f"{args.role}{' (fast)' if args.fast else ''}"
    print(f"held-out accuracy ({name}, greedy, {args.eval} problems): {accuracy:.1%}, answers {length:.1f} tokens")
    measured = {"heldout_accuracy": accuracy, "heldout_answer_tokens": length}
    if args.role == "llm":
        accuracy, length = evaluate(model, tokenizer, args.eval, given=concise_start)
        print(f"continuing a concise partial solution: {accuracy:.1%}, answers {length:.1f} tokens")
        measured |= {"continuation_accuracy": accuracy, "continuation_answer_tokens": length}
    return measured


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shape_name = "fast" if args.fast else args.role
    tokenizer = build_tokenizer()
    record_path = out / "training.json"
    runs = json.loads(record_path.read_text())["runs"] if record_path.exists() else []
    if args.resume:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    elif runs:
        sys.exit(f"{out} already holds a trained model: pass --resume to continue it, or pick another --out")
    else:
        model = new_model(shape_name, tokenizer)
    model.train()

    # Every run draws its own fresh problems (a resumed run does not replay the first one's).
    stream = training_problems(seed=SEEDS[shape_name] + 1000 * len(runs))
    formats = random.Random(SEEDS[shape_name] + 1000 * len(runs))  # which examples are concise, and cut where
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    budget_s = args.minutes * 60 if args.minutes else math.inf
    max_steps = args.max_steps or math.inf

    stop = []  # SIGINT/SIGTERM end training gracefully: the model so far is saved and evaluated
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))

    bar = tqdm(total=args.max_steps if args.max_steps else int(budget_s), unit="step" if args.max_steps else "s",
               mininterval=1 if sys.stdout.isatty() else 30, file=sys.stdout, dynamic_ncols=True)
    start, step, tokens, loss_avg = time.perf_counter(), 0, 0, None
    while not stop:
        elapsed = time.perf_counter() - start
        progress = max(step / max_steps, elapsed / budget_s)
        if progress >= 1:
            break
        # Linear warm-up, then cosine decay over whichever budget (steps or wall clock) runs out first.
        lr = args.lr * min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, labels = make_batch([next(stream) for _ in range(args.batch)], tokenizer, args.role, formats)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # ~1.65x faster than float32 on this CPU
            loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens += int((ids != tokenizer.pad_token_id).sum())
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        elapsed = time.perf_counter() - start
        bar.n = step if args.max_steps else min(int(elapsed), bar.total)
        bar.set_postfix(step=step, loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}",
                        elapsed=f"{elapsed / 60:.1f}m", refresh=False)
        bar.update(0)
    bar.close()
    minutes = (time.perf_counter() - start) / 60
    print(f"trained {step} steps in {minutes:.1f} min ({tokens / (minutes * 60):.0f} tokens/s), loss {loss_avg:.4f}")

    # Saved in bfloat16 (half the bytes); evaluated as the engine will load it: float32 from disk.
    out.mkdir(parents=True, exist_ok=True)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    measured = measure(model, tokenizer, args)
    runs.append({
        "command": "python -m training.train " + shlex.join(sys.argv[1:] if argv is None else argv),
        "role": args.role, "shape": SHAPES[shape_name], "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step, "minutes": round(minutes, 2), "tokens": tokens, "batch": args.batch, "peak_lr": args.lr,
        "final_loss": round(loss_avg, 5) if loss_avg is not None else None, "interrupted": bool(stop),
        "heldout_problems": args.eval, **measured,
    })
    record_path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
