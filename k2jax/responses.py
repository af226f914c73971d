"""OpenAI response bodies from scheduler outputs: per choice, text (incremental detokenizing, stop strings), the K2
chat parser's reasoning / content / tool calls, and log-probs; whole responses, or server-sent event streams."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

from k2jax import chat
from k2jax.api_schema import APIError
from k2jax.jobs import Job
from k2jax.scheduler import Output
from k2jax.tokenizer import TextStream, Tokenizer

TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]  # a token, its log-prob, its top (id, log-prob) pairs


@dataclasses.dataclass
class Choice:
    """Per-choice state of a response: text, chat parser (chat only), token count, finish reason, and the log-probs
    of its tokens (None when the request asks for none)."""

    text: TextStream
    parser: chat.StreamParser | None = None
    tokens: int = 0
    finish: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None

    def add(self, out: Output) -> tuple[str, list[chat.Delta], list[TokenLogprob]]:
        """Take an Output: (new text, new chat deltas, log-probs of the tokens taken); sets finish when the choice
        ends (tokens after a stop string are not taken)."""
        final = out.finish is not None
        text = self.text.feed(out.tokens, final=final)
        taken, self.tokens = self.text.used - self.tokens, self.text.used
        if self.text.stopped or final:
            self.finish = "stop" if self.text.stopped else out.finish
            self.error = out.error
        deltas = self.parser.feed(text) if self.parser and text else []
        if self.parser and self.finish:
            deltas += self.parser.finish()
        entries = []
        if self.logprobs is not None:
            tops = out.top_logprobs or ((),) * len(out.tokens)
            entries = list(zip(out.tokens[:taken], out.logprobs, tops))
            self.logprobs += entries
        return text, deltas, entries

    def finish_reason(self) -> str:
        """OpenAI's finish_reason: stop, length, or tool_calls when the model ended its turn with tool calls."""
        if self.finish == "stop" and self.parser and self.parser.output().tool_calls:
            return "tool_calls"
        return self.finish or "stop"


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text (U+FFFD for a part of a character) and its bytes; an id past the tokenizer's vocabulary (a
    model's padding) has none."""
    data = tokenizer.token_bytes[token] if token < len(tokenizer.token_bytes) else b""
    return data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: every generated token (reasoning and tool calls included) with its top tokens."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text, data = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": data}

    return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries],
            "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's completions `logprobs`: tokens, their log-probs and each token's top tokens as {text: log-prob}."""
    return {"tokens": [token_text(tokenizer, t)[0] for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [_top_by_text(tokenizer, top) for _, _, top in entries],
            "text_offset": None}


def _top_by_text(tokenizer: Tokenizer, top: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Top tokens as {text: log-prob}; tokens that read the same (e.g. partial UTF-8 bytes, each U+FFFD) keep the
    likeliest one's log-prob."""
    out: dict[str, float] = {}
    for token, logprob in top:
        text = token_text(tokenizer, token)[0]
        out[text] = max(logprob, out.get(text, -math.inf))
    return out


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, choices: Sequence[Choice], cached_tokens: int) -> dict[str, Any]:
    """OpenAI usage: prompt tokens counted once per prompt (cached_tokens of them from the prefix cache),
    completion tokens summed over choices."""
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def numbered(calls: Sequence[dict[str, Any]], first: int) -> list[dict[str, Any]]:
    """Tool calls with K2's ids functions.NAME:IDX, IDX counting from `first` (the conversation's earlier calls)."""
    return [{**call, "id": chat.call_id(call["function"]["name"], first + k)} for k, call in enumerate(calls)]


def chat_message(choice: Choice, call_offset: int = 0) -> dict[str, Any]:
    """The assistant message of a finished chat choice: content, reasoning_content, tool_calls (K2 ids from
    call_offset on)."""
    parsed = choice.parser.output()
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or (None if parsed.tool_calls else ""),
                               "reasoning_content": parsed.reasoning_content}
    if parsed.tool_calls:
        message["tool_calls"] = numbered(parsed.tool_calls, call_offset)
    return message


