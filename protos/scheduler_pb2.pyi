from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("client_id", "conversation_id", "text", "token_ids", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "priority", "request_id", "logprobs", "options")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    conversation_id: str
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    request_id: str
    logprobs: bool
    options: GenerationOptions
    def __init__(self, client_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[bool] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("ignore_eos", "min_tokens", "stop_token_ids", "top_k")
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ignore_eos: bool
    min_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    def __init__(self, ignore_eos: _Optional[bool] = ..., min_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("client_id", "conversation_id", "message", "max_tokens", "temperature", "top_p", "seed", "stop", "priority", "messages", "options", "request_id", "logprobs")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    conversation_id: str
    message: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    options: GenerationOptions
    request_id: str
    logprobs: bool
    def __init__(self, client_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., message: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "token", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: Token
    final: Final
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "ttft_s", "tbt_mean_s", "tbt_p99_s", "tbt_max_s", "preemptions", "bytes_swapped", "reused_prompt_tokens", "trailing_text")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TBT_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    TBT_P99_S_FIELD_NUMBER: _ClassVar[int]
    TBT_MAX_S_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    REUSED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAILING_TEXT_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tbt_mean_s: float
    tbt_p99_s: float
    tbt_max_s: float
    preemptions: int
    bytes_swapped: int
    reused_prompt_tokens: int
    trailing_text: str
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., tbt_mean_s: _Optional[float] = ..., tbt_p99_s: _Optional[float] = ..., tbt_max_s: _Optional[float] = ..., preemptions: _Optional[int] = ..., bytes_swapped: _Optional[int] = ..., reused_prompt_tokens: _Optional[int] = ..., trailing_text: _Optional[str] = ...) -> None: ...

class SetPriorityRequest(_message.Message):
    __slots__ = ("request_id", "client_id", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    client_id: str
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., client_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class SetPriorityResponse(_message.Message):
    __slots__ = ("updated",)
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    updated: int
    def __init__(self, updated: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("mode", "waiting", "running", "swapped", "running_blocks", "swapped_blocks", "draining_blocks", "free_blocks", "swaps_in_flight", "preemptions", "reuse_hit_tokens", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "tbt_p999_s", "finished", "swap_out_bytes", "copies", "steps", "step_overhead_mean_s", "step_overhead_p99_s", "executor_available", "kvstore_degraded", "model", "cached_blocks", "kvstores", "kvstores_down", "kvstore_degraded_seconds", "executor_idle_fraction", "wasted_tokens", "priority_inversions", "priority_inversion_s")
    MODE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SWAPS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    REUSE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_P95_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_S_FIELD_NUMBER: _ClassVar[int]
    TBT_P50_S_FIELD_NUMBER: _ClassVar[int]
    TBT_P99_S_FIELD_NUMBER: _ClassVar[int]
    TBT_P999_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SWAP_OUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_OVERHEAD_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    STEP_OVERHEAD_P99_S_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    KVSTORE_DEGRADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KVSTORES_FIELD_NUMBER: _ClassVar[int]
    KVSTORES_DOWN_FIELD_NUMBER: _ClassVar[int]
    KVSTORE_DEGRADED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_IDLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WASTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_INVERSIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_INVERSION_S_FIELD_NUMBER: _ClassVar[int]
    mode: str
    waiting: int
    running: int
    swapped: int
    running_blocks: int
    swapped_blocks: int
    draining_blocks: int
    free_blocks: int
    swaps_in_flight: int
    preemptions: int
    reuse_hit_tokens: int
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float
    tbt_p999_s: float
    finished: int
    swap_out_bytes: int
    copies: int
    steps: int
    step_overhead_mean_s: float
    step_overhead_p99_s: float
    executor_available: bool
    kvstore_degraded: bool
    model: str
    cached_blocks: int
    kvstores: int
    kvstores_down: int
    kvstore_degraded_seconds: float
    executor_idle_fraction: float
    wasted_tokens: int
    priority_inversions: int
    priority_inversion_s: float
    def __init__(self, mode: _Optional[str] = ..., waiting: _Optional[int] = ..., running: _Optional[int] = ..., swapped: _Optional[int] = ..., running_blocks: _Optional[int] = ..., swapped_blocks: _Optional[int] = ..., draining_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., swaps_in_flight: _Optional[int] = ..., preemptions: _Optional[int] = ..., reuse_hit_tokens: _Optional[int] = ..., ttft_p50_s: _Optional[float] = ..., ttft_p95_s: _Optional[float] = ..., ttft_p99_s: _Optional[float] = ..., tbt_p50_s: _Optional[float] = ..., tbt_p99_s: _Optional[float] = ..., tbt_p999_s: _Optional[float] = ..., finished: _Optional[int] = ..., swap_out_bytes: _Optional[int] = ..., copies: _Optional[int] = ..., steps: _Optional[int] = ..., step_overhead_mean_s: _Optional[float] = ..., step_overhead_p99_s: _Optional[float] = ..., executor_available: _Optional[bool] = ..., kvstore_degraded: _Optional[bool] = ..., model: _Optional[str] = ..., cached_blocks: _Optional[int] = ..., kvstores: _Optional[int] = ..., kvstores_down: _Optional[int] = ..., kvstore_degraded_seconds: _Optional[float] = ..., executor_idle_fraction: _Optional[float] = ..., wasted_tokens: _Optional[int] = ..., priority_inversions: _Optional[int] = ..., priority_inversion_s: _Optional[float] = ...) -> None: ...
