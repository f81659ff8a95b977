"""The R-Stitch+ router: at an uncertain SLM token, does the LLM take over or is the SLM's token kept?

A two-layer perceptron over the SLM's final hidden state at that token, its normalized entropy and
its answer position:

    x = [hidden (H), entropy, position / position_scale]
    p(switch) = sigmoid(w2 . relu(W1 x + b1) + b2)

It switches when p(switch) >= 0.5 (the argmax of Algorithm 1, line 15). With H = 128 (the trained
SLM) and 32 units it has 4,225 parameters, 17 KB as float32; one call is a 130x32 matrix-vector
product in NumPy, microseconds next to a forward pass (docs/router.md). Weights travel as a
safetensors file (no pickle), which `python -m training.dapo` writes.
"""

import json
import math

import numpy as np
from safetensors.numpy import save

FORMAT = "rstitch-router/1"
MAX_BYTES = 1 << 20
EXTRA_FEATURES = 2  # entropy, position


class Router:
    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, position_scale: float,
                 about: dict | None = None):
        self.w1, self.b1, self.w2, self.b2 = (np.asarray(a, dtype=np.float32) for a in (w1, b1, w2, b2))
        self.position_scale = float(position_scale)
        self.about = about or {}  # how it was trained: tau, lambda, steps... (informational)
        units, inputs = self.w1.shape if self.w1.ndim == 2 else (0, 0)
        if units == 0 or inputs <= EXTRA_FEATURES or self.b1.shape != (units,) or self.w2.shape != (1, units) \
                or self.b2.shape != (1,):
            raise ValueError(f"router weights have inconsistent shapes: w1 {self.w1.shape}, b1 {self.b1.shape}, "
                             f"w2 {self.w2.shape}, b2 {self.b2.shape}; expected (units, hidden + {EXTRA_FEATURES}), "
                             "(units,), (1, units), (1,) with units >= 1")
        if not (math.isfinite(self.position_scale) and self.position_scale > 0):
            raise ValueError(f"router position_scale must be a positive finite number, got {position_scale}")
        if not all(np.isfinite(a).all() for a in (self.w1, self.b1, self.w2, self.b2)):
            raise ValueError("router weights hold NaN or infinite values")

    @property
    def hidden_size(self) -> int:
        """The SLM hidden size this router reads."""
        return self.w1.shape[1] - EXTRA_FEATURES

    @property
    def parameters(self) -> int:
        return sum(a.size for a in (self.w1, self.b1, self.w2, self.b2))

    def features(self, hidden: np.ndarray, entropy: float, position: int) -> np.ndarray:
        return np.concatenate([hidden.astype(np.float32, copy=False),
                               np.array([entropy, position / self.position_scale], dtype=np.float32)])

    def switch_probability(self, hidden: np.ndarray, entropy: float, position: int) -> float:
        h = np.maximum(self.w1 @ self.features(hidden, entropy, position) + self.b1, 0.0)
        logit = float(self.w2[0] @ h + self.b2[0])
        return float(1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0))))

    def switches(self, hidden: np.ndarray, entropy: float, position: int) -> bool:
        return self.switch_probability(hidden, entropy, position) >= 0.5

    # --- the file format ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        metadata = {"format": FORMAT, "position_scale": repr(self.position_scale), "about": json.dumps(self.about)}
        return save({"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Router":
        """Raises ValueError saying what is wrong with a file that is not a router."""
        if len(data) > MAX_BYTES:
            raise ValueError(f"the router file has {len(data)} bytes; at most {MAX_BYTES}")
        try:
            header, body = _header(data)
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"the router is not a safetensors file: {e}") from None
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("the router is not a safetensors file: __metadata__ is not a map")
        tensors = {name: _tensor(name, entry, body) for name, entry in header.items()}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"the router file's format is {metadata.get('format')!r}, expected {FORMAT!r}")
        missing = {"w1", "b1", "w2", "b2"} - set(tensors)
        if missing:
            raise ValueError(f"the router file lacks tensors {sorted(missing)}")
        try:
            scale = float(metadata.get("position_scale", ""))
            about = json.loads(metadata.get("about") or "{}")
        except (ValueError, TypeError) as e:
            raise ValueError(f"the router file's metadata is unreadable: {e}") from None
        return cls(tensors["w1"], tensors["b1"], tensors["w2"], tensors["b2"], scale, about)

    @classmethod
    def constant(cls, hidden_size: int, switch: bool, units: int = 4) -> "Router":
        """A router that always switches (equal to the entropy policy) or always keeps (the SLM alone)."""
        zeros = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
        bias = np.array([30.0 if switch else -30.0], dtype=np.float32)
        return cls(zeros(units, hidden_size + EXTRA_FEATURES), zeros(units), zeros(1, units), bias, 1.0,
                   {"constant": "switch" if switch else "keep"})


# safetensors' dtype names of the floating-point tensors a router may hold. NumPy has no bfloat16 (the
# safetensors NumPy loader fails on it), so its bytes are widened to float32 here.
FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def _header(data: bytes) -> tuple[dict, bytes]:
    """The safetensors header (tensor name -> dtype, shape, offsets; and __metadata__) and the data."""
    if len(data) < 8:
        raise ValueError("shorter than a header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("truncated header")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a map")
    return header, data[8 + size:]


def _tensor(name: str, entry, body: bytes) -> np.ndarray:
    try:
        dtype, shape, (begin, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"the router file's entry for tensor {name!r} is malformed: {e!r}") from None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"router tensor {name!r} has dtype {dtype}; router weights are floating point "
                         f"({', '.join(FLOAT_DTYPES)})")
    count = math.prod(shape) if all(n >= 0 for n in shape) else -1
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(body)) \
            or count < 0 or end - begin != count * FLOAT_DTYPES[dtype].itemsize:
        raise ValueError(f"router tensor {name!r}: shape {shape} does not match its data offsets {begin}..{end}")
    values = np.frombuffer(body[begin:end], dtype=FLOAT_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)
