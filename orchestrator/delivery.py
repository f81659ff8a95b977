"""What a client receives of an answer: every token exactly once and in order, one Delta each."""

from rstitch.v1 import orchestrator_pb2 as opb

from .loop import Streamed
from .stops import StopStrings
from .text import IncrementalText


class Delivery:
    """The answer as one client sees it. Tokens reach it twice, as engines stream them and again as
    their span is logged, and again when a span is retried or a session resumed; each position goes
    out once, in order, and none the client already holds (`received`) goes out again. With stop
    strings, the text stops before the one that ended the answer, and what could still begin one is
    held back until it cannot (or the answer ends: `closing()`)."""

    def __init__(self, tokenizer, received: int = 0, stops=()):
        self.text = IncrementalText(tokenizer)
        self.received = received  # positions below this the client holds already
        self.stops = StopStrings(tokenizer, stops) if stops else None
        self.shown = 0  # characters of the text sent

    @property
    def delivered(self) -> int:
        return len(self.text.ids)

    def streamed(self, token: Streamed):
        if token.position == self.delivered:
            yield from self._deltas(token.source, [token.token_id], [token.entropy], [token.logprobs])

    def logged(self, record: opb.SpanRecord, end: int):
        """A span of the log that covers answer positions [end - len(record), end)."""
        skip = self.delivered - (end - len(record.token_ids))
        if 0 <= skip < len(record.token_ids):
            logprobs = list(record.logprobs[skip:]) or [None] * (len(record.token_ids) - skip)
            yield from self._deltas(record.source, record.token_ids[skip:], record.entropies[skip:], logprobs)

    def closing(self):
        """At the answer's end: a Delta (without tokens) with the text held back for stop strings."""
        rest = self.final_text()[self.shown:]
        if rest and self.delivered > self.received:
            self.shown += len(rest)
            yield opb.GenerateResponse(delta=opb.Delta(span=opb.SpanRecord(), text=rest))

    def final_text(self) -> str:
        cut = self.stops.cut if self.stops is not None else None
        return self.text.text[:cut] if cut is not None else self.text.text

    def _visible(self) -> str:
        return self.stops.visible(self.text.text) if self.stops is not None else self.text.text

    def _deltas(self, source: int, token_ids, entropies, logprobs):
        for token_id, entropy, token_logprobs in zip(token_ids, entropies, logprobs):
            position = self.delivered
            self.text.push([token_id])  # tokens the client holds still count for the text that follows
            if self.stops is not None:
                self.stops.push(position, token_id)
            visible = self._visible()
            if self.delivered > self.received:
                span = opb.SpanRecord(source=source, token_ids=[token_id], entropies=[entropy],
                                      logprobs=[token_logprobs] if token_logprobs is not None else [])
                yield opb.GenerateResponse(delta=opb.Delta(span=span, text=visible[self.shown:]))
            self.shown = max(self.shown, len(visible))
