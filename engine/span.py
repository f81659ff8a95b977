"""The span rule: validation, the per-token decision, and the one span builder every backend uses.

A span is decoded inside the engine with no round trip per token; this module says when it stops.
"""

import math
from collections.abc import Callable

from common.errors import InvalidRequest
from rstitch.client import MAX_TOP_LOGPROBS
from rstitch.v1 import engine_pb2 as pb

# Called with each committed token, as soon as the engine chose it (streaming).
OnToken = Callable[[pb.CommittedToken], None]

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
    validate_sampling(rule)


def validate_sampling(rule: pb.SpanRule) -> None:
    s = rule.sampling
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest(f"sampling.temperature must be >= 0 (0: greedy), got {s.temperature}")
    if not math.isfinite(s.top_p) or not 0.0 <= s.top_p <= 1.0:
        raise InvalidRequest(f"sampling.top_p must be in (0, 1] (0: off), got {s.top_p}")
    if not math.isfinite(s.min_p) or not 0.0 <= s.min_p <= 1.0:
        raise InvalidRequest(f"sampling.min_p must be in [0, 1], got {s.min_p}")
    if rule.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs is {rule.top_logprobs}; at most {MAX_TOP_LOGPROBS}")


def validate_drafts(req: pb.PrefillRequest, tokens: list[int], vocab_size: int) -> None:
    """Speculative sampling's draft distributions: one per drafted token (the last ones of the request),
    each a distribution over the vocabulary that gives its drafted token a chance."""
    drafts = req.draft_distributions
    if not req.verify or req.rule.sampling.temperature <= 0:
        raise InvalidRequest("draft_distributions needs verify and a rule that samples (sampling.temperature > 0)")
    if len(drafts) >= len(tokens):
        raise InvalidRequest(f"{len(drafts)} draft distributions for {len(tokens)} tokens: the drafted tokens are "
                             "the last ones, after at least one that is not drafted")
    for drafted, q in zip(tokens[len(tokens) - len(drafts):], drafts):
        if len(q.token_ids) != len(q.probs) or not q.token_ids:
            raise InvalidRequest("a draft distribution needs as many probs as token_ids, at least one")
        if max(q.token_ids) >= vocab_size:
            raise InvalidRequest(f"draft distribution token ids must be below the vocabulary of {vocab_size}")
        if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in q.probs) or not 0.99 <= sum(q.probs) <= 1.01:
            raise InvalidRequest("draft distribution probs must be in [0, 1] and sum to 1")
        if dict(zip(q.token_ids, q.probs)).get(drafted, 0.0) <= 0.0:
            raise InvalidRequest(f"drafted token {drafted} has probability 0 in its draft distribution")


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


class SpanBuilder:
    """One span as an engine decodes it, token by token: applies the rule (judge, then a full context)
    to each chosen token, commits it or keeps it as the gated candidate, and says whether the span
    goes on. The backend feeds each token the builder lets through and offers the next choice.

        if builder.open():            # max_tokens 0 or a full cache end it before any choice
            while builder.offer(token, entropy, hidden):
                feed(token)            # the cache grows by one; choose the next token
        span = builder.span           # stop_reason set; cache_len is the caller's to set
    """

    def __init__(self, rule: pb.SpanRule, cache_len: int, max_context: int, on_token: OnToken):
        self.rule, self.max_context, self.on_token = rule, max_context, on_token
        self.cache_len = cache_len  # tokens in the cache when the next choice is made
        self.span = pb.Span()
        # Whether the engine's last distribution belongs to the cache's end (nothing chosen after it was
        # committed): then a later Decode may choose from it without feeding anything.
        self.fresh = True

    @property
    def done(self) -> bool:
        return self.span.stop_reason != pb.STOP_REASON_UNSPECIFIED

    def open(self) -> bool:
        """Whether the span chooses a token at all."""
        if self.rule.max_tokens == 0:
            self.span.stop_reason = pb.STOP_REASON_MAX_TOKENS
        elif self.cache_len >= self.max_context:
            self.span.stop_reason = pb.STOP_REASON_CONTEXT_FULL
        return not self.done

    @property
    def position(self) -> int:
        """The answer position of the token chosen next (the key of its draws)."""
        return self.rule.position + len(self.span.token_ids)

    def offer(self, token: int, entropy: float, hidden: Callable[[], bytes] | None = None,
              logprobs: pb.TokenLogprobs | None = None, distribution: pb.Distribution | None = None) -> bool:
        """The token the engine chose at the cache's end; True: it was committed and must be fed.
        hidden() gives the hidden state a gated candidate carries (read only when one is kept);
        logprobs and distribution are kept with a committed token when the rule asked for them."""
        commit, reason = judge(self.rule, len(self.span.token_ids), token, entropy)
        if not commit:
            self.span.candidate.CopyFrom(pb.Candidate(token_id=token, entropy=entropy,
                                                      hidden=hidden() if hidden else b"", logprobs=logprobs))
            self.span.stop_reason = reason
            return False
        self.span.token_ids.append(token)
        self.span.entropies.append(entropy)
        if self.rule.logprobs:
            self.span.logprobs.append(logprobs)
        if self.rule.return_distributions:
            self.span.distributions.append(distribution)
        self.on_token(pb.CommittedToken(token_id=token, entropy=entropy, logprobs=logprobs))
        self.fresh = False
        if reason is None and self.cache_len + 1 >= self.max_context:
            reason = pb.STOP_REASON_CONTEXT_FULL  # feeding it would leave no room for the next choice
        if reason is not None:
            self.span.stop_reason = reason
            return False
        self.cache_len += 1
        self.fresh = True
        return True

    def stop(self, reason: int) -> None:
        """End the span from outside the rule (the caller went away, the backend ended it early)."""
        if not self.done:
            self.span.stop_reason = reason


def float_bytes(hidden) -> bytes:
    """A hidden state (a tensor) as Candidate.hidden carries it: float32 little-endian values."""
    return b"" if hidden is None else hidden.float().cpu().numpy().astype("<f4").tobytes()
