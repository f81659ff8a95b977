from rstitch.v1 import engine_pb2 as _engine_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_ENTROPY: _ClassVar[Policy]
    POLICY_LLM: _ClassVar[Policy]
    POLICY_SLM: _ClassVar[Policy]
    POLICY_RANDOM: _ClassVar[Policy]
    POLICY_SPEC: _ClassVar[Policy]
    POLICY_ROUTER: _ClassVar[Policy]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_SLM: _ClassVar[Source]
    SOURCE_LLM: _ClassVar[Source]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_RUNNING: _ClassVar[Status]
    STATUS_FINISHED: _ClassVar[Status]
    STATUS_CANCELLED: _ClassVar[Status]
    STATUS_FAILED: _ClassVar[Status]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_MAX_NEW_TOKENS: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT_FULL: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
POLICY_UNSPECIFIED: Policy
POLICY_ENTROPY: Policy
POLICY_LLM: Policy
POLICY_SLM: Policy
POLICY_RANDOM: Policy
POLICY_SPEC: Policy
POLICY_ROUTER: Policy
SOURCE_UNSPECIFIED: Source
SOURCE_SLM: Source
SOURCE_LLM: Source
STATUS_UNSPECIFIED: Status
STATUS_RUNNING: Status
STATUS_FINISHED: Status
STATUS_CANCELLED: Status
STATUS_FAILED: Status
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_MAX_NEW_TOKENS: FinishReason
FINISH_REASON_CONTEXT_FULL: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason
FINISH_REASON_STOP: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerationSpec(_message.Message):
    __slots__ = ("text", "messages", "token_ids", "raw", "policy", "tau", "max_new_tokens", "stop_token_ids", "slm_probability", "seed", "draft_tokens", "router", "temperature", "top_p", "top_k", "min_p", "stop", "logprobs", "top_logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SLM_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    messages: Messages
    token_ids: TokenIds
    raw: bool
    policy: Policy
    tau: float
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    slm_probability: float
    seed: int
    draft_tokens: int
    router: bytes
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    logprobs: bool
    top_logprobs: int
    def __init__(self, text: _Optional[str] = ..., messages: _Optional[_Union[Messages, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., raw: _Optional[bool] = ..., policy: _Optional[_Union[Policy, str]] = ..., tau: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., slm_probability: _Optional[float] = ..., seed: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., router: _Optional[bytes] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("spec", "session_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    spec: GenerationSpec
    session_id: str
    def __init__(self, spec: _Optional[_Union[GenerationSpec, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class SpanRecord(_message.Message):
    __slots__ = ("source", "token_ids", "entropies", "logprobs")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    source: Source
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    logprobs: _containers.RepeatedCompositeFieldContainer[_engine_pb2.TokenLogprobs]
    def __init__(self, source: _Optional[_Union[Source, str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., entropies: _Optional[_Iterable[float]] = ..., logprobs: _Optional[_Iterable[_Union[_engine_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("slm_tokens", "llm_tokens", "switches", "spans", "slm_prefill_tokens", "llm_prefill_tokens", "gated_tokens", "latency_ms", "slm_forward_ms", "llm_forward_ms", "drafted_tokens", "accepted_tokens", "router_kept_tokens", "slm_queue_ms", "llm_queue_ms", "rpc_ms", "store_ms", "switch_ms")
    SLM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LLM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    SLM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LLM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    SLM_FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    LLM_FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLM_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    LLM_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    RPC_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_MS_FIELD_NUMBER: _ClassVar[int]
    SWITCH_MS_FIELD_NUMBER: _ClassVar[int]
    slm_tokens: int
    llm_tokens: int
    switches: int
    spans: int
    slm_prefill_tokens: int
    llm_prefill_tokens: int
    gated_tokens: int
    latency_ms: float
    slm_forward_ms: float
    llm_forward_ms: float
    drafted_tokens: int
    accepted_tokens: int
    router_kept_tokens: int
    slm_queue_ms: float
    llm_queue_ms: float
    rpc_ms: float
    store_ms: float
    switch_ms: float
    def __init__(self, slm_tokens: _Optional[int] = ..., llm_tokens: _Optional[int] = ..., switches: _Optional[int] = ..., spans: _Optional[int] = ..., slm_prefill_tokens: _Optional[int] = ..., llm_prefill_tokens: _Optional[int] = ..., gated_tokens: _Optional[int] = ..., latency_ms: _Optional[float] = ..., slm_forward_ms: _Optional[float] = ..., llm_forward_ms: _Optional[float] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., router_kept_tokens: _Optional[int] = ..., slm_queue_ms: _Optional[float] = ..., llm_queue_ms: _Optional[float] = ..., rpc_ms: _Optional[float] = ..., store_ms: _Optional[float] = ..., switch_ms: _Optional[float] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("session_id", "prompt_token_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("span", "text")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    span: SpanRecord
    text: str
    def __init__(self, span: _Optional[_Union[SpanRecord, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("finish_reason", "stats", "text")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    stats: Stats
    text: str
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("started", "delta", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: Started
    delta: Delta
    finished: Finished
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., delta: _Optional[_Union[Delta, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "status", "spec", "prompt_token_ids", "spans", "stats", "finish_reason", "error", "text", "tau", "max_new_tokens", "slm_probability", "draft_tokens", "slm_replica", "llm_replica")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLM_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLM_REPLICA_FIELD_NUMBER: _ClassVar[int]
    LLM_REPLICA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: Status
    spec: GenerationSpec
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    spans: _containers.RepeatedCompositeFieldContainer[SpanRecord]
    stats: Stats
    finish_reason: FinishReason
    error: str
    text: str
    tau: float
    max_new_tokens: int
    slm_probability: float
    draft_tokens: int
    slm_replica: str
    llm_replica: str
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., spec: _Optional[_Union[GenerationSpec, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., spans: _Optional[_Iterable[_Union[SpanRecord, _Mapping]]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., error: _Optional[str] = ..., text: _Optional[str] = ..., tau: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., slm_probability: _Optional[float] = ..., draft_tokens: _Optional[int] = ..., slm_replica: _Optional[str] = ..., llm_replica: _Optional[str] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: GenerationSpec
    def __init__(self, spec: _Optional[_Union[GenerationSpec, _Mapping]] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("session_id", "received_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    received_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., received_tokens: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: Status
    def __init__(self, status: _Optional[_Union[Status, str]] = ...) -> None: ...
