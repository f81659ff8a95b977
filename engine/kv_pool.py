"""One KV pool per model, and the packed attention that reads it: the memory half of batched steps.

Layout: per layer, keys and values of shape [slots, kv_heads, max_context, head_dim], one slot per
session. A slot's length is just a number: truncating it is exact rollback, with nothing to copy and
no dependence on transformers' cache classes (whose crop() changed meaning between versions).

A step runs ONE forward over a packed batch: the new tokens of every session in the step are
concatenated into one sequence [1, T], each token carrying its own position. `PackedCache.update`
writes the step's keys/values into the pool at each token's (slot, position), and `packed_attention`
(registered with transformers' AttentionInterface) lets each session's segment attend causally to
its own slot, read as a view of the pool: a step never copies a cache.

The same model keeps working unbatched: without a packed batch in the call, the registered attention
is transformers' sdpa, and the registered mask function is sdpa's.
"""

import inspect
import math
import mmap
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "rstitch_packed"
# The forward kwarg that carries the step's PackedBatch down to every attention call.
BATCH_KWARG = "rstitch_batch"
# Decode rows of slots at most this far apart share one attention call over the slot range between
# them (the idle slots in the gap are computed and thrown away: cheaper than one call per row).
MAX_SLOT_GAP = 8
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


class UnsupportedModel(ValueError):
    """The model needs an attention feature the packed attention does not implement."""


class PoolFull(RuntimeError):
    """Every slot of the pool is taken."""


