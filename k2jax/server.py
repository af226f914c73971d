"""An OpenAI-compatible HTTP server over the Scheduler: chat (tools, reasoning), completions, models, health, metrics.

The model runs only on the scheduler's thread; worker threads parse, check, render and tokenize requests; the
event loop turns tokens into text (incremental detokenizing, stop strings, the K2 chat parser) and HTTP. Errors
follow OpenAI's shape: {"error": {message, type, param, code}}.

Tool calls are enforced whenever tools are declared: a grammar (k2jax.grammar) lets the model call only declared
tools, with K2's ids and arguments that match each tool's schema, and honours tool_choice and parallel_tool_calls;
`"strict": false` on a tool lifts its schema (on every tool: no enforcement), as does Service(enforce_tools=False).
Call ids of a client's history that are not K2's `functions.NAME:IDX` are renumbered into that form for the prompt,
and responses carry K2 ids. max_reasoning_tokens / reasoning_effort bound the reasoning block.

What a client controls is checked at the edge: body size (while it is read), media type, JSON depth and Unicode,
every value that reaches the model's arrays, tool schemas (jsonschema), and prompt size before tokenizing. Message
text never becomes reserved tokens (see Tokenizer.apply_chat_template); completions read their prompt as plain text
unless the request sets allow_special_tokens. A request whose client disconnects is cancelled at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import re
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Self

import jsonschema
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from k2jax import chat, grammar
from k2jax.grammar import GrammarError, RowConstraint
from k2jax.sampling import SamplingParams
from k2jax.scheduler import Output, QueueFull, Request, Scheduler

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_CHOICES = 16
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
SEED_RANGE = (-(2**63), 2**64 - 1)  # OpenAI's seeds are 64-bit; the sampler keys on the low 32 bits
PROMPT_WORKERS = 4
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for tool function names
POLL_S = 0.5
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW_S = 10.0
GRACEFUL_SHUTDOWN_S = 5
UNSUPPORTED: dict[str, tuple[Any, ...]] = {  # option -> the values that mean "not used"
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
    "response_format": (None, {"type": "text"}),
}


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's format with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {...}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> APIError:
    """A 422 naming the first offending field of a request body."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    return APIError(422, f"{param}: {first['msg']}" if param else first["msg"], param=param or None)


# ---------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    """stream_options: whether a last chunk carries usage."""

    include_usage: bool = False


