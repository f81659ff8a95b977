"""Response bodies and stream chunks of the OpenAI API, from a generation's events.

Each body and chunk carries an `rstitch` object beside OpenAI's fields: the session id, and for the
tokens it carries their sources ("slm" / "llm") and entropies; the one that ends the answer also its
finish reason as the gRPC API names it and its stats.
"""

import time
from dataclasses import dataclass, field

from rstitch.client import SOURCE_NAMES, finish_reason_name, stats_dict
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

FINISH_REASONS = {opb.FINISH_REASON_EOS: "stop", opb.FINISH_REASON_STOP: "stop",
                  opb.FINISH_REASON_MAX_NEW_TOKENS: "length", opb.FINISH_REASON_CONTEXT_FULL: "length",
                  opb.FINISH_REASON_CANCELLED: "abort", opb.FINISH_REASON_ERROR: "error"}
CHAT, TEXT = "chat", "text"  # the two kinds of completion


@dataclass
class Reply:
    """What every body and chunk of one response shares."""

    kind: str  # CHAT or TEXT
    model: str
    tokenizer: object
    logprobs: bool  # whether the request asked for them
    created: int = field(default_factory=lambda: int(time.time()))
    session_id: str = ""

    def envelope(self, choices: list, rstitch: dict, chunk: bool) -> dict:
        prefix, kind = ("chatcmpl", "chat.completion") if self.kind == CHAT else ("cmpl", "text_completion")
        return {"id": f"{prefix}-{self.session_id}", "object": f"{kind}.chunk" if chunk and self.kind == CHAT else kind,
                "created": self.created, "model": self.model, "choices": choices,
                "rstitch": {"session_id": self.session_id, **rstitch}}

    def choice(self, text: str | None, logprobs: list, finish_reason: str | None, chunk: bool,
               role: bool = False) -> dict:
        """The one choice; text None: a chunk that adds none (the last one)."""
        if self.kind == CHAT:
            message = {"role": "assistant"} if role or not chunk else {}
            if text is not None:
                message["content"] = text
            chosen = {"content": [self._chat_logprob(lp) for lp in logprobs]} if self.logprobs else None
            body = {"index": 0, "delta" if chunk else "message": message, "logprobs": chosen}
        else:
            chosen = self._text_logprobs(logprobs) if self.logprobs else None
            body = {"index": 0, "text": text or "", "logprobs": chosen}
        return body | {"finish_reason": finish_reason}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprob(self, entry: tuple[int, epb.TokenLogprobs]) -> dict:
        def one(token_id, logprob):
            text = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        token_id, lp = entry
        return one(token_id, lp.logprob) | {"top_logprobs": [one(t, p) for t, p in zip(lp.top_token_ids,
                                                                                      lp.top_logprobs)]}

    def _text_logprobs(self, entries: list[tuple[int, epb.TokenLogprobs]]) -> dict:
        tokens = [self._token(token_id) for token_id, _ in entries]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for _, lp in entries],
                "top_logprobs": [{self._token(t): p for t, p in zip(lp.top_token_ids, lp.top_logprobs)}
                                 for _, lp in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def ending(finished: opb.Finished) -> dict:
    return {"finish_reason": finish_reason_name(finished.finish_reason), "stats": stats_dict(finished.stats)}


@dataclass
class Answer:
    """A whole generation, gathered from its events for a plain (not streamed) response."""

    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    logprobs: list[tuple[int, epb.TokenLogprobs]] = field(default_factory=list)
    finished: opb.Finished | None = None

    def add(self, event: opb.GenerateResponse, reply: Reply) -> None:
        kind = event.WhichOneof("event")
        if kind == "started":
            reply.session_id = event.started.session_id
            self.prompt_tokens = len(event.started.prompt_token_ids)
        elif kind == "delta":
            span = event.delta.span
            self.token_ids += span.token_ids
            self.sources += [SOURCE_NAMES.get(span.source, "")] * len(span.token_ids)
            self.entropies += span.entropies
            self.logprobs += zip(span.token_ids, span.logprobs)
        else:
            self.finished = event.finished

    def body(self, reply: Reply) -> dict:
        finished = self.finished
        choice = reply.choice(finished.text, self.logprobs, FINISH_REASONS.get(finished.finish_reason), chunk=False)
        body = reply.envelope([choice], {"sources": self.sources, "entropies": self.entropies, **ending(finished)},
                              chunk=False)
        return body | {"usage": usage(self.prompt_tokens, len(self.token_ids))}


@dataclass
class Chunks:
    """A streamed response: the chunks of each event, one per answer token."""

    reply: Reply
    include_usage: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def of(self, event: opb.GenerateResponse) -> list[dict]:
        kind = event.WhichOneof("event")
        if kind == "started":
            self.reply.session_id = event.started.session_id
            self.prompt_tokens = len(event.started.prompt_token_ids)
            # Chat streams open with the assistant's role, as OpenAI's do.
            return [self._chunk(self.reply.choice("", [], None, chunk=True, role=True), [], [])] \
                if self.reply.kind == CHAT else []
        if kind == "delta":
            span = event.delta.span
            self.completion_tokens += len(span.token_ids)
            choice = self.reply.choice(event.delta.text, list(zip(span.token_ids, span.logprobs)), None, chunk=True)
            sources = [SOURCE_NAMES.get(span.source, "")] * len(span.token_ids)
            return [self._chunk(choice, sources, list(span.entropies))]
        finished = event.finished
        chunks = [self._chunk(self.reply.choice(None, [], FINISH_REASONS.get(finished.finish_reason), chunk=True),
                              [], [], **ending(finished))]
        if self.include_usage:
            chunks.append(self.reply.envelope([], {"sources": [], "entropies": []}, chunk=True)
                          | {"usage": usage(self.prompt_tokens, self.completion_tokens)})
        return chunks

    def _chunk(self, choice: dict, sources: list[str], entropies: list[float], **rstitch) -> dict:
        chunk = self.reply.envelope([choice], {"sources": sources, "entropies": entropies, **rstitch}, chunk=True)
        return chunk | {"usage": None} if self.include_usage else chunk
