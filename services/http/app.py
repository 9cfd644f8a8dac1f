"""The routes: each HTTP call becomes one call of the scheduler's gRPC API, with the caller's
`Authorization` header forwarded as the gRPC metadata `authorization`.

Chat and completion calls are one Generate each (chat as role messages, which the
scheduler renders with the checkpoint's chat template, under the conversation key of
`reuse_key`). The answer watches the connection: a client that disconnects, streaming or
not, cancels the gRPC call, and so the request in the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from common.client import Final, Generation, Token
from common.tls import ClientTls, aio_channel
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from services.http.errors import ApiError, bad_request, from_rpc
from services.http.metrics import HttpMetrics
from services.http.protocol import (
    Defaults,
    Parsed,
    chat_logprobs,
    completion_logprobs,
    parse_chat,
    parse_completion,
    usage,
)

SCHEDULER = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Settings:
    scheduler: str  # the scheduler's gRPC address
    defaults: Defaults
    served_model_name: str = ""  # empty: the name the scheduler's Stats reports
    metrics_token: str = ""  # what a scrape of /metrics must send; empty: open
    tls: ClientTls | None = None  # towards the scheduler; None: plaintext


@dataclass(frozen=True)
class Shape:
    """How one endpoint's answers look: chat.completion or text_completion."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, tokens: Sequence[Token], finish: str | None, *,
               logprobs: bool, offset: int = 0, delta: bool = False) -> dict[str, object]:
        if self.chat:
            lp = chat_logprobs(tokens) if logprobs else None
            body = {"content": text} if text or not delta else {}
            content = {"delta": body} if delta else {
                "message": {"role": "assistant", "content": text}}
        else:
            lp = completion_logprobs(tokens, offset) if logprobs else None
            content = {"text": text}
        return {"index": 0, **content, "logprobs": lp, "finish_reason": finish}


CHAT = Shape("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = Shape("cmpl-", "text_completion", "text_completion", chat=False)


def metadata(request: Request) -> Metadata:
    """The caller's credentials, as the gRPC metadata a gRPC client would send."""
    value = request.headers.get("authorization")
    if value is None:
        return ()
    if not (value.isascii() and value.isprintable()):
        raise ApiError(401, "the Authorization header must be printable ASCII",
                       type="authentication_error")
    return (("authorization", value),)


class Frontend:
    """The OpenAI-compatible routes over one channel to the scheduler."""

    ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = HttpMetrics(self.ROUTES, settings.metrics_token)
        self.started = int(time.time())
        self._model = settings.served_model_name
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SchedulerStub | None = None

    def app(self) -> ASGIApp:
        @asynccontextmanager
        async def lifespan(app: Starlette):  # the channel belongs to the server's loop
            self._channel = aio_channel(self.settings.scheduler, self.settings.tls)
            self._stub = pb_grpc.SchedulerStub(self._channel)
            try:
                yield
            finally:
                await self._channel.close()

        routes = [
            Route("/v1/models", self._api(self.models), methods=["GET"]),
            Route("/v1/completions", self._api(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._api(self.chat), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics.endpoint, methods=["GET"]),
        ]
        return self.metrics.middleware(Starlette(
            routes=routes, lifespan=lifespan,
            exception_handlers={HTTPException: _http_error}))

    @staticmethod
    def _api(handler: Callable[[Request], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
        """`handler`, with its ApiError and the scheduler's errors as error objects."""

        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return error_response(e)
            except grpc.aio.AioRpcError as e:
                return error_response(from_rpc(e))

        return endpoint

    @property
    def stub(self) -> pb_grpc.SchedulerStub:
        assert self._stub is not None, "the app's lifespan has not started"
        return self._stub

    async def model(self, md: Metadata) -> str:
        """The served model's name: the flag's, else the scheduler's (asked once)."""
        if not self._model:
            self._model = (await self.stub.Stats(pb.StatsRequest(), metadata=md)).model
        return self._model

    async def models(self, request: Request) -> Response:
        md = metadata(request)
        await self.stub.Stats(pb.StatsRequest(), metadata=md)  # the caller's key, every time
        name = await self.model(md)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.started, "owned_by": "fastswitch"}]})

    async def chat(self, request: Request) -> Response:
        md = metadata(request)
        parsed = parse_chat(await _json(request), self.settings.defaults,
                            request.headers.get("authorization", ""))
        return await self._generate(parsed, md, CHAT)

    async def completions(self, request: Request) -> Response:
        md = metadata(request)
        return await self._generate(parse_completion(await _json(request),
                                                     self.settings.defaults), md, COMPLETION)

    async def _generate(self, parsed: Parsed, md: Metadata, shape: Shape) -> Response:
        name = await self.model(md)
        if parsed.model and parsed.model != name:
            raise ApiError(404, f"The model '{parsed.model}' does not exist; this server "
                           f"serves '{name}'", type="not_found_error", param="model",
                           code="model_not_found")
        parsed.request.request_id = uuid.uuid4().hex
        call = self.stub.Generate(parsed.request, metadata=md)
        return Answer(call, Reply(parsed, shape, name, int(time.time())), self.metrics)

    async def health(self, request: Request) -> Response:
        """200 while the scheduler's Scheduler service is SERVING (ready), else 503."""
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=SCHEDULER), timeout=2)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)


