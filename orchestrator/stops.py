"""Stop strings: where the answer's text first contains one, as its tokens arrive.

The answer ends with the token whose text completes the first occurrence of any stop string
(FINISH_REASON_STOP), even when the string spans several tokens or a switch between the models; the
text a client sees stops before it, and while the text ends with what could begin a stop string that
much is held back (as vLLM does). The log keeps the tokens the models wrote.
"""

from .text import IncrementalText


class StopStrings:
    def __init__(self, tokenizer, stops):
        self.stops = [s for s in stops if s]
        self.text = IncrementalText(tokenizer)
        self.ended_at: int | None = None  # answer tokens up to and including the one that completed a stop string
        self.cut: int | None = None  # the answer's text ends here (the stop string's first character)

    def push(self, position: int, token_id: int) -> bool:
        """Answer token `position` arrived (in order; a token already seen is ignored). True when the
        answer ends with it."""
        if self.ended_at is not None:
            return position + 1 >= self.ended_at
        if not self.stops or position != len(self.text.ids):
            return False
        before = len(self.text.text)
        self.text.push([token_id])
        start = max(0, before - max(map(len, self.stops)) + 1)
        found = [i for i in (self.text.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.ended_at, self.cut = position + 1, min(found)
        return self.ended_at is not None

    def visible(self, text: str) -> str:
        """What of the answer's `text` a client may see now: up to the stop string once one is found,
        else without the end that could still turn into one."""
        if self.cut is not None:
            return text[:self.cut]
        held = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        return text[:len(text) - held]
