"""`make compose-test`: builds the image, runs docker-compose.yml for real and faults it.

Steps, each printed as it goes:
  1. `docker build` of docker/Dockerfile (classic builder, host network) with the build
     args PYTHON_IMAGE and TORCH_INDEX_CPU taken from the environment when set;
  2. `docker-compose up` of redis, executor, kvstore and scheduler under a project name of
     its own, on ephemeral host ports, with API keys (a key file written to a folder of its
     own, mounted as the secrets folder, and FASTSWITCH_INSECURE=0), without the scheduler's
     device prefix cache (so that a Chat turn's reuse is a store's), and a wait until the
     scheduler is healthy;
  3. the checks: a call without a key is refused (UNAUTHENTICATED), a greedy Generate (its
     tokens are the reference for later rounds), a two-turn Chat whose second turn reuses
     host KV (reused_prompt_tokens > 0), and concurrent Generates of three tenants;
  4. for executor, kvstore, scheduler and redis in turn: `docker restart`, then the checks
     again, which must pass within --bound seconds of the restart;
  5. the scale case: `up --scale kvstore=3`, a wait until Redis's registry lists three live
     stores and the scheduler has attached them, multi-turn Chats that must spread over at
     least two replicas (their chain keys in Redis name the instance), `docker stop` of the
     replica holding most of them, a check that the scheduler drops it (kvstore_degraded
     clears) and that every conversation's next turn gives the tokens of a twin
     conversation run before the stop, recomputed on the stopped store's, reusing KV on the
     others'; then a scale back to one store and the checks again;
  6. `docker-compose down -v`, and a check that no container, volume or network of the
     project is left.
Exits 0 when all of it passed. Needs Docker and docker-compose (v1); on machines without
a registry, run ../shared/tools/docker-sandbox.sh first and export what it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.auth import SCOPE
from common.client import FastSwitchClient

REPO = Path(__file__).resolve().parent.parent
SCHEDULER = "fastswitch.scheduler.v1.Scheduler"
SERVICES = ("executor", "kvstore", "scheduler", "redis")
PROMPT = "the quick brown fox jumps over the lazy dog"
HOST_PORTS = [f"FASTSWITCH_HOST_PORT_{s}{m}" for s in ("SCHEDULER", "EXECUTOR", "KVSTORE", "HTTP")
              for m in ("", "_METRICS")]
REPLICAS = 3  # of the KV store, in the scale case
SCALE_CONVS = 6  # conversations of the scale case, each with a twin run before the stop
# services/kvstore/redis_storage.py's layout, under the CPU set's namespace (compose file)
KEY_ROOT = "fastswitch:kv:cpu"
_started = time.monotonic()
TENANTS = ("ct", "ct-0", "ct-1", "ct-2")
KEYS = {tenant: secrets.token_hex(16) for tenant in TENANTS}


def say(message: str) -> None:
    print(f"[compose-test {time.monotonic() - _started:6.1f}s] {message}", flush=True)


class Compose:
    """docker-compose for one project, on ephemeral host ports."""

    def __init__(self, project: str, image: str, secrets_dir: str) -> None:
        self.project = project
        self.env = {
            **os.environ,
            "FASTSWITCH_IMAGE": image,
            "FASTSWITCH_NUM_HOST_BLOCKS": os.environ.get("FASTSWITCH_NUM_HOST_BLOCKS", "1024"),
            "FASTSWITCH_SHM_SIZE": os.environ.get("FASTSWITCH_SHM_SIZE", "256m"),
            **{name: "" for name in HOST_PORTS},
            "FASTSWITCH_SECRETS_DIR": secrets_dir,
            "FASTSWITCH_API_KEYS_FILE": "/secrets/api-keys",
            "FASTSWITCH_INSECURE": "0",
            # Without the device prefix cache, a Chat turn's reuse comes from a store.
            "FASTSWITCH_SWITCHES": "-device_cache",
        }

    def run(self, *args: str, capture: bool = False) -> str:
        result = subprocess.run(
            ["docker-compose", "-p", self.project, *args], cwd=REPO, env=self.env, check=True,
            stdout=subprocess.PIPE if capture else None, text=True)
        return result.stdout.strip() if capture else ""

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service, capture=True)

    def containers(self, service: str) -> list[str]:
        """The running containers' full ids."""
        return self.container(service).split()

    def redis(self, *args: str) -> list[str]:
        """redis-cli in the redis container, its raw output by line."""
        return self.run("exec", "-T", "redis", "redis-cli", "--raw", *args,
                        capture=True).splitlines()

    def scheduler_address(self) -> str:
        port = self.run("port", "scheduler", "50051", capture=True).rsplit(":", 1)[1]
        return f"127.0.0.1:{port}"

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
            out = subprocess.run(["docker", *kind, "-q", "--filter", label], check=True,
                                 capture_output=True, text=True).stdout.split()
            found += [f"{kind[0]} {name}" for name in out]
        return found


