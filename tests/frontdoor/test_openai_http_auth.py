"""The HTTP front door of a stack with API keys, through the official `openai` client: a
missing or unknown key gets a 401 OpenAI error object, naming another tenant as `user` a
403; a valid key's requests are accounted to its tenant, and resent histories reuse host
KV within a tenant only."""

from __future__ import annotations

import secrets
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


def client(stack: LocalStack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{stack.http_address}/v1", api_key=key,
                              max_retries=0)


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
