"""OpenAI request bodies to the scheduler's GenerateRequest, and its events back to OpenAI's
response objects (chat.completion, text_completion and their streamed chunks).

What is read: model, messages or prompt, max_tokens or max_completion_tokens, temperature,
top_p, seed, stop, n (1 only), logprobs (the sampled token's only: top_logprobs 0), stream,
stream_options.include_usage, user (the fairness principal), and vLLM's priority,
ignore_eos, min_tokens and top_k. Features the scheduler does not have (n > 1, penalties,
logit_bias, echo, suffix, tools, top logprobs) are refused with 400 rather than ignored.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.client import Final, Token
from protos import scheduler_pb2 as pb
from services.http.errors import bad_request
from services.http.reuse_key import conversation_key

ROLES = ("system", "user", "assistant")
ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Defaults:
    client_id: str  # the fairness principal of a request without `user`
    max_tokens: int  # of a request that sets neither max_tokens nor max_completion_tokens


@dataclass(frozen=True)
class Parsed:
    """A request body, checked: what to send the scheduler and how to answer."""

    request: pb.GenerateRequest
    model: str  # as asked; empty: the served one
    stream: bool
    include_usage: bool
    logprobs: bool


class Body:
    """Typed reads of a JSON object; a wrong type is a 400 naming the field."""

    def __init__(self, data: object) -> None:
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object")
        self.data: dict[str, Any] = data

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        # bool is an int in Python; JSON true is no number.
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            what = "a number" if float in kinds else " or ".join(_JSON[k] for k in kinds)
            raise bad_request(f"'{name}' must be {what}", name)
        return value

    def number(self, name: str, default: float) -> float:
        value = float(self.get(name, (int, float), default))
        if not math.isfinite(value):
            raise bad_request(f"'{name}' must be a finite number", name)
        return value

    def count(self, name: str, default: int | None = None) -> int | None:
        value = self.get(name, int, default)
        if value is not None and not 0 <= value <= INT_MAX:
            raise bad_request(f"'{name}' must be a non-negative integer", name)
        return value

    def refuse(self, name: str, allowed: Sequence[object], why: str) -> None:
        """400 when `name` is set to anything but one of `allowed` (or null)."""
        value = self.data.get(name)
        if value is not None and value not in allowed:
            raise bad_request(f"'{name}' is not supported: {why}", name)


_JSON = {str: "a string", int: "an integer", bool: "a boolean", list: "an array",
         dict: "an object"}


def parse_chat(data: object, defaults: Defaults, authorization: str) -> Parsed:
    body = Body(data)
    messages = _messages(body.get("messages", list))
    top = body.count("top_logprobs", 0)
    if top:
        raise bad_request("'top_logprobs' is not supported: only the sampled token's "
                          "logprob is returned (top_logprobs 0)", "top_logprobs")
    body.refuse("tools", ([],), "no tool calling")
    logprobs = body.get("logprobs", bool, False)
    newer = body.count("max_completion_tokens")  # OpenAI's name for it since o1
    request = _request(body, defaults, logprobs,
                       max_tokens=body.count("max_tokens") if newer is None else newer)
    request.messages.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    request.conversation_id = conversation_key(messages, client_id=request.client_id,
                                               authorization=authorization)
    return _parsed(body, request, logprobs)


def parse_completion(data: object, defaults: Defaults) -> Parsed:
    body = Body(data)
    prompt = body.data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    body.refuse("echo", (False,), "the prompt is not echoed")
    body.refuse("suffix", ("",), "no insertion")
    body.refuse("best_of", (1,), "one completion per request")
    logprobs = body.count("logprobs")
    if logprobs:
        raise bad_request("'logprobs' above 0 is not supported: only the sampled token's "
                          "logprob is returned (logprobs 0)", "logprobs")
    request = _request(body, defaults, logprobs is not None, max_tokens=body.count("max_tokens"))
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in prompt):
        request.token_ids.ids.extend(prompt)
    else:
        raise bad_request("'prompt' must be a string, an array of token ids, or an array of "
                          "one of either (one prompt per request)", "prompt")
    return _parsed(body, request, logprobs is not None)


def _messages(raw: list[Any] | None) -> list[tuple[str, str]]:
    if not raw:
        raise bad_request("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(raw):
        role = ALIASES.get(m.get("role"), m.get("role")) if isinstance(m, dict) else None
        if role not in ROLES:
            raise bad_request(f"messages[{i}] must be an object with a role among "
                              f"{', '.join([*ROLES, *ALIASES])}", f"messages[{i}].role")
        out.append((role, _content(m.get("content"), i)))
    return out


def _content(content: object, i: int) -> str:
    """A string, or text parts joined (no images or audio)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts",
                      f"messages[{i}].content")


def _request(body: Body, defaults: Defaults, logprobs: bool, *, max_tokens: int | None
             ) -> pb.GenerateRequest:
    body.refuse("n", (1,), "one choice per request (n=1)")
    for penalty in ("presence_penalty", "frequency_penalty"):
        body.refuse(penalty, (0, 0.0), "no penalties")
    body.refuse("repetition_penalty", (1, 1.0), "no penalties")
    body.refuse("logit_bias", ({},), "no logit bias")
    stop = body.get("stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a string or an array of non-empty strings", "stop")
    seed = body.get("seed", int)
    if seed is None:
        seed = secrets.randbits(63)  # unseeded sampling differs from request to request
    top_k = body.get("top_k", int, 0)
    if not -1 <= top_k <= INT_MAX:
        raise bad_request("'top_k' must be -1 or 0 (no cut) or a positive integer", "top_k")
    request = pb.GenerateRequest(
        client_id=body.get("user", str, "") or defaults.client_id,
        max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        temperature=body.number("temperature", 1.0),
        top_p=body.number("top_p", 1.0),
        seed=seed % 2**64,
        stop=stop,
        logprobs=logprobs,
        options=pb.GenerationOptions(ignore_eos=body.get("ignore_eos", bool, False),
                                     min_tokens=body.count("min_tokens", 0),
                                     top_k=max(top_k, 0)),  # vLLM: -1 is no cut
    )
    priority = body.get("priority", int)
    if priority is not None:
        if abs(priority) > INT_MAX:
            raise bad_request("'priority' must fit in 32 bits", "priority")
        request.priority = priority
    return request


def _parsed(body: Body, request: pb.GenerateRequest, logprobs: bool) -> Parsed:
    options = body.get("stream_options", dict, {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean",
                          "stream_options.include_usage")
    return Parsed(request=request, model=body.get("model", str, ""),
                  stream=body.get("stream", bool, False), include_usage=include_usage,
                  logprobs=logprobs)


def usage(final: Final) -> dict[str, object]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": final.reused_prompt_tokens},
    }


def chat_logprobs(tokens: Sequence[Token]) -> dict[str, object]:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                         "top_logprobs": []} for t in tokens]}


def completion_logprobs(tokens: Sequence[Token], offset: int = 0) -> dict[str, object]:
    """The legacy shape; `offset` is where the first token's text starts in the output."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": None, "text_offset": offsets}
