"""The speculative-decoding baseline over the very same engines and RPCs (greedy draft-and-verify)."""

from collections.abc import Iterator

from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .loop import Budget, Progress, advance, finish_reason, roll_back
from .policies import LLM, SLM


def speculate(progress: Progress, engines: dict, journal, draft_tokens: int, budget: Budget
              ) -> Iterator[opb.SpanRecord]:
    """The SLM drafts up to k tokens; the LLM appends them in one verify prefill. Greedy: the LLM
    returns its own choice after each, and the longest agreeing prefix plus the LLM's choice at the
    first disagreement is kept: the LLM's greedy output. Sampling: the LLM accepts or rejects each
    drafted token by the drafts' distributions and its own (engine.proto draft_distributions): the
    LLM's sampling distribution. Both caches roll back to what is kept."""
    sampled = progress.sampling.temperature > 0
    _undo_unfinished_round(progress)
    while True:
        start = len(progress.sequence)
        remaining = progress.room  # the LLM's verify prefill appends every drafted token
        rule = progress.ruled(epb.SpanRule(max_tokens=min(draft_tokens, remaining),
                                           stop_token_ids=progress.stop_token_ids, return_distributions=sampled))
        draft = advance(engines[SLM], progress, SLM, rule, budget).span
        drafted = list(draft.token_ids)
        if not drafted:  # the SLM could not draft: its context is full
            progress.finish_reason = finish_reason(progress, context_full=True)
            return
        # The verify feeds the sequence's last token before the drafts: the LLM's choice after it is the first one
        # checked. A replica that took the session over between the two logged spans of a round finds the LLM's
        # cache past it (the first span's cursor): cut it back.
        roll_back(engines[LLM], progress, LLM, start - 1, budget)
        verified = advance(engines[LLM], progress, LLM, progress.ruled(epb.SpanRule(max_tokens=0)), budget,
                           draft=drafted, draft_distributions=draft.distributions if sampled else ())
        accepted, next_token, next_entropy, next_logprobs = _verdict(verified, drafted, sampled)
        kept = drafted[:accepted]
        ends = any(t in progress.stop_token_ids for t in kept) or accepted == remaining
        correction = [] if ends else [next_token]
        roll_back(engines[LLM], progress, LLM, start + accepted, budget)
        roll_back(engines[SLM], progress, SLM, start + accepted, budget)
        progress.stats.drafted_tokens += len(drafted)
        progress.stats.accepted_tokens += accepted
        cancel_requested = False
        corrected = epb.Span(token_ids=correction, entropies=[next_entropy][:len(correction)],
                             logprobs=[next_logprobs][:len(correction)] if progress.top_logprobs >= 0 else [],
                             timings=verified.span.timings)
        for role, span in ((SLM, epb.Span(token_ids=kept, entropies=draft.entropies[:accepted],
                                          logprobs=draft.logprobs[:accepted], timings=draft.timings)),
                           (LLM, corrected)):
            record = progress.commit(role, span)
            cancel_requested |= journal.log(progress, record)
            yield record
            if progress.stops is not None and progress.stops.ended_at is not None:
                break  # a stop string ended the answer in the drafted tokens
        progress.finish_reason = finish_reason(progress)
        if progress.finish_reason == opb.FINISH_REASON_UNSPECIFIED and cancel_requested:
            progress.finish_reason = opb.FINISH_REASON_CANCELLED
        if progress.finish_reason != opb.FINISH_REASON_UNSPECIFIED:
            return


def _undo_unfinished_round(progress: Progress) -> None:
    """Every round but the answer's last logs the SLM's kept drafts, then the LLM's token: a log that ends with
    SLM tokens ends inside a round, its replica having died between the two writes. The round is run again from
    its start, as an undisturbed run cuts it (it drafts and verifies the same: decoding is deterministic); its
    SLM span is then logged again at the same index, which the store takes as already there."""
    kept = len(progress.sources) - next((i + 1 for i in range(len(progress.sources) - 1, -1, -1)
                                         if progress.sources[i] != SLM), 0)
    if not kept:
        return
    del progress.tokens[-kept:], progress.sources[-kept:], progress.entropies[-kept:]
    progress.logged -= 1
    progress.stats.spans -= 1
    progress.stats.slm_tokens -= kept
    progress.stats.accepted_tokens -= kept
    for role in (SLM, LLM):  # the engines are cut back to the round's start by the calls' own repairs
        progress.synced[role] = min(progress.synced[role], len(progress.sequence))


def _verdict(verified: epb.PrefillResponse, drafted: list[int], sampled: bool):
    """(accepted drafted tokens, the LLM's token after them, its entropy, its logprobs)."""
    if sampled:
        return verified.accepted, verified.next_token_id, verified.next_entropy, verified.next_logprobs
    # The LLM's choices after the sequence's last token and after each drafted token.
    choices = verified.greedy_token_ids[-len(drafted) - 1:]
    entropies = verified.greedy_entropies[-len(drafted) - 1:]
    logprobs = verified.greedy_logprobs[-len(drafted) - 1:] or [epb.TokenLogprobs()] * len(choices)
    accepted = 0
    while accepted < len(drafted) and drafted[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted], entropies[accepted], logprobs[accepted]