def chat_delta(delta: chat.Delta, first_call: int, call_offset: int = 0) -> dict[str, Any]:
    """A chat.Delta as an OpenAI stream delta; tool calls are numbered from first_call (ids from call_offset on)."""
    if delta.tool_calls:
        calls = numbered(delta.tool_calls, call_offset + first_call)
        return {"tool_calls": [{"index": first_call + k, **call} for k, call in enumerate(calls)]}
    if delta.reasoning_content:
        return {"reasoning_content": delta.reasoning_content}
    return {"content": delta.content}


def raise_choice_error(choices: Sequence[Choice]) -> None:
    """A 500 if generation failed for any choice."""
    failed = [c.error for c in choices if c.finish == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0]}", type="server_error")


@dataclasses.dataclass
class Call:
    """A validated generation call: its job, its choices, the prompt token count and the response envelope."""

    job: Job
    choices: list[Choice]
    prompt_tokens: int
    head: dict[str, Any]
    stream: bool
    include_usage: bool
    n_prompts: int = 1
    call_offset: int = 0
    tokenizer: Tokenizer | None = None

    def take(self, index: int, out: Output) -> tuple[list[chat.Delta], list[TokenLogprob]]:
        """Feed one Output to its choice; a stop string ends that choice. Returns chat deltas (or text as content)
        and the log-probs of the tokens taken."""
        choice = self.choices[index]
        text, deltas, entries = choice.add(out)
        if choice.text.stopped:
            self.job.stop(index)
        return deltas if choice.parser else ([chat.Delta(content=text)] if text else []), entries

    def logprobs(self, entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        """A choice's `logprobs` field for these tokens (None when the request asks for none)."""
        if entries is None:
            return None
        return (chat_logprobs if self.is_chat else completion_logprobs)(self.tokenizer, entries)

    async def collect(self) -> None:
        """Run to the end (non-streaming responses)."""
        async for index, out in self.job.outputs():
            self.take(index, out)
        raise_choice_error(self.choices)

    def chunk(self, index: int, delta: dict[str, Any] | None, finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> str:
        """One streamed chunk for a choice: a chat delta, or completion text, with the log-probs of its tokens."""
        if self.is_chat:
            body = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
        else:
            body = {"index": index, "text": (delta or {}).get("content", ""), "logprobs": logprobs,
                    "finish_reason": finish}
        return sse({**self.head, "choices": [body]})

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of a streaming response; the job is cancelled however the stream ends."""
        try:
            if self.is_chat:
                for index in range(len(self.choices)):
                    yield self.chunk(index, {"role": "assistant", "content": ""})
            calls_sent = [0] * len(self.choices)
            async for index, out in self.job.outputs():
                deltas, entries = self.take(index, out)
                logprobs = self.logprobs(entries) if entries else None  # rides on this Output's first chunk
                for delta in deltas:
                    yield self.chunk(index, chat_delta(delta, calls_sent[index], self.call_offset), logprobs=logprobs)
                    calls_sent[index] += len(delta.tool_calls)
                    logprobs = None
                if logprobs is not None:
                    yield self.chunk(index, None, logprobs=logprobs)
                choice = self.choices[index]
                if choice.finish is not None:
                    raise_choice_error([choice])
                    yield self.chunk(index, None, choice.finish_reason())
            if self.job.cancelled:
                return
            if self.include_usage:
                yield sse({**self.head, "choices": [], "usage": self.usage()})
            yield sse("[DONE]")
        except APIError as err:
            yield sse(err.body())
        finally:
            self.job.close()

    @property
    def is_chat(self) -> bool:
        """Whether this is a chat completion (its choices parse the K2 chat format)."""
        return self.choices[0].parser is not None

    def response(self) -> dict[str, Any]:
        """The non-streaming body: a chat.completion or a text_completion."""
        choices = [{"index": i, **({"message": chat_message(c, self.call_offset)} if self.is_chat
                                   else {"text": c.text.text}),
                    "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish_reason()}
                   for i, c in enumerate(self.choices)]
        return {**self.head, "choices": choices, "usage": self.usage()}

    def usage(self) -> dict[str, Any]:
        """The usage block; a prompt's cached tokens are those of its first choice."""
        return usage(self.prompt_tokens, self.choices, self.job.cached_tokens(len(self.choices) // self.n_prompts))
