from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Extent(_message.Message):
    __slots__ = ("start", "length")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("instance_id", "arena_name", "num_blocks", "block_bytes", "block_size", "model_fingerprint", "index_backend", "lease_seconds")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INDEX_BACKEND_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    arena_name: str
    num_blocks: int
    block_bytes: int
    block_size: int
    model_fingerprint: str
    index_backend: str
    lease_seconds: float
    def __init__(self, instance_id: _Optional[str] = ..., arena_name: _Optional[str] = ..., num_blocks: _Optional[int] = ..., block_bytes: _Optional[int] = ..., block_size: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., index_backend: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class ReservationRef(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    def __init__(self, reservation_id: _Optional[int] = ...) -> None: ...

class PinRef(_message.Message):
    __slots__ = ("pin_id",)
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    pin_id: int
    def __init__(self, pin_id: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("conversation_id",)
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    def __init__(self, conversation_id: _Optional[str] = ...) -> None: ...

class ChainOp(_message.Message):
    __slots__ = ("op_id", "conversation_id", "chain", "num_tokens")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    op_id: int
    conversation_id: str
    chain: _containers.RepeatedScalarFieldContainer[bytes]
    num_tokens: int
    def __init__(self, op_id: _Optional[int] = ..., conversation_id: _Optional[str] = ..., chain: _Optional[_Iterable[bytes]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class BatchOp(_message.Message):
    __slots__ = ("reserve", "pin", "commit", "abort", "unpin", "release")
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    UNPIN_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    reserve: ChainOp
    pin: ChainOp
    commit: ReservationRef
    abort: ReservationRef
    unpin: PinRef
    release: ReleaseRequest
    def __init__(self, reserve: _Optional[_Union[ChainOp, _Mapping]] = ..., pin: _Optional[_Union[ChainOp, _Mapping]] = ..., commit: _Optional[_Union[ReservationRef, _Mapping]] = ..., abort: _Optional[_Union[ReservationRef, _Mapping]] = ..., unpin: _Optional[_Union[PinRef, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("model_fingerprint", "ops", "client_id", "request_id", "renew_reservations", "renew_pins", "abandon_requests")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RENEW_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    RENEW_PINS_FIELD_NUMBER: _ClassVar[int]
    ABANDON_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    ops: _containers.RepeatedCompositeFieldContainer[BatchOp]
    client_id: str
    request_id: int
    renew_reservations: _containers.RepeatedScalarFieldContainer[int]
    renew_pins: _containers.RepeatedScalarFieldContainer[int]
    abandon_requests: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_fingerprint: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[BatchOp, _Mapping]]] = ..., client_id: _Optional[str] = ..., request_id: _Optional[int] = ..., renew_reservations: _Optional[_Iterable[int]] = ..., renew_pins: _Optional[_Iterable[int]] = ..., abandon_requests: _Optional[_Iterable[int]] = ...) -> None: ...

class ReservedReply(_message.Message):
    __slots__ = ("op_id", "ok", "reservation_id", "valid_tokens", "valid_extents", "new_extents")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    VALID_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALID_EXTENTS_FIELD_NUMBER: _ClassVar[int]
    NEW_EXTENTS_FIELD_NUMBER: _ClassVar[int]
    op_id: int
    ok: bool
    reservation_id: int
    valid_tokens: int
    valid_extents: _containers.RepeatedCompositeFieldContainer[Extent]
    new_extents: _containers.RepeatedCompositeFieldContainer[Extent]
    def __init__(self, op_id: _Optional[int] = ..., ok: _Optional[bool] = ..., reservation_id: _Optional[int] = ..., valid_tokens: _Optional[int] = ..., valid_extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ..., new_extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ...) -> None: ...

class PinnedReply(_message.Message):
    __slots__ = ("op_id", "pin_id", "valid_tokens", "extents", "holder_id")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    VALID_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    op_id: int
    pin_id: int
    valid_tokens: int
    extents: _containers.RepeatedCompositeFieldContainer[Extent]
    holder_id: str
    def __init__(self, op_id: _Optional[int] = ..., pin_id: _Optional[int] = ..., valid_tokens: _Optional[int] = ..., extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ..., holder_id: _Optional[str] = ...) -> None: ...

class BatchReply(_message.Message):
    __slots__ = ("reserved", "pinned")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    reserved: ReservedReply
    pinned: PinnedReply
    def __init__(self, reserved: _Optional[_Union[ReservedReply, _Mapping]] = ..., pinned: _Optional[_Union[PinnedReply, _Mapping]] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("replies", "instance_id", "arena_name", "lapsed_reservations", "lapsed_pins")
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_NAME_FIELD_NUMBER: _ClassVar[int]
    LAPSED_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    LAPSED_PINS_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[BatchReply]
    instance_id: str
    arena_name: str
    lapsed_reservations: _containers.RepeatedScalarFieldContainer[int]
    lapsed_pins: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, replies: _Optional[_Iterable[_Union[BatchReply, _Mapping]]] = ..., instance_id: _Optional[str] = ..., arena_name: _Optional[str] = ..., lapsed_reservations: _Optional[_Iterable[int]] = ..., lapsed_pins: _Optional[_Iterable[int]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("capacity_blocks", "used_blocks", "pinned_blocks", "hit_tokens", "miss_tokens", "evicted_blocks", "bytes_saved_by_reuse", "pending_reservations")
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MISS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SAVED_BY_REUSE_FIELD_NUMBER: _ClassVar[int]
    PENDING_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    capacity_blocks: int
    used_blocks: int
    pinned_blocks: int
    hit_tokens: int
    miss_tokens: int
    evicted_blocks: int
    bytes_saved_by_reuse: int
    pending_reservations: int
    def __init__(self, capacity_blocks: _Optional[int] = ..., used_blocks: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., miss_tokens: _Optional[int] = ..., evicted_blocks: _Optional[int] = ..., bytes_saved_by_reuse: _Optional[int] = ..., pending_reservations: _Optional[int] = ...) -> None: ...

class ReadBlocksRequest(_message.Message):
    __slots__ = ("extents",)
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    extents: _containers.RepeatedCompositeFieldContainer[Extent]
    def __init__(self, extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("offset", "data", "crc32c")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32c: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class WriteBlocksChunk(_message.Message):
    __slots__ = ("reservation_id", "extents", "offset", "data", "crc32c", "client_id")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: int
    extents: _containers.RepeatedCompositeFieldContainer[Extent]
    offset: int
    data: bytes
    crc32c: int
    client_id: str
    def __init__(self, reservation_id: _Optional[int] = ..., extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class WriteBlocksResponse(_message.Message):
    __slots__ = ("bytes_written",)
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    bytes_written: int
    def __init__(self, bytes_written: _Optional[int] = ...) -> None: ...