class KVPool:
    """Keys and values of one model's sessions, one slot each, lengths kept per slot.

    The caller owns the lengths (BatchedRunner advances them as it feeds tokens); a shorter length
    is a rollback. Slots are handed out lowest first, so busy slots stay packed at low indices and
    decode rows of neighbouring slots can share one attention call.
    """

    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_context: int,
                 device, dtype):
        if slots < 1 or max_context < 1:
            raise ValueError(f"a pool needs at least one slot of at least one token (got {slots} x {max_context})")
        self.slots, self.max_context = slots, max_context
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (slots, kv_heads, max_context, head_dim)
        # Zeros, not empty: masked-out positions are still multiplied by 0 in attention, and 0 * NaN
        # from uninitialised memory would poison real rows.
        self.keys = [_zeros(shape, device, dtype) for _ in range(layers)]
        self.values = [_zeros(shape, device, dtype) for _ in range(layers)]
        self.lengths = [0] * slots
        self._free = set(range(slots))
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model, *, budget_tokens: int, max_context: int | None = None) -> "KVPool":
        """A pool for `model` holding about `budget_tokens` tokens: budget // max_context slots, at least 1."""
        config = model.config.get_text_config()
        context = min(max_context or config.max_position_embeddings, config.max_position_embeddings)
        heads = config.num_attention_heads
        param = next(model.parameters())
        return cls(layers=config.num_hidden_layers, slots=max(1, budget_tokens // context),
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   max_context=context, device=param.device, dtype=param.dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * len(self.keys) * self.kv_heads * self.head_dim * self.keys[0].element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        with self._lock:
            if not self._free:
                raise PoolFull(f"all {self.slots} KV slots are in use")
            slot = min(self._free)
            self._free.remove(slot)
            self.lengths[slot] = 0
            return slot

    def free(self, slot: int) -> None:
        with self._lock:
            self._check_allocated(slot)
            self.lengths[slot] = 0
            self._free.add(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` tokens. Nothing is erased: later writes overwrite."""
        self._check_allocated(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot truncate to {length}")
        self.lengths[slot] = length

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self.slots and slot not in self._free

    def _check_allocated(self, slot: int) -> None:
        if not self.is_allocated(slot):
            raise ValueError(f"KV slot {slot} is not allocated")


def _zeros(shape, device, dtype) -> torch.Tensor:
    """Zeros. On the CPU in anonymous mmap pages, which the kernel zero-fills on first touch: a large
    KV budget then costs memory only as sessions fill it (torch.zeros would write every page now)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(1, count * dtype.itemsize))
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # the tensor keeps `pages` alive


@dataclass(frozen=True)
class Segment:
    """One session's tokens in a packed step: `count` tokens at positions start.., rows offset.. of the batch."""
    slot: int
    start: int
    count: int
    offset: int


class PackedBatch:
    """Per-step metadata, built once per forward and shared by every layer."""

    def __init__(self, segments: list[Segment], device):
        self.segments = segments
        self.device = device
        positions = [s.start + i for s in segments for i in range(s.count)]
        self.total = len(positions)
        self.position_ids = torch.tensor([positions], device=device)
        self.token_positions = self.position_ids[0]
        self.token_slots = torch.tensor([s.slot for s in segments for _ in range(s.count)], device=device)
        self.prefills = [s for s in segments if s.count > 1]
        self.decode_groups = [DecodeGroup(g, device) for g in _group_by_slot([s for s in segments if s.count == 1])]
        # A 4D attention_mask makes transformers skip building its own (masking_utils returns a 4D mask as
        # is); packed_attention ignores it and masks per segment.
        self.mask_placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        self.layers_written = 0
        self._masks: dict = {}

    def mask(self, key, build):
        """Masks depend on the segment and the layer's window only: build each once per step."""
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]


def _group_by_slot(decodes: list[Segment]) -> list[list[Segment]]:
    groups: list[list[Segment]] = []
    for seg in sorted(decodes, key=lambda s: s.slot):
        if groups and seg.slot - groups[-1][-1].slot <= MAX_SLOT_GAP:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    return groups


def _as_index(values: list[int], device):
    """A slice when the values are consecutive (a view, and the common case), else an index tensor."""
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return torch.tensor(values, device=device)


class DecodeGroup:
    """Single-token segments of slots lo..hi-1, attended in one call over that slot range of the pool.

    Everything here depends on the step only, so layers share it: indices, and a mask per window.
    """

    def __init__(self, segments: list[Segment], device):
        self.lo, self.hi = segments[0].slot, segments[-1].slot + 1
        self.size = len(segments)
        self.width = max(s.start for s in segments) + 1  # keys the longest row reads
        self.dense = self.hi - self.lo == self.size  # every slot of the range has a row: no scatter
        self.offsets = _as_index([s.offset for s in segments], device)
        self.slot_rows = [s.slot - self.lo for s in segments]
        self.rows = None if self.dense else torch.tensor(self.slot_rows, device=device)
        self.lengths = [s.start + 1 for s in segments]
        self.device = device
        self._masks: dict = {}

    def mask(self, window: int | None) -> torch.Tensor | None:
        """[range, 1, 1, width] bool, True at the keys each row may read; None when all may read all."""
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def first_key(self, window: int | None) -> int:
        """The first key position any row can see: keys before it are not even read."""
        return max(0, min(self.lengths) - window) if window else 0

    def _build_mask(self, window):
        if self.dense and min(self.lengths) == self.width:
            return None  # every row reads the same keys: first_key(window) .. width
        lengths = torch.tensor(self.lengths, device=self.device)[:, None]
        k_pos = torch.arange(self.width, device=self.device)[None, :]
        allowed = k_pos < lengths
        if window:
            allowed &= k_pos >= lengths - window
        if not self.dense:
            # Rows of idle slots read everything: an all-masked row would be NaN (it is dropped anyway).
            full = torch.ones(self.hi - self.lo, self.width, dtype=torch.bool, device=self.device)
            full[self.slot_rows] = allowed
            allowed = full
        return allowed[:, None, None, self.first_key(window):]


class PackedCache(Cache):
    """What a packed forward passes as the model's cache: writes new keys/values into the pool and
    hands attention the whole layer of the pool (no copy), which the PackedBatch tells it how to read."""

    def __init__(self, pool: KVPool, batch: PackedBatch):
        super().__init__(layers=[])
        self.pool, self.batch = pool, batch

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        if key_states.shape[1] != keys.shape[1] or key_states.shape[-1] != keys.shape[-1]:
            raise UnsupportedModel(f"layer {layer_idx} has keys of shape {tuple(key_states.shape)}; the pool "
                                   f"holds {keys.shape[1]} heads of {keys.shape[-1]}")
        # [1, kv_heads, T, d] -> [T, kv_heads, d], scattered to (slot, :, position) of each token.
        slots, positions = self.batch.token_slots, self.batch.token_positions
        keys[slots, :, positions] = key_states[0].transpose(0, 1).to(keys.dtype)
        values[slots, :, positions] = value_states[0].transpose(0, 1).to(values.dtype)
        self.batch.layers_written += 1
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come with every token (position_ids); nothing may derive them from the cache


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, **kwargs):
    """transformers' attention-function signature. With a PackedBatch: per-segment attention over the
    pool; without one (a plain forward with a DynamicCache): transformers' sdpa, unchanged."""
    batch = kwargs.pop(BATCH_KWARG, None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for feature in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(feature) is not None:
            raise UnsupportedModel(f"packed attention does not implement {feature!r}")
    if not getattr(module, "is_causal", True):
        raise UnsupportedModel("packed attention is causal only")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = query.new_empty(batch.total, query.shape[1], query.shape[-1])
    for group in batch.decode_groups:
        _attend_decodes(group, query, key, value, out, scale, sliding_window)
    for seg in batch.prefills:
        _attend_prefill(batch, seg, query, key, value, out, scale, sliding_window)
    return out.unsqueeze(0), None


def _fold_heads(query_rows: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[H, n, d] -> [kv_heads, groups * n, d]: GQA without repeating keys. Query head h reads kv head
    h // groups (as repeat_kv orders them), so the query heads of one kv head become extra query rows."""
    heads, n, dim = query_rows.shape
    return query_rows.reshape(kv_heads, (heads // kv_heads) * n, dim)


def _unfold_heads(attended: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """Inverse of _fold_heads, to the layout attention returns: [kv_heads, groups * n, d] -> [n, H, d]."""
    return attended.reshape(heads, n, attended.shape[-1]).transpose(0, 1)


def _attend_decodes(group: DecodeGroup, query, keys, values, out, scale, window):
    """One query token per session of slots lo..hi: one SDPA over that slot range of the pool (a view),
    each row masked to its own length; rows of idle slots in the range are computed and dropped."""
    heads, kv_heads, dim = query.shape[1], keys.shape[1], query.shape[-1]
    # [H, m, d] -> [m, kv_heads, groups, d]: the query heads of one kv head as its query rows (GQA).
    rows = query[0, :, group.offsets].transpose(0, 1).reshape(group.size, kv_heads, heads // kv_heads, dim)
    if not group.dense:
        scattered = query.new_zeros(group.hi - group.lo, *rows.shape[1:])
        scattered[group.rows] = rows
        rows = scattered
    first = group.first_key(window)
    attended = F.scaled_dot_product_attention(
        rows, keys[group.lo:group.hi, :, first:group.width], values[group.lo:group.hi, :, first:group.width],
        attn_mask=group.mask(window), scale=scale)
    if not group.dense:
        attended = attended[group.rows]
    out[group.offsets] = attended.reshape(group.size, heads, dim)


def _attend_prefill(batch, seg, query, keys, values, out, scale, window):
    """A chunk of tokens of one session: causal within the chunk and over the slot's earlier tokens,
    reading only the keys some query of the chunk can see (the last `window` ones on sliding layers)."""
    first = max(0, seg.start + 1 - window) if window else 0
    end = seg.start + seg.count
    heads, kv_heads = query.shape[1], keys.shape[1]
    folded = _fold_heads(query[0, :, seg.offset:seg.offset + seg.count], kv_heads)

    def build():
        q_pos = torch.arange(seg.start, end, device=batch.device)[:, None]
        k_pos = torch.arange(first, end, device=batch.device)[None, :]
        allowed = k_pos <= q_pos
        if window:
            allowed &= k_pos > q_pos - window
        return allowed.repeat(heads // kv_heads, 1)  # one copy per query head of a kv head (_fold_heads)

    mask = batch.mask(("prefill", seg.offset, window), build)
    attended = F.scaled_dot_product_attention(folded, keys[seg.slot, :, first:end], values[seg.slot, :, first:end],
                                              attn_mask=mask, scale=scale)
    out[seg.offset:seg.offset + seg.count] = _unfold_heads(attended, heads, seg.count)


def check_supported(model) -> None:
    """Refuse, with the reason, a model whose attention the packed path would get wrong."""
    config = model.config.get_text_config()
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= SUPPORTED_LAYER_TYPES:
        raise UnsupportedModel(f"layer types {sorted(layer_types - SUPPORTED_LAYER_TYPES)} are not supported "
                               f"(only {sorted(SUPPORTED_LAYER_TYPES)})")
    if getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedModel("attention logit softcapping (e.g. Gemma 2) is not supported")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModel(f"{type(model).__name__} does not route attention through transformers' "
                               "AttentionInterface")
    if not any(name in inspect.signature(model.forward).parameters for name in ("cache", "past_key_values")):
        raise UnsupportedModel(f"{type(model).__name__}.forward takes no cache")


def install_packed_attention(model) -> None:
    """Switch `model` to the packed attention (idempotent). Unbatched calls behave exactly as sdpa."""
    check_supported(model)
    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    if model.config.get_text_config()._attn_implementation != ATTENTION:
        raise UnsupportedModel(f"{type(model).__name__} did not accept a custom attention implementation")


def cache_kwarg(model) -> str:
    """transformers 5.24 calls the cache argument `cache`; earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