async def _json(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not JSON: {e}") from None


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a wrong method) as error objects too."""
    assert isinstance(exc, HTTPException)
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                   f"{exc.detail}", type="invalid_request_error"))


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@dataclass(frozen=True)
class Reply:
    """The bodies of one request's answer, whole or as SSE chunks."""

    parsed: Parsed
    shape: Shape
    model: str
    created: int  # Unix seconds

    def head(self, object_: str) -> dict[str, object]:
        return {"id": self.shape.id_prefix + self.parsed.request.request_id,
                "object": object_, "created": self.created, "model": self.model}

    def whole(self, gen: Generation) -> dict[str, object]:
        final = _final(gen)
        choice = self.shape.choice(gen.text, gen.tokens, final.finish_reason,
                                   logprobs=self.parsed.logprobs)
        return {**self.head(self.shape.object), "choices": [choice], "usage": usage(final)}

    def chunk(self, text: str, tokens: Sequence[Token], finish: str | None = None,
              offset: int = 0) -> bytes:
        choice = self.shape.choice(text, tokens, finish, logprobs=self.parsed.logprobs,
                                   offset=offset, delta=True)
        return self.event({**self.head(self.shape.chunk_object), "choices": [choice]})

    def usage_chunk(self, final: Final) -> bytes:
        return self.event({**self.head(self.shape.chunk_object), "choices": [],
                           "usage": usage(final)})

    def event(self, body: dict[str, object]) -> bytes:
        """A chunk; with include_usage every chunk has `usage`, null but in the last."""
        if self.parsed.include_usage:
            body.setdefault("usage", None)
        return sse(body)


def sse(body: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _final(gen: Generation) -> Final:
    if gen.final is None:
        raise ApiError(500, "the scheduler ended the stream without a result",
                       type="internal_error")
    return gen.final


class Answer(Response):
    """One Generate call's answer, JSON or SSE. Its errors before the first token are error
    objects with their HTTP status; later ones (the stream has begun) an error event. A
    client that disconnects first cancels the call."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, reply: Reply, metrics: HttpMetrics
                 ) -> None:
        self.call = call
        self.reply = reply
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._respond(scope, send))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()  # a no-op once it is done
            gone.cancel()
            self.call.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        if not work.cancelled():
            work.result()  # the answer's own failure, if any, for the server to log

    async def _respond(self, scope: Scope, send: Send) -> None:
        gen = Generation(self.call)
        tokens = gen.__aiter__()
        try:
            first = [await anext(tokens)]
            self.metrics.first_token(scope)
        except StopAsyncIteration:
            first = []
        except grpc.aio.AioRpcError as e:
            await _send_whole(send, error_response(from_rpc(e)))
            return
        if not self.reply.parsed.stream:
            try:
                async for _ in tokens:  # the rest; `gen` keeps them all
                    pass
                answer: Response = JSONResponse(self.reply.whole(gen))
            except grpc.aio.AioRpcError as e:
                answer = error_response(from_rpc(e))
            except ApiError as e:
                answer = error_response(e)
            await _send_whole(send, answer)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache")]})
        await self._stream(gen, first, tokens, send)
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    async def _stream(self, gen: Generation, first: list[Token],
                      tokens: AsyncIterator[Token], send: Send) -> None:
        """The token chunks as they come, then the finishing and usage chunks; an error
        after the start is an error event."""
        reply = self.reply

        async def body(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        if reply.shape.chat:
            await body(reply.event({**reply.head(reply.shape.chunk_object), "choices": [{
                "index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}]}))
        offset = 0

        async def token_chunk(token: Token) -> None:
            nonlocal offset
            if token.text or reply.parsed.logprobs:  # no empty deltas (a split character)
                await body(reply.chunk(token.text, [token], offset=offset))
            offset += len(token.text)

        try:
            for token in first:
                await token_chunk(token)
            async for token in tokens:
                await token_chunk(token)
            final = _final(gen)
        except grpc.aio.AioRpcError as e:
            await body(sse(from_rpc(e).body()))
            return
        except ApiError as e:
            await body(sse(e.body()))
            return
        if final.trailing_text:
            await body(reply.chunk(final.trailing_text, [], offset=offset))
        await body(reply.chunk("", [], final.finish_reason))
        if reply.parsed.include_usage:
            await body(reply.usage_chunk(final))


async def _send_whole(send: Send, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
