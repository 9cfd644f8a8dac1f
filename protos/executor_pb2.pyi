from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_OUT: _ClassVar[Direction]
    DIRECTION_IN: _ClassVar[Direction]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_OUT: Direction
DIRECTION_IN: Direction

class BlockGeometry(_message.Message):
    __slots__ = ("block_size", "num_layers", "kv_heads", "head_dim", "dtype", "block_bytes")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_bytes: int
    def __init__(self, block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model_fingerprint", "geometry", "num_gpu_blocks", "backend", "vocab_size", "max_model_len", "host_arena", "num_host_blocks", "eos_token_id", "host_arenas", "checkpoint", "tokenizer_sha256", "eos_token_ids", "batch_invariant")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    HOST_ARENA_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ARENAS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    geometry: BlockGeometry
    num_gpu_blocks: int
    backend: str
    vocab_size: int
    max_model_len: int
    host_arena: str
    num_host_blocks: int
    eos_token_id: int
    host_arenas: _containers.RepeatedScalarFieldContainer[str]
    checkpoint: str
    tokenizer_sha256: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    batch_invariant: bool
    def __init__(self, model_fingerprint: _Optional[str] = ..., geometry: _Optional[_Union[BlockGeometry, _Mapping]] = ..., num_gpu_blocks: _Optional[int] = ..., backend: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., host_arena: _Optional[str] = ..., num_host_blocks: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., host_arenas: _Optional[_Iterable[str]] = ..., checkpoint: _Optional[str] = ..., tokenizer_sha256: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., batch_invariant: _Optional[bool] = ...) -> None: ...

class AttachHostArenaRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AttachHostArenaResponse(_message.Message):
    __slots__ = ("num_host_blocks", "first_host_block")
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_HOST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    num_host_blocks: int
    first_host_block: int
    def __init__(self, num_host_blocks: _Optional[int] = ..., first_host_block: _Optional[int] = ...) -> None: ...

class DetachHostArenaRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DetachHostArenaResponse(_message.Message):
    __slots__ = ("num_host_blocks", "first_host_block")
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_HOST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    num_host_blocks: int
    first_host_block: int
    def __init__(self, num_host_blocks: _Optional[int] = ..., first_host_block: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "seed", "logprobs", "top_k")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    logprobs: bool
    top_k: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class SequenceInput(_message.Message):
    __slots__ = ("request_id", "block_table", "start", "token_ids", "sample", "sampling", "banned_token_ids", "from_last_step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    BANNED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FROM_LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_table: _containers.RepeatedScalarFieldContainer[int]
    start: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    sampling: SamplingParams
    banned_token_ids: _containers.RepeatedScalarFieldContainer[int]
    from_last_step: bool
    def __init__(self, request_id: _Optional[str] = ..., block_table: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., banned_token_ids: _Optional[_Iterable[int]] = ..., from_last_step: _Optional[bool] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("iteration", "sequences", "follows")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceInput]
    follows: int
    def __init__(self, iteration: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceInput, _Mapping]]] = ..., follows: _Optional[int] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("request_id", "token_id", "logprob")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    logprob: float
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("tokens", "duration_s")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    duration_s: float
    def __init__(self, tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., duration_s: _Optional[float] = ...) -> None: ...

class Extent(_message.Message):
    __slots__ = ("start", "length")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class SwapCopy(_message.Message):
    __slots__ = ("src", "dst")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    src: Extent
    dst: Extent
    def __init__(self, src: _Optional[_Union[Extent, _Mapping]] = ..., dst: _Optional[_Union[Extent, _Mapping]] = ...) -> None: ...

class SwapOrder(_message.Message):
    __slots__ = ("swap_id", "request_id", "direction", "copies")
    SWAP_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    swap_id: int
    request_id: str
    direction: Direction
    copies: _containers.RepeatedCompositeFieldContainer[SwapCopy]
    def __init__(self, swap_id: _Optional[int] = ..., request_id: _Optional[str] = ..., direction: _Optional[_Union[Direction, str]] = ..., copies: _Optional[_Iterable[_Union[SwapCopy, _Mapping]]] = ...) -> None: ...

class SubmitSwapsRequest(_message.Message):
    __slots__ = ("swaps",)
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    swaps: _containers.RepeatedCompositeFieldContainer[SwapOrder]
    def __init__(self, swaps: _Optional[_Iterable[_Union[SwapOrder, _Mapping]]] = ...) -> None: ...

class SubmitSwapsResponse(_message.Message):
    __slots__ = ("tickets",)
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    tickets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tickets: _Optional[_Iterable[int]] = ...) -> None: ...

class SwapEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SwapEvent(_message.Message):
    __slots__ = ("ticket", "request_id", "direction", "bytes", "duration_s", "error")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ticket: int
    request_id: str
    direction: Direction
    bytes: int
    duration_s: float
    error: str
    def __init__(self, ticket: _Optional[int] = ..., request_id: _Optional[str] = ..., direction: _Optional[_Union[Direction, str]] = ..., bytes: _Optional[int] = ..., duration_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...
