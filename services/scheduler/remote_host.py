"""One KV store over its gRPC API, for the planner's thread (blocking calls): the
`StoreClient` that `HostRouter` presents to the planner as host KV.

A KV store that fails degrades preemption to recompute instead of failing requests: a
reservation that cannot be made raises `HostCapacityExhausted`, a commit that cannot be
made raises `StaleReservation`, and lookups answer "nothing held". A store that cannot be
reached at all also calls `on_unreachable`. The store hashes the tokens itself, so the
planner's precomputed chains are not sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc

from common.kv.extent import Extent, flatten
from common.kv.reuse_index import (
    Hit,
    HostCapacityExhausted,
    PinHandle,
    Reservation,
    StaleReservation,
)
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.scheduler.host_router import NO_PIN, StoreIdentity

log = logging.getLogger("fastswitch.scheduler.kvstore")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RemoteHostKV:
    def __init__(
        self, channel: grpc.Channel, *, fingerprint: str, block_size: int, timeout_s: float = 5.0
    ) -> None:
        self._stub = kv_grpc.KVStoreStub(channel)
        self.fingerprint = fingerprint
        self.block_size = block_size
        self._timeout = timeout_s
        self.on_unreachable: Callable[[], None] | None = None

    def identity(self) -> StoreIdentity | None:
        try:
            reply = self._stub.Describe(kv.DescribeRequest(), timeout=min(self._timeout, 1.0))
        except grpc.RpcError:
            return None
        return StoreIdentity(reply.instance_id, reply.arena_name)

    def lookup(self, conv: str, tokens: Sequence[int]) -> tuple[Hit, str]:
        """The hit, and the id of the instance whose arena its blocks are in."""
        try:
            reply = self._stub.Lookup(self._tokens(conv, tokens), timeout=self._timeout)
        except grpc.RpcError as e:
            self._warn("Lookup", e)
            return Hit(0, ()), ""
        return Hit(reply.valid_tokens, _blocks(reply.extents)), reply.instance_id

    def reserve(self, conv: str, tokens: Sequence[int]) -> Reservation:
        try:
            reply = self._stub.Reserve(self._tokens(conv, tokens), timeout=self._timeout)
        except grpc.RpcError as e:
            if e.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._warn("Reserve", e)
            raise HostCapacityExhausted(e.details() or str(e.code())) from e
        return Reservation(
            reservation_id=reply.reservation_id,
            conversation=conv,
            num_tokens=len(tokens),
            valid_tokens=reply.valid_tokens,
            valid_blocks=_blocks(reply.valid_extents),
            new_blocks=_blocks(reply.new_extents),
        )

    def commit(self, reservation_id: int) -> None:
        try:
            self._stub.Commit(kv.ReservationRef(reservation_id=reservation_id),
                              timeout=self._timeout)
        except grpc.RpcError as e:
            self._warn("Commit", e)
            raise StaleReservation(e.details() or str(e.code())) from e

    def abort(self, reservation_id: int) -> None:
        self._call("Abort", kv.ReservationRef(reservation_id=reservation_id))

    def pin(self, conv: str, tokens: Sequence[int]) -> tuple[Hit, PinHandle]:
        try:
            reply = self._stub.Pin(self._tokens(conv, tokens), timeout=self._timeout)
        except grpc.RpcError as e:
            self._warn("Pin", e)
            return Hit(0, ()), PinHandle(NO_PIN, ())
        blocks = _blocks(reply.extents)
        return Hit(reply.valid_tokens, blocks), PinHandle(reply.pin_id, blocks)

    def unpin(self, pin_id: int) -> None:
        if pin_id != NO_PIN:
            self._call("Unpin", kv.PinRef(pin_id=pin_id))

    def release(self, conv: str) -> None:
        self._call("Release", kv.ReleaseRequest(conversation_id=conv))

    def _tokens(self, conv: str, tokens: Sequence[int]) -> kv.TokensRequest:
        return kv.TokensRequest(
            conversation_id=conv, token_ids=tokens, model_fingerprint=self.fingerprint
        )

    def _call(self, method: str, message: object) -> None:
        try:
            getattr(self._stub, method)(message, timeout=self._timeout)
        except grpc.RpcError as e:
            self._warn(method, e)

    def _warn(self, method: str, error: grpc.RpcError) -> None:
        log.warning("kvstore %s failed (%s: %s); preemption falls back to recompute",
                    method, error.code().name, error.details())
        if error.code() in _UNREACHABLE and self.on_unreachable is not None:
            self.on_unreachable()


def _blocks(extents: Sequence[kv.Extent]) -> tuple[int, ...]:
    return tuple(flatten(Extent(e.start, e.length) for e in extents))
