"""What every FastSwitch gRPC server carries: grpc.health.v1, reflection (so `grpcurl`
works), SERVING once ready, a stop on SIGTERM or SIGINT, requests that do not parse refused
with INVALID_ARGUMENT, and a port of its own (`SERVER_OPTIONS`); `new_server` makes one."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# grpc sets SO_REUSEPORT by default, so a second server could bind a port a live one holds,
# and the kernel would split new connections between the two: a client of one service
# would reach another (UNIMPLEMENTED), or a stale process, at random. Off, the second bind
# fails (`tls.listen`).
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)
HANDLER_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
log = logging.getLogger("fastswitch.grpc")
Before = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def before_each_call(behavior: Callable[..., Any], before: Before) -> Callable[..., Any]:
    """`behavior`, awaiting `before(request, context)` first. grpc.aio tells handler kinds
    apart by their function type, so coroutine and async generator handlers keep theirs;
    others (sync handlers, whose context lacks the aio methods) are left as they are."""
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await before(request, context)
            return await behavior(request, context)

        return call
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await before(request, context)
            async for response in behavior(request, context):
                yield response

        return stream
    return behavior


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return next(k for k in HANDLER_KINDS if getattr(handler, k) is not None)


@dataclass(frozen=True, slots=True)
class _Undecodable:
    reason: str


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """A request message that does not parse (invalid UTF-8 in a string field, garbage
    bytes) gets INVALID_ARGUMENT and one log line, where grpc would answer UNKNOWN and log
    a traceback. Only unary requests are checked; no FastSwitch API streams requests."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        kind = handler_kind(handler)
        parse = handler.request_deserializer
        method = handler_call_details.method

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # protobuf raises DecodeError, or others on garbage
                return _Undecodable(f"{type(e).__name__}: {e}")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Undecodable):
                log.warning("%s: request does not parse (%s)", method, request.reason)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request message does not parse: {request.reason}")

        return handler._replace(
            request_deserializer=lenient,
            **{kind: before_each_call(getattr(handler, kind), refuse)},
        )


def new_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A FastSwitch gRPC server: `interceptors`, then `RefuseUndecodable`, on a port of its
    own (`SERVER_OPTIONS`)."""
    return grpc.aio.server(interceptors=[*interceptors, RefuseUndecodable()],
                           options=SERVER_OPTIONS)


def add_health_and_reflection(
    server: grpc.aio.Server, service_name: str
) -> health_aio.HealthServicer:
    """Registers health (NOT_SERVING until `mark_serving`) and reflection for the service."""
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (service_name, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    return health


async def mark_serving(health: health_aio.HealthServicer, service_name: str) -> None:
    for name in ("", service_name):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
