"""Host intents (`common.kv.host_ops`) on the wire: the KV store's Batch RPC messages.

Both ends use it: the scheduler encodes requests and decodes replies, the store decodes
requests and encodes replies. Blocks travel as extents of the answering store's arena; a reply names
its op by `op_id`, and a Reservation takes its conversation and length from that op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.kv.extent import Extent, flatten, runs
from common.kv.host_ops import (
    Abort,
    Commit,
    HostOp,
    HostReply,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
)
from common.kv.reuse_index import ID_BITS, Hit, PinHandle, Reservation
from protos import kvstore_pb2 as kv
from services.kvstore.store import StoreRequest


def request_to_proto(fingerprint: str, request: StoreRequest) -> kv.BatchRequest:
    return kv.BatchRequest(
        model_fingerprint=fingerprint, ops=ops_to_proto(request.ops),
        client_id=request.client, request_id=request.request_id,
        renew_reservations=request.renew_reservations, renew_pins=request.renew_pins,
        abandon_requests=request.abandon)


def request_from_proto(request: kv.BatchRequest) -> StoreRequest:
    """The request; a BatchOp with no op set raises ValueError."""
    return StoreRequest(
        client=request.client_id, request_id=request.request_id,
        ops=ops_from_proto(request.ops),
        renew_reservations=tuple(request.renew_reservations),
        renew_pins=tuple(request.renew_pins), abandon=tuple(request.abandon_requests))


def ops_to_proto(ops: Sequence[HostOp]) -> list[kv.BatchOp]:
    out = []
    for op in ops:
        match op:
            case Reserve():
                out.append(kv.BatchOp(reserve=_chain_op(op)))
            case Pin():
                out.append(kv.BatchOp(pin=_chain_op(op)))
            case Commit():
                out.append(kv.BatchOp(commit=kv.ReservationRef(reservation_id=op.reservation_id)))
            case Abort():
                out.append(kv.BatchOp(abort=kv.ReservationRef(reservation_id=op.reservation_id)))
            case Unpin():
                out.append(kv.BatchOp(unpin=kv.PinRef(pin_id=op.pin_id)))
            case Release():
                out.append(kv.BatchOp(release=kv.ReleaseRequest(conversation_id=op.conv)))
    return out


def ops_from_proto(ops: Sequence[kv.BatchOp]) -> list[HostOp]:
    """The ops; a BatchOp with no op set raises ValueError."""
    out: list[HostOp] = []
    for op in ops:
        match op.WhichOneof("op"):
            case "reserve":
                out.append(Reserve(*_chain_fields(op.reserve)))
            case "pin":
                out.append(Pin(*_chain_fields(op.pin)))
            case "commit":
                out.append(Commit(op.commit.reservation_id))
            case "abort":
                out.append(Abort(op.abort.reservation_id))
            case "unpin":
                out.append(Unpin(op.unpin.pin_id))
            case "release":
                out.append(Release(op.release.conversation_id))
            case _:
                raise ValueError(f"batch op {len(out)} names no operation")
    return out


def replies_to_proto(
    replies: Sequence[HostReply], holders: Mapping[int, str]
) -> list[kv.BatchReply]:
    out = []
    for reply in replies:
        match reply:
            case Reserved(op_id, None):
                out.append(kv.BatchReply(reserved=kv.ReservedReply(op_id=op_id, ok=False)))
            case Reserved(op_id, res):
                out.append(kv.BatchReply(reserved=kv.ReservedReply(
                    op_id=op_id, ok=True, reservation_id=res.reservation_id,
                    valid_tokens=res.valid_tokens,
                    valid_extents=_extents(res.valid_blocks),
                    new_extents=_extents(res.new_blocks))))
            case Pinned(op_id, hit, pin):
                out.append(kv.BatchReply(pinned=kv.PinnedReply(
                    op_id=op_id, pin_id=pin.pin_id, valid_tokens=hit.num_tokens,
                    extents=_extents(hit.blocks), holder_id=holders.get(op_id, ""))))
    return out


def replies_from_proto(
    replies: Sequence[kv.BatchReply], ops: Sequence[HostOp]
) -> tuple[list[HostReply], dict[int, str]]:
    """The replies to `ops`, and each Pin's holder by op id. Raises ValueError when they do
    not answer exactly the Reserve and Pin ops, in order, or carry ids over ID_BITS bits."""
    asked = [op for op in ops if isinstance(op, Reserve | Pin)]
    if len(replies) != len(asked):
        raise ValueError(f"{len(replies)} replies to {len(asked)} reserves and pins")
    out: list[HostReply] = []
    holders: dict[int, str] = {}
    for op, reply in zip(asked, replies, strict=True):
        kind = reply.WhichOneof("reply")
        if isinstance(op, Reserve) and kind == "reserved" and reply.reserved.op_id == op.op_id:
            out.append(Reserved(op.op_id, _reservation(op, reply.reserved)))
        elif isinstance(op, Pin) and kind == "pinned" and reply.pinned.op_id == op.op_id:
            p = reply.pinned
            blocks = _blocks(p.extents)
            out.append(Pinned(op.op_id, Hit(p.valid_tokens, blocks), PinHandle(p.pin_id, blocks)))
            holders[op.op_id] = p.holder_id
        else:
            raise ValueError(f"reply {len(out)} ({kind}) does not answer op {op.op_id}")
        if (reply.reserved.reservation_id if kind == "reserved" else reply.pinned.pin_id) \
                >> ID_BITS:
            raise ValueError(f"reply {len(out) - 1} carries an id over {ID_BITS} bits")
    return out, holders


def _chain_op(op: Reserve | Pin) -> kv.ChainOp:
    return kv.ChainOp(op_id=op.op_id, conversation_id=op.conv, chain=op.chain,
                      num_tokens=op.num_tokens)


def _chain_fields(op: kv.ChainOp) -> tuple[int, str, tuple[bytes, ...], int]:
    return op.op_id, op.conversation_id, tuple(op.chain), op.num_tokens


def _reservation(op: Reserve, reply: kv.ReservedReply) -> Reservation | None:
    if not reply.ok:
        return None
    return Reservation(
        reservation_id=reply.reservation_id,
        conversation=op.conv,
        num_tokens=op.num_tokens,
        valid_tokens=reply.valid_tokens,
        valid_blocks=_blocks(reply.valid_extents),
        new_blocks=_blocks(reply.new_extents),
    )


def _extents(blocks: Sequence[int]) -> list[kv.Extent]:
    return [kv.Extent(start=e.start, length=e.length) for e in runs(blocks)]


def _blocks(extents: Sequence[kv.Extent]) -> tuple[int, ...]:
    return tuple(flatten(Extent(e.start, e.length) for e in extents))