class FunctionDef(BaseModel):
    """A tool's function declaration."""

    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    """The function a named tool_choice forces."""

    name: str


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}."""

    type: Literal["function"]
    function: FunctionName


class Message(BaseModel):
    """A chat message; content, tool calls and tool results are checked further by k2jax.chat."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class GenerationBody(BaseModel):
    """Fields shared by chat and text completions; other fields are ignored unless UNSUPPORTED lists them.

    top_k, min_p and ignore_eos (completions: generate exactly max_tokens) are extensions, as in vLLM.
    """

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class ChatBody(GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[Message]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = None
    max_reasoning_tokens: int | None = None
    reasoning_effort: str | None = None


class CompletionBody(GenerationBody):
    """POST /v1/completions; allow_special_tokens (an extension) lets reserved-token names in prompt text become
    reserved tokens, which by default are plain text."""

    prompt: str | list[str] | list[int] | list[list[int]]
    allow_special_tokens: bool = False


def check_supported(body: GenerationBody) -> None:
    """400 for an OpenAI option this server does not implement, rather than silently ignoring it."""
    for name, neutral in UNSUPPORTED.items():
        if (body.model_extra or {}).get(name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server", param=name)


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """Reject a sampling value outside [low, high] (or (low, high])."""
    if not (low < value <= high if low_open else low <= value <= high):
        raise APIError(400, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", param=name)


def sampling_params(body: GenerationBody, vocab_size: int) -> SamplingParams:
    """SamplingParams from a body, OpenAI defaults (temperature 1), ranges checked; no seed -> a random one."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = body.top_k or 0
    min_p = body.min_p or 0.0
    check_range("temperature", temperature, 0.0, 2.0)
    check_range("top_p", top_p, 0.0, 1.0, low_open=True)
    check_range("min_p", min_p, 0.0, 1.0)
    if not 0 <= top_k <= vocab_size:
        raise APIError(400, f"top_k must be in [0, {vocab_size}] (0 disables it), got {top_k}", param="top_k")
    if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
        raise APIError(400, f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {body.seed}", param="seed")
    seed = uuid.uuid4().int if body.seed is None else body.seed
    try:
        return SamplingParams(float(temperature), top_k, float(top_p), float(min_p), seed & 0xFFFFFFFF)
    except ValueError as err:  # anything the checks above let through that the sampler cannot hold
        raise APIError(400, str(err)) from None


def stop_strings(body: GenerationBody) -> tuple[str, ...]:
    """The body's stop strings as a tuple (at most MAX_STOP_STRINGS, none empty or over MAX_STOP_CHARS)."""
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: give at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                       "characters", param="stop")
    return stops


def check_tools(tools: Sequence[Tool]) -> None:
    """400 for a tool whose function name breaks OpenAI's rule or whose parameters are not a valid JSON Schema."""
    for i, tool in enumerate(tools):
        where = f"tools[{i}].function"
        if not FUNCTION_NAME.fullmatch(tool.function.name):
            raise APIError(400, f"{where}.name: must match {FUNCTION_NAME.pattern}, got {tool.function.name!r}",
                           param=f"{where}.name")
        schema = tool.function.parameters
        if schema is None:
            continue
        if not isinstance(schema.get("$schema", ""), str):
            raise APIError(400, f"{where}.parameters['$schema'] must be a string", param=f"{where}.parameters")
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as err:
            path = "".join(f"[{p!r}]" for p in err.absolute_path)
            raise APIError(400, f"{where}.parameters{path} is not a valid JSON Schema: {err.message}",
                           param=f"{where}.parameters") from None


def choice_count(body: GenerationBody) -> int:
    """n, checked: 1..MAX_CHOICES."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n must be in [1, {MAX_CHOICES}], got {n}", param="n")
    return n


def check_prompt_chars(chars: int, max_token_chars: int, max_context: int, prompt_param: str) -> None:
    """413 before tokenizing for text too long for the context however it is tokenized (a token covers at most
    max_token_chars characters)."""
    if chars > max_context * max_token_chars:
        raise APIError(413, f"the prompt is {chars} characters, at least {-(-chars // max_token_chars)} tokens; this "
                       f"server's context is {max_context} tokens", param=prompt_param, code="context_length_exceeded")


def token_budget(prompt_len: int, max_tokens: int | None, max_context: int, prompt_param: str,
                 default: int | None = None) -> int:
    """max_tokens checked against the context (default: `default`, capped by the room left, else all of it);
    a too-long prompt is a 413."""
    if prompt_len >= max_context:
        raise APIError(413, f"the prompt is {prompt_len} tokens; this server's context is {max_context} tokens",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return min(max_context - prompt_len, default or max_context)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if prompt_len + max_tokens > max_context:
        raise APIError(400, f"max_tokens {max_tokens} plus the prompt's {prompt_len} tokens exceeds this server's "
                       f"context of {max_context} tokens", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def chat_messages(body: ChatBody) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template ('developer' is rendered as 'system'), call ids in K2's form."""
    if not body.messages:
        raise APIError(422, "messages: give at least one message", param="messages")
    out = []
    for message in body.messages:
        item = message.model_dump(exclude_none=True)
        item["role"] = "system" if item["role"] == "developer" else item["role"]
        out.append(item)
    return chat.normalize_call_ids(out)


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]],
                       vocab_size: int) -> list[str | list[int]]:
    """A completions `prompt` as a list of prompts (text or token ids, each id checked against the vocabulary)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    prompts = [prompt] if isinstance(prompt[0], int) else list(prompt)
    for p in prompts:
        bad = [] if isinstance(p, str) else [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                           param="prompt")
    return prompts


# ---------------------------------------------------------------- raw bodies


def reject_constant(name: str) -> None:
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object: 400 unless it is valid JSON, at most MAX_JSON_DEPTH deep, valid Unicode."""
    try:
        data = json.loads(raw, parse_constant=reject_constant)
    except RecursionError:
        raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:
        raise APIError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    check_json_tree(data)
    return data


