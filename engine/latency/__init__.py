"""The latency model of an engine (R-Stitch paper, eq. 5-6): the cost of one forward pass over
N_inf new tokens on a cache of N_kv tokens,

    T(N_inf, N_kv) = a * N_inf * N_kv + b * N_inf^2 + c * N_inf + d      (milliseconds)

fitted by least squares to timings over a grid. Router training estimates a trajectory's latency as
the sum of its engine calls' estimates instead of timing it (noisy, and slow to repeat).

    python -m engine.latency --model models/rstitch-slm --role slm --write --plot docs/latency-slm.png

profiles the engine in-process, prints the coefficients and R^2, and with --write stores them in
the model's `latency.json`, keyed by backend, device type and dtype (a fit for one says nothing of
another); an engine started on that model reports the matching entry in Info.
"""

import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rstitch.v1 import engine_pb2 as pb

FILE_NAME = "latency.json"
# Tokens processed per forward x cache length before it; the pair's context is 256 tokens and a
# stitched answer rarely prefills more than the prompt (~20-40 tokens) or a long switch-back span.
DEFAULT_N_INF = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_N_KV = (0, 16, 32, 64, 96, 128)


@dataclass(frozen=True)
class LatencyModel:
    a: float
    b: float
    c: float
    d: float
    r2: float = math.nan
    measured_on: str = ""

    def ms(self, n_inf: int, n_kv: int) -> float:
        """The estimated milliseconds of one forward pass."""
        return self.a * n_inf * n_kv + self.b * n_inf * n_inf + self.c * n_inf + self.d

    def call_ms(self, base_len: int, new_tokens: int, forwards: int) -> float:
        """The estimate of one engine call that appended `new_tokens` to a cache of `base_len` and made
        `forwards` forward passes: one over the new tokens (a Prefill), then one per decoded token,
        each on a cache one token longer."""
        total, kv, left = 0.0, base_len, forwards
        if new_tokens and left:
            total += self.ms(new_tokens, kv)
            kv, left = kv + new_tokens, left - 1
        for step in range(left):
            total += self.ms(1, kv + step)
        return total

    def to_proto(self) -> pb.LatencyModel:
        return pb.LatencyModel(**asdict(self))

    @classmethod
    def from_proto(cls, message: pb.LatencyModel) -> "LatencyModel":
        return cls(message.a, message.b, message.c, message.d, message.r2, message.measured_on)

    # --- stored with the model ----------------------------------------------------------------

    @classmethod
    def load(cls, model_path, key: str) -> "LatencyModel | None":
        """The fit stored for `key` (see `key()`) beside the model, or None."""
        path = stored_path(model_path)
        if not path.exists():
            return None
        entry = json.loads(path.read_text()).get(key)
        return cls(**entry) if entry else None

    def save(self, model_path, key: str) -> Path:
        path = stored_path(model_path)
        fits = json.loads(path.read_text()) if path.exists() else {}
        fits[key] = asdict(self)
        path.write_text(json.dumps(fits, indent=2, sort_keys=True) + "\n")
        return path


def key(backend: str, device: str, dtype: str) -> str:
    """Fits are per backend, device type (cuda:1 is cuda) and dtype."""
    return f"{backend}-{device.split(':')[0]}-{dtype}"


def stored_path(model_path) -> Path:
    """`latency.json` inside a checkpoint directory, `NAME.gguf.latency.json` beside a GGUF file."""
    model_path = Path(model_path)
    return model_path / FILE_NAME if model_path.is_dir() else model_path.with_name(f"{model_path.name}.{FILE_NAME}")


def stored_proto(model_path, backend: str, device: str, dtype: str) -> pb.LatencyModel | None:
    """What an engine reports in Info: the stored fit of its own configuration, if there is one."""
    try:
        fit = LatencyModel.load(model_path, key(backend, device, dtype))
    except (OSError, ValueError, TypeError) as e:
        logging.getLogger(__name__).warning("ignoring unreadable %s: %s", stored_path(model_path), e)
        return None
    return fit.to_proto() if fit else None


# --- fitting and profiling --------------------------------------------------------------------

def fit(samples: list[tuple[int, int, float]], measured_on: str = "") -> LatencyModel:
    """Least squares over (n_inf, n_kv, ms) samples."""
    n_inf, n_kv, ms = (np.array(column, dtype=np.float64) for column in zip(*samples))
    design = np.stack([n_inf * n_kv, n_inf ** 2, n_inf, np.ones_like(n_inf)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, ms, rcond=None)
    residual = ms - design @ coefficients
    spread = float(((ms - ms.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / spread if spread > 0 else math.nan
    return LatencyModel(*map(float, coefficients), r2=r2, measured_on=measured_on)


def profile(engine, n_inf=DEFAULT_N_INF, n_kv=DEFAULT_N_KV, repeats: int = 5, progress=None):
    """Median milliseconds of one forward over each (n_inf, n_kv) of the grid that fits the context.

    Each timing is a Prefill of n_inf tokens onto a cache of n_kv with max_tokens = 1: one forward
    pass and the choice of one token, the unit of work of every engine call (a decoded token is
    N_inf = 1). Each point keeps its own session, rolled back to n_kv after every timing, so the
    cache is real; the rounds visit the points in a fresh random order, so that a busy spell of a
    shared machine spreads over the grid instead of bending a few points."""
    rng = np.random.default_rng(0)
    tokens = lambda n: [int(t) for t in rng.integers(0, engine.vocab_size, n)]  # noqa: E731
    points = [(i, k) for k in n_kv for i in n_inf if i + k <= engine.max_context]
    sessions = {point: f"latency-profile-{point[0]}-{point[1]}" for point in points}
    times = {point: [] for point in points}
    try:
        for (inf, kv), session in sessions.items():
            if kv:
                engine.prefill(pb.PrefillRequest(session_id=session, token_ids=tokens(kv),
                                                 rule=pb.SpanRule(max_tokens=0)))
        for round_ in range(repeats + 1):  # round 0 warms up
            for index in rng.permutation(len(points)):
                inf, kv = point = points[index]
                span = engine.prefill(pb.PrefillRequest(session_id=sessions[point], base_len=kv,
                                                        token_ids=tokens(inf), rule=pb.SpanRule(max_tokens=1))).span
                if round_:
                    times[point].append(span.timings.forward_ms)
                if kv:
                    engine.rollback(pb.RollbackRequest(session_id=sessions[point], length=kv))
                else:
                    engine.release(pb.ReleaseRequest(session_id=sessions[point]))
            if progress:
                progress(round_ + 1, repeats + 1)
    finally:
        for session in sessions.values():
            engine.release(pb.ReleaseRequest(session_id=session))
    return [(inf, kv, statistics.median(times[(inf, kv)])) for inf, kv in points]
