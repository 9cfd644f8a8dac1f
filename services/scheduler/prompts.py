"""Requests' text to token ids, the checkpoint's way: its tokenizer and its chat template.

A conversation keeps its token history, the previous turn's prompt and output, so that the
next turn's prompt starts with exactly those tokens and the host's KV for them is reused.
The new turn's text is whatever the template renders past that history; when a template
does not render the history as a prefix of itself, the whole conversation is encoded again
(the reuse index then still finds the blocks the two share).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.chat_template import ChatTemplate, Message, NoChatTemplate
from common.tokenizer import Tokenizer

log = logging.getLogger("fastswitch.scheduler")


@dataclass
class Conversation:
    """What the server keeps of a conversation between turns."""

    messages: list[Message] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # last turn's prompt + output


@dataclass(frozen=True)
class Prompts:
    tokenizer: Tokenizer
    template: ChatTemplate | None

    def text(self, text: str) -> list[int]:
        """A raw prompt, with the special tokens the tokenizer adds (HF's default)."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def chat(self, messages: Sequence[Message]) -> list[int]:
        """Role messages with the generation prompt, as `apply_chat_template` tokenizes."""
        return self.tokenizer.encode(self._render(messages), add_special_tokens=False)

    def next_turn(self, conversation: Conversation, new: Sequence[Message]) -> list[int]:
        """The prompt of the conversation's next turn: its history tokens, then the rest."""
        rendered = self._render([*conversation.messages, *new])
        history = self.tokenizer.decode(conversation.tokens, skip_special_tokens=False)
        if rendered.startswith(history):
            rest = self.tokenizer.encode(rendered[len(history):], add_special_tokens=False)
            return conversation.tokens + rest
        log.info("the chat template does not extend the conversation's history; "
                 "encoding the whole conversation again")
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def record_turn(
        self, conversation: Conversation, new: Sequence[Message], prompt: list[int],
        output: list[int],
    ) -> None:
        """Appends a finished turn: its messages, the reply as text, and its tokens. The
        reply is decoded as a whole, as `next_turn` decodes the history, so that the two
        agree even on bytes that are not valid UTF-8."""
        conversation.messages.extend(new)
        conversation.messages.append(Message("assistant", self.tokenizer.decode(output)))
        conversation.tokens = prompt + output

    def _render(self, messages: Sequence[Message]) -> str:
        if self.template is None:
            raise NoChatTemplate("the checkpoint has no chat template: send text or token ids")
        return self.template.render(messages, add_generation_prompt=True)
