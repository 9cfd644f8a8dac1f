"""OpenAI-style error objects, and the HTTP status each gRPC status of the scheduler gets.

The body is `{"error": {"message", "type", "param", "code"}}`, as OpenAI's API answers; the
official clients raise their matching exception class (BadRequestError for 400, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    # A checkpoint without a chat template refuses role messages: the request cannot work.
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_INTERNAL = (500, "internal_error")


@dataclass
class ApiError(Exception):
    """An error answered as an OpenAI error object with HTTP `status`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def from_rpc(error: grpc.aio.AioRpcError) -> ApiError:
    """The scheduler's status as an API error; statuses without a mapping are 500, with the
    status name and the server's message only (never a traceback)."""
    code = error.code()
    status, kind = _BY_CODE.get(code, _INTERNAL)
    message = error.details() or code.name
    if (status, kind) == _INTERNAL:
        message = f"scheduler error {code.name}: {message}"
    return ApiError(status, message, type=kind, code=code.name.lower())
