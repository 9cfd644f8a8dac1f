"""The executor's device side: model, KV cache, host arenas and copy engines, behind plain calls.

No gRPC here: the service turns messages into these types and errors into status codes.
Every call validates all of its input before it acts, so a refused call changes nothing;
the refusal names the request it is about (`Refused.request_id`), so that only that request
need fail.

Host memory is one or more arenas (one per KV store instance), attached in order; host block
ids run through them end to end. Each arena has its own copy engine: one store's
reservation or pin never spans two arenas, so neither does a swap. A detached arena (its
store restarted with a new one) keeps its range of ids, never reused, and swaps into it
are refused.

Steps: at most two are begun at once, the running one and one queued behind it
(`begin_step`). Each is prepared (host work), launched (device work queued, no host sync)
and collected (its tokens read back), launches and collections in the order the steps were
begun; the queued step may be prepared while the running one runs. A row of a step may feed
the token its request sampled in the step begun before it (`StepSequence.from_last_step`):
that token is taken from the earlier step's tokens on the device, so the later step can be
launched before the earlier one's tokens reach the host.

Threads: steps are prepared, launched and collected on worker threads; the other calls run on
the event loop's thread. One lock guards what they share: the steps begun and the swaps in
flight, which is what keeps a step and the copies it conflicts with apart.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from common.kv.extent import Extent
from common.kv.swap_plan import Copy, SwapOrder
from common.shm.arena import ARENA_PREFIX, HostArena
from common.tokenizer import tokenizer_fingerprint
from services.executor.arena_view import arena_tensor
from services.executor.copy import CompletionStream, CopyEngine, CpuCopyEngine, Direction
from services.executor.copy.completions import CompletionHub
from services.executor.copy.engine import SwapCompletion
from services.executor.model import (
    DecoderModel,
    KVCacheGeometry,
    ModelConfig,
    PackedInputs,
    SamplingInputs,
    SamplingParams,
    SequenceStep,
    load_checkpoint,
    sample_rows,
)
from services.executor.model.batch import StepInputs
from services.executor.model.cuda_graphs import DecodeGraphs
from services.executor.options import Backend

CopyEngineFactory = Callable[[torch.Tensor, torch.Tensor], CopyEngine[Any]]
TableEntry = tuple[int, int]  # (index in the step's sequences, index in its block table)
# (source side, destination side) of each direction
_SIDES: dict[str, tuple[str, str]] = {"out": ("device", "host"), "in": ("host", "device")}


class Refused(Exception):
    """A refused call: nothing of it ran. `request_id` names the request whose sequence or
    swap order was refused; empty when the refusal is about the call as a whole."""

    request_id: str = ""


class InvalidInput(Refused, ValueError):
    """The request itself is wrong; the message names the offending field."""


class PreconditionFailed(Refused, RuntimeError):
    """The request is well formed but conflicts with the executor's state (busy blocks,
    no arena attached, a detached arena); it may succeed later."""


@contextmanager
def blame(request_id: str) -> Iterator[None]:
    """Names `request_id` in a refusal raised inside, unless it names one already."""
    try:
        yield
    except Refused as exc:
        if not exc.request_id:
            exc.request_id = request_id
        raise


class DeviceFailure(RuntimeError):
    """The device or its driver failed an operation (a CUDA error); what the call had set up
    is released."""


class BackendUnavailable(RuntimeError):
    """The selected backend cannot run on this machine."""


@dataclass(frozen=True, slots=True)
class StepSequence:
    """One entry of a step; the fields mirror the proto so that errors can name them.

    `from_last_step`: `token_ids` is empty and the entry feeds one token at `start`, the one
    sampled for `request_id` in the step begun before this one (it must have sampled it for
    position `start`); filled in on the device when the step is launched."""

    request_id: str
    block_table: Sequence[int]
    start: int
    token_ids: Sequence[int]
    sample: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    banned_token_ids: tuple[int, ...] = ()  # never sampled this step
    from_last_step: bool = False

    @property
    def end(self) -> int:
        return self.start + (1 if self.from_last_step else len(self.token_ids))


@dataclass(frozen=True, slots=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: float | None


@dataclass(frozen=True, slots=True)
class StepResult:
    """`duration_s`: from the step's start (its host work, or the collection of the step
    before it, whichever is later) to its tokens on the host: the executor's time on this
    step alone, so that the durations of pipelined steps never overlap."""

    tokens: tuple[SampledToken, ...]
    duration_s: float


@dataclass(frozen=True, slots=True, eq=False)
class PreparedStep:
    """A step's host work done: `packed` holds everything its device work reads."""

    claim: StepClaim
    sampled: tuple[StepSequence, ...]
    packed: PackedInputs
    started_s: float
    graphs: DecodeGraphs | None = None  # set: `packed` is padded to a bucket they replay