def check_json_tree(data: Any) -> None:
    """400 naming the place where a parsed body nests deeper than MAX_JSON_DEPTH or holds a lone surrogate."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            check_unicode(value, path)
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels (at {path})")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                check_unicode(key, where)
            if isinstance(item, (str, dict, list)):
                stack.append((item, depth + 1, where))


def check_unicode(text: str, where: str) -> None:
    """400 for a string that is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(400, f"{where}: the string holds a lone surrogate ({text[err.start]!a}); send valid "
                           "Unicode", param=where) from None


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The raw request body, refused with a 413 as soon as it grows past `limit` bytes (chunked bodies too)."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    return b"".join(chunks)


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """A raw body parsed and validated against `schema` (400 not JSON, 422 wrong shape)."""
    data = parse_json(raw)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


# ---------------------------------------------------------------- text side


class TextStream:
    """One choice's text as tokens arrive: incremental detokenizing, stop strings cut and their prefixes held back.

    Tokens are taken one at a time, so `used` counts exactly the tokens up to the one that completed a stop string.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = self._read = self._sent = 0

    @property
    def used(self) -> int:
        """Tokens consumed (none after a stop string)."""
        return len(self.ids)

    def feed(self, ids: Sequence[int], final: bool = False) -> str:
        """Text that these new ids make certain (all of the rest when final)."""
        pieces = [self._add(token) for token in ids if not self.stopped]
        if final and not self.stopped:
            pieces.append(self._advance(final=True))
        return "".join(pieces)

    def _add(self, token: int) -> str:
        """Take one token: the text it makes certain."""
        self.ids.append(token)
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        """Decode what is new, cut at a stop string, and hand out all but a possible stop-string prefix."""
        before = len(self.text)
        self._absorb(final)
        hit = [i for i in (self.text.find(s, max(0, before - len(s) + 1)) for s in self.stops) if i >= 0]
        if hit:
            self.text, self.stopped = self.text[: min(hit)], True
        held = 0 if self.stopped or final else chat.held_suffix(self.text, self.stops)
        return self._release(held)

    def _absorb(self, final: bool) -> None:
        """Append newly decoded text; waits while the tail is an incomplete UTF-8 character (unless final)."""
        decode = self.tokenizer.decode
        old = decode(self.ids[self._prefix:self._read])
        new = decode(self.ids[self._prefix:])
        if new.endswith("\ufffd") and not final:
            return
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new[len(old):]

    def _release(self, held: int) -> str:
        """The text not yet handed out, except its last `held` characters."""
        end = len(self.text) - held
        out, self._sent = self.text[self._sent:end], max(self._sent, end)
        return out


@dataclasses.dataclass
class Choice:
    """Per-choice state of a response: text, chat parser (chat only), token count and finish reason."""

    text: TextStream
    parser: chat.StreamParser | None = None
    tokens: int = 0
    finish: str | None = None
    error: str | None = None

    def add(self, out: Output) -> tuple[str, list[chat.Delta]]:
        """Take an Output: (new text, new chat deltas); sets finish when the choice ends."""
        final = out.finish is not None
        text = self.text.feed(out.tokens, final=final)
        self.tokens = self.text.used
        if self.text.stopped or final:
            self.finish = "stop" if self.text.stopped else out.finish
            self.error = out.error
        deltas = self.parser.feed(text) if self.parser and text else []
        if self.parser and self.finish:
            deltas += self.parser.finish()
        return text, deltas

    def finish_reason(self) -> str:
        """OpenAI's finish_reason: stop, length, or tool_calls when the model ended its turn with tool calls."""
        if self.finish == "stop" and self.parser and self.parser.output().tool_calls:
            return "tool_calls"
        return self.finish or "stop"


# ---------------------------------------------------------------- jobs and metrics


