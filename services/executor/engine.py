"""The executor's device side: model, KV cache, host arena view and copy engine, behind plain calls.

No gRPC here: the service turns messages into these types and errors into status codes.
Every call validates all of its input before it acts, so a refused call changes nothing.

Threads: `step` runs on one worker thread (steps are serialized there); the other calls run
on the event loop's thread. One lock guards what they share: the step in progress and the
swaps in flight, which is what keeps a step and the copies it conflicts with apart.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from common.kv.arena import HostArena
from common.kv.swap_plan import Copy
from services.executor.copy import CompletionStream, CopyEngine, CpuCopyEngine, Direction
from services.executor.copy.completions import CompletionHub
from services.executor.copy.engine import SwapCompletion
from services.executor.model import (
    DecoderModel,
    KVCacheGeometry,
    ModelConfig,
    SamplingParams,
    SequenceStep,
    load_checkpoint,
    sample,
)

Backend = Literal["cpu", "cupy"]
BACKENDS: tuple[Backend, ...] = ("cpu", "cupy")
CopyEngineFactory = Callable[[torch.Tensor, torch.Tensor], CopyEngine[Any]]
# (source side, destination side) of each direction
_SIDES: dict[str, tuple[str, str]] = {"out": ("device", "host"), "in": ("host", "device")}


class InvalidInput(ValueError):
    """The request itself is wrong; the message names the offending field."""


class PreconditionFailed(RuntimeError):
    """The request is well formed but conflicts with the executor's state (busy blocks,
    no arena attached); it may succeed later."""


class BackendUnavailable(RuntimeError):
    """The selected backend cannot run on this machine."""


@dataclass(frozen=True, slots=True)
class StepSequence:
    """One entry of a step; the fields mirror the proto so that errors can name them."""

    request_id: str
    block_table: Sequence[int]
    start: int
    token_ids: Sequence[int]
    sample: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: float | None


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: tuple[SampledToken, ...]
    duration_s: float


@dataclass(frozen=True, slots=True)
class SwapOrder:
    """Copies of one request in one direction, submitted as a single copy-engine swap."""

    swap_id: int
    request_id: str
    direction: Direction
    copies: Sequence[Copy]


@dataclass(frozen=True, slots=True)
class SwapDone:
    swap_id: int
    request_id: str
    direction: Direction
    bytes: int
    duration_s: float
    error: str | None


@dataclass(frozen=True, slots=True)
class Description:
    fingerprint: str
    geometry: KVCacheGeometry
    backend: Backend
    vocab_size: int
    max_model_len: int
    eos_token_id: int
    host_arena: str | None
    num_host_blocks: int


@dataclass(frozen=True, slots=True, eq=False)
class StepClaim:
    """A validated step and the device blocks it reads and writes, each with the field that
    names it (for the messages of refused swaps)."""

    sequences: tuple[StepSequence, ...]
    reads: dict[int, str]
    writes: dict[int, str]


@dataclass(frozen=True, slots=True)
class _InFlight:
    swap_id: int
    request_id: str
    direction: Direction
    device_blocks: frozenset[int]


@dataclass(slots=True)
class _HostSide:
    arena: HostArena
    copy: CopyEngine[Any]


def cache_fingerprint(model_fingerprint: str, kv_dtype: torch.dtype, block_size: int) -> str:
    """Names the bytes a KV block holds: host blocks are reusable only between equal ones."""
    text = f"{model_fingerprint}|kv_dtype={kv_dtype}|block_size={block_size}"
    return hashlib.sha256(text.encode()).hexdigest()


def copy_engine_factory(backend: Backend) -> CopyEngineFactory:
    """Fails fast, before a model is loaded, when the backend cannot run here."""
    if backend == "cpu":
        return CpuCopyEngine
    if importlib.util.find_spec("cupy") is None:
        raise BackendUnavailable("--backend cupy needs CuPy: pip install -e '.[gpu]'")
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"--backend cupy needs a CUDA device, and torch {torch.__version__} sees none"
        )
    from services.executor.copy.cupy_backend import CupyCopyEngine

    return CupyCopyEngine


class ExecutorEngine:
    def __init__(
        self,
        config: ModelConfig,
        model: DecoderModel,
        cache: torch.Tensor,
        *,
        backend: Backend,
        copy_engine: CopyEngineFactory,
    ) -> None:
        self.config = config
        self.model = model
        self.cache = cache
        self.geometry = KVCacheGeometry.of(cache)
        self.backend = backend
        self.fingerprint = cache_fingerprint(
            model.fingerprint(), cache.dtype, self.geometry.block_size
        )
        self._make_copy_engine = copy_engine
        self._lock = threading.Lock()
        self._host: _HostSide | None = None
        self._running: StepClaim | None = None
        self._inflight: dict[int, _InFlight] = {}
        self._last_step_fence: object | None = None
        self._hub = CompletionHub()

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        num_gpu_blocks: int,
        block_size: int = 16,
        backend: Backend = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ExecutorEngine:
        factory = copy_engine_factory(backend)
        device = torch.device("cuda" if backend == "cupy" else "cpu")
        config, model = load_checkpoint(checkpoint, dtype=dtype)
        geometry = KVCacheGeometry.for_model(
            config, num_blocks=num_gpu_blocks, block_size=block_size, dtype=dtype
        )
        return cls(
            config,
            model.to(device),
            geometry.allocate(device),
            backend=backend,
            copy_engine=factory,
        )

    def describe(self) -> Description:
        host = self._host
        eos = self.config.eos_token_ids
        return Description(
            fingerprint=self.fingerprint,
            geometry=self.geometry,
            backend=self.backend,
            vocab_size=self.config.vocab_size,
            max_model_len=self.config.max_position_embeddings,
            eos_token_id=eos[0] if eos else 0,
            host_arena=host.arena.name if host else None,
            num_host_blocks=host.arena.num_blocks if host else 0,
        )

    def attach_host_arena(self, name: str) -> int:
        """Maps the arena as the host side of swaps; returns its number of blocks.

        Re-attaching the same name is a no-op; switching arenas waits for no swap, so it is
        refused while any is in flight. Raises FileNotFoundError if there is no such arena.
        """
        with self._lock:
            if self._host is not None and self._host.arena.name == name:
                return self._host.arena.num_blocks
            if self._inflight:
                raise PreconditionFailed(
                    f"{len(self._inflight)} swaps are in flight on arena "
                    f"{self._host.arena.name if self._host else '?'}; attach after they finish"
                )
        if not name:
            raise InvalidInput("name is empty")
        arena = HostArena.attach(name)
        if arena.block_bytes != self.geometry.block_bytes:
            arena.close()
            raise InvalidInput(
                f"name: arena {name} has {arena.block_bytes}-byte blocks, the KV cache "
                f"needs {self.geometry.block_bytes}"
            )
        host_view = arena.as_tensor(self.cache.dtype, self.geometry.block_shape)
        side = _HostSide(arena, self._make_copy_engine(self.cache, host_view))
        del host_view  # the copy engine holds the view it needs
        with self._lock:
            previous, self._host = self._host, side
        if previous is not None:
            _release(previous)
        return arena.num_blocks

    def begin_step(self, sequences: Sequence[StepSequence]) -> StepClaim:
        """Validates a step and claims its blocks: from now until `run_step` returns, swaps
        that would race with it are refused. Call it where swaps are submitted."""
        with self._lock:
            if self._running is not None:
                raise RuntimeError("a step is already running: steps must be serialized")
            claim = self._validate_step(sequences)
            self._running = claim
        return claim

    def run_step(self, claim: StepClaim) -> StepResult:
        """The forward pass and sampling, blocking: call it on the step worker thread."""
        if self._running is not claim:
            raise RuntimeError("run_step needs the claim of the step begun last")
        started = time.perf_counter()
        try:
            logits = self.model.forward_step(
                self.cache,
                [SequenceStep(s.block_table, s.start, s.token_ids) for s in claim.sequences],
            )
            tokens = tuple(
                self._sample(seq, row)
                for seq, row in zip(claim.sequences, logits, strict=True)
                if seq.sample
            )
        finally:
            with self._lock:
                self._running = None
                if self._host is not None:
                    self._last_step_fence = self._host.copy.step_fence()
        return StepResult(tokens, time.perf_counter() - started)

    def submit_swaps(self, orders: Sequence[SwapOrder]) -> list[int]:
        """Starts every order as one copy-engine swap and returns their swap ids at once.

        Swap-outs wait for the fence of the last finished step, so a copy never reads KV a
        step is still writing; completions reach `subscribe()` streams.
        """
        with self._lock:
            host = self._host
            if host is None:
                raise PreconditionFailed("no host arena attached: call AttachHostArena first")
            planned = self._validate_swaps(orders, host.copy)
            fence = self._last_step_fence
            for order, inflight in zip(orders, planned, strict=True):
                self._inflight[order.swap_id] = inflight
        if fence is None:
            fence = host.copy.step_fence()
        for order in orders:
            after = fence if order.direction == "out" else None
            ticket = host.copy.submit(order.direction, order.request_id, order.copies, after)
            ticket.future.add_done_callback(
                lambda future, swap_id=order.swap_id: self._finish_swap(swap_id, future.result())
            )
        return [order.swap_id for order in orders]

    def subscribe(self) -> CompletionStream:
        """Every `SwapDone` from now on, delivered into the running asyncio loop."""
        return self._hub.subscribe()

    def close(self) -> None:
        """Lets submitted swaps finish, then unmaps the arena."""
        with self._lock:
            host, self._host = self._host, None
        if host is not None:
            _release(host)

    def _sample(self, seq: StepSequence, logits: torch.Tensor) -> SampledToken:
        # The index of the token being sampled in the request's whole token list: the same
        # whether or not the request was preempted or its prompt chunked.
        chosen = sample(logits, seq.sampling, output_index=seq.end)
        return SampledToken(seq.request_id, chosen.token_id, chosen.logprob)

    def _finish_swap(self, swap_id: int, completion: SwapCompletion) -> None:
        # Runs inside the ticket's set_result, so the blocks are free before anyone can learn
        # of the completion.
        with self._lock:
            del self._inflight[swap_id]
        self._hub.publish(
            SwapDone(  # type: ignore[arg-type]  # the hub relays any completion record
                swap_id,
                completion.request_id,
                completion.direction,
                completion.bytes,
                completion.duration_s,
                completion.error,
            )
        )

    def _validate_step(self, sequences: Sequence[StepSequence]) -> StepClaim:
        if not sequences:
            raise InvalidInput("sequences is empty: a step needs at least one sequence")
        block_size, num_blocks = self.geometry.block_size, self.geometry.num_blocks
        vocab, max_len = self.config.vocab_size, self.config.max_position_embeddings
        first_of_request: dict[str, int] = {}
        slot_writer: dict[tuple[int, int], int] = {}
        reads: dict[int, str] = {}
        writes: dict[int, str] = {}
        for i, seq in enumerate(sequences):
            where = f"sequences[{i}]"
            if not seq.request_id:
                raise InvalidInput(f"{where}.request_id is empty")
            if seq.request_id in first_of_request:
                raise InvalidInput(
                    f"{where}.request_id={seq.request_id!r} repeats "
                    f"sequences[{first_of_request[seq.request_id]}]"
                )
            first_of_request[seq.request_id] = i
            if not seq.token_ids:
                raise InvalidInput(f"{where}.token_ids is empty: an entry feeds at least one token")
            if seq.start < 0:
                raise InvalidInput(f"{where}.start={seq.start} is negative")
            if seq.end > max_len:
                raise InvalidInput(
                    f"{where}: start+len(token_ids)={seq.end} exceeds max_model_len {max_len}"
                )
            _check_range(f"{where}.token_ids", seq.token_ids, vocab)
            _check_range(f"{where}.block_table", seq.block_table, num_blocks)
            needed = -(-seq.end // block_size)
            if len(seq.block_table) < needed:
                raise InvalidInput(
                    f"{where}.block_table has {len(seq.block_table)} blocks; "
                    f"start+len(token_ids)={seq.end} tokens need {needed}"
                )
            for j in range(needed):
                reads.setdefault(seq.block_table[j], f"{where}.block_table[{j}]")
            for pos in range(seq.start, seq.end):
                j = pos // block_size
                slot = (seq.block_table[j], pos % block_size)
                if slot in slot_writer:
                    raise InvalidInput(
                        f"{where}.block_table[{j}]={slot[0]}: sequences[{slot_writer[slot]}] "
                        f"writes the same slot {slot[1]}"
                    )
                slot_writer[slot] = i
                writes.setdefault(slot[0], f"{where}.block_table[{j}]")
        claim = StepClaim(tuple(sequences), reads, writes)
        for swap in self._inflight.values():
            # A swap-out only reads its blocks: a step may read them too, never write them.
            touched = claim.writes if swap.direction == "out" else claim.reads
            for block in sorted(swap.device_blocks & touched.keys()):
                raise PreconditionFailed(
                    f"{touched[block]}={block} is in flight in swap {swap.swap_id} "
                    f"({swap.direction} of {swap.request_id!r}); wait for its SwapEvent"
                )
        return claim

    def _validate_swaps(
        self, orders: Sequence[SwapOrder], copy: CopyEngine[Any]
    ) -> list[_InFlight]:
        if not orders:
            raise InvalidInput("swaps is empty")
        layout = copy.layout
        sides = {"device": layout.device_blocks, "host": layout.host_blocks}
        dst_writer: dict[tuple[str, int], str] = {}
        planned: list[_InFlight] = []
        for i, order in enumerate(orders):
            where = f"swaps[{i}]"
            if order.swap_id in self._inflight or any(
                p.swap_id == order.swap_id for p in planned
            ):
                raise InvalidInput(f"{where}.swap_id={order.swap_id} is already in use")
            if not order.request_id:
                raise InvalidInput(f"{where}.request_id is empty")
            if order.direction not in _SIDES:
                raise InvalidInput(f"{where}.direction={order.direction!r} is not 'out' or 'in'")
            if not order.copies:
                raise InvalidInput(f"{where}.copies is empty")
            src_side, dst_side = _SIDES[order.direction]
            for j, c in enumerate(order.copies):
                for role, extent, side in (("src", c.src, src_side), ("dst", c.dst, dst_side)):
                    if extent.end > sides[side]:
                        raise InvalidInput(
                            f"{where}.copies[{j}].{role}=[{extent.start}, {extent.end}) out of "
                            f"range [0, {sides[side]}) {side} blocks"
                        )
                for block in c.dst.blocks():
                    if (dst_side, block) in dst_writer:
                        raise InvalidInput(
                            f"{where}.copies[{j}].dst: {dst_side} block {block} is also "
                            f"written by {dst_writer[dst_side, block]}"
                        )
                    dst_writer[dst_side, block] = f"{where}.copies[{j}]"
            device_extents = [c.src if order.direction == "out" else c.dst for c in order.copies]
            planned.append(
                _InFlight(
                    order.swap_id,
                    order.request_id,
                    order.direction,
                    frozenset(b for e in device_extents for b in e.blocks()),
                )
            )
        for i, swap in enumerate(planned):
            self._check_device_conflicts(f"swaps[{i}]", swap, planned[:i])
        return planned

    def _check_device_conflicts(
        self, where: str, swap: _InFlight, earlier: Iterable[_InFlight]
    ) -> None:
        """Device blocks may be shared by readers only; the copy engine orders one request's
        own swaps, so those never conflict with each other."""
        running = self._running
        if running is not None:
            touched = running.writes if swap.direction == "out" else running.reads
            clash = swap.device_blocks & touched.keys()
            if clash:
                block = min(clash)
                raise PreconditionFailed(
                    f"{where}: device block {block} is used by the running step "
                    f"({touched[block]}); submit after the step returns"
                )
        for other in (*self._inflight.values(), *earlier):
            if other.request_id == swap.request_id or "in" not in (
                swap.direction,
                other.direction,
            ):
                continue
            clash = swap.device_blocks & other.device_blocks
            if clash:
                raise PreconditionFailed(
                    f"{where}: device block {min(clash)} is also in swap {other.swap_id} "
                    f"({other.direction} of {other.request_id!r})"
                )


def _check_range(where: str, values: Sequence[int], bound: int) -> None:
    for j, value in enumerate(values):
        if not 0 <= value < bound:
            raise InvalidInput(f"{where}[{j}]={value} out of range [0, {bound})")


def _release(host: _HostSide) -> None:
    host.copy.close()
    arena = host.arena
    del host.copy  # drop the last views of the arena, so it can be unmapped
    arena.close()
