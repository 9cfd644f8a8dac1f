"""`HostKV` over the KV store's gRPC API, for the planner's thread (blocking calls).

A KV store that fails degrades preemption to recompute instead of failing requests: a
reservation that cannot be made raises `HostCapacityExhausted`, a commit that cannot be
made raises `StaleReservation`, and lookups answer "nothing held". The store hashes the
tokens itself, so the planner's precomputed chains are not sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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

log = logging.getLogger("fastswitch.scheduler.kvstore")
NO_PIN = 0


class RemoteHostKV:
    def __init__(
        self, channel: grpc.Channel, *, fingerprint: str, block_size: int, timeout_s: float = 5.0
    ) -> None:
        self._stub = kv_grpc.KVStoreStub(channel)
        self.fingerprint = fingerprint
        self.block_size = block_size
        self._timeout = timeout_s
        self.degraded = False

    def lookup(self, conv: str, tokens: Sequence[int], chain: Sequence[bytes] = ()) -> Hit:
        try:
            reply = self._stub.Lookup(self._tokens(conv, tokens), timeout=self._timeout)
        except grpc.RpcError as e:
            self._warn("Lookup", e)
            return Hit(0, ())
        return Hit(reply.valid_tokens, _blocks(reply.extents))

    def reserve(
        self, conv: str, tokens: Sequence[int], chain: Sequence[bytes] = ()
    ) -> Reservation:
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

    def pin(
        self, conv: str, tokens: Sequence[int], chain: Sequence[bytes] = ()
    ) -> tuple[Hit, PinHandle]:
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
        self.degraded = error.code() is grpc.StatusCode.UNAVAILABLE
        log.warning("kvstore %s failed (%s: %s); preemption falls back to recompute",
                    method, error.code().name, error.details())


def _blocks(extents: Sequence[kv.Extent]) -> tuple[int, ...]:
    return tuple(flatten(Extent(e.start, e.length) for e in extents))
