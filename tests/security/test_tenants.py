"""Tenants and internal credentials on a real stack: API keys, tenant-scoped ids, Stats by
role, the executor and KV store closed to all but the scheduler, TLS, bind rules, bounded
conversations, per-tenant limits and metrics behind a token, and keys reloaded on SIGHUP.
One executor and KV store serve the module, with an internal token and mutual TLS (a CA and
certificate that the module makes with openssl); its schedulers run with API keys and serve
TLS."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.client import FastSwitchClient, Generation, Sampling
from common.kv.host_ops import Abort, Release
from common.tls import ClientTls, aio_channel, sync_channel
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from services.launch import LocalStack, StackConfig, free_port
from tests.support.stacks import executor_and_stores
from tests.support.stores import BatchCalls

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.process
ALICE, BOB, ADMIN = (f"{name}-{secrets.token_hex(12)}" for name in ("alice", "bob", "admin"))
KEYS = f"""# test keys
{ALICE} tenant-a
{BOB}   tenant-b user
{ADMIN} ops      admin
"""
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
LONG = Sampling(ignore_eos=True)  # generates exactly max_tokens


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signs for 127.0.0.1 (server and client use): the CA's
    file, the certificate's and its key's."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=fastswitch test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=localhost")
    (folder / "node.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.pem", "-days", "2", "-extfile", "node.ext")
    return folder / "ca.pem", folder / "node.pem", folder / "node.key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    folder = tmp_path_factory.mktemp("tenants")
    keys = folder / "api-keys"
    keys.write_text(KEYS)
    keys.chmod(0o600)
    ca, cert, key = make_certificates(folder)
    config = StackConfig(num_gpu_blocks=128, num_host_blocks=1024, log_dir=str(folder / "logs"),
                         internal_token=secrets.token_urlsafe(32), api_keys_file=str(keys),
                         tls_cert=str(cert), tls_key=str(key), tls_ca=str(ca),
                         tls_mutual=True)
    with executor_and_stores(config) as s:
        yield s


@dataclass(frozen=True)
class Scheduler:
    address: str
    ca: str

    def client(self, key: str = "") -> FastSwitchClient:
        return FastSwitchClient(self.address, api_key=key, tls_ca=self.ca)


@pytest.fixture(scope="module")
def keyed(stack: LocalStack) -> Iterator[Scheduler]:
    """One scheduler with API keys, serving TLS, shared by the module's tests."""
    child = stack.start_scheduler()
    yield Scheduler(child.address, stack.config.tls_ca)
    assert stack.stop_child(child) == 0


async def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call()
        if isinstance(result, Generation):
            await result.collect()
        else:
            await result
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def first_token(gen: Generation) -> asyncio.Task[Generation]:
    """Runs `gen` in the background, returning once its first token is in."""
    task = asyncio.create_task(gen.collect())
    while not gen.tokens:
        if task.done():
            task.result()  # raises what ended it
            raise AssertionError("the generation ended without a token")
        await asyncio.sleep(0.01)
    return task


# ---- keys ------------------------------------------------------------------------------

