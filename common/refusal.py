"""How the executor names the request a refused Step or SubmitSwaps is about: trailing
metadata that both sides read through these two functions (see protos/executor.proto)."""

from __future__ import annotations

import grpc

REFUSED_REQUEST_KEY = "fastswitch-refused-request-id-bin"


def refusal_metadata(request_id: str) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that names `request_id`; none for an empty id."""
    return ((REFUSED_REQUEST_KEY, request_id.encode()),) if request_id else ()


def refused_request(error: grpc.aio.AioRpcError) -> str | None:
    """The request a refusal names, or None when it names none."""
    for key, value in error.trailing_metadata() or ():
        if key == REFUSED_REQUEST_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def executor_lost(error: grpc.aio.AioRpcError) -> bool:
    """False only for a refusal of the call itself: one that names its request, or an
    INVALID_ARGUMENT (a malformed call). Anything else means the executor is gone, stuck or
    not in the state the caller assumed: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED by a
    server that is stopping, UNKNOWN or INTERNAL from a dying process, or FAILED_PRECONDITION
    naming no request (no arena attached: it restarted)."""
    if refused_request(error) is not None:
        return False
    return error.code() is not grpc.StatusCode.INVALID_ARGUMENT
