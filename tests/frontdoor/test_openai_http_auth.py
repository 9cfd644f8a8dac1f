"""The HTTP front door of a stack with API keys, through the official `openai` client: a
missing or unknown key gets a 401 OpenAI error object, naming another tenant as `user` a
403; a valid key's requests are accounted to its tenant, and resent histories reuse host
KV within a tenant only. A scheduler's tenant limits answer 429 and 403, and the front
door serves its metrics on its own port behind a token."""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from common.client import FastSwitchClient
from services.launch import LocalStack, StackConfig
from tests.frontdoor.test_openai_http import raw_post

pytestmark = pytest.mark.process

ALICE, BOB = (f"{name}-{secrets.token_hex(12)}" for name in ("alice", "bob"))
KEYS = f"{ALICE} tenant-a\n{BOB} tenant-b\n"
OPENING = [{"role": "system", "content": "You are a terse assistant for FastSwitch."},
           {"role": "user", "content": "Whose KV is this? Tell me about tenants. " * 3}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    folder = tmp_path_factory.mktemp("http-auth")
    keys = folder / "api-keys"
    keys.write_text(KEYS)
    keys.chmod(0o600)
    config = StackConfig(num_gpu_blocks=128, num_host_blocks=1024, log_dir=str(folder / "logs"),
                         api_keys_file=str(keys))
    with LocalStack(config) as s:
        s.start_http()
        yield s


def client(stack: LocalStack, key: str, address: str = "") -> openai.AsyncOpenAI:
    """An OpenAI client of the stack's front door (or of the one at `address`)."""
    return openai.AsyncOpenAI(base_url=f"http://{address or stack.http_address}/v1",
                              api_key=key, max_retries=0)


@pytest.fixture
async def alice(stack: LocalStack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(stack, ALICE) as api:
        yield api


@pytest.fixture
async def bob(stack: LocalStack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(stack, BOB) as api:
        yield api


async def model(api: openai.AsyncOpenAI) -> str:
    return (await api.models.list()).data[0].id


async def test_a_missing_key_gets_a_401_error_object(stack: LocalStack) -> None:
    status, body = raw_post(stack.http_address, "/v1/chat/completions",
                            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}')
    assert status == 401
    assert body["error"]["type"] == "authentication_error" and body["error"]["message"]


async def test_an_unknown_key_gets_401(stack: LocalStack, alice: openai.AsyncOpenAI) -> None:
    name = await model(alice)
    async with client(stack, "sk-not-a-key-of-this-stack") as stranger:
        with pytest.raises(openai.AuthenticationError) as err:
            await stranger.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert err.value.status_code == 401
        assert err.value.body["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()


async def test_naming_another_tenant_as_user_gets_403(alice: openai.AsyncOpenAI) -> None:
    name = await model(alice)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await alice.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            user="tenant-b")
    assert err.value.status_code == 403 and "tenant-b" in err.value.body["message"]
    own = await alice.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="tenant-a")
    assert own.usage.completion_tokens == 2


async def test_a_valid_keys_requests_are_its_tenants(stack: LocalStack,
                                                     alice: openai.AsyncOpenAI) -> None:
    name = await model(alice)
    stream = await alice.chat.completions.create(
        model=name, messages=OPENING, max_tokens=64, stream=True, temperature=0,
        extra_body={"ignore_eos": True})
    async with (FastSwitchClient(stack.scheduler_address, api_key=ALICE) as mine,
                FastSwitchClient(stack.scheduler_address, api_key=BOB) as theirs):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # in flight: the scheduler holds it
        own, other = await mine.stats(), await theirs.stats()
    assert own.running + own.waiting + own.swapped == 1
    assert other.running + other.waiting + other.swapped == 0
    await stream.close()


async def test_resent_history_reuses_kv_within_a_tenant_only(
    alice: openai.AsyncOpenAI, bob: openai.AsyncOpenAI
) -> None:
    name = await model(alice)
    first = await alice.chat.completions.create(model=name, messages=OPENING, max_tokens=16,
                                                temperature=0)
    history = [*OPENING, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And then?"}]
    again = await alice.chat.completions.create(model=name, messages=history, max_tokens=4,
                                                temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    theirs = await bob.chat.completions.create(model=name, messages=history, max_tokens=4,
                                               temperature=0)
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    assert theirs.usage.prompt_tokens == again.usage.prompt_tokens


def scrape(address: str, token: str = "") -> tuple[int, str]:
    """GET /metrics on the front door's own port: the status and the page."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://{address}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


async def test_tenant_limits_are_429_and_403_and_metrics_serve_on_the_api_port(
        stack: LocalStack) -> None:
    """A scheduler that caps every tenant at one queued request and priority 1, running
    one sequence a step, behind a front door whose /metrics wants a token."""
    token = secrets.token_urlsafe(16)
    scheduler = stack.start_scheduler(extra_args=[
        "--max-num-seqs", "1", "--tenant-max-queued", "1", "--tenant-max-priority", "1"])
    http = stack.spawn("http", ["--scheduler", scheduler.address, "--client-id=",
                                f"--metrics-token={token}"])
    try:
        async with client(stack, ALICE, http.address) as alice, \
                FastSwitchClient(scheduler.address, api_key=ALICE) as grpc_alice:
            name = await model(alice)
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await alice.completions.create(model=name, prompt="hi", max_tokens=2,
                                               extra_body={"priority": 2})
            assert denied.value.body["type"] == "permission_error"
            assert "max_priority=1" in denied.value.body["message"]
            stream = await alice.completions.create(
                model=name, prompt="a long one", max_tokens=200, stream=True,
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    break  # running: the scheduler's one sequence
            second = asyncio.create_task(alice.completions.create(
                model=name, prompt="second", max_tokens=2))
            for _ in range(200):
                if (await grpc_alice.stats()).waiting == 1:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(openai.RateLimitError) as limited:
                await alice.completions.create(model=name, prompt="third", max_tokens=2)
            assert limited.value.status_code == 429
            assert limited.value.body["type"] == "rate_limit_error"
            assert "max_queued=1" in limited.value.body["message"]
            assert (await asyncio.to_thread(scrape, http.address))[0] == 401
            assert (await asyncio.to_thread(scrape, http.address, "wrong"))[0] == 401
            status, page = await asyncio.to_thread(scrape, http.address, token)
            assert status == 200
            route = 'route="/v1/completions"'
            assert f"fastswitch_http_requests_in_flight{{{route}}} 2.0" in page
            assert f"fastswitch_http_ttft_seconds_count{{{route}}} 1.0" in page
            assert f'fastswitch_http_requests_total{{{route},status="429"}} 1.0' in page
            await stream.close()  # cancels it: the second one runs
            assert (await second).usage.completion_tokens == 2
        _, page = await asyncio.to_thread(scrape, http.address, token)
        assert f"fastswitch_http_requests_in_flight{{{route}}} 0.0" in page
        assert f"fastswitch_http_request_seconds_count{{{route}}} 4.0" in page
    finally:
        stack.stop_child(http)
        stack.stop_child(scheduler)
