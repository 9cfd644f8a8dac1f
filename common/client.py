"""An asyncio client for FastSwitch's public gRPC API, for other services to import.

    async with FastSwitchClient("127.0.0.1:50051") as client:
        gen = client.generate("Hello", client_id="team-a", max_tokens=32)
        async for token in gen:
            print(token.text, end="")
        print(gen.final.ttft_s)

With API keys on the scheduler, pass yours: `FastSwitchClient(address, api_key=KEY)` sends
it as `authorization: Bearer KEY` on every call. Your tenant is then your client_id (leave
`client_id` empty or name your tenant), and your request and conversation ids are your
tenant's own. A missing or unknown key gets UNAUTHENTICATED, a forbidden action
PERMISSION_DENIED. A scheduler serving TLS takes `tls_ca=` (the CA bundle its certificate
chains to) and, when the address is not the name in its certificate, `tls_server_name=`.

Errors arrive as `grpc.aio.AioRpcError` with the server's status code and message;
`timeout_s` on a call is its gRPC deadline (DEADLINE_EXCEEDED when it passes). A scheduler
that is shutting down refuses new requests with UNAVAILABLE: retry them elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.auth import bearer_metadata
from common.tls import ClientTls, aio_channel
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True, slots=True)
class Final:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tbt_mean_s: float
    tbt_p99_s: float
    tbt_max_s: float
    preemptions: int
    bytes_swapped: int
    reused_prompt_tokens: int
    trailing_text: str  # text held back past the last token; `Generation.text` includes it


@dataclass(frozen=True, slots=True)
class Sampling:
    """How tokens are chosen and when generation stops; the defaults are greedy until EOS."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut
    seed: int = 0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False

    def fields(self) -> dict[str, object]:
        """The request fields these set (GenerateRequest and ChatRequest share them)."""
        return {
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "stop": list(self.stop), "logprobs": self.logprobs,
            "options": pb.GenerationOptions(
                ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                stop_token_ids=list(self.stop_token_ids), top_k=self.top_k,
            ),
        }


Messages = Sequence[tuple[str, str]]  # (role, content) pairs


def _messages(messages: Messages) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=role, content=content) for role, content in messages]


class Generation:
    """Async-iterates the tokens of one request; `final` is set once they are all in."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self.request_id = ""
        self.tokens: list[Token] = []
        self.final: Final | None = None

    @property
    def text(self) -> str:
        tail = self.final.trailing_text if self.final else ""
        return "".join(t.text for t in self.tokens) + tail

    async def __aiter__(self) -> AsyncIterator[Token]:
        async for event in self._call:
            self.request_id = event.request_id
            if event.HasField("token"):
                token = Token(event.token.id, event.token.text, event.token.logprob)
                self.tokens.append(token)
                yield token
            else:
                f = event.final
                self.final = Final(
                    f.finish_reason, f.prompt_tokens, f.completion_tokens, f.ttft_s,
                    f.tbt_mean_s, f.tbt_p99_s, f.tbt_max_s, f.preemptions, f.bytes_swapped,
                    f.reused_prompt_tokens, f.trailing_text,
                )

    async def collect(self) -> Generation:
        async for _ in self:
            pass
        return self

    def cancel(self) -> None:
        self._call.cancel()


class FastSwitchClient:
    def __init__(self, address: str, *, api_key: str = "", tls_ca: str = "",
                 tls_server_name: str = "", channel: grpc.aio.Channel | None = None) -> None:
        self._channel = channel or aio_channel(
            address, ClientTls(tls_ca, server_name=tls_server_name))
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._metadata = bearer_metadata(api_key) or None

    async def __aenter__(self) -> FastSwitchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Waits until the scheduler reports SERVING on the standard health service (it is
        NOT_SERVING while it starts or drains); raises TimeoutError after `timeout_s`."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        serving = health_pb2.HealthCheckResponse.SERVING

        async def until_serving() -> None:
            while (await stub.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True)
                   ).status != serving:
                await asyncio.sleep(0.1)

        await asyncio.wait_for(until_serving(), timeout_s)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        client_id: str = "",
        max_tokens: int = 64,
        messages: Messages = (),
        conversation_id: str = "",
        sampling: Sampling | None = None,
        priority: int | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Generation:
        """`prompt` is text (tokenized with the model's special tokens, as HF does) or token
        ids; or pass `prompt=""` and role `messages`, rendered with the chat template."""
        request = pb.GenerateRequest(
            client_id=client_id, conversation_id=conversation_id, max_tokens=max_tokens,
            priority=priority, request_id=request_id, **(sampling or Sampling()).fields(),
        )
        if messages:
            request.messages.messages.extend(_messages(messages))
        elif isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        return Generation(self._stub.Generate(request, timeout=timeout_s,
                                              metadata=self._metadata))

    def chat(
        self,
        conversation_id: str,
        message: str | Messages,
        *,
        client_id: str = "",
        max_tokens: int = 64,
        sampling: Sampling | None = None,
        priority: int | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Generation:
        """One turn: a user message, or this turn's (role, content) messages."""
        request = pb.ChatRequest(
            client_id=client_id, conversation_id=conversation_id, max_tokens=max_tokens,
            priority=priority, request_id=request_id, **(sampling or Sampling()).fields(),
        )
        if isinstance(message, str):
            request.message = message
        else:
            request.messages.extend(_messages(message))
        return Generation(self._stub.Chat(request, timeout=timeout_s, metadata=self._metadata))

    async def set_priority(
        self, priority: int, *, request_id: str = "", client_id: str = ""
    ) -> int:
        request = pb.SetPriorityRequest(priority=priority)
        if request_id:
            request.request_id = request_id
        elif client_id:
            request.client_id = client_id
        return (await self._stub.SetPriority(request, metadata=self._metadata)).updated

    async def cancel(self, request_id: str) -> bool:
        return (await self._stub.Cancel(pb.CancelRequest(request_id=request_id),
                                        metadata=self._metadata)).cancelled

    async def stats(self) -> pb.StatsResponse:
        """With keys: an admin sees the whole service, a user only its tenant's requests."""
        return await self._stub.Stats(pb.StatsRequest(), metadata=self._metadata)
