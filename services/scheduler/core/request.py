"""A request's life: its tokens, how much of their KV exists, and where that KV is."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.core.lifecycle import Event, RequestState, next_state


@dataclass(eq=False)
class Request:
    request_id: str
    client_id: str
    prompt: list[int]
    max_tokens: int
    conversation_id: str | None = None
    priority: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    min_tokens: int = 0  # stop tokens are not sampled before this many outputs
    # Leading prompt tokens from the conversation's earlier turns, whose KV the host may
    # hold (0: a first turn, which need not ask the host); None when unknown.
    history_tokens: int | None = None
    arrival: int = 0  # admission order, set by the planner: a sequence number, not a time
    output: list[int] = field(default_factory=list)
    state: RequestState = RequestState.WAITING
    num_computed: int = 0  # leading tokens whose KV exists (on the device, or on the host)
    preemptions: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the host instead of prefill
    prompt_charged: int = 0  # leading prompt tokens the policy was told were served
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, start: int, end: int) -> list[int]:
        """`tokens[start:end]` without building the whole token list."""
        split = len(self.prompt)
        if end <= split:
            return self.prompt[start:end]
        if start >= split:
            return self.output[start - split : end - split]
        return self.prompt[start:] + self.output[: end - split]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def kv_key(self) -> str:
        """Host KV is kept per conversation; a one-shot request is its own conversation."""
        return self.conversation_id or f"request:{self.request_id}"

    def handle(self, event: Event) -> None:
        """The one place a request changes state: a row of `lifecycle.TRANSITIONS`."""
        self.state = next_state(self.state, event)