class Metrics:
    """Prometheus metrics of one server: queue depth, running requests, tokens, tokens/s, time to first token,
    KV pages, prefix-cache hits, preemptions, step times and decode rows per step."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        gauges = {
            "k2jax_queue_depth": ("Requests waiting for a slot", lambda: scheduler.queue_depth),
            "k2jax_running_requests": ("Requests holding a cache slot", lambda: scheduler.running),
            "k2jax_generation_tokens_per_second": (f"Generated tokens per second over the last {RATE_WINDOW_S:g} s",
                                                   self.tokens_per_second),
            "k2jax_kv_pages_total": ("Pages in the KV pool", lambda: scheduler.total_pages),
            "k2jax_kv_pages_free": ("KV pages on the free lists", lambda: scheduler.free_pages),
            "k2jax_kv_pages_used": ("KV pages held by requests or the prefix cache",
                                    lambda: scheduler.total_pages - scheduler.free_pages),
            "k2jax_kv_pages_cached": ("KV pages held by the prefix cache", lambda: scheduler.cached_pages),
            "k2jax_kv_pages_evictable": ("Cached KV pages no request holds", lambda: scheduler.evictable_pages),
            "k2jax_prefix_cache_hit_tokens": ("Tokens the prefix cache gave to starting requests (total)",
                                              lambda: scheduler.reused_tokens),
            "k2jax_prefix_cache_lookup_tokens": ("Tokens of starting requests looked up in the prefix cache (total)",
                                                 lambda: scheduler.looked_up_tokens),
            "k2jax_prefix_cache_hit_rate": ("Prefix-cache hit tokens over looked-up tokens",
                                            lambda: scheduler.reused_tokens / max(scheduler.looked_up_tokens, 1)),
            "k2jax_preemptions": ("Requests preempted because the KV pool was full (total)",
                                  lambda: scheduler.preemptions),
        }
        for name, (doc, value) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(value)
        self.step_time = Histogram("k2jax_step_seconds", "Time of one scheduler step (prefill chunks, a decode call)",
                                   buckets=STEP_BUCKETS, registry=self.registry)
        self.step_rows = Histogram("k2jax_step_decode_rows", "Requests decoded by one scheduler step",
                                   buckets=tuple(2.0**k for k in range(11)), registry=self.registry)
        scheduler.on_step = self.observe_step
        self.prompt_tokens = Counter("k2jax_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.generation_tokens = Counter("k2jax_generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("k2jax_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.ttft = Histogram("k2jax_time_to_first_token_seconds", "Time from submission to first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def observe_step(self, seconds: float, rows: int) -> None:
        """Record one scheduler step (called on the scheduler thread)."""
        self.step_time.observe(seconds)
        self.step_rows.observe(rows)

    def add_tokens(self, n: int) -> None:
        """Count n generated tokens now."""
        self.generation_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        """Forget counts older than the window."""
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()


def cancel_all(scheduler: Scheduler, requests: list[Request]) -> None:
    """Cancel every request of a job that is still running (no-op for finished ones)."""
    for request in requests:
        scheduler.cancel(request)


class Job:
    """The scheduler requests of one HTTP call (n choices, or several prompts) and the queue their outputs reach.

    Its requests are cancelled by close(), when its client disconnects (see watch), or when the Job is
    garbage-collected, so a response that is dropped frees its slots even if its body was never iterated.
    """

    def __init__(self, scheduler: Scheduler, metrics: Metrics):
        self.scheduler, self.metrics = scheduler, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output] | None] = asyncio.Queue()
        self.requests: list[Request] = []
        self.pending: set[int] = set()
        self.started = time.monotonic()
        self.cancelled = False
        self._watcher: asyncio.Task | None = None
        self._cancel_requests = weakref.finalize(self, cancel_all, scheduler, self.requests)

    def add(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: frozenset[int],
            force_before_stop: tuple[int, ...] = (), sample: int = 0, constraint: RowConstraint | None = None) -> None:
        """Add one sequence (sample j of its prompt draws with seed + j); its outputs arrive tagged with its index."""
        index = len(self.requests)
        params = dataclasses.replace(params, seed=(params.seed + sample) & 0xFFFFFFFF)
        emit = functools.partial(self.loop.call_soon_threadsafe, self.queue.put_nowait)
        self.pending.add(index)
        self.requests.append(Request(prompt, max_tokens, lambda out: emit((index, out)), params, stop_ids,
                                     force_before_stop, constraint))

    def submit(self) -> None:
        """Queue every request; a full queue (429) or a rejected request (400) cancels those already queued."""
        try:
            for request in self.requests:
                self.scheduler.submit(request)
        except QueueFull as err:
            self.close()
            raise APIError(429, f"server busy: {err}; retry later", type="rate_limit_exceeded") from None
        except ValueError as err:
            self.close()
            raise APIError(400, str(err)) from None
        except RuntimeError as err:
            self.close()
            raise APIError(503, str(err), type="server_error") from None
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in self.requests))
        self.started = time.monotonic()

    def watch(self, receive: Receive) -> None:
        """Cancel this job the moment the ASGI channel reports that the client has gone (the body is read)."""
        self._watcher = self.loop.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        """Wait for http.disconnect, then cancel."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    def cancel(self) -> None:
        """The client is gone: cancel every request (slots freed before the next model call) and end outputs()."""
        if not self.cancelled:
            self.cancelled = True
            self._cancel_requests()
            self.queue.put_nowait(None)

    def close(self) -> None:
        """The response is over: stop watching the client and cancel whatever still runs."""
        if self._watcher is not None:
            self._watcher.cancel()
        self._cancel_requests()

    def cached_tokens(self, n: int) -> int:
        """Prompt tokens the prefix cache gave, counting each prompt once (its requests come in groups of n)."""
        return sum(r.cached_tokens or 0 for r in self.requests[::n])

    def stop(self, index: int) -> None:
        """End one sequence early (its stop string was found): no more outputs are awaited for it."""
        if index in self.pending:
            self.pending.discard(index)
            self.scheduler.cancel(self.requests[index])
            self.metrics.requests.labels("stop").inc()

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """(index, Output) until every request finished or the job is cancelled; 503 if the scheduler dies."""
        seen: set[int] = set()
        while self.pending and not self.cancelled:
            try:
                item = await asyncio.wait_for(self.queue.get(), POLL_S)
            except TimeoutError:
                if not self.scheduler.alive:
                    raise APIError(503, "the model thread has stopped", type="server_error") from None
                continue
            if item is None:
                return
            index, out = item
            if index not in seen:
                seen.add(index)
                self.metrics.ttft.observe(time.monotonic() - self.started)
            self.metrics.add_tokens(len(out.tokens))
            if index not in self.pending:
                continue
            if out.finish is not None:
                self.pending.discard(index)
                self.metrics.requests.labels(out.finish).inc()
            yield index, out