def build(image: str) -> None:
    args = ["--build-arg", "VARIANT=cpu"]
    for name in ("PYTHON_IMAGE", "TORCH_INDEX_CPU"):
        if os.environ.get(name):
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    subprocess.run(["docker", "build", "--network", "host", *args, "-f", "docker/Dockerfile",
                    "-t", image, "."], cwd=REPO, check=True,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"})


def ready(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SCHEDULER), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def checks(address: str, reference: Sequence[int] | None, tag: str) -> list[int]:
    """Generate (the same tokens as `reference`), a Chat reusing host KV on its second
    turn, and concurrent requests; returns the Generate's tokens."""
    async with FastSwitchClient(address) as anonymous:
        try:
            await anonymous.stats()
            raise AssertionError("a call without an API key was served")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    tenants = [FastSwitchClient(address, api_key=KEYS[t]) for t in TENANTS[1:]]
    async with FastSwitchClient(address, api_key=KEYS["ct"]) as client:
        one = await client.generate(PROMPT, max_tokens=16).collect()
        tokens = [t.id for t in one.tokens]
        assert one.final is not None and one.final.completion_tokens > 0, "empty Generate"
        assert reference is None or tokens == list(reference), "Generate's tokens changed"
        conv = f"conv-{tag}"
        await client.chat(conv, "tell me about block groups and swaps " * 3,
                          max_tokens=24).collect()
        await asyncio.sleep(0.5)  # the finished turn's KV is copied to the host meanwhile
        second = await client.chat(conv, "and then?", max_tokens=8).collect()
        assert second.final is not None and second.final.reused_prompt_tokens > 0, \
            "the second Chat turn reused no host KV"
        try:
            many = await asyncio.gather(*[
                tenants[i % 3].generate(f"{PROMPT} {i}", max_tokens=12).collect()
                for i in range(8)])
        finally:
            for tenant in tenants:
                await tenant.close()
        assert all(g.final is not None and g.final.completion_tokens > 0 for g in many)
        stats = await client.stats()
        assert stats.executor_available and not stats.kvstore_degraded, stats
    return tokens


async def recover(compose: Compose, reference: Sequence[int], tag: str, bound_s: float
                  ) -> float:
    """Seconds until the checks pass again; fails past `bound_s`."""
    started = time.monotonic()
    problem = "not ready"
    while time.monotonic() - started < bound_s:
        try:
            address = compose.scheduler_address()  # a restarted container may move ports
            if ready(address):
                await asyncio.wait_for(checks(address, reference, tag), bound_s)
                return time.monotonic() - started
        except (grpc.RpcError, AssertionError, subprocess.CalledProcessError,
                TimeoutError) as e:
            problem = f"{type(e).__name__}: {e}"
        await asyncio.sleep(1)
    raise SystemExit(f"{tag}: not serving correctly {bound_s:.0f} s after the restart "
                     f"({problem})")


async def scenario(compose: Compose, bound_s: float, start_s: float
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """The restart round's recovery times, and the scale case's timings."""
    compose.run("up", "-d", "--no-build")
    say("stack started; waiting for the scheduler to be ready")
    deadline = time.monotonic() + start_s
    while not ready(compose.scheduler_address()):
        if time.monotonic() > deadline:
            raise SystemExit(f"the scheduler was not ready {start_s:.0f} s after up")
        await asyncio.sleep(1)
    reference = await checks(compose.scheduler_address(), None, "start")
    say(f"checks passed (Generate: {len(reference)} tokens)")
    recovered: dict[str, float] = {}
    for service in SERVICES:
        container = compose.container(service)
        say(f"docker restart {service}")
        subprocess.run(["docker", "restart", container], check=True, capture_output=True)
        recovered[service] = await recover(compose, reference, f"after-{service}", bound_s)
        say(f"{service} restarted: serving correctly again {recovered[service]:.1f} s later")
    return recovered, await scale_case(compose, reference, bound_s)


def live_stores(compose: Compose) -> dict[str, dict[str, object]]:
    """The registry's serving entries (an address, a lease that holds), by instance id."""
    now = time.time()
    live = {}
    for key in compose.redis("--scan", "--pattern", f"{KEY_ROOT}:{{*}}:instances"):
        flat = compose.redis("HGETALL", key)
        for instance, value in zip(flat[::2], flat[1::2], strict=True):
            entry = json.loads(value)
            if entry["address"] and entry["lease_until"] > now:
                live[instance] = entry
    return live


def holders(compose: Compose, convs: Sequence[str]) -> dict[str, str]:
    """The instance whose chain key holds each of `convs`, for those that have one."""
    found = {}
    for key in compose.redis("--scan", "--pattern", f"{KEY_ROOT}:{{*}}:*"):
        head, sep, instance = key.rpartition("}:")
        scoped = head.removeprefix(f"{KEY_ROOT}:{{").partition(":")[2]  # after the fingerprint
        name = scoped.rpartition(SCOPE)[2]
        if sep and name in convs:
            found[name] = instance
    return found


def scheduler_stores(compose: Compose) -> dict[str, str]:
    """Each store the scheduler's log names, by instance id: "joined" or "left", whichever
    it told last (services/scheduler/store_membership.py logs both)."""
    log = subprocess.run(["docker", "logs", compose.container("scheduler")], check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    last = {}
    for match in re.finditer(r"KV store (\S+) at \S+ (joined|left)", log):
        last[match[1]] = match[2]
    return last


async def until(what: str, done: Callable[[], Awaitable[bool]], bound_s: float) -> float:
    """Seconds until `done()` holds; fails past `bound_s`."""
    started = time.monotonic()
    while not await done():
        if time.monotonic() - started > bound_s:
            raise SystemExit(f"scale case: {what}, not within {bound_s:.0f} s")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class Turn:
    tokens: list[int]
    reused: int  # prompt tokens whose KV came from a store


async def turn(client: FastSwitchClient, conv: str, message: str) -> Turn:
    reply = await client.chat(conv, message, max_tokens=12).collect()
    assert reply.final is not None and reply.final.completion_tokens > 0, f"{conv}: empty turn"
    return Turn([t.id for t in reply.tokens], reply.final.reused_prompt_tokens)


async def turns(client: FastSwitchClient, convs: Sequence[str], message: str
                ) -> dict[str, Turn]:
    """One turn of every conversation, concurrently; `message` may name {i}, its index."""
    replies = await asyncio.gather(*[turn(client, c, message.format(i=c.rsplit("-", 1)[1]))
                                     for c in convs])
    return dict(zip(convs, replies, strict=True))


async def scale_case(compose: Compose, reference: Sequence[int], bound_s: float
                     ) -> dict[str, float]:
    """Conversations spread over REPLICAS stores and survive one of them stopping."""
    timings: dict[str, float] = {}
    say(f"docker-compose up --scale kvstore={REPLICAS}")
    started = time.monotonic()
    compose.run("up", "-d", "--no-build", "--no-recreate", "--no-deps", "--scale",
                f"kvstore={REPLICAS}", "kvstore")
    await until(f"{REPLICAS} live stores in the registry",
                lambda: asyncio.to_thread(lambda: len(live_stores(compose)) == REPLICAS),
                bound_s)
    stores = live_stores(compose)
    def attached() -> bool:
        joined = scheduler_stores(compose)
        return all(joined.get(store) == "joined" for store in stores)

    await until("the scheduler attached every store", lambda: asyncio.to_thread(attached),
                bound_s)
    timings["scale up"] = time.monotonic() - started
    say(f"{REPLICAS} stores registered and attached {timings['scale up']:.1f} s later: "
        + ", ".join(f"{i} at {e['address']}" for i, e in sorted(stores.items()))
        + f" ({next(iter(stores.values()))['block_bytes']} B blocks)")
    convs = [f"scale-a-{i}" for i in range(SCALE_CONVS)]
    twins = [f"scale-b-{i}" for i in range(SCALE_CONVS)]
    first, second, third = ("tell me about block groups and swaps, part {i}. " * 3,
                            "and then?", "why is that, {i}?")
    address = compose.scheduler_address()
    async with FastSwitchClient(address, api_key=KEYS["ct"]) as client:
        before = {}
        for message in (first, second):
            before = await turns(client, [*convs, *twins], message)
            for conv, twin in zip(convs, twins, strict=True):
                assert before[conv].tokens == before[twin].tokens, \
                    f"{conv} and its twin answered apart"
        expected = await turns(client, twins, third)
        every = [*convs, *twins]
        await until("every conversation's chain is in Redis",
                    lambda: asyncio.to_thread(lambda: len(holders(compose, every)) == len(every)),
                    bound_s)
        held = holders(compose, every)
        spread = {i: sorted(c for c, h in held.items() if h == i) for i in set(held.values())}
        say("conversations per store: " + ", ".join(f"{i} {len(c)}" for i, c in spread.items()))
        assert len(spread) >= 2, f"every conversation is on one store: {spread}"
        victim = max(spread, key=lambda i: sum(c in convs for c in spread[i]))
        moved = [c for c in convs if held[c] == victim]
        container = next(c for c in compose.containers("kvstore") if victim.startswith(c[:12]))
        say(f"docker stop {victim} (holds {len(moved)} of the {len(convs)} conversations)")
        started = time.monotonic()
        subprocess.run(["docker", "stop", container], check=True, capture_output=True)

        async def dropped() -> bool:
            if victim in await asyncio.to_thread(live_stores, compose):
                return False
            if (await asyncio.to_thread(scheduler_stores, compose)).get(victim) != "left":
                return False
            return not (await client.stats()).kvstore_degraded

        await until(f"the scheduler dropped {victim}", dropped, bound_s)
        timings["stop"] = time.monotonic() - started
        say(f"{victim} left the registry and the scheduler, {timings['stop']:.1f} s after "
            "the stop")
        after = await turns(client, convs, third)
        for conv, twin in zip(convs, twins, strict=True):
            assert after[conv].tokens == expected[twin].tokens, \
                f"{conv}: its turn after the stop differs from its twin's"
            if conv in moved:
                assert after[conv].reused == 0, f"{conv} reused KV its stopped store held"
            else:
                assert after[conv].reused > 0, f"{conv} lost the KV of a store still running"
        say(f"every conversation answered as its twin did: the {len(moved)} on the stopped "
            "store recomputed, the others reused their KV")
    say("docker-compose up --scale kvstore=1")
    compose.run("up", "-d", "--no-build", "--no-recreate", "--no-deps", "--scale",
                "kvstore=1", "kvstore")
    timings["scale down"] = await recover(compose, reference, "after-scale-down", bound_s)
    say(f"back to one store: serving correctly again {timings['scale down']:.1f} s later")
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/compose_test.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="fastswitch-compose-test:cpu")
    parser.add_argument("--project", default=f"fastswitch-ct-{os.getpid()}")
    parser.add_argument("--bound", type=float, default=60.0,
                        help="seconds the stack may take to serve again after a restart")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--no-build", action="store_true", help="use the image as it is")
    args = parser.parse_args(argv)
    if not args.no_build:
        say(f"building {args.image}")
        build(args.image)
    secrets_dir = tempfile.mkdtemp(prefix="fastswitch-ct-secrets-")
    keys = Path(secrets_dir) / "api-keys"
    keys.write_text("".join(f"{key} {tenant} user\n" for tenant, key in KEYS.items()))
    # The container's user (uid 10001) reads them through the bind mount.
    os.chmod(secrets_dir, 0o755)
    keys.chmod(0o644)
    compose = Compose(args.project, args.image, secrets_dir)
    try:
        recovered, scaled = asyncio.run(scenario(compose, args.bound, args.start_timeout))
    except BaseException:
        say("failed; the services' last log lines:")
        subprocess.run(["docker-compose", "-p", compose.project, "logs", "--tail", "30"],
                       cwd=REPO, env=compose.env)
        raise
    finally:
        say("docker-compose down -v")
        compose.run("down", "-v", "--remove-orphans")
        shutil.rmtree(secrets_dir, ignore_errors=True)
        left = compose.leftovers()
        if left:
            raise SystemExit(f"left behind after down -v: {', '.join(left)}")
    summary = ", ".join(f"{s} {t:.1f} s" for s, t in recovered.items())
    say(f"passed; recovery after restart: {summary} (bound {args.bound:.0f} s); scale case: "
        + ", ".join(f"{step} {t:.1f} s" for step, t in scaled.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