async def test_missing_or_unknown_keys_are_unauthenticated(keyed: Scheduler) -> None:
    for key in ("", "not-a-key-of-this-stack"):
        async with keyed.client(key) as c:
            assert "key" in await refused(lambda c=c: c.generate("hi", max_tokens=2),
                                          UNAUTHENTICATED)
            await refused(lambda c=c: c.chat("conv", "hi", max_tokens=2), UNAUTHENTICATED)
            await refused(lambda c=c: c.stats(), UNAUTHENTICATED)
            await refused(lambda c=c: c.cancel("r"), UNAUTHENTICATED)
            await refused(lambda c=c: c.set_priority(1, request_id="r"), UNAUTHENTICATED)
    # Not a bearer credential at all, by hand.
    async with aio_channel(keyed.address, ClientTls(keyed.ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.SchedulerStub(channel).Stats(
                pb.StatsRequest(), metadata=(("authorization", f"Basic {ALICE}"),))
        assert info.value.code() == UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health stays open


async def test_the_tenant_is_the_fairness_principal(keyed: Scheduler) -> None:
    async with keyed.client(ALICE) as alice:
        details = await refused(lambda: alice.generate("hi", client_id="tenant-b", max_tokens=2),
                                PERMISSION_DENIED)
        assert "tenant-a" in details
        await refused(lambda: alice.chat("c-principal", "hi", client_id="tenant-b",
                                         max_tokens=2), PERMISSION_DENIED)
        for client_id in ("", "tenant-a"):
            gen = await alice.generate("hi", client_id=client_id, max_tokens=2).collect()
            assert gen.final is not None and gen.final.completion_tokens == 2


# ---- ids are the tenant's own ----------------------------------------------------------

async def test_two_tenants_use_the_same_request_id(keyed: Scheduler) -> None:
    async with keyed.client(ALICE) as alice, keyed.client(BOB) as bob:
        a = alice.generate("one prompt", max_tokens=200, request_id="same", sampling=LONG)
        running = await first_token(a)
        b = await bob.generate("another prompt", max_tokens=4, request_id="same").collect()
        # The same id twice within a tenant is still one too many; the message shows the
        # caller's id, not the internal one.
        details = await refused(
            lambda: alice.generate("x", max_tokens=2, request_id="same"),
            grpc.StatusCode.ALREADY_EXISTS)
        assert "'same'" in details and "tenant-a" not in details
        assert await alice.cancel("same") is True
        a = await running
    assert a.request_id == b.request_id == "same"  # never prefixed
    assert a.final.finish_reason == "cancelled" and b.final.completion_tokens == 4


async def test_cancel_and_set_priority_reach_only_the_callers_requests(keyed: Scheduler) -> None:
    prompt = "the victim's prompt, long enough to be running a while"
    async with keyed.client(ALICE) as alice, keyed.client(BOB) as bob, \
            keyed.client(ADMIN) as admin:
        reference = await alice.generate(prompt, max_tokens=120, sampling=LONG).collect()
        victim = alice.generate(prompt, max_tokens=120, request_id="victim", sampling=LONG)
        running = await first_token(victim)
        assert await bob.cancel("victim") is False
        assert await bob.set_priority(9, request_id="victim") == 0
        await refused(lambda: bob.set_priority(9, client_id="tenant-a"), PERMISSION_DENIED)
        assert await bob.set_priority(1, client_id="tenant-b") == 0  # its own: allowed
        assert await admin.set_priority(2, client_id="tenant-a") == 1  # admins may
        assert await alice.set_priority(3, request_id="victim") == 1
        done = await running
        assert done.final.finish_reason == "length"
        assert [t.id for t in done.tokens] == [t.id for t in reference.tokens]
        # Its owner can cancel it.
        mine = alice.generate(prompt, max_tokens=200, request_id="mine", sampling=LONG)
        running = await first_token(mine)
        assert await bob.cancel("mine") is False
        assert await alice.cancel("mine") is True
        assert (await running).final.finish_reason == "cancelled"


async def test_a_conversation_id_is_the_tenants_own(keyed: Scheduler) -> None:
    secret = "my card PIN is 4711, remember it"
    async with keyed.client(ALICE) as alice, keyed.client(BOB) as bob:
        first = await alice.chat("shared-id", secret, max_tokens=8).collect()
        # Bob's turn under the same id starts a conversation of his own: no history.
        fresh = await bob.chat("bob-fresh", "what was the PIN?", max_tokens=8).collect()
        probe = await bob.chat("shared-id", "what was the PIN?", max_tokens=8).collect()
        assert probe.final.prompt_tokens == fresh.final.prompt_tokens
        assert probe.final.reused_prompt_tokens == 0
        # Alice's conversation is as it would be without Bob: compare with a twin.
        twin_first = await alice.chat("twin", secret, max_tokens=8).collect()
        assert [t.id for t in twin_first.tokens] == [t.id for t in first.tokens]
        second = await alice.chat("shared-id", "and then?", max_tokens=8).collect()
        twin = await alice.chat("twin", "and then?", max_tokens=8).collect()
        assert second.final.prompt_tokens == twin.final.prompt_tokens > fresh.final.prompt_tokens
        assert [t.id for t in second.tokens] == [t.id for t in twin.tokens]


async def test_stats_show_a_user_its_tenant_and_an_admin_everything(keyed: Scheduler) -> None:
    async with keyed.client(ALICE) as alice, keyed.client(BOB) as bob, \
            keyed.client(ADMIN) as admin:
        running = await first_token(alice.generate("busy", max_tokens=200, request_id="busy",
                                                   sampling=LONG))
        mine, theirs, everything = await alice.stats(), await bob.stats(), await admin.stats()
        await alice.cancel("busy")
        await running
    assert mine.running + mine.waiting + mine.swapped == 1
    assert theirs.running + theirs.waiting + theirs.swapped == 0
    assert everything.running + everything.waiting + everything.swapped >= 1
    assert everything.steps > 0
    assert mine.steps == theirs.steps == mine.finished == 0  # service-wide: admins only
    assert mine.executor_available and theirs.executor_available and mine.mode == "fastswitch"


async def test_the_public_api_serves_tls_only(keyed: Scheduler) -> None:
    async with FastSwitchClient(keyed.address, api_key=ALICE) as plaintext:
        await refused(lambda: plaintext.stats(), grpc.StatusCode.UNAVAILABLE)
    async with keyed.client(ALICE) as alice:
        gen = await alice.generate("over TLS", max_tokens=3).collect()
    assert gen.final.completion_tokens == 3


# ---- the executor and the KV store serve only the scheduler ----------------------------

def _code(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_executor_and_kvstore_refuse_calls_without_the_internal_token(
        stack: LocalStack) -> None:
    good = stack.internal_metadata
    bad = (("authorization", "Bearer not-the-token"),)
    # Mutual TLS: without a client certificate (or without TLS) nothing gets through.
    for tls in (None, ClientTls(stack.config.tls_ca)):
        for address in (stack.executor_address, stack.kvstore_address):
            with sync_channel(address, tls) as channel:
                call = ex_grpc.ExecutorStub(channel).Describe if address == \
                    stack.executor_address else kv_grpc.KVStoreStub(channel).Describe
                request = ex.DescribeRequest() if address == stack.executor_address \
                    else kv.DescribeRequest()
                assert _code(lambda c=call, r=request: c(r, metadata=good, timeout=5)) == \
                    grpc.StatusCode.UNAVAILABLE, (address, tls)
    with stack.channel(stack.executor_address) as channel:
        executor = ex_grpc.ExecutorStub(channel)
        calls = {
            "Describe": lambda m: executor.Describe(ex.DescribeRequest(), metadata=m),
            "Step": lambda m: executor.Step(ex.StepRequest(iteration=1), metadata=m),
            "SubmitSwaps": lambda m: executor.SubmitSwaps(ex.SubmitSwapsRequest(), metadata=m),
            "AttachHostArena": lambda m: executor.AttachHostArena(
                ex.AttachHostArenaRequest(name="nope"), metadata=m),
            "SwapEvents": lambda m: executor.SwapEvents(ex.SwapEventsRequest(), metadata=m,
                                                       timeout=0.5),
        }
        for name, call in calls.items():
            for metadata in ((), bad):
                assert _code(lambda c=call, m=metadata: c(m)) == UNAUTHENTICATED, name
        assert _code(lambda: calls["Describe"](good)) == grpc.StatusCode.OK
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status \
            == health_pb2.HealthCheckResponse.SERVING
    fingerprint = stack.describe.model_fingerprint
    block_size = stack.describe.geometry.block_size
    with stack.channel(stack.kvstore_address) as channel:
        store = kv_grpc.KVStoreStub(channel)
        batch = BatchCalls(store, fingerprint, block_size)
        tokens = list(range(40))
        calls = {
            "Describe": lambda m: store.Describe(kv.DescribeRequest(), metadata=m),
            "Stats": lambda m: store.Stats(kv.StatsRequest(), metadata=m),
            "Batch": lambda m: store.Batch(batch.request(
                batch.reserve_op("tenant-a/shared-id", tokens),
                batch.pin_op("tenant-a/shared-id", tokens, op_id=2), Release("x"),
                Abort(1)), metadata=m),
            "ReadBlocks": lambda m: store.ReadBlocks(
                kv.ReadBlocksRequest(extents=[kv.Extent(start=0, length=4)]), metadata=m),
            "WriteBlocks": lambda m: store.WriteBlocks(
                iter([kv.WriteBlocksChunk(reservation_id=1)]), metadata=m),
        }
        before = store.Stats(kv.StatsRequest(), metadata=good)
        for name, call in calls.items():
            for metadata in ((), bad):
                assert _code(lambda c=call, m=metadata: c(m)) == UNAUTHENTICATED, name
        after = store.Stats(kv.StatsRequest(), metadata=good)
        assert after.pending_reservations == before.pending_reservations  # nothing reserved
        assert after.pinned_blocks == before.pinned_blocks
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status \
            == health_pb2.HealthCheckResponse.SERVING
        # Reservation ids are random, not a count another caller could walk.
        ids = []
        for i in range(3):
            reply = store.Batch(batch.request(batch.reserve_op(f"ids-{i}", list(range(20)))),
                                metadata=good).replies[0].reserved
            ids.append(reply.reservation_id)
        store.Batch(batch.request(*(Abort(i) for i in ids)), metadata=good)
    assert len(set(ids)) == 3 and all(0 < i < 2**48 for i in ids)
    assert max(ids) - min(ids) > 1000


# ---- binding ---------------------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTSWITCH_INTERNAL_TOKEN", "FASTSWITCH_INTERNAL_TOKEN_FILE",
                        "FASTSWITCH_INSECURE", "FASTSWITCH_API_KEYS_FILE")
           and not k.startswith("FASTSWITCH_TLS_")}
    return {**env, **extra}


def _serve_all(runs: list[tuple[list[str], dict[str, str]]]) -> None:
    """Starts each `python -m ARGS` at once, waits for each one's ready line, stops them."""
    processes = [subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for args, env in runs]
    try:
        for process in processes:
            line = process.stdout.readline()
            assert line.startswith("kvstore ready"), process.stderr.read()
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


async def test_a_public_bind_needs_credentials_or_insecure(
        stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service's own entry point, in this process, refuses before it binds (or loads
    a model); the KV store, as a process, serves 0.0.0.0 with a token or --insecure."""
    from services.executor.__main__ import main as executor_main
    from services.kvstore.__main__ import serve as kvstore_serve
    from services.kvstore.config import parse_config
    from services.scheduler.__main__ import parse_args as scheduler_args
    from services.scheduler.__main__ import serve as scheduler_serve

    for name in [k for k in os.environ if k not in _env()]:
        monkeypatch.delenv(name)
    store = ["--host", "0.0.0.0", "--port", "0", "--num-blocks", "8", "--block-bytes", "4096",
             "--fingerprint", "fp"]
    refusal = r"refusing to listen on 0\.0\.0\.0 without"
    with pytest.raises(SystemExit, match=f"{refusal} an internal token"):
        await kvstore_serve(parse_config(store, {}))
    with pytest.raises(SystemExit, match=f"{refusal} an internal token"):
        executor_main(["--listen", "0.0.0.0", "--port", "0"])
    # The scheduler needs keys: an internal token is not what protects its public API.
    with pytest.raises(SystemExit, match=f"{refusal} API keys"):
        await scheduler_serve(scheduler_args(["--host", "0.0.0.0", "--internal-token", "t" * 20,
                                              "--executor", stack.executor_address]))
    _serve_all([(["services.kvstore", *store], _env(FASTSWITCH_INTERNAL_TOKEN="its-own-token")),
                (["services.kvstore", *store, "--insecure"], _env())])


# ---- conversations are bounded ---------------------------------------------------------

async def _turns(scheduler: Scheduler, key: str, conv: str) -> int:
    """A first turn and a second, returning the second's prompt tokens."""
    async with scheduler.client(key) as c:
        await c.chat(conv, "tell me about block groups and swaps", max_tokens=8).collect()
        return (await c.chat(conv, "and then?", max_tokens=4).collect()).final.prompt_tokens


async def _again(scheduler: Scheduler, key: str, conv: str) -> int:
    async with scheduler.client(key) as c:
        return (await c.chat(conv, "and then?", max_tokens=4).collect()).final.prompt_tokens


@pytest.fixture
def limited(stack: LocalStack, request: pytest.FixtureRequest) -> Iterator[Scheduler]:
    child = stack.start_scheduler(extra_args=request.param)
    yield Scheduler(child.address, stack.config.tls_ca)
    assert stack.stop_child(child) == 0


@pytest.mark.parametrize("limited", [["--max-conversations", "2"]], indirect=True)
async def test_a_tenant_keeps_at_most_its_cap_of_conversations(limited: Scheduler) -> None:
    async with limited.client(ALICE) as alice:
        fresh = (await alice.chat("fresh", "and then?", max_tokens=4).collect()).final
    # "fresh" is Alice's first conversation; two more push it and then c1 out.
    bob_kept = await _turns(limited, BOB, "b1")
    with_history = await _turns(limited, ALICE, "c1")
    assert with_history > fresh.prompt_tokens
    await _turns(limited, ALICE, "c2")
    assert await _again(limited, ALICE, "c2") > with_history  # kept, and growing
    await _turns(limited, ALICE, "c3")  # evicts c1, the least recently used
    assert await _again(limited, ALICE, "c1") == fresh.prompt_tokens  # forgotten
    assert await _again(limited, BOB, "b1") > bob_kept  # another tenant's: untouched


@pytest.mark.parametrize("limited", [["--conversation-ttl", "1"]], indirect=True)
async def test_an_idle_conversation_expires_and_its_host_kv_is_released(
        limited: Scheduler, stack: LocalStack) -> None:
    with stack.channel(stack.kvstore_address) as channel:
        store = kv_grpc.KVStoreStub(channel)

        def used() -> int:
            return store.Stats(kv.StatsRequest(), metadata=stack.internal_metadata).used_blocks

        before = used()
        async with limited.client(ALICE) as alice:
            long = "tell me everything about block groups and swaps " * 8
            await alice.chat("idle", long, max_tokens=8).collect()
            deadline = time.monotonic() + 5
            while used() <= before:  # the finished turn's KV reaches the host
                assert time.monotonic() < deadline, "the turn's KV never reached the host"
                await asyncio.sleep(0.02)
            await asyncio.sleep(2.5)  # past the TTL: the scheduler's sweep forgets it
            assert used() <= before, "the expired conversation's host KV was not released"
            fresh = (await alice.chat("fresh-ttl", "and then?", max_tokens=4).collect()).final
            again = (await alice.chat("idle", "and then?", max_tokens=4).collect()).final
            assert again.prompt_tokens == fresh.prompt_tokens  # its history is gone too


# ---- per-tenant limits -----------------------------------------------------------------

CAPPED_KEYS = f"""{ALICE} tenant-a user max_queued=1 max_conversations=1 max_priority=5
{BOB}   tenant-b
{ADMIN} ops      admin
"""
METRICS_TOKEN = secrets.token_urlsafe(24)
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Capped(Scheduler):
    metrics_port: int

    def scrape(self, token: str | None = METRICS_TOKEN) -> str:
        """The metrics page, sent `token`; raises HTTPError on a refusal."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                         headers=headers)
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.read().decode()


@pytest.fixture(scope="module")
def capped(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capped]:
    """A scheduler whose key file limits tenant-a, with a priority cap of 2 for the other
    users (the flag's), one sequence a step (so that a second request queues), and its
    metrics behind a token."""
    keys = tmp_path_factory.mktemp("capped") / "api-keys"
    keys.write_text(CAPPED_KEYS)
    keys.chmod(0o600)
    port = free_port()
    child = stack.start_scheduler(extra_args=[
        "--api-keys", str(keys), "--max-num-seqs", "1", "--tenant-max-priority", "2",
        "--metrics-port", str(port), f"--metrics-token={METRICS_TOKEN}"])
    yield Capped(child.address, stack.config.tls_ca, port)
    assert stack.stop_child(child) == 0


async def until(check, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_tenants_queue_limit_refuses_and_changes_nothing(capped: Capped) -> None:
    async with capped.client(ALICE) as alice, capped.client(BOB) as bob:
        running = await first_token(alice.generate("first", max_tokens=200, request_id="q1",
                                                   sampling=LONG))
        queued = asyncio.create_task(alice.generate("second", max_tokens=2,
                                                    request_id="q2").collect())

        async def waiting() -> bool:
            return (await alice.stats()).waiting == 1

        await until(waiting, "the second request to queue")
        details = await refused(lambda: alice.generate("third", max_tokens=2, request_id="q3"),
                                RESOURCE_EXHAUSTED)
        assert "max_queued=1" in details and "tenant-a" in details
        mine = await alice.stats()
        assert (mine.running, mine.waiting) == (1, 1)  # the refused one is nowhere
        # Another tenant's requests are not held to tenant-a's limit.
        theirs = asyncio.create_task(bob.generate("bob's", max_tokens=2).collect())
        assert await alice.cancel("q1") is True
        assert (await running).final.finish_reason == "cancelled"
        assert (await queued).final.completion_tokens == 2
        assert (await theirs).final.completion_tokens == 2
        again = await alice.generate("third", max_tokens=2, request_id="q3").collect()
        assert again.final.completion_tokens == 2


async def test_a_tenants_conversation_limit_refuses_a_second_one_in_flight(
        capped: Capped) -> None:
    async with capped.client(ALICE) as alice, capped.client(BOB) as bob:
        turn = await first_token(alice.chat("talk-1", "a long talk", max_tokens=200,
                                            request_id="t1", sampling=LONG))
        details = await refused(lambda: alice.chat("talk-2", "hi", max_tokens=2),
                                RESOURCE_EXHAUSTED)
        assert "max_conversations=1" in details
        theirs = asyncio.create_task(bob.chat("talk-2", "hi", max_tokens=2).collect())
        assert await alice.cancel("t1") is True
        await turn
        assert (await theirs).final.completion_tokens == 2  # not held to tenant-a's cap
        # The cancelled first turn left nothing to keep: the one slot is free again.
        assert (await alice.chat("talk-2", "hi", max_tokens=2).collect()).final


async def test_a_users_priority_is_capped_and_an_admins_is_not(capped: Capped) -> None:
    async with capped.client(ALICE) as alice, capped.client(BOB) as bob, \
            capped.client(ADMIN) as admin:
        details = await refused(lambda: alice.generate("hi", max_tokens=2, priority=6),
                                PERMISSION_DENIED)
        assert "max_priority=5" in details  # the key file's
        assert "max_priority=2" in await refused(  # the flag's, for tenants without one
            lambda: bob.chat("prio", "hi", max_tokens=2, priority=3), PERMISSION_DENIED)
        running = await first_token(alice.generate("p", max_tokens=200, request_id="p1",
                                                   sampling=LONG, priority=5))
        await refused(lambda: alice.set_priority(6, request_id="p1"), PERMISSION_DENIED)
        await refused(lambda: alice.set_priority(6, client_id="tenant-a"), PERMISSION_DENIED)
        assert await alice.set_priority(4, request_id="p1") == 1
        assert await admin.set_priority(50, client_id="tenant-a") == 1
        ops = await admin.generate("mine", max_tokens=2, priority=99).collect()
        assert ops.final.completion_tokens == 2
        assert await alice.cancel("p1") is True
        await running


def _sample(page: str, name: str, **labels: str) -> float:
    """The value of `name{labels}` on a metrics page (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in page.splitlines():
        if line.startswith(f"{name}{{") and not line.startswith("#"):
            got, value = line.removeprefix(name).rsplit(" ", 1)
            if ",".join(sorted(got.strip("{}").split(","))) == want:
                return float(value)
    return 0.0


async def test_metrics_need_the_token_and_count_per_tenant(capped: Capped) -> None:
    for token in (None, "not-the-token"):
        with pytest.raises(urllib.error.HTTPError) as info:
            await asyncio.to_thread(capped.scrape, token)
        assert info.value.code == 401
    before = await asyncio.to_thread(capped.scrape)
    async with capped.client(ALICE) as alice, capped.client(BOB) as bob:
        await refused(lambda: alice.generate("hi", max_tokens=2, priority=6), PERMISSION_DENIED)
        await alice.generate("counted", max_tokens=3).collect()
        running = await first_token(bob.generate("bob", max_tokens=200, request_id="m1",
                                                 sampling=LONG))
        during = await asyncio.to_thread(capped.scrape)
        await bob.cancel("m1")
        await running
    after = await asyncio.to_thread(capped.scrape)
    prefix = "fastswitch_scheduler_tenant_"

    def grew(name: str, **labels: str) -> float:
        return _sample(after, prefix + name, **labels) - _sample(before, prefix + name, **labels)

    assert grew("refusals_total", tenant="tenant-a", limit="max_priority") == 1
    assert grew("tokens_total", tenant="tenant-a") == 3
    assert _sample(during, prefix + "running", tenant="tenant-b") == 1
    assert _sample(after, prefix + "running", tenant="tenant-b") == 0
    assert f'{prefix}queued{{tenant="ops"}} 0.0' in after  # the key file's tenants, all


# ---- the keys reload -------------------------------------------------------------------

async def test_keys_reload_on_sighup_without_dropping_streams(
        stack: LocalStack, tmp_path: Path) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(f"{ALICE} tenant-a\n")
    keys.chmod(0o600)
    log = Path(stack.config.log_dir) / "scheduler.log"
    # Polled once an hour: only the signal reloads them here.
    child = stack.start_scheduler(extra_args=["--api-keys", str(keys), "--api-keys-poll", "3600"])
    scheduler = Scheduler(child.address, stack.config.tls_ca)
    try:
        async with scheduler.client(ALICE) as alice, scheduler.client(BOB) as bob:
            await refused(lambda: bob.stats(), UNAUTHENTICATED)
            stream = await first_token(alice.generate("keep going", max_tokens=120,
                                                      sampling=LONG))
            keys.write_text(f"{BOB} tenant-b\n")
            child.process.send_signal(signal.SIGHUP)

            async def bob_is_in() -> bool:
                try:
                    await bob.stats()
                except grpc.aio.AioRpcError:
                    return False
                return True

            await until(bob_is_in, "the new keys")
            await refused(lambda: alice.stats(), UNAUTHENTICATED)  # its key is gone
            done = await stream  # but its stream in flight ran to its end
            assert done.final.finish_reason == "length" and done.final.completion_tokens == 120
            failures = log.read_text().count("API keys not reloaded")
            keys.write_text("not a key file\n")
            child.process.send_signal(signal.SIGHUP)

            async def logged() -> bool:
                return log.read_text().count("API keys not reloaded") > failures

            await until(logged, "the bad file's error")
            assert (await bob.stats()).mode == "fastswitch"  # the keys before are kept
            await refused(lambda: alice.stats(), UNAUTHENTICATED)
    finally:
        assert stack.stop_child(child) == 0
