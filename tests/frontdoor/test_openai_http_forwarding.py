"""The HTTP front door over a fake scheduler: the caller's Authorization header reaches the
scheduler as gRPC metadata, each gRPC status becomes its HTTP status and OpenAI error type,
and request bodies are checked before any gRPC call. The conversation key of `reuse_key`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import openai
import pytest

from common.grpc_serving import add_health_and_reflection, mark_serving
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from services.http.app import SCHEDULER
from services.http.errors import ApiError
from services.http.protocol import Defaults, parse_chat, parse_completion
from services.http.reuse_key import conversation_key
from services.launch import Child, free_port, wait_serving

MESSAGES = [{"role": "user", "content": "hi"}]


class FakeScheduler(pb_grpc.SchedulerServicer):
    """Records each Generate's metadata and request; a bearer key `code-NAME` makes it
    abort with that status, before its first event or (`late-NAME`) after one token."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], pb.GenerateRequest]] = []

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateEvent]:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append((md, request))
        key = md.get("authorization", "").removeprefix("Bearer ")
        when, _, code = key.partition("-")
        if when == "code":
            await context.abort(grpc.StatusCode[code], f"{code.lower()} says the fake")
        yield pb.GenerateEvent(request_id=request.request_id,
                               token=pb.Token(id=1, text="ok", logprob=-0.5))
        if when == "late":
            await context.abort(grpc.StatusCode[code], "late failure")
        yield pb.GenerateEvent(request_id=request.request_id, final=pb.Final(
            finish_reason="length", prompt_tokens=3, completion_tokens=1,
            reused_prompt_tokens=2))

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
                    ) -> pb.StatsResponse:
        return pb.StatsResponse(model="not-the-flags")  # /v1/models authenticates by it


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeScheduler, str]]:
    server = grpc.aio.server()
    scheduler = FakeScheduler()
    pb_grpc.add_SchedulerServicer_to_server(scheduler, server)
    health = add_health_and_reflection(server, SCHEDULER)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await mark_serving(health, SCHEDULER)
    http_port = free_port()
    process = subprocess.Popen([
        sys.executable, "-m", "services.http", "--port", str(http_port),
        "--scheduler", f"127.0.0.1:{port}", "--served-model-name", "fake-model"])
    child = Child("http", f"127.0.0.1:{http_port}", process)
    try:
        await asyncio.to_thread(wait_serving, child, 60)
        yield scheduler, f"http://{child.address}/v1"
    finally:
        process.terminate()
        process.wait(10)
        await server.stop(0)


def api(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def test_the_bearer_key_reaches_the_scheduler_as_metadata(
    fake: tuple[FakeScheduler, str]
) -> None:
    scheduler, url = fake
    async with api(url, "sk-tenant-a") as client:
        reply = await client.chat.completions.create(model="fake-model", messages=MESSAGES,
                                                     user="alice", max_tokens=5)
    md, request = scheduler.calls[-1]
    assert md["authorization"] == "Bearer sk-tenant-a"
    assert request.client_id == "alice" and request.max_tokens == 5
    assert [(m.role, m.content) for m in request.messages.messages] == [("user", "hi")]
    assert request.conversation_id == conversation_key(
        [("user", "hi")], client_id="alice", authorization="Bearer sk-tenant-a")
    assert reply.id == f"chatcmpl-{request.request_id}"
    assert reply.usage.prompt_tokens_details.cached_tokens == 2


STATUSES = {
    "INVALID_ARGUMENT": (openai.BadRequestError, "invalid_request_error"),
    "UNAUTHENTICATED": (openai.AuthenticationError, "authentication_error"),
    "PERMISSION_DENIED": (openai.PermissionDeniedError, "permission_error"),
    "NOT_FOUND": (openai.NotFoundError, "not_found_error"),
    "RESOURCE_EXHAUSTED": (openai.RateLimitError, "rate_limit_error"),
    "UNAVAILABLE": (openai.InternalServerError, "service_unavailable"),
    "INTERNAL": (openai.InternalServerError, "internal_error"),
}


async def test_grpc_statuses_become_http_statuses_and_error_objects(
    fake: tuple[FakeScheduler, str]
) -> None:
    _, url = fake
    for code, (error, kind) in STATUSES.items():
        async with api(url, f"code-{code}") as client:
            for stream in (False, True):
                with pytest.raises(error) as err:
                    await client.completions.create(model="fake-model", prompt="x",
                                                    stream=stream)
                assert err.value.body["type"] == kind, code
                assert err.value.body["code"] == code.lower()
                assert f"{code.lower()} says the fake" in err.value.body["message"]
                assert "Traceback" not in err.value.body["message"]
    assert err.value.status_code == 500
    async with api(url, "code-UNAVAILABLE") as client:  # the flag names it, not Stats
        assert [m.id for m in (await client.models.list()).data] == ["fake-model"]
    async with api(url, "late-UNAVAILABLE") as client:  # the stream has begun: an event
        with pytest.raises(openai.APIError, match="late failure"):
            async for _ in await client.chat.completions.create(
                    model="fake-model", messages=MESSAGES, stream=True):
                pass


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": MESSAGES, "n": 2}, "n"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
    ({"messages": MESSAGES, "stop": [""]}, "stop"),
    ({"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MESSAGES, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": MESSAGES, "ignore_eos": 1}, "ignore_eos"),
    ({"messages": MESSAGES, "top_k": 2**40}, "top_k"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
])
def test_bad_chat_bodies_are_refused_before_any_call(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body, Defaults(client_id="c", max_tokens=8), "")
    assert (err.value.status, err.value.param) == (400, param)


def test_bad_completion_prompts_are_refused() -> None:
    defaults = Defaults(client_id="c", max_tokens=8)
    for prompt in ([2**32], ["a", "b"], 5, None, [True]):
        with pytest.raises(ApiError) as err:
            parse_completion({"prompt": prompt}, defaults)
        assert (err.value.status, err.value.param) == (400, "prompt"), prompt
    parsed = parse_completion({"prompt": [[1, 2]], "logprobs": 0}, defaults)
    assert list(parsed.request.token_ids.ids) == [1, 2] and parsed.logprobs
    assert parsed.request.max_tokens == 8 and parsed.request.client_id == "c"


def test_a_resent_history_keeps_its_conversation_key() -> None:
    turn1 = [("system", "be brief"), ("user", "hello")]
    turn2 = [*turn1, ("assistant", "hi!"), ("user", "and then?")]
    key = conversation_key(turn1, client_id="c", authorization="Bearer a")
    assert key.startswith("http:")
    assert conversation_key(turn2, client_id="c", authorization="Bearer a") == key
    assert conversation_key(turn1, client_id="c", authorization="Bearer b") != key
    assert conversation_key(turn1, client_id="d", authorization="Bearer a") != key
    assert conversation_key([("system", "be brief"), ("user", "bye")], client_id="c",
                            authorization="Bearer a") != key
