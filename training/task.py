"""The synthetic task: left-to-right chains of 2-3 operations on 1-99, solved step by step.

    question  (69*4-13)*3
    solution  69*4=276;276-13=263;263*3=789;A:789                                        (concise)
    worked    step 1: 69*4=276; step 2: 276-13=263; step 3: 263*3=789; answer A:789      (verbose)

The SLM is trained on the concise solution; the LLM writes the verbose worked one from scratch, and
continues a concise partial solution concisely, so a stitched answer is as short as the SLM's (the
paper's token reduction) while LLM-only decoding pays for every verbose token.

Operations are +b and -b (b in 1-99) and *d (d in 2-9); every intermediate value stays in 0-999.
Brackets wrap the chain so far when a multiplication follows an addition or subtraction, so the
question reads left to right exactly as the solution computes it.
"""

import random
import re
from dataclasses import dataclass
from functools import lru_cache

HELDOUT_SEED = 20240601
HELDOUT_SIZE = 500
ANSWER = re.compile(r"A:(\d+)")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int

    @property
    def worked(self) -> str:
        """The verbose solution: each step numbered and the answer announced, about 2x the characters."""
        steps = self.solution.split(";")[:-1]
        return "".join(f"step {i}: {s}; " for i, s in enumerate(steps, 1)) + f"answer A:{self.answer}"


def make_problem(rng: random.Random) -> Problem:
    value = rng.randint(1, 99)
    expr, additive, steps = str(value), False, []
    for _ in range(rng.choice((2, 3))):
        while True:  # redraw the operation until the result stays in 0-999
            op = rng.choice("+-*")
            operand = rng.randint(2, 9) if op == "*" else rng.randint(1, 99)
            result = value + operand if op == "+" else value - operand if op == "-" else value * operand
            if 0 <= result <= 999:
                break
        if op == "*" and additive:
            expr = f"({expr})"
        expr += f"{op}{operand}"
        additive = op != "*"
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    return Problem(expr, ";".join(steps) + f";A:{value}", value)


@lru_cache(maxsize=None)
def _heldout() -> tuple[Problem, ...]:
    rng, seen, out = random.Random(HELDOUT_SEED), set(), []
    while len(out) < HELDOUT_SIZE:
        p = make_problem(rng)
        if p.question not in seen:  # distinct questions, so accuracy counts each once
            seen.add(p.question)
            out.append(p)
    return tuple(out)


def heldout(n: int = HELDOUT_SIZE) -> list[Problem]:
    """The first n of the fixed list of held-out problems."""
    if n > HELDOUT_SIZE:
        raise ValueError(f"only {HELDOUT_SIZE} problems are held out")
    return list(_heldout()[:n])


def training_problems(seed: int):
    """An endless stream of fresh problems, never one whose question is held out."""
    excluded = {p.question for p in heldout()}
    rng = random.Random(seed)
    while True:
        p = make_problem(rng)
        if p.question not in excluded:
            yield p


def score(text: str, problem: Problem) -> bool:
    """True when the generated text's final answer (A:<digits>) is the problem's answer."""
    m = ANSWER.search(text)
    return m is not None and int(m.group(1)) == problem.answer
