"""Delivery of swap completions from copy threads into asyncio loops.

Copies finish on worker threads; the service's loop must learn of them without blocking a
step, so each subscriber gets its own queue fed through `call_soon_threadsafe`. The hub
relays whatever its publisher hands it (the executor engine: its `SwapDone`s).
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Generic, TypeVar, cast

T = TypeVar("T")
_CLOSED = object()


class CompletionStream(Generic[T]):
    """Completions in the order they finished, as an async iterator bound to one loop."""

    def __init__(self, hub: CompletionHub[T], loop: asyncio.AbstractEventLoop) -> None:
        self._hub = hub
        self._loop = loop
        self._queue: asyncio.Queue[T | object] = asyncio.Queue()

    def deliver(self, item: T | object) -> None:
        """Thread-safe; raises RuntimeError once the loop is closed."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def close(self) -> None:
        """Stop receiving; an iteration waiting on the stream ends."""
        if self._hub.unsubscribe(self):
            self.deliver(_CLOSED)

    def __aiter__(self) -> CompletionStream[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        return cast(T, item)

    def __enter__(self) -> CompletionStream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CompletionHub(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[CompletionStream[T]] = []

    def subscribe(self) -> CompletionStream[T]:
        """A stream into the running loop; it sees completions from now on."""
        stream = CompletionStream(self, asyncio.get_running_loop())
        with self._lock:
            self._streams.append(stream)
        return stream

    def unsubscribe(self, stream: CompletionStream[T]) -> bool:
        with self._lock:
            if stream not in self._streams:
                return False
            self._streams.remove(stream)
            return True

    def publish(self, completion: T) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            try:
                stream.deliver(completion)
            except RuntimeError:  # its loop is closed: nobody will read it again
                self.unsubscribe(stream)
