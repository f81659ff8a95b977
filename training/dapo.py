"""Train the R-Stitch+ router with DAPO and a latency-aware reward (paper section 3.3, eq. 4-8).

    python -m training.dapo --out models/rstitch-router.safetensors            # the committed router
    python -m training.dapo --out /tmp/router.safetensors --steps 2 --fast     # seconds; for the tests

For each training problem the real stitching loop (in-process engines) runs G times with the
router's action sampled at every SLM token whose entropy exceeds tau. A trajectory's reward is

    R = r_acc - lambda * r_acc * L_hat        (latency only penalized when the answer is right)

with L_hat the trajectory's latency in milliseconds estimated by the engines' latency models
(models/*/latency.json, `python -m engine.latency`). Advantages are taken within each group: R_i
minus the group's mean, divided by the group's std with `--advantage std` (eq. 7 as written). The
default leaves the std out (as Dr. GRPO does): on this task most groups are all right, and dividing
their millisecond-sized reward differences by their own small std gives them the weight of a right
answer against a wrong one, so the router unlearns switching whatever lambda says (docs/router.md).
Groups whose rewards are all equal carry no signal and are dropped (DAPO's dynamic sampling, without
re-sampling to refill the batch). The objective is DAPO's clipped ratio with decoupled clip ranges,
averaged over all actions of the batch (token-level normalization, eq. 8).
"""

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.default_models import build_tokenizer, default_model_path, default_router_path
from engine.hf import HFEngine
from engine.latency import LatencyModel
from orchestrator.router import EXTRA_FEATURES, Router

from .rollouts import Roller, SampledRouter, Trajectory
from .task import training_problems

POSITION_SCALE = 64.0  # the SLM's concise answers are under 40 tokens


# --- the objective (eq. 4, 7, 8) -----------------------------------------------------------------

def reward(correct: bool, latency_ms: float, lam: float) -> float:
    r_acc = 1.0 if correct else 0.0
    return r_acc - lam * r_acc * latency_ms


def group_advantages(rewards: list[float], scale: bool = True, eps: float = 1e-6) -> np.ndarray | None:
    """R_i - mean within one prompt's group, divided by the group's (population) std with `scale`
    (eq. 7); None when all rewards are equal (no signal)."""
    r = np.asarray(rewards, dtype=np.float64)
    std = r.std()
    if std < eps:
        return None
    return (r - r.mean()) / (std if scale else 1.0)


def dapo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              eps_low: float = 0.2, eps_high: float = 0.28) -> torch.Tensor:
    """Minus eq. 8: the clipped surrogate of every action, averaged over all actions (not per
    trajectory first), with DAPO's clip-higher range [1 - eps_low, 1 + eps_high]."""
    ratio = torch.exp(logp_new - logp_old)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()


# --- the router network -----------------------------------------------------------------------

class RouterNet(torch.nn.Module):
    """orchestrator.router.Router's network, trainable; the input standardization (set from the
    first batch of features) is folded into the first layer on export."""

    def __init__(self, hidden_size: int, units: int = 32, switch_probability: float = 0.7):
        super().__init__()
        inputs = hidden_size + EXTRA_FEATURES
        self.register_buffer("mean", torch.zeros(inputs))
        self.register_buffer("scale", torch.ones(inputs))
        self.hidden = torch.nn.Linear(inputs, units)
        self.out = torch.nn.Linear(units, 1)
        with torch.no_grad():  # start near R-Stitch (mostly switch), still exploring
            self.out.weight.mul_(0.1)
            self.out.bias.fill_(float(np.log(switch_probability / (1 - switch_probability))))

    def standardize_from(self, features: np.ndarray) -> None:
        x = torch.as_tensor(features, dtype=torch.float32)
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(1e-3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden((x - self.mean) / self.scale))).squeeze(-1)

    def log_prob(self, x: torch.Tensor, switch: torch.Tensor) -> torch.Tensor:
        logit = self.logits(x)
        return torch.where(switch, torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit))

    def export(self, about: dict) -> Router:
        with torch.no_grad():
            w1 = self.hidden.weight / self.scale
            b1 = self.hidden.bias - w1 @ self.mean
            return Router(w1.numpy(), b1.numpy(), self.out.weight.numpy(), self.out.bias.numpy(), POSITION_SCALE,
                          about)


# --- training ---------------------------------------------------------------------------------

def rollout_groups(roller: Roller, router: Router, problems, tau: float, group: int, rng: random.Random
                   ) -> list[list[Trajectory]]:
    groups = []
    for problem in problems:
        trajectories = []
        for _ in range(group):
            sampler = SampledRouter(router, random.Random(rng.getrandbits(64)))
            trajectory = roller.run(problem, tau, sampler)
            trajectory.decisions = sampler.decisions
            trajectories.append(trajectory)
        groups.append(trajectories)
    return groups


