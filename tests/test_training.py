"""The training task (generator, held-out split, scoring) and a seconds-long run of the trainer."""

import ast
import itertools
import json
import operator
import random
import subprocess
import sys
from pathlib import Path

import torch

from training.task import Problem, heldout, make_problem, score, training_problems

ROOT = Path(__file__).resolve().parent.parent
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def arithmetic(expr: str) -> int:
    """Integer arithmetic with Python's precedence, by walking the syntax tree: eval would run any code."""
    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"not integer arithmetic: {expr!r}")

    return value(ast.parse(expr, mode="eval").body)


def test_problems_are_exact_and_read_left_to_right():
    rng = random.Random(0)
    for _ in range(2000):
        p = make_problem(rng)
        assert arithmetic(p.question) == p.answer  # brackets make Python's precedence agree with the chain
        steps = p.solution.split(";")
        assert steps[-1] == f"A:{p.answer}" and len(steps) in (3, 4)
        value = None
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            assert arithmetic(lhs) == int(rhs) and 0 <= int(rhs) <= 999
            assert value is None or lhs.startswith(str(value))
            value = int(rhs)


def test_the_worked_solution_spells_out_the_concise_one_at_least_half_again_as_long():
    rng = random.Random(1)
    for _ in range(2000):
        p = make_problem(rng)
        steps = p.solution.split(";")[:-1]
        assert p.worked == " ".join(f"step {i}: {s};" for i, s in enumerate(steps, 1)) + f" answer A:{p.answer}"
        assert score(p.worked, p) and len(p.worked) >= 1.5 * len(p.solution)


def test_the_llm_learns_verbose_answers_and_concise_continuations_and_the_slm_concise_answers():
    from engine.default_models import build_tokenizer
    from training.train import CONCISE_SHARE, example, prompt_ids

    tokenizer, rng, problems = build_tokenizer(), random.Random(0), random.Random(2)
    kinds = {"verbose": 0, "continuation": 0}
    for _ in range(1000):
        p = make_problem(problems)
        prompt = prompt_ids(tokenizer, p.question)
        for role in ("slm", "llm"):
            ids, labels = example(p, tokenizer, role, rng)
            assert len(ids) == len(labels) and ids[:len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id
            answer, learned = tokenizer.decode(ids[len(prompt):-1]), [t for t in labels if t != -100]
            given = labels.index(learned[0]) - len(prompt)  # the loss covers one suffix: what follows `given`
            assert labels[len(prompt) + given:] == ids[len(prompt) + given:]
            if role == "slm":
                assert answer == p.solution and given == 0
            elif answer == p.worked:
                kinds["verbose"] += 1
                assert given == 0
            else:
                kinds["continuation"] += 1
                assert answer == p.solution and 1 <= given <= len(p.solution)  # at least <eos> is learned
    assert abs(kinds["continuation"] / 1000 - CONCISE_SHARE) < 0.06


def test_heldout_is_fixed_and_never_trained_on():
    held = heldout()
    assert len(held) == 500 and len({p.question for p in held}) == 500
    assert heldout(10) == held[:10]
    questions = {p.question for p in held}
    # Draws collide with held-out questions often enough that the exclusion is really exercised.
    raw = random.Random(1)
    assert any(make_problem(raw).question in questions for _ in range(20000))
    assert not any(p.question in questions for p in itertools.islice(training_problems(seed=1), 20000))


def test_score():
    p = Problem("(69*4-13)*3", "69*4=276;276-13=263;263*3=789;A:789", 789)
    assert score(p.solution, p)
    assert score("69*4=276;A:789<eos>junk", p)
    assert not score("69*4=276;276-13=263;263*3=788;A:788", p)
    assert not score("A:7890", p)
    assert not score("69*4=276;276-13=263;263*3=789", p)  # no final answer


def test_fast_training_run_saves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    run = subprocess.run([sys.executable, "-m", "training.train", "--fast", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "held-out accuracy" in run.stdout
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32 and model.config.eos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True,
                                         tokenize=False) == "<|user|>1+2<|assistant|>"
    record = json.loads((out / "training.json").read_text())["runs"]
    assert len(record) == 1 and record[0]["steps"] == 5 and "--fast" in record[0]["command"]
    # Resuming continues the saved weights and appends a second run to the record; as the LLM, it
    # also measures continuing a concise partial solution.
    again = subprocess.run([sys.executable, "-m", "training.train", "--fast", "--role", "llm", "--resume", "--out",
                            str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    runs = json.loads((out / "training.json").read_text())["runs"]
    assert [r["steps"] for r in runs] == [5, 5] and "continuing a concise partial solution" in again.stdout
    assert "continuation_accuracy" not in runs[0] and 0 <= runs[1]["continuation_accuracy"] <= 1
