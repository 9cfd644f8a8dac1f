"""The HTTP front door against a live stack, through the official `openai` client: chat,
streaming, completions, errors, a disconnect cancelling its request, greedy text equal to
the gRPC API's, multi-turn reuse without a conversation id, and the request counter."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from common.client import FastSwitchClient, Sampling
from services.launch import LocalStack, StackConfig, free_port

pytestmark = pytest.mark.process

KEY = "sk-test"
HISTORY = [{"role": "system", "content": "You are a terse assistant for FastSwitch."},
           {"role": "user", "content": "Tell me about block groups, swaps and host KV reuse."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(num_gpu_blocks=128, num_host_blocks=1024,
                         log_dir=str(tmp_path_factory.mktemp("logs")))
    with LocalStack(config) as s:
        s.metrics_port = free_port()  # type: ignore[attr-defined]
        s.start_http(extra_args=["--metrics-port", str(s.metrics_port)])  # type: ignore[attr-defined]
        yield s


@pytest.fixture
async def api(stack: LocalStack) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"http://{stack.http_address}/v1", api_key=KEY,
                                max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def grpc_client(stack: LocalStack) -> AsyncIterator[FastSwitchClient]:
    async with FastSwitchClient(stack.scheduler_address) as client:
        await client.wait_ready()
        yield client


async def model(api: openai.AsyncOpenAI) -> str:
    return (await api.models.list()).data[0].id


async def test_models_lists_the_served_checkpoint(api: openai.AsyncOpenAI,
                                                  grpc_client: FastSwitchClient) -> None:
    models = (await api.models.list()).data
    assert [m.id for m in models] == [(await grpc_client.stats()).model] != [""]


async def test_greedy_chat_and_completion_equal_grpc(
    api: openai.AsyncOpenAI, grpc_client: FastSwitchClient
) -> None:
    name = await model(api)
    messages = [("user", "What is a block group?")]
    want = await grpc_client.generate("", messages=messages, client_id="g", max_tokens=24,
                                      sampling=Sampling(logprobs=True)).collect()
    chat = await api.chat.completions.create(
        model=name, messages=[{"role": r, "content": c} for r, c in messages], max_tokens=24,
        temperature=0, logprobs=True)
    assert chat.choices[0].message.content == want.text
    assert chat.choices[0].finish_reason == want.final.finish_reason
    assert [lp.logprob for lp in chat.choices[0].logprobs.content] == pytest.approx(
        [t.logprob for t in want.tokens])
    assert chat.usage.prompt_tokens == want.final.prompt_tokens
    assert chat.usage.completion_tokens == want.final.completion_tokens == 24
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 24

    streamed = await api.chat.completions.create(
        model=name, messages=[{"role": r, "content": c} for r, c in messages],
        max_completion_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in streamed]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])

    prompt = "FastSwitch swaps KV in block groups"
    want = await grpc_client.generate(prompt, client_id="g", max_tokens=16).collect()
    completion = await api.completions.create(model=name, prompt=prompt, max_tokens=16,
                                              temperature=0)
    assert completion.choices[0].text == want.text
    assert completion.usage.prompt_tokens == want.final.prompt_tokens
    pieces = [c.choices[0].text async for c in await api.completions.create(
        model=name, prompt=prompt, max_tokens=16, temperature=0, stream=True)]
    assert "".join(pieces) == want.text


async def test_sampling_fields_reach_the_scheduler(api: openai.AsyncOpenAI) -> None:
    name = await model(api)
    seeded = [await api.chat.completions.create(
        model=name, messages=HISTORY, max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
        extra_body={"ignore_eos": True, "min_tokens": 12, "priority": 2})
        for _ in range(2)]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content
    assert seeded[0].usage.completion_tokens == 12
    stopped = await api.completions.create(model=name, prompt=[1, 2, 3, 4], max_tokens=8,
                                           temperature=0, stop=["\x00"])
    assert stopped.usage.prompt_tokens == 4


def raw_post(address: str, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{address}{path}", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_errors_are_openai_error_objects(api: openai.AsyncOpenAI,
                                               stack: LocalStack) -> None:
    name = await model(api)
    with pytest.raises(openai.BadRequestError) as err:
        await api.chat.completions.create(model=name, messages=HISTORY, n=2)
    assert err.value.body["param"] == "n" and "n=1" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        await api.chat.completions.create(model="gpt-4o", messages=HISTORY)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:  # the scheduler's INVALID_ARGUMENT
        await api.completions.create(model=name, prompt="x" * 5000, max_tokens=8)
    assert "context" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # before the stream starts, too
        await api.completions.create(model=name, prompt="x" * 5000, max_tokens=8, stream=True)
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model=name, messages=[{"role": "robot",
                                                                 "content": "hi"}])
    status, body = await asyncio.to_thread(raw_post, stack.http_address,
                                           "/v1/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    status, body = await asyncio.to_thread(
        raw_post, stack.http_address, "/v1/completions",
        json.dumps({"prompt": "hi", "temperature": "hot"}).encode())
    assert (status, body["error"]["param"]) == (400, "temperature")
    status, body = await asyncio.to_thread(raw_post, stack.http_address, "/v1/embeddings",
                                           b"{}")
    assert status == 404 and "Not Found" in body["error"]["message"]


def read_sse(address: str, body: dict) -> list[str]:
    """The `data:` lines of a streamed answer, as sent."""
    conn = http.client.HTTPConnection(address, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"content-type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("content-type").startswith(
        "text/event-stream")
    lines = [line.decode().strip() for line in reply.read().splitlines()]
    conn.close()
    return [line.removeprefix("data: ") for line in lines if line]


async def test_stream_ends_with_done(stack: LocalStack, api: openai.AsyncOpenAI) -> None:
    events = await asyncio.to_thread(read_sse, stack.http_address, {
        "model": await model(api), "messages": HISTORY, "max_tokens": 4, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4


async def test_a_disconnect_mid_stream_cancels_the_request(
    api: openai.AsyncOpenAI, grpc_client: FastSwitchClient
) -> None:
    before = (await grpc_client.stats()).finished
    stream = await api.chat.completions.create(
        model=await model(api), messages=HISTORY, max_tokens=1500, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()  # the client goes away
    for _ in range(100):
        stats = await grpc_client.stats()
        if stats.running == stats.waiting == 0:
            break
        await asyncio.sleep(0.05)
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.finished == before, "the request ran to its end instead of being cancelled"


async def test_resent_history_reuses_the_host_prefix(api: openai.AsyncOpenAI,
                                                     stack: LocalStack) -> None:
    name = await model(api)
    opening = [HISTORY[0], {"role": "user", "content": "A conversation of its own: " * 4}]
    first = await api.chat.completions.create(model=name, messages=opening, max_tokens=24,
                                              temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = [*opening, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And then?"}]
    second = await api.chat.completions.create(model=name, messages=history, max_tokens=8,
                                               temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens // 16 * 16 > 0
    assert cached < second.usage.prompt_tokens
    # Another key's conversation is another conversation, even with the same messages.
    async with openai.AsyncOpenAI(base_url=f"http://{stack.http_address}/v1",
                                  api_key="sk-other", max_retries=0) as other:
        theirs = await other.chat.completions.create(model=name, messages=history,
                                                     max_tokens=8, temperature=0)
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    assert theirs.choices[0].message.content == second.choices[0].message.content


def scrape(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line.startswith("fastswitch_http_requests_total{"):
            labels, value = line.removeprefix("fastswitch_http_requests_total").rsplit(" ", 1)
            pairs = dict(p.split("=") for p in labels.strip("{}").split(","))
            out[pairs['route'].strip('"'), pairs['status'].strip('"')] = float(value)
    return out


async def test_metrics_count_requests_by_route_and_status(
    api: openai.AsyncOpenAI, stack: LocalStack
) -> None:
    port = stack.metrics_port  # type: ignore[attr-defined]
    before = await asyncio.to_thread(scrape, port)
    name = await model(api)
    await api.chat.completions.create(model=name, messages=HISTORY, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model=name, messages=HISTORY, n=3)
    after = await asyncio.to_thread(scrape, port)

    def grew(route: str, status: str) -> float:
        return after.get((route, status), 0) - before.get((route, status), 0)

    assert grew("/v1/chat/completions", "200") == 1
    assert grew("/v1/chat/completions", "400") == 1
    assert grew("/v1/models", "200") == 1