@dataclass(frozen=True, slots=True, eq=False)
class LaunchedStep:
    """A step whose device work is queued: `copied` (a host tensor, filled once `done`
    has passed) holds the tokens of `sampled`, in order."""

    claim: StepClaim
    sampled: tuple[StepSequence, ...]
    copied: torch.Tensor | None
    done: Any  # a torch.cuda.Event on a CUDA device; None where the step ran synchronously
    started_s: float


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
    eos_token_id: int  # the first of eos_token_ids, 0 if none
    eos_token_ids: tuple[int, ...]  # config.json's, then generation_config.json's
    checkpoint: str  # the absolute folder served; empty if the engine was not loaded from one
    host_arenas: tuple[str, ...]  # in attach order, which is host block id order
    num_host_blocks: int  # over all arenas
    batch_invariant: bool  # steps give bit-identical results whatever the batch
    tokenizer_sha256: str = ""  # of the checkpoint's tokenizer.json; empty: byte-level tokens


@dataclass(frozen=True, slots=True, eq=False)
class StepClaim:
    """A validated step and the device blocks it reads and writes, each with the block-table
    entry (sequence, index) that names it first (for the messages of refused swaps).

    `samples`: per request it samples, its row among the step's sampled tokens and the
    position the token is sampled for. `follows`: the step begun before it, whose tokens its
    `from_last_step` entries feed; None when it has no such entry."""

    sequences: tuple[StepSequence, ...]
    reads: dict[int, TableEntry]
    writes: dict[int, TableEntry]
    samples: dict[str, tuple[int, int]]
    follows: StepClaim | None


@dataclass(frozen=True, slots=True, eq=False)
class _LastSampled:
    """The step launched last and its sampled tokens on the device (int64, in the order of
    its sampled entries; None if it samples nothing)."""

    claim: StepClaim
    tokens: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class AttachedArena:
    name: str
    first_block: int  # global host block id of the arena's block 0
    num_blocks: int


@dataclass(frozen=True, slots=True)
class _InFlight:
    swap_id: int
    request_id: str
    direction: Direction
    device_blocks: frozenset[int]
    arena: int  # index of the host side it copies to or from


@dataclass(slots=True, eq=False)  # one per attach: compared by identity
class _HostSide:
    arena: HostArena
    copy: CopyEngine[Any]
    first_block: int
    fence: object | None = None  # of the last finished step, on this side's copy engine
    detached: bool = False  # its range of host block ids stays taken, and refuses swaps

    @property
    def end(self) -> int:
        return self.first_block + self.arena.num_blocks


