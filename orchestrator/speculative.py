"""The speculative-decoding baseline over the very same engines and RPCs (greedy draft-and-verify)."""

from collections.abc import Iterator

from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .loop import Budget, Progress, advance, finish_reason, roll_back
from .policies import LLM, SLM


def speculate(progress: Progress, engines: dict, journal, draft_tokens: int, budget: Budget
              ) -> Iterator[opb.SpanRecord]:
    """The SLM drafts up to k tokens; the LLM appends them in one verify prefill and returns its own
    greedy choice after each; the longest agreeing prefix plus the LLM's choice at the first
    disagreement is kept, and both caches roll back to it. The output is the LLM's greedy output."""
    while True:
        start = len(progress.sequence)
        remaining = progress.room  # the LLM's verify prefill appends every drafted token
        rule = epb.SpanRule(max_tokens=min(draft_tokens, remaining), stop_token_ids=progress.stop_token_ids)
        draft = advance(engines[SLM], progress, SLM, rule, budget).span
        drafted = list(draft.token_ids)
        if not drafted:  # the SLM could not draft: its context is full
            progress.finish_reason = finish_reason(progress, context_full=True)
            return
        verified = advance(engines[LLM], progress, LLM, epb.SpanRule(max_tokens=0), budget, draft=drafted)
        # The LLM's choices after the sequence's last token and after each drafted token.
        choices = verified.greedy_token_ids[-len(drafted) - 1:]
        entropies = verified.greedy_entropies[-len(drafted) - 1:]
        accepted = 0
        while accepted < len(drafted) and drafted[accepted] == choices[accepted]:
            accepted += 1
        kept = drafted[:accepted]
        ends = any(t in progress.stop_token_ids for t in kept) or accepted == remaining
        correction = [] if ends else [choices[accepted]]
        roll_back(engines[LLM], progress, LLM, start + accepted, budget)
        roll_back(engines[SLM], progress, SLM, start + accepted, budget)
        progress.stats.drafted_tokens += len(drafted)
        progress.stats.accepted_tokens += accepted
        cancel_requested = False
        for role, tokens, ents, timings in ((SLM, kept, draft.entropies[:accepted], draft.timings),
                                            (LLM, correction, entropies[accepted:accepted + 1], verified.span.timings)):
            record = progress.commit(role, epb.Span(token_ids=tokens, entropies=ents, timings=timings))
            cancel_requested |= journal.log(progress, record)
            yield record
        progress.finish_reason = finish_reason(progress)
        if progress.finish_reason == opb.FINISH_REASON_UNSPECIFIED and cancel_requested:
            progress.finish_reason = opb.FINISH_REASON_CANCELLED
        if progress.finish_reason != opb.FINISH_REASON_UNSPECIFIED:
            return

