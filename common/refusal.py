"""How the executor names the request a refused Step or SubmitSwaps is about: trailing
metadata that both sides read through these two functions (see protos/executor.proto)."""

from __future__ import annotations

import grpc

REFUSED_REQUEST_KEY = "fastswitch-refused-request-id-bin"
_GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


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
    """True if the error means the executor is gone or stuck (UNAVAILABLE, DEADLINE_EXCEEDED),
    or that its state is not what the caller assumed (FAILED_PRECONDITION naming no request,
    such as no arena attached: it restarted); any other error is a refusal of the call."""
    code = error.code()
    return code in _GONE or (
        code is grpc.StatusCode.FAILED_PRECONDITION and refused_request(error) is None
    )
