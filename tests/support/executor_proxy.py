"""An Executor server in the test process that relays every call to a real executor,
after `rewrite` has had its way with each Step and SubmitSwaps: the real executor's
refusals of what it was sent (status, details, trailing metadata) come back unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from services.launch import free_port

Rewrite = Callable[[Any], None]  # edits a StepRequest or SubmitSwapsRequest in place


class _Relay(ex_grpc.ExecutorServicer):
    def __init__(self, upstream: ex_grpc.ExecutorStub, rewrite: Rewrite) -> None:
        self._upstream = upstream
        self._rewrite = rewrite

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await getattr(self._upstream, method)(request)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "",
                                trailing_metadata=tuple(e.trailing_metadata() or ()))

    async def Describe(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Describe", request, context)

    async def AttachHostArena(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("AttachHostArena", request, context)

    async def DetachHostArena(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("DetachHostArena", request, context)

    async def Step(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._rewrite(request)
        return await self._call("Step", request, context)

    async def SubmitSwaps(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._rewrite(request)
        return await self._call("SubmitSwaps", request, context)

    async def SwapEvents(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ex.SwapEvent]:
        call = self._upstream.SwapEvents(request)
        await call.initial_metadata()  # the executor has subscribed: so are we
        await context.send_initial_metadata(())
        async for event in call:
            yield event


@asynccontextmanager
async def executor_proxy(target: str, rewrite: Rewrite) -> AsyncIterator[str]:
    """Serves the relay on a free port for the duration; yields its address."""
    address = f"127.0.0.1:{free_port()}"
    async with grpc.aio.insecure_channel(target) as channel:
        server = grpc.aio.server()
        ex_grpc.add_ExecutorServicer_to_server(_Relay(ex_grpc.ExecutorStub(channel), rewrite),
                                               server)
        server.add_insecure_port(address)
        await server.start()
        try:
            yield address
        finally:
            await server.stop(grace=0)
