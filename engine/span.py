"""The span rule: validation, and the per-token decision every backend applies.

A span is decoded inside the engine with no round trip per token; this module says when it stops.
"""

import math

from rstitch.v1 import engine_pb2 as pb

from .errors import InvalidRequest

GATES = (pb.GATE_UNSPECIFIED, pb.GATE_STOP_ABOVE, pb.GATE_STOP_AT_OR_BELOW)
# Every decoded token is looked up in the stop list: a real one holds the EOS ids and a few more.
MAX_STOP_TOKENS = 1024


def validate_rule(rule: pb.SpanRule, vocab_size: int, max_context: int) -> None:
    if rule.gate not in GATES:
        raise InvalidRequest(f"unknown gate {rule.gate}; use GATE_UNSPECIFIED, GATE_STOP_ABOVE or GATE_STOP_AT_OR_BELOW")
    if not math.isfinite(rule.tau) or not 0.0 <= rule.tau <= 1.0:
        raise InvalidRequest(f"tau must be in [0, 1] (entropy is normalized), got {rule.tau}")
    if rule.max_tokens > max_context:
        raise InvalidRequest(f"max_tokens {rule.max_tokens} exceeds the model's context of {max_context} tokens")
    if len(rule.stop_token_ids) > MAX_STOP_TOKENS:
        raise InvalidRequest(f"stop_token_ids has {len(rule.stop_token_ids)} entries; at most {MAX_STOP_TOKENS}")
    bad = [t for t in rule.stop_token_ids if t >= vocab_size]
    if bad:
        raise InvalidRequest(f"stop_token_ids {bad[:5]} are outside the vocabulary of {vocab_size} tokens")


def validate_tokens(token_ids, vocab_size: int) -> None:
    bad = [t for t in token_ids if t >= vocab_size]
    if bad:
        raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary of {vocab_size} tokens")


def judge(rule: pb.SpanRule, n_committed: int, token: int, entropy: float) -> tuple[bool, int | None]:
    """Whether to commit `token`, and the stop reason if the span ends with it.

    Order matters: a gated SLM candidate is never committed, not even an EOS (the LLM writes that
    position instead); a committed stop token ends the span before the LLM gate or max_tokens do.
    """
    if rule.gate == pb.GATE_STOP_ABOVE and entropy > rule.tau:
        return False, pb.STOP_REASON_GATE
    if token in rule.stop_token_ids:
        return True, pb.STOP_REASON_STOP_TOKEN
    if rule.gate == pb.GATE_STOP_AT_OR_BELOW and entropy <= rule.tau:
        return True, pb.STOP_REASON_GATE
    if n_committed + 1 >= rule.max_tokens:
        return True, pb.STOP_REASON_MAX_TOKENS
    return True, None
