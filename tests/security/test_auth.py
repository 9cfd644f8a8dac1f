"""common.auth and the scheduler's conversation bounds, in process: the key file and its
tenant limits, its reloading, bearer metadata, principals and their scoped ids, the
internal token and its file, bind rules, the metrics token, and the conversation
registry's TTL and per-tenant cap."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from common.auth import (
    OPEN,
    ApiKeys,
    AuthError,
    KeyFileError,
    Principal,
    TenantLimits,
    bearer,
    bearer_interceptors,
    check_bind,
    internal_token,
    is_loopback,
    token_interceptors,
)
from common.grpc_serving import add_health_and_reflection, mark_serving
from common.key_reload import ReloadingKeys
from common.metrics import serve_metrics
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.launch import free_port
from services.scheduler.conversations import (
    ConversationLimits,
    Conversations,
    TooManyConversations,
)

KEY_A, KEY_B = "a" * 16 + "-team-a", "b" * 20


def test_key_file_maps_keys_to_tenants_and_roles() -> None:
    keys = ApiKeys.parse(f"# comment\n\n{KEY_A} team-a   # trailing\n{KEY_B} ops admin\n")
    assert len(keys) == 2 and keys.tenants == {"team-a", "ops"}
    assert keys.authenticate([("authorization", f"Bearer {KEY_A}")]) == Principal("team-a")
    admin = keys.authenticate([("Authorization", f"bearer  {KEY_B} ")])
    assert admin == Principal("ops", "admin") and admin.admin
    for metadata in ([], [("authorization", KEY_A)], [("authorization", "Bearer nope" * 3)],
                     [("x-api-key", KEY_A)]):
        with pytest.raises(AuthError) as info:
            keys.authenticate(metadata)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("text", "problem"), [
    ("", "no keys"),
    ("short team-a", "at least 16"),
    (f"{KEY_A} team/a", "tenant"),
    (f"{KEY_A} team-a root", "role"),
    (f"{KEY_A} team-a user extra", "fields"),
    (f"{KEY_A} team-a\n{KEY_A} team-b", "twice"),
    (f"{KEY_A} team-a max_queued=-1", ">= 0"),
    (f"{KEY_A} team-a user max_priority=high", "not an integer"),
    (f"{KEY_A} team-a max_priority={2**31}", "32-bit"),
    (f"{KEY_A} team-a max_tokens=5", "LIMIT one of"),
    (f"{KEY_A} team-a max_queued=1\n{KEY_B} team-a admin max_queued=2", "another line"),
])
def test_bad_key_files_are_refused(text: str, problem: str) -> None:
    with pytest.raises(KeyFileError, match=problem):
        ApiKeys.parse(text)


def test_key_file_limits_are_the_tenants_over_the_defaults() -> None:
    keys = ApiKeys.parse(f"{KEY_A} team-a max_queued=3 max_priority=-2\n"
                         f"{KEY_B} team-a admin max_conversations=0 max_queued=3\n"
                         f"{'c' * 16} team-b\n")
    defaults = TenantLimits(max_queued=10, max_conversations=100, max_priority=7)
    assert keys.limits("team-a") == TenantLimits(3, 0, -2)
    assert keys.limits("team-b") == TenantLimits()
    assert keys.limits("team-a").over(defaults) == TenantLimits(3, 0, -2)  # 0: no cap
    assert keys.limits("team-b").over(defaults) == defaults
    assert keys.authenticate([("authorization", f"Bearer {KEY_B}")]).admin


async def test_reloading_keys_follow_the_file_and_keep_the_old_on_a_bad_one(
        tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A} team-a\n")
    keys = ReloadingKeys(path, poll_s=0.02)
    watcher = asyncio.create_task(keys.watch())

    async def until(check) -> None:
        for _ in range(250):
            if check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the watcher did not notice")

    try:
        path.write_text(f"{KEY_B} team-b max_queued=2\n")
        await until(lambda: keys.keys.tenants == {"team-b"})
        assert keys.keys.limits("team-b").max_queued == 2
        path.write_text("broken\n")
        await until(lambda: keys.failures >= 1)  # a torn read may fail too
        assert keys.keys.tenants == {"team-b"} and keys.reloads == 1
        replacement = tmp_path / "keys.new"  # an editor's atomic rename
        replacement.write_text(f"{KEY_A} team-c\n")
        replacement.replace(path)
        await until(lambda: keys.keys.tenants == {"team-c"})
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    with pytest.raises(KeyFileError):
        ReloadingKeys(tmp_path / "missing")


def test_metrics_endpoints_want_the_token_when_one_is_set() -> None:
    registry = CollectorRegistry()
    Counter("probe", "a test counter", registry=registry).inc()
    open_port = serve_metrics(free_port(), "127.0.0.1", registry)
    closed_port = serve_metrics(free_port(), "127.0.0.1", registry, "s3cret-token")

    def get(port: int, authorization: str = "") -> int:
        headers = {"authorization": authorization} if authorization else {}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                assert b"probe_total 1.0" in reply.read()
                return reply.status
        except urllib.error.HTTPError as e:
            assert e.headers["WWW-Authenticate"].startswith("Bearer")
            return e.code

    assert get(open_port) == 200  # no token configured: as before
    assert get(closed_port) == 401
    assert get(closed_port, "Bearer wrong-token") == 401
    assert get(closed_port, "Basic s3cret-token") == 401
    assert get(closed_port, "Bearer s3cret-token") == 200
    assert serve_metrics(0, "127.0.0.1", registry, "t") is None


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A} team-a\n")
    assert ApiKeys.load(path).tenants == {"team-a"}
    with pytest.raises(KeyFileError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing")


def test_bearer_reads_the_authorization_header() -> None:
    assert bearer([("authorization", "Bearer abc")]) == "abc"
    assert bearer([("authorization", b"Bearer abc")]) == "abc"
    assert bearer([("authorization", "Basic abc")]) is None
    assert bearer([("authorization", "Bearer ")]) is None
    assert bearer(None) is None


def test_a_principal_scopes_its_ids_and_is_its_own_fairness_principal() -> None:
    a = Principal("team-a")
    assert a.scope("r1") == "team-a/r1" != Principal("team-b").scope("r1")
    assert a.unscope(a.scope("x/y")) == "x/y"
    assert a.fairness_id("") == a.fairness_id("team-a") == "team-a"
    with pytest.raises(AuthError) as info:
        a.fairness_id("team-b")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert not a.may_act_for("team-b") and a.may_act_for("team-a")
    assert Principal("ops", "admin").may_act_for("team-b")
    # Without keys: ids as given, client_id as given, everything allowed.
    assert OPEN.scope("r1") == "r1" and OPEN.fairness_id("c7") == "c7"
    assert OPEN.may_act_for("anyone") and OPEN.admin


def test_the_token_file_is_made_once_and_shared(tmp_path: Path) -> None:
    assert internal_token("", "") == ""
    assert internal_token(" given ", str(tmp_path / "unused")) == "given"
    assert not (tmp_path / "unused").exists()
    path = tmp_path / "secret" / "token"
    start = threading.Barrier(8)

    def race() -> str:
        start.wait()
        return internal_token("", str(path))

    with ThreadPoolExecutor(8) as pool:
        tokens = set(pool.map(lambda _: race(), range(8)))
    assert len(tokens) == 1 and len(tokens.pop()) >= 32  # every racer reads the one winner
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no drafts left
    assert internal_token("", str(path)) == path.read_text().strip()  # a restart reads it


def test_binding_beyond_loopback_needs_credentials_or_insecure() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "scheduler"]))
    check_bind("127.0.0.1", service="s", credentials=False, insecure=False, what="keys")
    check_bind("0.0.0.0", service="s", credentials=True, insecure=False, what="keys")
    check_bind("0.0.0.0", service="s", credentials=False, insecure=True, what="keys")
    with pytest.raises(SystemExit, match=r"refusing to listen on 0\.0\.0\.0 without keys"):
        check_bind("0.0.0.0", service="s", credentials=False, insecure=False, what="keys")


class _Store(kv_grpc.KVStoreServicer):
    async def Stats(self, request, context):
        return kv.StatsResponse(capacity_blocks=7)

    async def ReadBlocks(self, request, context):
        yield kv.BlockChunk(offset=0, data=b"x")


async def test_require_token_over_grpc() -> None:
    """The server interceptor against the client interceptor, on a real aio server."""
    server = grpc.aio.server(interceptors=token_interceptors("s3cret-token"))
    kv_grpc.add_KVStoreServicer_to_server(_Store(), server)
    health = add_health_and_reflection(server, "fastswitch.kvstore.v1.KVStore")
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await mark_serving(health, "fastswitch.kvstore.v1.KVStore")
    address = f"127.0.0.1:{port}"
    try:
        for token, ok in (("s3cret-token", True), ("wrong", False), ("", False)):
            async with grpc.aio.insecure_channel(
                    address, interceptors=bearer_interceptors(token)) as channel:
                stub = kv_grpc.KVStoreStub(channel)
                if ok:
                    assert (await stub.Stats(kv.StatsRequest())).capacity_blocks == 7
                    assert [c.data async for c in stub.ReadBlocks(kv.ReadBlocksRequest())] \
                        == [b"x"]
                else:
                    for call in (lambda s=stub: s.Stats(kv.StatsRequest()),
                                 lambda s=stub: _drain(s.ReadBlocks(kv.ReadBlocksRequest()))):
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await call()
                        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def _drain(call) -> None:
    async for _ in call:
        pass


# ---- conversations ---------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_cap_evicts_the_least_recently_used_idle_conversation() -> None:
    convs = Conversations(ConversationLimits(ttl_s=0, max_per_tenant=2), Clock())
    convs.open("a", "a/1")
    convs.open("a", "a/2")
    convs.open("b", "b/1")
    assert convs.open("a", "a/1")[1] == []  # known: used again, nothing evicted
    _, evicted = convs.open("a", "a/3")
    assert evicted == ["a/2"] and convs.count("a") == 2 and convs.count("b") == 1


async def test_a_turn_in_flight_is_never_evicted() -> None:
    convs = Conversations(ConversationLimits(ttl_s=10, max_per_tenant=1), clock := Clock())
    entry, _ = convs.open("a", "a/1")
    async with entry.turn:
        with pytest.raises(TooManyConversations):
            convs.open("a", "a/2")
        clock.now = 100
        assert convs.expire() == []
    assert convs.expire() == ["a/1"] and len(convs) == 0


def test_idle_conversations_expire() -> None:
    convs = Conversations(ConversationLimits(ttl_s=10, max_per_tenant=0), clock := Clock())
    convs.open("a", "a/old")
    clock.now = 5
    convs.open("a", "a/new")
    convs.open("b", "b/x")
    clock.now = 12
    assert convs.expire() == ["a/old"]
    entry = convs.get("a", "a/new")
    assert entry is not None
    clock.now = 14
    convs.touch(entry)  # a turn ended: idle from now
    clock.now = 20
    assert convs.expire() == ["b/x"]
    assert convs.get("a", "a/new") is entry


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        ConversationLimits(ttl_s=-1)