def update(net: RouterNet, optimizer, groups, lam: float, epochs: int, scale: bool) -> dict:
    features, switches, logp_old, advantages = [], [], [], []
    kept = 0
    for trajectories in groups:
        adv = group_advantages([reward(t.correct, t.latency_ms, lam) for t in trajectories], scale)
        if adv is None:
            continue
        kept += 1
        for t, a in zip(trajectories, adv):
            for d in t.decisions:
                features.append(d.features)
                switches.append(d.switch)
                logp_old.append(d.logp)
                advantages.append(a)
    loss = None  # no group carried a signal
    if features:
        x = torch.as_tensor(np.stack(features))
        s, old, adv = torch.tensor(switches), torch.tensor(logp_old), torch.tensor(advantages, dtype=torch.float32)
        for _ in range(epochs):
            optimizer.zero_grad()
            objective = dapo_loss(net.log_prob(x, s), old, adv)
            objective.backward()
            optimizer.step()
            loss = objective.item()
    return {"groups_kept": kept, "actions": len(features), "loss": loss}


def validate(roller: Roller, decide, tau: float, problems) -> dict:
    """Accuracy and mean estimated latency of greedy routing (the deployed rule) on `problems`."""
    runs = [roller.run(problem, tau, decide) for problem in problems]
    return {"accuracy": float(np.mean([t.correct for t in runs])),
            "latency_ms": float(np.mean([t.latency_ms for t in runs]))}


def always_switch(hidden, entropy, position) -> bool:
    return True


class FixedTau:
    """The teacher of the imitation warm start: switch when the entropy is above `tau`, recording
    every consulted token's router features."""

    def __init__(self, router: Router, tau: float):
        self.router, self.tau, self.features, self.switch = router, tau, [], []

    def __call__(self, hidden: np.ndarray, entropy: float, position: int) -> bool:
        self.features.append(self.router.features(hidden, entropy, position))
        self.switch.append(entropy > self.tau)
        return self.switch[-1]


def imitate(net: RouterNet, roller: Roller, problems, consult_tau: float, teacher_tau: float, about: dict,
            epochs: int = 300) -> dict:
    """Warm start: fit the router to fixed-threshold routing at teacher_tau (cross-entropy on the
    tokens that routing consults), so DAPO starts from a point on the fixed-tau curve."""
    teacher = FixedTau(net.export(about), teacher_tau)
    for problem in problems:
        roller.run(problem, consult_tau, teacher)
    if not teacher.features:
        return {"teacher_tau": teacher_tau, "imitation_tokens": 0}
    x, target = np.stack(teacher.features), torch.tensor(teacher.switch, dtype=torch.float32)
    net.standardize_from(x)
    x = torch.as_tensor(x)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net.logits(x), target)
        loss.backward()
        optimizer.step()
    agreement = float(((net.logits(x) > 0) == target.bool()).float().mean())
    return {"teacher_tau": teacher_tau, "imitation_tokens": len(target), "imitation_switch_share": float(target.mean()),
            "imitation_agreement": agreement, "imitation_loss": loss.item()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.dapo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=default_router_path(), help="router file to write")
    p.add_argument("--tau", type=float, default=0.02, help="entropy above which the router is consulted")
    p.add_argument("--lam", type=float, default=0.002, help="latency penalty per estimated millisecond")
    p.add_argument("--advantage", choices=["centered", "std"], default="centered",
                   help="std: (R - mean) / std as in the paper's eq. 7; centered: R - mean (see docs/router.md: "
                        "with std, groups that are all right turn millisecond differences into full-size "
                        "advantages and the router unlearns switching)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8, help="problems per step")
    p.add_argument("--group", type=int, default=8, help="trajectories per problem (G)")
    p.add_argument("--epochs", type=int, default=4, help="gradient steps per batch of rollouts")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--units", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curves", type=Path, help="PNG of reward, accuracy and latency per step (default: beside --out)")
    p.add_argument("--validation", type=int, default=200,
                   help="problems (not held out, not trained on) to compare the router with fixed tau at the end")
    p.add_argument("--imitate", type=float, metavar="TAU",
                   help="warm start: first fit the router to fixed-threshold routing at this tau (behaviour cloning)")
    p.add_argument("--imitation-problems", type=int, default=512,
                   help="with --imitate: problems the teacher routes (64 gave ~200 tokens, too few: docs/router.md)")
    p.add_argument("--fast", action="store_true", help="the tiny pair, a unit latency model: for the tests")
    return p.parse_args(argv)


