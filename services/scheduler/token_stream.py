"""One request's outgoing events: tokens as they are sampled, then one final event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

import grpc

from common.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    text: str  # empty while a multi-byte character is incomplete
    logprob: float


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # "length", "stop" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tbts: list[float]
    preemptions: int
    bytes_swapped: int
    reused_tokens: int
    trailing_text: str = ""  # what the detokenizer held back past the last token


@dataclass(frozen=True, slots=True)
class Failed:
    code: grpc.StatusCode
    message: str


StreamItem = TokenEvent | Finished | Failed


class TokenStream:
    """Detokenizes incrementally and watches for stop strings. The stop string itself is
    streamed (tokens are sent as they come); generation ends right after it."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop: Sequence[str] = ()) -> None:
        self._detok = detokenizer
        self._stop = tuple(s for s in stop if s)
        self._tail = ""
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.stopped = False

    def push(self, token_id: int, logprob: float = 0.0) -> bool:
        """Queues a token; True when a stop string has now appeared."""
        text = self._detok.push(token_id)
        self._queue.put_nowait(TokenEvent(token_id, text, logprob))
        if self._stop and not self.stopped:
            self._tail = (self._tail + text)[-(max(map(len, self._stop)) + len(text)) :]
            self.stopped = any(s in self._tail for s in self._stop)
        return self.stopped

    def finish(self, final: Finished) -> None:
        """Ends the stream; the detokenizer's held-back text goes out with `final`."""
        self._queue.put_nowait(replace(final, trailing_text=self._detok.flush()))

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        self._queue.put_nowait(Failed(code, message))

    async def __aiter__(self) -> AsyncIterator[StreamItem]:
        while True:
            item = await self._queue.get()
            yield item
            if not isinstance(item, TokenEvent):
                return
