"""How the executor names the request a refused Step or SubmitSwaps is about: trailing
metadata that both sides read through these two functions (see protos/executor.proto)."""

from __future__ import annotations

import grpc

REFUSED_REQUEST_KEY = "fastswitch-refused-request-id-bin"
# What an executor that is gone or stuck answers with; any other error is a refusal.
EXECUTOR_LOST = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def refusal_metadata(request_id: str) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that names `request_id`; none for an empty id."""
    return ((REFUSED_REQUEST_KEY, request_id.encode()),) if request_id else ()


def refused_request(error: grpc.aio.AioRpcError) -> str | None:
    """The request a refusal names, or None when it names none."""
    for key, value in error.trailing_metadata() or ():
        if key == REFUSED_REQUEST_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None