def load_pair(fast: bool):
    """The engines, and the latency model each reports in Info (--fast: the tiny pair, unprofiled,
    with unit costs that keep the LLM 5x the SLM)."""
    from engine.default_models import tiny_model_path

    paths = {role: tiny_model_path(role) if fast else default_model_path(role) for role in ("slm", "llm")}
    engines = {role: HFEngine(path, role=role) for role, path in paths.items()}
    latencies = {}
    for role, engine in engines.items():
        if fast:
            latencies[role] = LatencyModel(0.0, 0.0, 1.0 if role == "llm" else 0.2, 0.0)
        elif engine.info().HasField("latency_model"):
            latencies[role] = LatencyModel.from_proto(engine.info().latency_model)
        else:
            sys.exit(f"no latency model for {paths[role]}: run "
                     f"`python -m engine.latency --model {paths[role]} --role {role} --write`")
    return engines, latencies


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    engines, latencies = load_pair(args.fast)
    roller = Roller(engines, latencies, build_tokenizer())
    net = RouterNet(engines["slm"].info().hidden_size, args.units)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    problems = training_problems(seed=1000 + args.seed)
    history = []
    about = {"tau": args.tau, "lambda": args.lam, "command": shlex.join(["python", "-m", "training.dapo", *(argv or sys.argv[1:])])}
    started = time.monotonic()
    if args.imitate is not None:
        about["imitation"] = imitate(net, roller, [next(problems) for _ in range(args.imitation_problems)], args.tau,
                                     args.imitate, about)
        print(f"imitation of tau={args.imitate}: {about['imitation']}", file=sys.stderr)
    with tqdm(range(args.steps), desc="DAPO steps", file=sys.stderr) as bar:
        for step in bar:
            batch = [next(problems) for _ in range(args.batch)]
            if step == 0 and args.imitate is None:  # standardize inputs on the features the first rollouts see
                warm = rollout_groups(roller, net.export(about), batch[:2], args.tau, 2, rng)
                features = [d.features for g in warm for t in g for d in t.decisions]
                if features:
                    net.standardize_from(np.stack(features))
            groups = rollout_groups(roller, net.export(about), batch, args.tau, args.group, rng)
            flat = [t for g in groups for t in g]
            stats = update(net, optimizer, groups, args.lam, args.epochs, args.advantage == "std")
            decisions = [d for t in flat for d in t.decisions]
            row = {"step": step, "reward": float(np.mean([reward(t.correct, t.latency_ms, args.lam) for t in flat])),
                   "accuracy": float(np.mean([t.correct for t in flat])),
                   "latency_ms": float(np.mean([t.latency_ms for t in flat])),
                   "switch_rate": float(np.mean([d.switch for d in decisions])) if decisions else float("nan"),
                   "decisions_per_trajectory": len(decisions) / len(flat), **stats,
                   "elapsed_s": time.monotonic() - started}
            history.append(row)
            bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                            ms=f"{row['latency_ms']:.0f}", switch=f"{row['switch_rate']:.2f}")
    about.update(advantage=args.advantage, steps=args.steps, batch=args.batch, group=args.group, epochs=args.epochs, lr=args.lr,
                 minutes=round((time.monotonic() - started) / 60, 1))
    router = net.export(about)
    # A stream of its own: never trained on (other seed), never the held-out problems of the harness.
    stream = training_problems(seed=999_999)
    problems = [next(stream) for _ in range(args.validation)]
    validation = {f"router tau={args.tau}": validate(roller, router.switches, args.tau, problems)}
    for tau in sorted({args.tau, 0.05, 0.1, 0.2, 1.0}):  # tau = 1: the SLM alone
        validation[f"entropy tau={tau}"] = validate(roller, always_switch, tau, problems)
    for name, row in validation.items():
        print(f"validation ({len(problems)} problems) {name:22s} accuracy {100 * row['accuracy']:5.1f} %  "
              f"estimated latency {row['latency_ms']:6.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(router.to_bytes())
    args.out.with_suffix(".json").write_text(json.dumps({"about": about, "parameters": router.parameters,
                                                         "validation": validation, "history": history}, indent=1))
    plot(history, args.curves or args.out.with_suffix(".png"), about)
    print(f"router ({router.parameters} parameters) written to {args.out}; curves in "
          f"{args.curves or args.out.with_suffix('.png')}")


def plot(history: list[dict], path: Path, about: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in zip(axes, ("reward", "accuracy", "latency_ms", "switch_rate"),
                              ("mean reward", "accuracy of sampled trajectories", "estimated latency (ms)",
                               "share of uncertain tokens sent to the LLM")):
        values = np.array([np.nan if h[key] is None else h[key] for h in history], dtype=float)
        ax.plot(steps, values, "-o", markersize=2, alpha=0.35, label="per step")
        window = min(10, len(values))
        smooth = np.convolve(np.nan_to_num(values), np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, "-", linewidth=2, label=f"mean of {window} steps")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("DAPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"router training, tau={about['tau']}, lambda={about['lambda']} ({about['command']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
