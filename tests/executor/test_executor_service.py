"""The executor over real gRPC: one `python -m services.executor` process per module."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.kv.extent import runs
from common.kv.swap_plan import plan_copies
from common.refusal import refused_request
from common.shm.arena import SHM_DIR, HostArena
from protos import executor_pb2 as pb
from protos import executor_pb2_grpc
from services.executor.__main__ import cpu_threads, parse_args
from services.executor.arena_view import arena_tensor
from services.executor.engine import cache_fingerprint
from services.executor.model import KVCacheGeometry, ModelConfig, load_checkpoint
from services.executor.model.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
NUM_GPU_BLOCKS = 256
HOST_BLOCKS = 32
PROMPT = [1, *b"The executor keeps no scheduling state."]  # 40 tokens
GENERATED = 30
GREEDY = pb.SamplingParams()
SEEDED = pb.SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
EXTRA_EOS = 3  # generation_config.json's, after config.json's


@dataclass(frozen=True)
class Server:
    address: str
    checkpoint: Path
    config: ModelConfig
    geometry: KVCacheGeometry
    arena: HostArena
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("executor")
    checkpoint = make_tiny_checkpoint(tmp / "tiny")
    config = ModelConfig.from_file(checkpoint / "config.json")
    generation = {"eos_token_id": [*config.eos_token_ids, EXTRA_EOS]}
    (checkpoint / "generation_config.json").write_text(json.dumps(generation))
    geometry = KVCacheGeometry.for_model(config, num_blocks=NUM_GPU_BLOCKS, block_size=16)
    with HostArena.local(HOST_BLOCKS, geometry.block_bytes) as arena:
        view = arena_tensor(arena)
        view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8))  # garbage to start
        del view
        stderr = (tmp / "stderr.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.executor", "--checkpoint", str(checkpoint),
             "--num-gpu-blocks", str(NUM_GPU_BLOCKS), "--block-size", "16", "--backend", "cpu",
             "--dtype", "float32", "--host-arena", arena.name, "--listen", "127.0.0.1",
             "--port", "0", "--batch-invariant"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        try:
            ready, _, _ = select.select([process.stdout], [], [], 120)
            line = process.stdout.readline() if ready else ""  # type: ignore[union-attr]
            if "listening on" not in line:
                pytest.fail(f"executor did not start: {(tmp / 'stderr.log').read_text()}")
            address = f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="fastswitch.executor.v1.Executor"),
                    timeout=60, wait_for_ready=True,
                )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            yield Server(address, checkpoint, config, geometry, arena, process)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, (tmp / "stderr.log").read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            stderr.close()


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[executor_pb2_grpc.ExecutorStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield executor_pb2_grpc.ExecutorStub(channel)


@dataclass
class Generation:
    """A request decoded token by token, as a scheduler drives it."""

    request_id: str
    block_table: list[int]
    sampling: pb.SamplingParams
    tokens: list[int] = field(default_factory=lambda: list(PROMPT))
    cached: int = 0  # tokens whose KV is in the cache

    def step_input(self) -> pb.SequenceInput:
        return pb.SequenceInput(
            request_id=self.request_id, block_table=self.block_table, start=self.cached,
            token_ids=self.tokens[self.cached:], sample=True, sampling=self.sampling,
        )

    async def run(self, stub: executor_pb2_grpc.ExecutorStub, until: int) -> list[int]:
        """Generates until `until` tokens follow the prompt; returns the generated ones."""
        while len(self.tokens) - len(PROMPT) < until:
            response = await stub.Step(pb.StepRequest(sequences=[self.step_input()]))
            self.cached = len(self.tokens)
            self.tokens.append(only_token(response, self.request_id))
        return self.tokens[len(PROMPT):]

    async def run_pipelined(self, stub: executor_pb2_grpc.ExecutorStub, until: int
                            ) -> list[int]:
        """As `run` from the prompt, a scheduler with lookahead driving it: every Step after
        the first feeds the token sampled in the one before (from_last_step), and is sent
        before that one's reply is awaited."""
        assert self.cached == 0
        steps = [self.step_input()] + [
            pb.SequenceInput(request_id=self.request_id, block_table=self.block_table,
                             start=len(self.tokens) + k, sample=True, sampling=self.sampling,
                             from_last_step=True)
            for k in range(until - 1)
        ]
        pending: asyncio.Future[pb.StepResponse] | None = None
        for step in steps:
            sent = asyncio.ensure_future(stub.Step(pb.StepRequest(sequences=[step])))
            if pending is not None:
                self.tokens.append(only_token(await pending, self.request_id))
            pending = sent
        assert pending is not None
        self.tokens.append(only_token(await pending, self.request_id))
        self.cached = len(self.tokens) - 1
        return self.tokens[len(PROMPT):]

    def used_blocks(self, block_size: int = 16) -> list[int]:
        return self.block_table[: -(-self.cached // block_size)]


def only_token(response: pb.StepResponse, request_id: str) -> int:
    (sampled,) = response.tokens
    assert sampled.request_id == request_id
    return sampled.token_id


def swap_order(swap_id: int, request_id: str, direction: int, src: Sequence[int],
               dst: Sequence[int]) -> pb.SwapOrder:
    return pb.SwapOrder(
        swap_id=swap_id, request_id=request_id, direction=direction,
        copies=[pb.SwapCopy(src=pb.Extent(start=c.src.start, length=c.src.length),
                            dst=pb.Extent(start=c.dst.start, length=c.dst.length))
                for c in plan_copies(src, dst)],
    )


async def swap(stub: executor_pb2_grpc.ExecutorStub, order: pb.SwapOrder) -> pb.SwapEvent:
    """Submits one order and waits for its completion on a SwapEvents stream."""
    events = stub.SwapEvents(pb.SwapEventsRequest())
    await events.initial_metadata()  # subscribed: the completion cannot be missed
    accepted = await stub.SubmitSwaps(pb.SubmitSwapsRequest(swaps=[order]))
    assert list(accepted.tickets) == [order.swap_id]
    async for event in events:
        if event.ticket == order.swap_id:
            events.cancel()
            return event
    raise AssertionError("stream ended without the swap's event")


async def test_describe(server: Server, stub: executor_pb2_grpc.ExecutorStub) -> None:
    described = await stub.Describe(pb.DescribeRequest())
    _, model = load_checkpoint(server.checkpoint)
    assert described.model_fingerprint == cache_fingerprint(
        model.fingerprint(), torch.float32, 16, batch_invariant=True, attention="torch",
        device="cpu",
    )
    assert described.batch_invariant
    geometry = described.geometry
    assert (geometry.block_size, geometry.num_layers, geometry.kv_heads, geometry.head_dim) == (
        16, server.config.num_hidden_layers, server.config.num_key_value_heads,
        server.config.head_dim)
    assert geometry.dtype == "float32"
    assert geometry.block_bytes == server.geometry.block_bytes == server.arena.block_bytes
    assert described.num_gpu_blocks == NUM_GPU_BLOCKS
    assert described.backend == "cpu"
    assert described.vocab_size == server.config.vocab_size
    assert described.max_model_len == server.config.max_position_embeddings
    assert described.eos_token_id == server.config.eos_token_ids[0]
    assert list(described.eos_token_ids) == [*server.config.eos_token_ids, EXTRA_EOS]
    assert described.checkpoint == str(server.checkpoint.resolve())
    assert (described.host_arena, described.num_host_blocks) == (server.arena.name, HOST_BLOCKS)


def test_kv_fingerprint_covers_cache_dtype_block_size_mode_backend_and_device() -> None:
    def named(model: str = "model", dtype: torch.dtype = torch.float32, block_size: int = 16,
              invariant: bool = False, attention: str = "torch", device: str = "cpu") -> str:
        return cache_fingerprint(model, dtype, block_size, batch_invariant=invariant,
                                 attention=attention, device=device)

    base = named()
    others = [named(dtype=torch.float16), named(block_size=32), named(model="other"),
              named(invariant=True), named(attention="triton"), named(device="cuda")]
    assert len({base, *others}) == 1 + len(others)


@pytest.mark.parametrize(
    ("flag", "env", "argv", "expected"),
    [
        ("batch_invariant", {}, [], False),  # off unless asked
        ("batch_invariant", {"FASTSWITCH_EXECUTOR_BATCH_INVARIANT": "1"}, [], True),
        ("batch_invariant", {"FASTSWITCH_EXECUTOR_BATCH_INVARIANT": "true"},
         ["--no-batch-invariant"], False),
        ("batch_invariant", {"FASTSWITCH_EXECUTOR_BATCH_INVARIANT": "off"},
         ["--batch-invariant"], True),
        ("cuda_graphs", {}, [], True),  # on unless turned off
        ("cuda_graphs", {"FASTSWITCH_EXECUTOR_CUDA_GRAPHS": "0"}, [], False),
        ("cuda_graphs", {"FASTSWITCH_EXECUTOR_CUDA_GRAPHS": "off"}, ["--cuda-graphs"], True),
        ("cuda_graphs", {}, ["--no-cuda-graphs"], False),
    ],
)
def test_a_boolean_flag_reads_its_variable_and_the_command_line_wins(
    monkeypatch: pytest.MonkeyPatch, flag: str, env: dict[str, str], argv: list[str],
    expected: bool,
) -> None:
    for variable in ("FASTSWITCH_EXECUTOR_BATCH_INVARIANT", "FASTSWITCH_EXECUTOR_CUDA_GRAPHS"):
        monkeypatch.delenv(variable, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert getattr(parse_args(argv), flag) is expected


@pytest.mark.parametrize("variable", ["FASTSWITCH_EXECUTOR_BATCH_INVARIANT",
                                      "FASTSWITCH_EXECUTOR_CUDA_GRAPHS"])
def test_a_misspelt_boolean_variable_is_an_error(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "ture")
    with pytest.raises(SystemExit):
        parse_args([])


async def test_attach_host_arena(server: Server, stub: executor_pb2_grpc.ExecutorStub) -> None:
    again = await stub.AttachHostArena(pb.AttachHostArenaRequest(name=server.arena.name))
    assert again.num_host_blocks == HOST_BLOCKS
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.AttachHostArena(pb.AttachHostArenaRequest(name="fastswitch-no-such-arena"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with HostArena.local(4, server.geometry.block_bytes // 2) as wrong, pytest.raises(
        grpc.aio.AioRpcError
    ) as mismatch:
        await stub.AttachHostArena(pb.AttachHostArenaRequest(name=wrong.name))
    assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name: arena" in mismatch.value.details()
    described = await stub.Describe(pb.DescribeRequest())
    assert described.host_arena == server.arena.name


async def test_attach_host_arena_refuses_what_is_no_fastswitch_arena(
    server: Server, stub: executor_pb2_grpc.ExecutorStub
) -> None:
    folder = SHM_DIR / f"fastswitch-a-folder-{uuid.uuid4().hex[:8]}"
    garbage = SHM_DIR / f"fastswitch-garbage-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    garbage.write_bytes(b"not an arena" * 100)
    try:
        for name, code in [
            (folder.name, grpc.StatusCode.NOT_FOUND),  # a directory is no segment
            (garbage.name, grpc.StatusCode.INVALID_ARGUMENT),  # a file without a header
            ("fastswitch-" + "x" * 300, grpc.StatusCode.INVALID_ARGUMENT),  # too long a name
            ("fastswitch-../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
            ("other-" + server.arena.name, grpc.StatusCode.INVALID_ARGUMENT),  # not ours
            ("", grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.AttachHostArena(pb.AttachHostArenaRequest(name=name))
            assert refused.value.code() == code, name
            assert "Traceback" not in (refused.value.details() or "")
    finally:
        folder.rmdir()
        garbage.unlink()
    described = await stub.Describe(pb.DescribeRequest())
    assert described.host_arena == server.arena.name  # nothing else was attached


@pytest.fixture(scope="module")
def references() -> dict[str, list[int]]:
    """Uninterrupted generations, computed once by the first test that needs each."""
    return {}


async def reference(
    stub: executor_pb2_grpc.ExecutorStub, references: dict[str, list[int]], name: str,
    sampling: pb.SamplingParams,
) -> list[int]:
    if name not in references:
        references[name] = await Generation(f"ref-{name}", [0, 1, 2, 3, 4],
                                            sampling).run(stub, GENERATED)
    return references[name]


@pytest.mark.parametrize(("name", "sampling"), [("greedy", GREEDY), ("seeded", SEEDED)])
async def test_generation_is_deterministic(
    stub: executor_pb2_grpc.ExecutorStub, references: dict[str, list[int]], name: str,
    sampling: pb.SamplingParams,
) -> None:
    expected = await reference(stub, references, name, sampling)
    assert len(set(expected)) > 3  # a real generation, not one token repeated
    again = await Generation(f"again-{name}", [9, 17, 5, 6, 8], sampling).run(stub, GENERATED)
    assert again == expected
    # Each step sent before the one before returns, its token fed from it (from_last_step).
    ahead = Generation(f"ahead-{name}", [40, 41, 42, 43, 44], sampling)
    assert await ahead.run_pipelined(stub, GENERATED) == expected


async def test_seed_and_temperature_change_the_draw(
    stub: executor_pb2_grpc.ExecutorStub, references: dict[str, list[int]]
) -> None:
    seeded = await reference(stub, references, "seeded", SEEDED)
    greedy = await reference(stub, references, "greedy", GREEDY)
    other_seed = pb.SamplingParams(temperature=0.9, top_p=0.95, seed=99)
    reseeded = await Generation("reseeded", [20, 21, 22, 23, 24], other_seed).run(stub, GENERATED)
    assert seeded != greedy
    assert reseeded != seeded


@pytest.mark.parametrize(("name", "sampling", "swap_ids"),
                         [("greedy", GREEDY, (101, 102)), ("seeded", SEEDED, (111, 112))])
async def test_swap_out_and_into_other_blocks_keeps_tokens_identical(
    server: Server, stub: executor_pb2_grpc.ExecutorStub, references: dict[str, list[int]],
    name: str, sampling: pb.SamplingParams, swap_ids: tuple[int, int],
) -> None:
    expected = await reference(stub, references, name, sampling)
    request = Generation(f"swapped-{name}", [30, 32, 33, 34, 35], sampling)
    await request.run(stub, 12)  # 51 tokens cached: blocks 30, 32, 33, 34 (two extents)
    device = request.used_blocks()
    host = [HOST_BLOCKS - 1, 3, 4, 5]
    assert len(list(runs(device))) == 2
    out = await swap(stub, swap_order(swap_ids[0], request.request_id, pb.DIRECTION_OUT,
                                      device, host))
    assert (out.error, out.request_id, out.direction) == ("", request.request_id,
                                                          pb.DIRECTION_OUT)
    assert out.bytes == len(device) * server.geometry.block_bytes
    # Another request now takes the freed device blocks and overwrites their KV.
    await stub.Step(pb.StepRequest(sequences=[_seq("intruder", device, 0, list(range(64)))]))
    moved = [60, 61, 70, 71]
    back = await swap(stub, swap_order(swap_ids[1], request.request_id, pb.DIRECTION_IN,
                                       host, moved))
    assert back.error == ""
    request.block_table = [*moved, 72]
    assert await request.run(stub, GENERATED) == expected


def _seq(request_id: str, table: Sequence[int], start: int, tokens: Sequence[int],
         **extra: object) -> pb.SequenceInput:
    return pb.SequenceInput(request_id=request_id, block_table=table, start=start,
                            token_ids=tokens, **extra)


VICTIM_BLOCKS = [80, 81, 82, 83]
# Valid on its own and overwrites the victim's first block: applied, it would change tokens.
POISON_STEP = _seq("poison", VICTIM_BLOCKS[:1], 0, [7] * 16)
BAD_STEPS = [
    ([POISON_STEP, _seq("b", [1, 9000], 0, [5] * 20)],
     r"sequences\[1\]\.block_table\[1\]=9000 out of range \[0, 256\)"),
    ([POISON_STEP, _seq("b", [100], 10, [5] * 20)],
     r"sequences\[1\]\.block_table has 1 blocks; start\+len\(token_ids\)=30 tokens need 2"),
    ([POISON_STEP, _seq("b", [100], 0, [5, 6, 5000])],
     r"sequences\[1\]\.token_ids\[2\]=5000 out of range \[0, 264\)"),
    ([POISON_STEP, _seq("b", [100], 0, [])], r"sequences\[1\]\.token_ids is empty"),
    ([POISON_STEP, _seq("b", [100], 0, [5], sample=True, from_last_step=True)],
     r"sequences\[1\]\.token_ids is not empty: with from_last_step"),
    ([POISON_STEP, _seq("poison", [100], 0, [5])],
     r"sequences\[1\]\.request_id='poison' repeats sequences\[0\]"),
    ([POISON_STEP, _seq("b", [100], 0, [5], sample=True,
                        sampling=pb.SamplingParams(temperature=-1))],
     r"sequences\[1\]\.sampling: temperature must be a finite number >= 0"),
    ([POISON_STEP, _seq("b", [100], 0, [5], sample=True,
                        sampling=pb.SamplingParams(temperature=float("nan")))],
     r"sequences\[1\]\.sampling: temperature must be a finite number >= 0, got nan"),
    ([POISON_STEP, _seq("b", [100], 0, [5], sample=True,
                        sampling=pb.SamplingParams(top_p=float("inf")))],
     r"sequences\[1\]\.sampling: top_p must be in \(0, 1\]"),
    ([POISON_STEP, pb.SequenceInput(request_id="b", block_table=[100], token_ids=[5],
                                    sample=True, banned_token_ids=[9999])],
     r"sequences\[1\]\.banned_token_ids\[0\]=9999 out of range"),
    ([POISON_STEP, _seq("b", list(range(100, 100 + 257)), 4090, [5] * 10)],
     r"sequences\[1\]: start\+len\(token_ids\)=4100 exceeds max_model_len 4096"),
    ([POISON_STEP, _seq("b", [VICTIM_BLOCKS[0]], 3, [5])],
     r"sequences\[1\]\.block_table\[0\]=80: sequences\[0\] writes the same slot 3"),
    ([], r"sequences is empty"),
]
# Well formed, but the step before them (the victim's last, its token for position 49) did
# not sample their token.
BAD_FOLLOWERS = [
    ([POISON_STEP, _seq("b", [100], 0, [], sample=True, from_last_step=True)],
     r"sequences\[1\]\.from_last_step: the step before this one sampled no token for 'b'"),
    ([POISON_STEP, _seq("victim", [*VICTIM_BLOCKS, 84], 60, [], sample=True,
                        from_last_step=True)],
     r"sequences\[1\]\.start=60: the step before this one sampled 'victim''s token for "
     r"position 49"),
]
# Valid on its own: copies garbage from the host arena over the victim's first block.
POISON_SWAP = swap_order(900, "poison", pb.DIRECTION_IN, [0], VICTIM_BLOCKS[:1])
BAD_SWAPS = [
    ([POISON_SWAP, pb.SwapOrder(swap_id=901, request_id="b", copies=POISON_SWAP.copies)],
     r"swaps\[1\]\.direction=0 is not DIRECTION_OUT or DIRECTION_IN"),
    ([POISON_SWAP, swap_order(901, "b", pb.DIRECTION_OUT, [250, 251, 252, 253, 254, 255, 256],
                              [0, 1, 2, 3, 4, 5, 6])],
     r"swaps\[1\]\.copies\[0\]\.src=\[250, 257\) out of range \[0, 256\) device blocks"),
    ([POISON_SWAP, swap_order(901, "b", pb.DIRECTION_OUT, [1, 2], [31, 32])],
     r"swaps\[1\]\.copies\[0\]\.dst=\[31, 33\) out of range \[0, 32\) host blocks"),
    ([POISON_SWAP, pb.SwapOrder(swap_id=901, request_id="b", direction=pb.DIRECTION_OUT,
                                copies=[pb.SwapCopy(src=pb.Extent(start=1, length=2),
                                                    dst=pb.Extent(start=1, length=3))])],
     r"swaps\[1\]\.copies\[0\]: copy lengths differ"),
    ([POISON_SWAP, pb.SwapOrder(swap_id=901, request_id="b", direction=pb.DIRECTION_OUT,
                                copies=[pb.SwapCopy(src=pb.Extent(start=1, length=0),
                                                    dst=pb.Extent(start=1, length=0))])],
     r"swaps\[1\]\.copies\[0\]: bad extent start=1 length=0"),
    ([POISON_SWAP, swap_order(901, "b", pb.DIRECTION_IN, [2], VICTIM_BLOCKS[:1])],
     r"swaps\[1\]\.copies\[0\]\.dst: device block 80 is also written by swaps\[0\]\.copies\[0\]"),
    ([POISON_SWAP, swap_order(900, "b", pb.DIRECTION_OUT, [1], [1])],
     r"swaps\[1\]\.swap_id=900 is already in use"),
    ([POISON_SWAP, pb.SwapOrder(swap_id=901, request_id="b", direction=pb.DIRECTION_OUT)],
     r"swaps\[1\]\.copies is empty"),
    ([], r"swaps is empty"),
]


async def test_invalid_input_names_the_field_and_touches_nothing(
    stub: executor_pb2_grpc.ExecutorStub, references: dict[str, list[int]]
) -> None:
    expected = await reference(stub, references, "greedy", GREEDY)
    victim = Generation("victim", [*VICTIM_BLOCKS, 84], GREEDY)
    await victim.run(stub, 10)
    invalid, precondition = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    calls = [(stub.Step, pb.StepRequest(sequences=s), invalid, m) for s, m in BAD_STEPS]
    calls += [(stub.Step, pb.StepRequest(sequences=s), precondition, m)
              for s, m in BAD_FOLLOWERS]
    calls += [(stub.SubmitSwaps, pb.SubmitSwapsRequest(swaps=s), invalid, m)
              for s, m in BAD_SWAPS]
    for call, request, code, message in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(request)
        assert refused.value.code() == code, refused.value.details()
        assert re.search(message, refused.value.details()), refused.value.details()
        entries = getattr(request, "sequences", None) or getattr(request, "swaps", None)
        # The entry at fault is always the second, so the scheduler fails its request alone.
        assert refused_request(refused.value) == (entries[1].request_id if entries else None)
    assert await victim.run(stub, GENERATED) == expected
    # The control: the poison on its own does change what the victim generates.
    control = Generation("control", [*VICTIM_BLOCKS, 84], GREEDY)
    await control.run(stub, 10)
    await stub.Step(pb.StepRequest(sequences=[POISON_STEP]))
    assert await control.run(stub, GENERATED) != expected


LONG_PROMPT = [(7 * i) % 250 + 3 for i in range(2800)]  # a step of about a second
LONG_TABLE = list(range(NUM_GPU_BLOCKS - 176, NUM_GPU_BLOCKS))


async def test_a_step_queues_behind_the_running_one_and_a_third_is_refused(
    stub: executor_pb2_grpc.ExecutorStub,
) -> None:
    """The follower is sent first and waits for the step it follows, which runs for about a
    second; a third step is refused once the follower is queued."""
    follower = asyncio.ensure_future(stub.Step(pb.StepRequest(iteration=2, follows=1, sequences=[
        _seq("queuer", LONG_TABLE, len(LONG_PROMPT), [], sample=True, from_last_step=True)])))
    await asyncio.sleep(0.05)  # lets it arrive first; either order gives the same outcome
    running = asyncio.ensure_future(stub.Step(pb.StepRequest(
        iteration=1, sequences=[_seq("queuer", LONG_TABLE, 0, LONG_PROMPT, sample=True)])))
    # Refused before its validation once two are begun, for its bad entry until then.
    third = pb.StepRequest(sequences=[_seq("bad", [110], 0, [5000])])
    for _ in range(500):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Step(third)
        if "out of range" not in refused.value.details():
            break
        await asyncio.sleep(0.01)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "a step is already queued" in refused.value.details()
    assert refused_request(refused.value) is None
    first, second = await running, await follower
    assert [t.request_id for t in (*first.tokens, *second.tokens)] == ["queuer", "queuer"]


async def test_a_step_whose_predecessor_never_arrives_is_refused_and_its_follower_runs(
    stub: executor_pb2_grpc.ExecutorStub,
) -> None:
    """Steps begin in the order sent; one whose predecessor is lost waits for it until its
    deadline, and is then settled, so the step that follows it begins at once (not after
    the executor's own 10 s wait, which would refuse it)."""
    orphan = pb.StepRequest(iteration=8, follows=7,
                            sequences=[_seq("orphan", [120], 0, [5, 6], sample=True)])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Step(orphan, timeout=0.5)
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    response = await stub.Step(pb.StepRequest(
        iteration=9, follows=8, sequences=[_seq("next", [121], 0, [5, 6], sample=True)]),
        timeout=5)
    assert [t.request_id for t in response.tokens] == ["next"]


async def test_a_follower_begins_though_another_step_settles_right_after_its_own(
    stub: executor_pb2_grpc.ExecutorStub,
) -> None:
    """The step a follower waits for, and a stray refused one, settle in the same tick: the
    follower still sees its own (it is not only the last one settled that counts)."""
    follower = asyncio.ensure_future(stub.Step(pb.StepRequest(
        iteration=21, follows=20, sequences=[_seq("f", [122], 0, [5, 6], sample=True)]),
        timeout=5))
    await asyncio.sleep(0.05)
    stray = pb.StepRequest(iteration=99, sequences=[_seq("stray", [1, 9000], 0, [5])])
    ran, refused = await asyncio.gather(
        stub.Step(pb.StepRequest(
            iteration=20, sequences=[_seq("g", [123], 0, [5, 6], sample=True)])),
        stub.Step(stray), return_exceptions=True)
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert [t.request_id for t in ran.tokens] == ["g"]  # type: ignore[union-attr]
    assert [t.request_id for t in (await follower).tokens] == ["f"]


async def test_swap_events_stream_while_a_step_runs(
    server: Server, stub: executor_pb2_grpc.ExecutorStub
) -> None:
    """Evidence by ordering: a swap touching the step's blocks is refused both before and
    after another swap's event arrives, so that event was delivered while the step ran."""
    table = LONG_TABLE
    events = stub.SwapEvents(pb.SwapEventsRequest())
    await events.initial_metadata()
    step = asyncio.ensure_future(
        stub.Step(pb.StepRequest(sequences=[_seq("long", table, 0, LONG_PROMPT)])))
    await asyncio.sleep(0.1)  # let the server pick the step up; the checks below do not time

    async def assert_step_running(swap_id: int) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await stub.SubmitSwaps(pb.SubmitSwapsRequest(
                swaps=[swap_order(swap_id, "long", pb.DIRECTION_OUT, table[:2], [0, 1])]))
        assert conflict.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "used by the running step" in conflict.value.details()

    await assert_step_running(201)
    await stub.SubmitSwaps(pb.SubmitSwapsRequest(
        swaps=[swap_order(202, "other", pb.DIRECTION_OUT, [1, 2], [10, 11])]))
    event = await anext(aiter(events))
    assert (event.ticket, event.error) == (202, "")
    await assert_step_running(203)
    await step
    events.cancel()


async def test_detaching_an_arena_that_is_not_attached_is_not_found(
    stub: executor_pb2_grpc.ExecutorStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DetachHostArena(pb.DetachHostArenaRequest(name="fastswitch-no-such-arena"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no attached arena 'fastswitch-no-such-arena'" in refused.value.details()


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 15)])
def test_threads_default_to_every_core_but_one_and_refuse_a_negative_count(
        monkeypatch: pytest.MonkeyPatch, cores: int, threads: int) -> None:
    assert parse_args([]).threads == 0  # decided at start, by backend
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
    assert cpu_threads() == threads
    with pytest.raises(SystemExit):
        parse_args(["--threads", "-1"])


def test_packed_heights_default_to_every_height_and_refuse_what_no_call_would_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args([]).packed_heights == (8, 16, 32)
    assert parse_args(["--packed-heights", "none"]).packed_heights == ()
    assert parse_args(["--packed-heights", "8, 32"]).packed_heights == (8, 32)
    monkeypatch.setenv("FASTSWITCH_EXECUTOR_PACKED_HEIGHTS", "16")
    assert parse_args([]).packed_heights == (16,)
    for bad in ("3,8", "16,8", "8,8", "eight"):  # 1-3 rows never pack; ascending, distinct
        with pytest.raises(SystemExit):
            parse_args(["--packed-heights", bad])


def test_steps_compute_on_their_threads_and_every_other_thread_on_one() -> None:
    """`compute_on`, in a process of its own: it sets torch's process-wide count. The launch
    thread keeps its count after torch's first setup of that thread (which would reset it),
    and neither this thread nor one started later opens a team of OpenMP threads."""
    assert printed_json(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from services.executor.service import compute_on\n"
        "torch.set_num_threads(2)\n"
        "launch = ThreadPoolExecutor(1)\n"
        "compute_on(launch, 3)\n"
        "later = ThreadPoolExecutor(1)\n"
        "print(json.dumps([launch.submit(torch.get_num_threads).result(),\n"
        "                  torch.get_num_threads(),\n"
        "                  later.submit(torch.get_num_threads).result()]))\n"
    ) == [3, 1, 1]


def test_the_service_packs_the_models_projections_on_the_steps_thread_count() -> None:
    """In a process of its own (the count is process-wide): MKL fixes a packed weight's
    threads, so the weights are packed where the steps run, on their count, before the
    service is built; nothing is packed for the main thread's count."""
    assert printed_json(
        "from services.executor.engine import ExecutorEngine\n"
        "from services.executor.model.layers import Projection\n"
        "from services.executor.model.tiny_checkpoint import tiny_checkpoint\n"
        "from services.executor.service import ExecutorService\n"
        "engine = ExecutorEngine.load(tiny_checkpoint(), num_gpu_blocks=8)\n"
        "service = ExecutorService(engine, step_threads=3, packed_heights=(8, 32))\n"
        "packed = {json.dumps(sorted(m._packed[0]) if m._packed else [])\n"
        "          for m in engine.model.modules() if isinstance(m, Projection)}\n"
        "service.close()\n"
        "print(json.dumps(sorted(packed)))\n"
    ) == [json.dumps([[8, 3], [32, 3]])]


def printed_json(script: str) -> Any:
    """What `script` prints as JSON, run in a fresh interpreter (`json` and `torch`
    imported): torch's thread counts are process-wide."""
    done = subprocess.run([sys.executable, "-c", "import json, torch\n" + script],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)