def cache_fingerprint(
    model_fingerprint: str, kv_dtype: torch.dtype, block_size: int, *, batch_invariant: bool,
    attention: str, device: str,
) -> str:
    """Names the bytes a KV block holds: host blocks are reusable only between equal ones.

    The mode counts: the fast path's KV differs from the invariant path's in the last bits,
    and reusing it would break an invariant executor's bit-exactness. So do the attention
    backend and the device type, whose arithmetic differs in the last bits too.
    """
    text = (f"{model_fingerprint}|kv_dtype={kv_dtype}|block_size={block_size}"
            f"|attention={attention}|device={device}")
    if batch_invariant:
        text += "|batch_invariant"
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
        checkpoint: Path | None = None,
        fingerprint: str | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        """`fingerprint` names the model's weights (`DecoderModel.fingerprint()`, computed here
        when None: from the weights' bytes, which must then be readable on the host).
        `cuda_graphs`: replay decode-only steps as CUDA graphs where `DecodeGraphs` can (a
        CUDA device and Triton attention); ignored elsewhere."""
        self.config = config
        self.checkpoint = checkpoint  # its tokenizer and chat template live there too
        self.tokenizer_sha256 = tokenizer_fingerprint(checkpoint) if checkpoint else ""
        self.model = model
        self.cache = cache
        self.geometry = KVCacheGeometry.of(cache)
        self.backend = backend
        self.fingerprint = cache_fingerprint(
            fingerprint or model.fingerprint(),
            cache.dtype,
            self.geometry.block_size,
            batch_invariant=model.batch_invariant,
            attention=model.attention_backend().name,
            device=cache.device.type,
        )
        self._graphs = (DecodeGraphs(model, cache)
                        if cuda_graphs and DecodeGraphs.supported(model, cache) else None)
        self._make_copy_engine = copy_engine
        self._lock = threading.Lock()
        self._swap_finished = threading.Condition(self._lock)
        self._attach_lock = threading.Lock()  # attaches one at a time, so offsets are unique
        self._hosts: list[_HostSide] = []  # in attach order; only ever appended to
        self._steps: list[StepClaim] = []  # begun and not ended, in order: running, queued
        self._begun_last: StepClaim | None = None  # None: it failed, or none was begun
        self._launched_last: _LastSampled | None = None  # None: it failed, or none launched
        self._collected_s = 0.0  # perf_counter when the step collected last was
        self._inflight: dict[int, _InFlight] = {}
        self._hub = CompletionHub()

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        num_gpu_blocks: int,
        block_size: int = 16,
        backend: Backend = "cpu",
        dtype: torch.dtype | None = None,
        batch_invariant: bool = False,
        attention: str = "auto",
        cuda_graphs: bool = True,
    ) -> ExecutorEngine:
        """The checkpoint on the backend's device, in the fast or the batch-invariant mode,
        with the named attention backend (`ATTENTION_BACKENDS`); dtype of weights and KV
        cache, or None: the checkpoint's (see `load_checkpoint`); decode steps replayed as
        CUDA graphs with `cuda_graphs`, the cupy backend and Triton attention."""
        factory = copy_engine_factory(backend)
        device = torch.device("cuda" if backend == "cupy" else "cpu")
        config, model = load_checkpoint(checkpoint, dtype=dtype, batch_invariant=batch_invariant,
                                        attention=attention)
        geometry = KVCacheGeometry.for_model(
            config, num_blocks=num_gpu_blocks, block_size=block_size, dtype=model.dtype
        )
        fingerprint = model.fingerprint()  # of the weights' bytes: on the host, before moving
        return cls(
            config,
            model.to(device),
            geometry.allocate(device),
            backend=backend,
            copy_engine=factory,
            checkpoint=Path(checkpoint).resolve(),
            fingerprint=fingerprint,
            cuda_graphs=cuda_graphs,
        )

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode-only steps replay CUDA graphs: asked for, possible here, and none
        has failed."""
        return self._graphs is not None and self._graphs.enabled

    def describe(self) -> Description:
        hosts = [h for h in self._hosts if not h.detached]
        eos = self.config.eos_token_ids
        return Description(
            fingerprint=self.fingerprint,
            geometry=self.geometry,
            backend=self.backend,
            vocab_size=self.config.vocab_size,
            max_model_len=self.config.max_position_embeddings,
            eos_token_id=eos[0] if eos else 0,
            eos_token_ids=eos,
            checkpoint=str(self.checkpoint or ""),
            host_arenas=tuple(h.arena.name for h in hosts),
            num_host_blocks=sum(h.arena.num_blocks for h in hosts),
            tokenizer_sha256=self.tokenizer_sha256,
            batch_invariant=self.model.batch_invariant,
        )

    def attach_host_arena(self, name: str) -> AttachedArena:
        """Maps the arena after those attached before; its blocks take the next global ids.

        Attaching an attached name again changes nothing and answers as the first time did;
        one detached before is attached anew, after the others. Raises FileNotFoundError if
        there is no such arena, and DeviceFailure, with nothing left attached, if the copy
        engine cannot take it (pinning failed). Blocking: call it off the event loop.
        """
        if not name.startswith(ARENA_PREFIX):
            raise InvalidInput(f"name: {name[:64]!r} is not a FastSwitch arena (their names "
                               f"start with {ARENA_PREFIX!r})")
        with self._attach_lock:
            known = self._attached(name)
            if known is not None:
                return _attached(known)
            try:
                arena = HostArena.attach(name)
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as exc:  # a bad name, or a segment that is no arena
                raise InvalidInput(f"name: {exc}") from exc
            if arena.block_bytes != self.geometry.block_bytes:
                arena.close()
                raise InvalidInput(
                    f"name: arena {name} has {arena.block_bytes}-byte blocks, the KV cache "
                    f"needs {self.geometry.block_bytes}"
                )
            host_view = arena_tensor(arena, self.cache.dtype, self.geometry.block_shape)
            try:  # pins the arena for DMA on a GPU
                copy = self._make_copy_engine(self.cache, host_view)
            except Exception as exc:  # its traceback holds views of the arena: not chained
                failure = f"{type(exc).__name__}: {exc}"
            else:
                failure = ""
            if failure:
                del host_view
                arena.close()
                raise DeviceFailure(f"name: arena {name} could not be mapped for copies: "
                                    f"{failure}")
            side = _HostSide(arena, copy, self._hosts[-1].end if self._hosts else 0)
            del host_view  # the copy engine holds the view it needs
            with self._lock:
                self._hosts.append(side)
        return _attached(side)

    def detach_host_arena(self, name: str) -> AttachedArena:
        """Refuses swaps into the arena from now on, lets those in flight finish, and
        unmaps it; its host block ids are never given to another arena. Blocking: call it
        off the event loop. Raises FileNotFoundError if no such arena is attached."""
        if not name:
            raise InvalidInput("name is empty")
        with self._attach_lock:
            side = self._attached(name)
            if side is None:
                raise FileNotFoundError(name)
            index = self._hosts.index(side)
            with self._lock:
                side.detached = True
                # Including those validated but not yet handed to its copy engine.
                self._swap_finished.wait_for(
                    lambda: all(s.arena != index for s in self._inflight.values())
                )
            _release(side)
        return _attached(side)

    def _attached(self, name: str) -> _HostSide | None:
        return next((h for h in self._hosts if h.arena.name == name and not h.detached), None)

    def begin_step(self, sequences: Sequence[StepSequence]) -> StepClaim:
        """Validates a step and claims its blocks: from now until it is collected (or fails),
        swaps that would race with it are refused. Call it where swaps are submitted.

        One step may be begun while another runs: it is queued, to be launched and collected
        after it. With one running and one queued, a further step is refused
        (PreconditionFailed naming no request)."""
        with self._lock:
            if len(self._steps) > 1:
                raise PreconditionFailed(
                    "a step is already queued behind the running one: send the next after "
                    "one of them returns"
                )
            claim = self._validate_step(sequences)
            self._steps.append(claim)
            self._begun_last = claim
        return claim

    def run_step(self, claim: StepClaim) -> StepResult:
        """The forward pass and sampling, blocking: prepared, launched and collected at once,
        so every step begun before it must have been launched."""
        return self.collect_step(self.launch_step(self.prepare_step(claim)))

    def prepare_step(self, claim: StepClaim) -> PreparedStep:
        """The step's host work: its layout, its sampling draws and the one buffer that
        carries them to the device. It may run while the step before it runs. Ends the step
        if it raises."""
        with self._lock:
            if claim not in self._steps:
                raise RuntimeError("prepare_step needs a step begun and not ended")
        started = time.perf_counter()
        try:
            sequences = claim.sequences
            sampled = tuple(seq for seq in sequences if seq.sample)
            plan = self.model.plan_step(
                self.geometry,
                # A from_last_step entry's token is a placeholder until the device fills it.
                [SequenceStep(s.block_table, s.start, [0] if s.from_last_step else s.token_ids)
                 for s in sequences],
                validated=True,  # by `begin_step`, field by field
            )
            plan = replace(plan, output_rows=[
                plan.query_start[i + 1] - 1 for i, seq in enumerate(sequences) if seq.sample
            ])
            sampling = SamplingInputs.build(
                [seq.sampling for seq in sampled],
                # The index of the token being sampled in the request's whole token list: the
                # same whether or not the request was preempted, its prompt chunked, or its
                # last token fed from the step before.
                [seq.end for seq in sampled],
                [seq.banned_token_ids for seq in sampled],
                self.config.vocab_size,
            )
            extra = sampling.named() | _from_last_step_fields(claim, plan.query_start)
            graphed = self._graphs.pack(plan, extra) if self._graphs is not None else None
            packed = graphed or self.model.pack(plan, extra)
        except BaseException:
            self._end_step(claim, failed=True)
            raise
        return PreparedStep(claim, sampled, packed, started,
                            self._graphs if graphed is not None else None)

    def launch_step(self, prepared: PreparedStep) -> LaunchedStep:
        """Queues the step's device work and the one copy back of its sampled tokens, with no
        host sync, and records every arena's step fence after it on the stream it ran on.
        Steps are launched in the order they were begun (RuntimeError, nothing changed,
        otherwise). A step whose from_last_step entries follow a step that failed is
        refused (PreconditionFailed naming the first such entry's request), nothing of it
        run. Ends the step if anything else raises."""
        claim = prepared.claim
        self._check_launch_order(claim)
        try:
            last_tokens = self._tokens_followed(claim)
            fill = None if last_tokens is None else (
                lambda inputs: _feed_last_tokens(inputs, last_tokens))
            if prepared.graphs is not None:
                logits, inputs = prepared.graphs.launch(prepared.packed, len(prepared.sampled),
                                                        fill)
            else:
                inputs = prepared.packed.to(self.model.device)
                if fill is not None:
                    fill(inputs)
                logits = self.model.forward(self.cache, inputs)
            tokens = copied = None
            if prepared.sampled:
                tokens, copied = _sample_to_host(
                    logits, SamplingInputs.from_named(inputs.tensors),
                    [seq.sampling for seq in prepared.sampled])
            # Blocking: the wait for it sleeps rather than spins a core the copies need.
            done = torch.cuda.Event(blocking=True) if _on_cuda(logits) else None
            if done is not None:
                done.record()
            with self._lock:
                self._launched_last = _LastSampled(claim, tokens)
                for side in self._hosts:
                    if not side.detached:
                        side.fence = side.copy.step_fence()
        except BaseException:
            self._end_step(claim, failed=True)
            raise
        return LaunchedStep(claim, prepared.sampled, copied, done, prepared.started_s)

    def collect_step(self, launched: LaunchedStep) -> StepResult:
        """Waits for the step's copy back and ends the step: its blocks are free for swaps
        again (which still wait for its fence on the device). Steps are collected in the
        order they were launched."""
        failed = True
        try:
            if launched.done is not None:
                launched.done.synchronize()
            tokens = _tokens(launched.sampled, launched.copied)
            failed = False
        finally:
            self._end_step(launched.claim, failed=failed)
        collected = time.perf_counter()
        started = max(launched.started_s, self._collected_s)
        self._collected_s = collected
        return StepResult(tokens, collected - started)

    def _check_launch_order(self, claim: StepClaim) -> None:
        """Every step begun before `claim` is launched: of two begun, the first is the step
        launched last."""
        with self._lock:
            if claim not in self._steps:
                raise RuntimeError("launch_step needs a step begun and not ended")
            first = self._steps[0]
            if first is not claim and (self._launched_last is None
                                       or self._launched_last.claim is not first):
                raise RuntimeError("launch_step: the step begun before this one is not "
                                   "launched yet")

    def _tokens_followed(self, claim: StepClaim) -> torch.Tensor | None:
        """The sampled tokens, on the device, of the step the from_last_step entries of
        `claim` follow; None if it has none."""
        with self._lock:
            if claim.follows is None:
                return None
            last = self._launched_last
            if last is None or last.claim is not claim.follows or last.tokens is None:
                i, seq = next((i, s) for i, s in enumerate(claim.sequences) if s.from_last_step)
                with blame(seq.request_id):
                    raise PreconditionFailed(
                        f"sequences[{i}].from_last_step: the step before this one failed, so "
                        f"{seq.request_id!r} has no sampled token to feed"
                    )
            return last.tokens

    def _end_step(self, claim: StepClaim, *, failed: bool) -> None:
        """Frees the step's blocks; a failed step leaves no tokens for a next step's
        from_last_step entries."""
        with self._lock:
            self._steps.remove(claim)
            if failed:
                if self._begun_last is claim:
                    self._begun_last = None
                if self._launched_last is not None and self._launched_last.claim is claim:
                    self._launched_last = None

    def submit_swaps(self, orders: Sequence[SwapOrder]) -> list[int]:
        """Starts every order as one swap on its arena's copy engine, in the arena's own
        block ids, and returns their swap ids at once.

        Every swap waits for the fence of the last step launched before it: a swap-out never
        reads KV a step is still writing, and a swap-in never writes blocks a step may still
        read or write. A step begun and not yet launched (queued) has no fence to wait for;
        its claim covers it instead, as the running step's covers that one: a swap-out of a
        block either step writes, or a swap-in to a block either reads or writes, is refused
        (PreconditionFailed) until that step returns. Completions of every arena reach
        `subscribe()` streams.
        """
        with self._lock:
            if not any(not h.detached for h in self._hosts):
                raise PreconditionFailed("no host arena attached: call AttachHostArena first")
            planned = self._validate_swaps(orders)
            starts = []
            for order, (inflight, copies) in zip(orders, planned, strict=True):
                self._inflight[order.swap_id] = inflight
                side = self._hosts[inflight.arena]
                starts.append((order, side, copies, side.fence))
        for order, side, copies, fence in starts:
            after = fence if fence is not None else side.copy.step_fence()
            ticket = side.copy.submit(order.direction, order.request_id, copies, after)
            ticket.future.add_done_callback(
                lambda future, swap_id=order.swap_id: self._finish_swap(swap_id, future.result())
            )
        return [order.swap_id for order in orders]

    def subscribe(self) -> CompletionStream:
        """Every `SwapDone` from now on, delivered into the running asyncio loop."""
        return self._hub.subscribe()

    def close(self) -> None:
        """Lets submitted swaps finish, then unmaps the arenas."""
        with self._lock:
            hosts, self._hosts = self._hosts, []
        for host in hosts:
            if not host.detached:
                _release(host)

    def _finish_swap(self, swap_id: int, completion: SwapCompletion) -> None:
        # Runs inside the ticket's set_result, so the blocks are free before anyone can learn
        # of the completion.
        with self._lock:
            del self._inflight[swap_id]
            self._swap_finished.notify_all()
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
        first_of_request: dict[str, int] = {}
        slot_writer: dict[tuple[int, int], int] = {}
        reads: dict[int, TableEntry] = {}
        writes: dict[int, TableEntry] = {}
        for i, seq in enumerate(sequences):
            with blame(seq.request_id):
                self._validate_sequence(i, seq, first_of_request, slot_writer, reads, writes)
                if seq.from_last_step:
                    self._check_follows(i, seq)
        samples = {seq.request_id: (row, seq.end)
                   for row, seq in enumerate(s for s in sequences if s.sample)}
        follows = self._begun_last if any(s.from_last_step for s in sequences) else None
        return StepClaim(tuple(sequences), reads, writes, samples, follows)

    def _check_follows(self, i: int, seq: StepSequence) -> None:
        """A from_last_step entry feeds the token the step begun last sampled for its request,
        at the position it was sampled for."""
        where = f"sequences[{i}]"
        previous = self._begun_last
        sampled = previous.samples.get(seq.request_id) if previous is not None else None
        if sampled is None:
            raise PreconditionFailed(
                f"{where}.from_last_step: the step before this one sampled no token for "
                f"{seq.request_id!r} (or failed)"
            )
        if sampled[1] != seq.start:
            raise PreconditionFailed(
                f"{where}.start={seq.start}: the step before this one sampled "
                f"{seq.request_id!r}'s token for position {sampled[1]}, which from_last_step "
                "feeds there"
            )

    def _validate_sequence(
        self,
        i: int,
        seq: StepSequence,
        first_of_request: dict[str, int],
        slot_writer: dict[tuple[int, int], int],
        reads: dict[int, TableEntry],
        writes: dict[int, TableEntry],
    ) -> None:
        """Checks one entry against the geometry, the entries before it and the swaps in
        flight, and adds the blocks it reads and writes."""
        block_size, num_blocks = self.geometry.block_size, self.geometry.num_blocks
        vocab, max_len = self.config.vocab_size, self.config.max_position_embeddings
        where = f"sequences[{i}]"
        if not seq.request_id:
            raise InvalidInput(f"{where}.request_id is empty")
        if seq.request_id in first_of_request:
            raise InvalidInput(
                f"{where}.request_id={seq.request_id!r} repeats "
                f"sequences[{first_of_request[seq.request_id]}]"
            )
        first_of_request[seq.request_id] = i
        if seq.from_last_step and seq.token_ids:
            raise InvalidInput(f"{where}.token_ids is not empty: with from_last_step the entry "
                               "feeds the token sampled for it in the step before, no other")
        if not seq.token_ids and not seq.from_last_step:
            raise InvalidInput(f"{where}.token_ids is empty: an entry feeds at least one token")
        if seq.start < 0:
            raise InvalidInput(f"{where}.start={seq.start} is negative")
        if seq.end > max_len:
            raise InvalidInput(
                f"{where}: start+len(token_ids)={seq.end} exceeds max_model_len {max_len}"
            )
        _check_range(f"{where}.token_ids", seq.token_ids, vocab)
        _check_range(f"{where}.banned_token_ids", seq.banned_token_ids, vocab)
        _check_range(f"{where}.block_table", seq.block_table, num_blocks)
        needed = -(-seq.end // block_size)
        if len(seq.block_table) < needed:
            raise InvalidInput(
                f"{where}.block_table has {len(seq.block_table)} blocks; "
                f"start+len(token_ids)={seq.end} tokens need {needed}"
            )
        for j in range(needed):
            reads.setdefault(seq.block_table[j], (i, j))
        for pos in range(seq.start, seq.end):
            j = pos // block_size
            slot = (seq.block_table[j], pos % block_size)
            if slot in slot_writer:
                raise InvalidInput(
                    f"{where}.block_table[{j}]={slot[0]}: sequences[{slot_writer[slot]}] "
                    f"writes the same slot {slot[1]}"
                )
            slot_writer[slot] = i
            writes.setdefault(slot[0], (i, j))
        for swap in self._inflight.values():
            # A swap-out only reads its blocks: a step may read them too, never write them.
            touched = writes if swap.direction == "out" else reads
            for block in sorted(swap.device_blocks & touched.keys()):
                if touched[block][0] == i:
                    raise PreconditionFailed(
                        f"{_table_field(touched[block])}={block} is in flight in swap "
                        f"{swap.swap_id} ({swap.direction} of {swap.request_id!r}); wait for "
                        "its SwapEvent"
                    )

    def _validate_swaps(
        self, orders: Sequence[SwapOrder]
    ) -> list[tuple[_InFlight, list[Copy]]]:
        """Each order's in-flight record, and its copies in its arena's own block ids."""
        if not orders:
            raise InvalidInput("swaps is empty")
        sides = {"device": self.geometry.num_blocks, "host": self._hosts[-1].end}
        dst_writer: dict[tuple[str, int], str] = {}
        planned: list[tuple[_InFlight, list[Copy]]] = []
        for i, order in enumerate(orders):
            with blame(order.request_id):
                planned.append(self._validate_order(i, order, sides, dst_writer, planned))
        for i, (swap, _) in enumerate(planned):
            with blame(swap.request_id):
                self._check_device_conflicts(f"swaps[{i}]", swap, [p for p, _ in planned[:i]])
        return planned

    def _validate_order(
        self,
        i: int,
        order: SwapOrder,
        sides: dict[str, int],
        dst_writer: dict[tuple[str, int], str],
        planned: Sequence[tuple[_InFlight, list[Copy]]],
    ) -> tuple[_InFlight, list[Copy]]:
        """Checks one order against the geometry, the arenas and the orders before it."""
        where = f"swaps[{i}]"
        if order.swap_id in self._inflight or any(
            p.swap_id == order.swap_id for p, _ in planned
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
        arena, copies = self._localize(where, order)
        device_extents = [c.src if order.direction == "out" else c.dst for c in order.copies]
        inflight = _InFlight(
            order.swap_id,
            order.request_id,
            order.direction,
            frozenset(b for e in device_extents for b in e.blocks()),
            arena,
        )
        self._check_same_arena(where, inflight, [p for p, _ in planned])
        return inflight, copies

    def _localize(self, where: str, order: SwapOrder) -> tuple[int, list[Copy]]:
        """The one arena the order's host extents lie in, and its copies in that arena's
        block ids; InvalidInput names the first extent that lies elsewhere."""
        role = "dst" if order.direction == "out" else "src"
        starts = [h.first_block for h in self._hosts]
        arena: int | None = None
        for j, c in enumerate(order.copies):
            extent = c.dst if order.direction == "out" else c.src
            k = bisect.bisect_right(starts, extent.start) - 1
            side = self._hosts[k]
            field_name = f"{where}.copies[{j}].{role}=[{extent.start}, {extent.end})"
            if extent.end > side.end:
                raise InvalidInput(
                    f"{field_name} crosses the end of host arena {side.arena.name} "
                    f"[{side.first_block}, {side.end}): an order's host blocks lie in one arena"
                )
            if side.detached:
                raise PreconditionFailed(
                    f"{field_name} is in host arena {side.arena.name}, which is detached "
                    "(its KV store restarted with a new one)"
                )
            if arena is not None and k != arena:
                first = self._hosts[arena]
                raise InvalidInput(
                    f"{field_name} is in host arena {side.arena.name}, but earlier copies are "
                    f"in {first.arena.name}: an order's host blocks lie in one arena"
                )
            arena = k
        assert arena is not None  # the order has copies
        offset = self._hosts[arena].first_block

        def local(e: Extent) -> Extent:
            return Extent(e.start - offset, e.length)

        if order.direction == "out":
            return arena, [Copy(c.src, local(c.dst)) for c in order.copies]
        return arena, [Copy(local(c.src), c.dst) for c in order.copies]

    def _check_same_arena(
        self, where: str, swap: _InFlight, earlier: Iterable[_InFlight]
    ) -> None:
        """A copy engine orders one request's swaps only among its own: a request's swaps in
        flight together must use one arena."""
        for other in (*self._inflight.values(), *earlier):
            if other.request_id == swap.request_id and other.arena != swap.arena:
                raise PreconditionFailed(
                    f"{where}: swap {other.swap_id} of {swap.request_id!r} is in flight on host "
                    f"arena {self._hosts[other.arena].arena.name}, this one is on "
                    f"{self._hosts[swap.arena].arena.name}; submit after its SwapEvent"
                )

    def _check_device_conflicts(
        self, where: str, swap: _InFlight, earlier: Iterable[_InFlight]
    ) -> None:
        """Device blocks may be shared by readers only; the copy engine orders one request's
        own swaps, so those never conflict with each other."""
        for state, step in zip(("running", "queued"), self._steps, strict=False):
            touched = step.writes if swap.direction == "out" else step.reads
            clash = swap.device_blocks & touched.keys()
            if clash:
                block = min(clash)
                raise PreconditionFailed(
                    f"{where}: device block {block} is used by the {state} step "
                    f"({_table_field(touched[block])}); submit after the step returns"
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


def _sample_to_host(
    logits: torch.Tensor, inputs: SamplingInputs, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chooses every sampled row's token on the device and starts their one copy to the
    host. Returns the tokens on the device (int64 `[rows]`) and the host copy: `[1 or 2,
    rows]` int64, tokens then (when asked for) float64 logprobs' bits."""
    token_ids, logprobs = sample_rows(
        logits,
        inputs,
        all_greedy=not any(p.temperature for p in params),
        want_logprobs=any(p.logprobs for p in params),
    )
    parts = [token_ids] if logprobs is None else [token_ids, logprobs.view(torch.int64)]
    return token_ids, torch.stack(parts).to("cpu", non_blocking=True)


def _from_last_step_fields(claim: StepClaim, query_start: Sequence[int]
                           ) -> dict[str, torch.Tensor]:
    """For a step with from_last_step entries, the fields `_feed_last_tokens` reads: each
    entry's row, and its request's row among the tokens of the step it follows."""
    if claim.follows is None:
        return {}
    follows = claim.follows
    entries = [(i, seq) for i, seq in enumerate(claim.sequences) if seq.from_last_step]
    return {
        "from_last_step.rows": torch.tensor([query_start[i] for i, _ in entries]),
        "from_last_step.sources": torch.tensor(
            [follows.samples[seq.request_id][0] for _, seq in entries]),
    }


def _feed_last_tokens(inputs: StepInputs, last_tokens: torch.Tensor) -> None:
    """Writes, on the device and with no host sync, the tokens of the step before into the
    token ids of the rows fed from it."""
    inputs["token_ids"].index_copy_(
        0, inputs["from_last_step.rows"],
        last_tokens.index_select(0, inputs["from_last_step.sources"]),
    )


def _tokens(sampled: Sequence[StepSequence], copied: torch.Tensor | None
            ) -> tuple[SampledToken, ...]:
    if copied is None:
        return ()
    token_ids = copied[0].tolist()
    logprobs = copied[1].view(torch.float64).tolist() if len(copied) > 1 else None
    return tuple(
        SampledToken(seq.request_id, token_ids[i],
                     logprobs[i] if logprobs is not None and seq.sampling.logprobs else None)
        for i, seq in enumerate(sampled)
    )


def _on_cuda(tensor: torch.Tensor) -> bool:
    """A real CUDA device: a fake one (FakeTensorMode on a CPU build) has no events."""
    return tensor.device.type == "cuda" and torch.cuda.is_available()


def _table_field(entry: TableEntry) -> str:
    return f"sequences[{entry[0]}].block_table[{entry[1]}]"


def _check_range(where: str, values: Sequence[int], bound: int) -> None:
    for j, value in enumerate(values):
        if not 0 <= value < bound:
            raise InvalidInput(f"{where}[{j}]={value} out of range [0, {bound})")


def _attached(side: _HostSide) -> AttachedArena:
    return AttachedArena(side.arena.name, side.first_block, side.arena.num_blocks)


def _release(host: _HostSide) -> None:
    host.copy.close()
    arena = host.arena
    del host.copy  # drop the last views of the arena, so it can be unmapped
    arena.close()
