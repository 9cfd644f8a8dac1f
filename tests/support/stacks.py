"""Local stacks for process-level tests, and waits for one to settle once its work is done."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from common.client import FastSwitchClient
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from protos import scheduler_pb2
from services.launch import LocalStack, StackConfig

SETTLE_S = 10.0  # how long a finished workload's last copies and host operations may take


@contextmanager
def executor_and_stores(config: StackConfig) -> Iterator[LocalStack]:
    """The executor and KV store(s) of `config`, without a scheduler: each test starts its
    own (the `scheduler` fixture), so one slow model load serves a whole module."""
    stack = LocalStack(config)
    try:
        stack.start(scheduler=False)
        yield stack
    finally:
        stack.stop()


async def settled_scheduler(client: FastSwitchClient) -> scheduler_pb2.StatsResponse:
    """The scheduler's stats once no swap is in flight and no block runs or drains (the
    last turn's copy to the host may still be landing when its answer ends), or after
    `SETTLE_S`, for the caller to assert on."""
    for _ in range(int(SETTLE_S / 0.1)):
        s = await client.stats()
        if not (s.swaps_in_flight or s.running_blocks or s.draining_blocks):
            break
        await asyncio.sleep(0.1)
    return s


async def settled_store(address: str) -> kv.StatsResponse:
    """The KV store's stats once it holds no pin and no pending reservation, or after
    `SETTLE_S`: a scheduler sends its commits and unpins after its own state has moved on,
    so they may still be on the way, while a leaked one stays (the scheduler renews it)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_grpc.KVStoreStub(channel)
        for _ in range(int(SETTLE_S / 0.1)):
            store = await stub.Stats(kv.StatsRequest())
            if not (store.pinned_blocks or store.pending_reservations):
                break
            await asyncio.sleep(0.1)
    return store
