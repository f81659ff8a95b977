from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Gate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_UNSPECIFIED: _ClassVar[Gate]
    GATE_STOP_ABOVE: _ClassVar[Gate]
    GATE_STOP_AT_OR_BELOW: _ClassVar[Gate]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_MAX_TOKENS: _ClassVar[StopReason]
    STOP_REASON_STOP_TOKEN: _ClassVar[StopReason]
    STOP_REASON_CONTEXT_FULL: _ClassVar[StopReason]
    STOP_REASON_GATE: _ClassVar[StopReason]
GATE_UNSPECIFIED: Gate
GATE_STOP_ABOVE: Gate
GATE_STOP_AT_OR_BELOW: Gate
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_MAX_TOKENS: StopReason
STOP_REASON_STOP_TOKEN: StopReason
STOP_REASON_CONTEXT_FULL: StopReason
STOP_REASON_GATE: StopReason

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SpanRule(_message.Message):
    __slots__ = ("max_tokens", "stop_token_ids", "gate", "tau", "return_hidden", "sampling", "position", "logprobs", "top_logprobs", "return_distributions")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    RETURN_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RETURN_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    gate: Gate
    tau: float
    return_hidden: bool
    sampling: Sampling
    position: int
    logprobs: bool
    top_logprobs: int
    return_distributions: bool
    def __init__(self, max_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., gate: _Optional[_Union[Gate, str]] = ..., tau: _Optional[float] = ..., return_hidden: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., position: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., return_distributions: _Optional[bool] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("logprob", "top_token_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Distribution(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("token_id", "entropy", "hidden", "logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    entropy: float
    hidden: bytes
    logprobs: TokenLogprobs
    def __init__(self, token_id: _Optional[int] = ..., entropy: _Optional[float] = ..., hidden: _Optional[bytes] = ..., logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "forward_ms", "forwards", "first_token_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    forward_ms: float
    forwards: int
    first_token_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., forward_ms: _Optional[float] = ..., forwards: _Optional[int] = ..., first_token_ms: _Optional[float] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("token_ids", "entropies", "candidate", "stop_reason", "cache_len", "timings", "logprobs", "distributions")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CACHE_LEN_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    candidate: Candidate
    stop_reason: StopReason
    cache_len: int
    timings: Timings
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    distributions: _containers.RepeatedCompositeFieldContainer[Distribution]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., entropies: _Optional[_Iterable[float]] = ..., candidate: _Optional[_Union[Candidate, _Mapping]] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., cache_len: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., distributions: _Optional[_Iterable[_Union[Distribution, _Mapping]]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("session_id", "base_len", "token_ids", "rule", "verify", "draft_distributions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    base_len: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    rule: SpanRule
    verify: bool
    draft_distributions: _containers.RepeatedCompositeFieldContainer[Distribution]
    def __init__(self, session_id: _Optional[str] = ..., base_len: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., rule: _Optional[_Union[SpanRule, _Mapping]] = ..., verify: _Optional[bool] = ..., draft_distributions: _Optional[_Iterable[_Union[Distribution, _Mapping]]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("span", "greedy_token_ids", "greedy_entropies", "accepted", "next_token_id", "next_entropy", "next_logprobs", "greedy_logprobs")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    GREEDY_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GREEDY_ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    NEXT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GREEDY_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    span: Span
    greedy_token_ids: _containers.RepeatedScalarFieldContainer[int]
    greedy_entropies: _containers.RepeatedScalarFieldContainer[float]
    accepted: int
    next_token_id: int
    next_entropy: float
    next_logprobs: TokenLogprobs
    greedy_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    def __init__(self, span: _Optional[_Union[Span, _Mapping]] = ..., greedy_token_ids: _Optional[_Iterable[int]] = ..., greedy_entropies: _Optional[_Iterable[float]] = ..., accepted: _Optional[int] = ..., next_token_id: _Optional[int] = ..., next_entropy: _Optional[float] = ..., next_logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., greedy_logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ...) -> None: ...

class CommittedToken(_message.Message):
    __slots__ = ("token_id", "entropy", "logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    entropy: float
    logprobs: TokenLogprobs
    def __init__(self, token_id: _Optional[int] = ..., entropy: _Optional[float] = ..., logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ...) -> None: ...

class StreamSpanRequest(_message.Message):
    __slots__ = ("prefill",)
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    prefill: PrefillRequest
    def __init__(self, prefill: _Optional[_Union[PrefillRequest, _Mapping]] = ...) -> None: ...

class StreamSpanResponse(_message.Message):
    __slots__ = ("token", "done")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    token: CommittedToken
    done: PrefillResponse
    def __init__(self, token: _Optional[_Union[CommittedToken, _Mapping]] = ..., done: _Optional[_Union[PrefillResponse, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("session_id", "base_len", "rule")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    base_len: int
    rule: SpanRule
    def __init__(self, session_id: _Optional[str] = ..., base_len: _Optional[int] = ..., rule: _Optional[_Union[SpanRule, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("span",)
    SPAN_FIELD_NUMBER: _ClassVar[int]
    span: Span
    def __init__(self, span: _Optional[_Union[Span, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("session_id", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("cache_len",)
    CACHE_LEN_FIELD_NUMBER: _ClassVar[int]
    cache_len: int
    def __init__(self, cache_len: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "role", "vocab_size", "tokenizer_fingerprint", "max_context", "kv_capacity_tokens", "kv_used_tokens", "sessions", "eos_token_ids", "backend", "device", "dtype", "hidden_size", "kv_evictions", "latency_model", "steps", "step_tokens", "busy_seconds", "forward_seconds")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MODEL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    role: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_context: int
    kv_capacity_tokens: int
    kv_used_tokens: int
    sessions: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    backend: str
    device: str
    dtype: str
    hidden_size: int
    kv_evictions: int
    latency_model: LatencyModel
    steps: int
    step_tokens: int
    busy_seconds: float
    forward_seconds: float
    def __init__(self, model_id: _Optional[str] = ..., role: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., max_context: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., sessions: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., kv_evictions: _Optional[int] = ..., latency_model: _Optional[_Union[LatencyModel, _Mapping]] = ..., steps: _Optional[int] = ..., step_tokens: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., forward_seconds: _Optional[float] = ...) -> None: ...

class LatencyModel(_message.Message):
    __slots__ = ("a", "b", "c", "d", "r2", "measured_on")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    D_FIELD_NUMBER: _ClassVar[int]
    R2_FIELD_NUMBER: _ClassVar[int]
    MEASURED_ON_FIELD_NUMBER: _ClassVar[int]
    a: float
    b: float
    c: float
    d: float
    r2: float
    measured_on: str
    def __init__(self, a: _Optional[float] = ..., b: _Optional[float] = ..., c: _Optional[float] = ..., d: _Optional[float] = ..., r2: _Optional[float] = ..., measured_on: _Optional[str] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTokenizerResponse(_message.Message):
    __slots__ = ("files", "fingerprint")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    files: _containers.ScalarMap[str, bytes]
    fingerprint: str
    def __init__(self, files: _Optional[_Mapping[str, bytes]] = ..., fingerprint: _Optional[str] = ...) -> None: ...