# ---------------------------------------------------------------- responses


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

    def take(self, index: int, out: Output) -> list[chat.Delta]:
        """Feed one Output to its choice; a stop string ends that choice. Returns chat deltas (or text as content)."""
        choice = self.choices[index]
        text, deltas = choice.add(out)
        if choice.text.stopped:
            self.job.stop(index)
        return deltas if choice.parser else ([chat.Delta(content=text)] if text else [])

    async def collect(self) -> None:
        """Run to the end (non-streaming responses)."""
        async for index, out in self.job.outputs():
            self.take(index, out)
        raise_choice_error(self.choices)

    def chunk(self, index: int, delta: dict[str, Any] | None, finish: str | None = None) -> str:
        """One streamed chunk for a choice: a chat delta, or completion text."""
        if self.is_chat:
            body = {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        else:
            body = {"index": index, "text": (delta or {}).get("content", ""), "logprobs": None, "finish_reason": finish}
        return sse({**self.head, "choices": [body]})

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of a streaming response; the job is cancelled however the stream ends."""
        try:
            if self.is_chat:
                for index in range(len(self.choices)):
                    yield self.chunk(index, {"role": "assistant", "content": ""})
            calls_sent = [0] * len(self.choices)
            async for index, out in self.job.outputs():
                for delta in self.take(index, out):
                    yield self.chunk(index, chat_delta(delta, calls_sent[index], self.call_offset))
                    calls_sent[index] += len(delta.tool_calls)
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
                    "logprobs": None, "finish_reason": c.finish_reason()} for i, c in enumerate(self.choices)]
        return {**self.head, "choices": choices, "usage": self.usage()}

    def usage(self) -> dict[str, Any]:
        """The usage block; a prompt's cached tokens are those of its first choice."""
        return usage(self.prompt_tokens, self.choices, self.job.cached_tokens(len(self.choices) // self.n_prompts))


# ---------------------------------------------------------------- service


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked, tokenized generation request: its sequences (n samples of each prompt) and how to answer."""

    prompts: list[list[int]]
    budgets: list[int]
    n: int
    params: SamplingParams
    stops: tuple[str, ...]
    stop_ids: frozenset[int]
    forced: tuple[int, ...]
    is_chat: bool
    stream: bool
    include_usage: bool
    constraints: tuple[RowConstraint | None, ...] = ()
    call_offset: int = 0


class Service:
    """What the HTTP routes need: the model's tokenizer, the scheduler, the served name, the key, the metrics.

    default_max_tokens: a chat completion's max_tokens when it sets none (None: all the context left).
    enforce_tools: whether declared tools are enforced by a grammar (each tool may still opt out with strict false).
    Token masks (tool grammars, reasoning budgets) need a single-process scheduler.
    """

    def __init__(self, model: Any, scheduler: Scheduler, name: str = "k2jax", api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, default_max_tokens: int | None = None,
                 enforce_tools: bool = True):
        if model.tokenizer is None:
            raise ValueError("serving needs a checkpoint with a tokenizer (tiktoken.model)")
        self.tokenizer, self.scheduler, self.name, self.api_key = model.tokenizer, scheduler, name, api_key
        self.vocab_size = model.config.vocab_size
        self.max_body_bytes, self.default_max_tokens = max_body_bytes, default_max_tokens
        self.masks = scheduler.link is None
        self.enforce_tools = enforce_tools and self.masks
        self.created = int(time.time())
        self.metrics = Metrics(scheduler)
        self.workers = ThreadPoolExecutor(PROMPT_WORKERS, thread_name_prefix="k2jax-prompt")

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the API key ("Bearer" in any case); always, without a key."""
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_model(self, name: str) -> None:
        """404 unless `name` is the served model."""
        if name != self.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.name}`",
                           param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        """The served model as a /v1/models entry."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "k2jax",
                "max_model_len": self.scheduler.max_context}

    def enforced(self, tools: Sequence[dict[str, Any]]) -> bool:
        """Whether a request's tools are enforced: the server enforces tools and some tool is strict."""
        return self.enforce_tools and any(map(grammar.is_strict, tools))

    def tool_setup(self, body: ChatBody) -> tuple[list[dict[str, Any]] | None, frozenset[int], tuple[int, ...]]:
        """Tools to render, stop ids and forced tokens for tool_choice: none / auto / required / a named function
        (no forced tokens when a grammar enforces the tools)."""
        check_tools(body.tools or [])
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = body.tool_choice or ("auto" if tools else "none")
        stop_ids = frozenset(self.tokenizer.stop_ids)
        enforced = self.enforced(tools)
        tools = [{**t, "function": {k: v for k, v in t["function"].items() if k != "strict"}} for t in tools]
        if choice == "none":
            return None, stop_ids if enforced else stop_ids | {self.tokenizer.token_id(chat.SECTION_BEGIN)}, ()
        if not tools:
            raise APIError(400, "tool_choice needs a non-empty `tools` list", param="tool_choice")
        names = [t["function"]["name"] for t in tools]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names `{choice.function.name}`, which is not in tools {names}",
                           param="tool_choice")
        if choice == "auto" or enforced:
            return tools, stop_ids, ()
        opening = f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions."
        if choice == "required":
            return tools, stop_ids, tuple(self.tokenizer.encode_marked(opening))
        name = chat.mark(choice.function.name, self.tokenizer.reserved_names)
        return tools, stop_ids, tuple(self.tokenizer.encode_marked(f"{opening}{name}:0{chat.ARGUMENT_BEGIN}"))

    def tool_grammar(self, body: ChatBody, call_offset: int) -> str | None:
        """The grammar that enforces the request's tools (None when none are declared or enforced); a schema the
        grammar library cannot compile is a 400 naming the tool."""
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        if not self.enforced(tools):
            return None
        choice = body.tool_choice or "auto"
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        try:
            return grammar.tool_calls_grammar(tools, "required" if named else choice, named,
                                              body.parallel_tool_calls is not False, call_offset)
        except GrammarError as err:
            raise APIError(400, f"{err}; send the tool with \"strict\": false to skip enforcing it",
                           param=err.where) from None

    def constraints(self, body: ChatBody, n: int, call_offset: int) -> tuple[RowConstraint | None, ...]:
        """One constraint per choice: the tool grammar and the reasoning budget, if any."""
        try:
            budget = grammar.reasoning_budget(body.max_reasoning_tokens, body.reasoning_effort)
        except ValueError as err:
            param = "max_reasoning_tokens" if body.max_reasoning_tokens is not None else "reasoning_effort"
            raise APIError(400, str(err), param=param) from None
        rules = self.tool_grammar(body, call_offset)
        if rules is None and budget is None:
            return (None,) * n
        if not self.masks:
            raise APIError(400, "max_reasoning_tokens and reasoning_effort are not available when serving over "
                           "several processes", param="max_reasoning_tokens")
        vocab = grammar.vocabulary(self.tokenizer, self.vocab_size)
        try:
            return tuple(RowConstraint(vocab, rules, budget) for _ in range(n))
        except GrammarError as err:  # e.g. over the library's size limits, though each schema compiled alone
            raise APIError(400, f"the tools cannot be enforced together: {err}", param="tools") from None

    def head(self, kind: str) -> dict[str, Any]:
        """The id/object/created/model envelope of a response."""
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": self.name}

    def prepare(self, raw: bytes, schema: type[ChatBody] | type[CompletionBody]) -> Prepared:
        """Parse, check and tokenize a raw body (runs on a worker thread, off the event loop)."""
        body = parse_body(raw, schema)
        self.check_model(body.model)
        check_supported(body)
        return self.prepare_chat(body) if isinstance(body, ChatBody) else self.prepare_completion(body)

    def prepare_chat(self, body: ChatBody) -> Prepared:
        """A chat completion's prompt ids (user text stays text), budget, sampling and tool setup."""
        n, params, stops = choice_count(body), sampling_params(body, self.vocab_size), stop_strings(body)
        tools, stop_ids, forced = self.tool_setup(body)
        messages = chat_messages(body)
        call_offset = chat.call_count(messages)
        constraints = self.constraints(body, n, call_offset)
        tokenizer, max_context = self.tokenizer, self.scheduler.max_context
        try:
            marked = tokenizer.render_marked(messages, tools)
        except ValueError as err:
            raise APIError(422, str(err), param="messages") from None
        check_prompt_chars(len(marked) - marked.count(chat.MARK), tokenizer.max_token_chars, max_context, "messages")
        ids = tokenizer.encode_marked(marked)
        requested = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        budget = token_budget(len(ids), requested, max_context, "messages", self.default_max_tokens)
        return Prepared([ids], [budget], n, params, stops, stop_ids, forced, True, body.stream,
                        bool(body.stream_options and body.stream_options.include_usage), constraints, call_offset)

    def prepare_completion(self, body: CompletionBody) -> Prepared:
        """A text completion's prompts (plain text unless allow_special_tokens), budgets and sampling."""
        n, params, stops = choice_count(body), sampling_params(body, self.vocab_size), stop_strings(body)
        texts = completion_prompts(body.prompt, self.vocab_size)
        if len(texts) * n > MAX_CHOICES:
            raise APIError(400, f"{len(texts)} prompts x n={n} exceeds {MAX_CHOICES} choices", param="prompt")
        max_context = self.scheduler.max_context
        for text in texts:
            if isinstance(text, str):
                check_prompt_chars(len(text), self.tokenizer.max_token_chars, max_context, "prompt")
        prompts = [p if isinstance(p, list) else self.tokenizer.encode(p, body.allow_special_tokens) for p in texts]
        if not all(prompts):
            raise APIError(400, "prompt: every prompt needs at least one token", param="prompt")
        requested = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        budgets = [token_budget(len(p), requested, max_context, "prompt") for p in prompts]
        stop_ids = frozenset() if body.ignore_eos else frozenset(self.tokenizer.stop_ids)
        return Prepared(prompts, budgets, n, params, stops, stop_ids, (), False, body.stream,
                        bool(body.stream_options and body.stream_options.include_usage))

    def start(self, prepared: Prepared) -> Call:
        """Submit a prepared request to the scheduler (on the event loop): its Call."""
        job = Job(self.scheduler, self.metrics)
        constraints = iter(prepared.constraints)
        for ids, budget in zip(prepared.prompts, prepared.budgets):
            for j in range(prepared.n):
                job.add(ids, budget, prepared.params, prepared.stop_ids, prepared.forced, sample=j,
                        constraint=next(constraints, None))
        job.submit()
        choices = [Choice(TextStream(self.tokenizer, prepared.stops), chat.StreamParser() if prepared.is_chat else None)
                   for _ in range(len(prepared.prompts) * prepared.n)]
        kind = ("chat.completion.chunk" if prepared.stream else "chat.completion") if prepared.is_chat \
            else "text_completion"
        return Call(job, choices, sum(map(len, prepared.prompts)), self.head(kind), prepared.stream,
                    prepared.include_usage, len(prepared.prompts), prepared.call_offset)

    async def call(self, request: HTTPRequest, schema: type[ChatBody] | type[CompletionBody]) -> Call:
        """Read the body, prepare it on a worker thread, submit it."""
        raw = await read_body(request, self.max_body_bytes)
        prepared = await asyncio.get_running_loop().run_in_executor(self.workers, self.prepare, raw, schema)
        return self.start(prepared)


# ---------------------------------------------------------------- app


async def respond(request: HTTPRequest, call: Call) -> Response:
    """A server-sent event stream, or the whole response once every choice has finished; either way the job is
    cancelled as soon as the client disconnects."""
    call.job.watch(request.receive)
    if call.stream:
        return StreamingResponse(call.events(), media_type="text/event-stream")
    try:
        await call.collect()
    finally:
        call.job.close()
    return JSONResponse(call.response())


def error_response(err: APIError) -> JSONResponse:
    """An APIError as a JSON response."""
    return JSONResponse(err.body(), status_code=err.status)


def media_type(headers: Headers) -> str:
    """The Content-Type without parameters, lower-case."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


class Gate:
    """ASGI middleware before the routes: the API key on /v1 routes, then JSON bodies only, no larger than the limit
    they declare. Pure ASGI (the receive channel passes untouched), so a client's disconnect reaches the handlers."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> APIError | None:
        """Why a request is refused before its route runs, or None."""
        headers = Headers(scope=scope)
        if scope["path"].startswith("/v1") and not self.service.authorized(headers.get("authorization")):
            return APIError(401, "Incorrect API key provided", code="invalid_api_key")
        if scope["method"] != "POST":
            return None
        if media_type(headers) != "application/json":
            return APIError(415, f"request body must be sent as application/json, not {media_type(headers) or 'none'}",
                            code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.service.max_body_bytes):
            return APIError(413, f"request body is {length} bytes, over the limit of {self.service.max_body_bytes}")
        return None


def create_app(service: Service) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    app = FastAPI(title="k2jax", docs_url=None, redoc_url=None, openapi_url=None)

    async def api_error(_request: HTTPRequest, err: APIError) -> JSONResponse:
        return error_response(err)

    async def http_error(_request: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), type=kind))

    async def internal_error(_request: HTTPRequest, err: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=err)
        return error_response(APIError(500, "internal server error", type="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(Gate, service=service)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the serving programs are compiled and while the model thread runs, else 503."""
        scheduler = service.scheduler
        if not scheduler.alive:
            return JSONResponse({"status": "model thread stopped"}, status_code=503)
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "compiling"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one served model."""
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        """One model by id (404 unless it is the served one)."""
        service.check_model(name)
        return service.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        """OpenAI chat completions, streaming or not."""
        return await respond(request, await service.call(request, ChatBody))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        """OpenAI text completions, streaming or not."""
        return await respond(request, await service.call(request, CompletionBody))

    return app


class BackgroundServer:
    """A uvicorn server for `app` on its own thread (tests, benchmarks, notebooks); a context manager.

    port 0 picks a free port; `url` is the base URL (http://host:port/v1) once started.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        self.host, self.start_timeout = host, start_timeout
        self.thread = threading.Thread(target=self.server.run, name="k2jax-http", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start within {self.start_timeout} s")
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(self.start_timeout)

    @property
    def port(self) -> int:
        """The bound port."""
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API."""
        return f"http://{self.host}:{self.port}/v1"
