"""Requests of the OpenAI API as this server reads them, and the GenerationSpec each becomes.

Every field is one this server honours, or one it takes only at the value that changes nothing (`n`
1, penalties 0, ...: clients send them by default). Any other field, among them those vLLM takes
and we cannot honour (tools, response_format, min_tokens, ...), is refused naming it rather than
ignored. Types are strict (a number is not a string, NaN is not a number). The R-Stitch knobs
(policy, tau, slm_probability, draft_tokens, top_k, min_p, and vLLM's stop_token_ids) travel as
extra body fields, the openai client's `extra_body`.
"""

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from rstitch.client import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, POLICIES, OptionNotForPolicy, make_spec
from rstitch.v1 import orchestrator_pb2 as opb

from .errors import bad_request

UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
MAX_STOP_TOKEN_IDS = 256  # as the gRPC API

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
Fraction = Annotated[float, Field(ge=0, le=1)]
# Fields taken only at the value under which the answer is what it would be without them.
NEUTRAL = {"n": 1, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1,
           "echo": False, "logit_bias": {}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # R-Stitch's own (extra_body)
    policy: str = "entropy"
    tau: Fraction | None = None
    slm_probability: Fraction | None = None
    draft_tokens: int | None = Field(None, ge=1, le=64)
    top_k: int | None = Field(None, ge=-1, le=UINT32_MAX)  # vLLM's -1, as 0: no truncation
    min_p: Fraction | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None

    @field_validator(*NEUTRAL, check_fields=False)
    @classmethod
    def _neutral(cls, value, info: ValidationInfo):
        neutral = NEUTRAL[info.field_name]
        if value is not None and value != neutral:
            raise ValueError(f"only {json.dumps(neutral)} is supported by this server")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose from {', '.join(POLICIES)}")
        return value

    def spec(self, max_tokens: int | None, logprobs: int | None, **prompt) -> opb.GenerationSpec:
        """The request as the gRPC API takes it; prompt: make_spec's prompt (and raw) or messages."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "stream_options is only allowed with stream: true")
        try:
            return make_spec(**prompt, policy=self.policy, tau=self.tau, max_new_tokens=max_tokens or 0,
                             stop_token_ids=self.stop_token_ids or (), slm_probability=self.slm_probability,
                             seed=self.seed, draft_tokens=self.draft_tokens, temperature=self.temperature,
                             top_p=self.top_p, top_k=None if self.top_k == -1 else self.top_k, min_p=self.min_p,
                             stop=self.stop or (), logprobs=logprobs)
        except OptionNotForPolicy as e:
            raise bad_request(e.option, str(e)) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(_Strict):
    role: str
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_joined(cls, value: Any) -> Any:
        """Content as a list of parts is taken when every part is text."""
        if not isinstance(value, list):
            return value
        kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in value}
        if kinds - {"text"} or not all(isinstance(part.get("text"), str) for part in value):
            raise ValueError(f"only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported, "
                             f"got {sorted(map(str, kinds))}")
        return "".join(part["text"] for part in value)


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def to_spec(self) -> opb.GenerationSpec:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "top_logprobs needs logprobs: true")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_tokens", "max_tokens and max_completion_tokens differ; send one of them")
        return self.spec(self.answer_limit[1], (self.top_logprobs or 0) if self.logprobs else None,
                         messages=[message.model_dump() for message in self.messages])

    @property
    def answer_limit(self) -> tuple[str, int | None]:
        """The answer's length limit: the field that gave it, and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]  # what _one_prompt lets through, checked there
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    echo: bool | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """A string or token ids, alone or as a batch of one (a batch of several would need n > 1)."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and any(isinstance(item, str | list) for item in value):
            raise ValueError("one prompt per request: batches of several prompts are not supported")
        if not (isinstance(value, list) and value and all(type(t) is int and 0 <= t <= UINT32_MAX for t in value)):
            raise ValueError("must be a string or a non-empty list of token ids (whole numbers >= 0)")
        return value

    def to_spec(self) -> opb.GenerationSpec:
        prompt = {"prompt": self.prompt, "raw": True} if isinstance(self.prompt, str) else {"prompt": self.prompt}
        return self.spec(self.max_tokens, self.logprobs, **prompt)

    @property
    def answer_limit(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens
