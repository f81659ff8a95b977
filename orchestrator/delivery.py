"""What a client receives of an answer: every token exactly once and in order, one Delta each."""

from rstitch.v1 import orchestrator_pb2 as opb

from .loop import Streamed
from .text import IncrementalText


class Delivery:
    """The answer as one client sees it. Tokens reach it twice, as engines stream them and again as
    their span is logged, and again when a span is retried or a session resumed; each position goes
    out once, in order, and none the client already holds (`received`) goes out again."""

    def __init__(self, tokenizer, received: int = 0):
        self.text = IncrementalText(tokenizer)
        self.received = received  # positions below this the client holds already

    @property
    def delivered(self) -> int:
        return len(self.text.ids)

    def streamed(self, token: Streamed):
        if token.position == self.delivered:
            yield from self._deltas(token.source, [token.token_id], [token.entropy])

    def logged(self, record: opb.SpanRecord, end: int):
        """A span of the log that covers answer positions [end - len(record), end)."""
        skip = self.delivered - (end - len(record.token_ids))
        if 0 <= skip < len(record.token_ids):
            yield from self._deltas(record.source, record.token_ids[skip:], record.entropies[skip:])

    def _deltas(self, source: int, token_ids, entropies):
        for token_id, entropy in zip(token_ids, entropies):
            text = self.text.push([token_id])  # tokens the client holds still count for the text that follows
            if self.delivered > self.received:
                span = opb.SpanRecord(source=source, token_ids=[token_id], entropies=[entropy])
                yield opb.GenerateResponse(delta=opb.Delta(span=span, text=text))
