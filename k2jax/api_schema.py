"""OpenAI request bodies and their checks: the pydantic models of chat and text completions, the errors answered in
OpenAI's shape ({"error": {message, type, param, code}}), and every check of a value a client sends, each a 400 (422
for a body of the wrong shape, 413 for a prompt over the context) naming the field.

Raw bodies are checked before pydantic sees them: valid JSON (no NaN / Infinity), at most MAX_JSON_DEPTH deep, valid
Unicode. Options this server does not implement (UNSUPPORTED) are refused rather than ignored.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, ValidationError

from k2jax import chat
from k2jax.sampling import TOP_LOGPROBS, SamplingParams

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_CHOICES = 16
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_STOP_IDS = 16
SEED_RANGE = (-(2**63), 2**64 - 1)  # OpenAI's seeds are 64-bit; the sampler keys on the low 32 bits
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for tool function names
UNSUPPORTED: dict[str, tuple[Any, ...]] = {  # option -> the values that mean "not used" (completions: the last two)
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "top_logprobs": (None, 0), "response_format": (None, {"type": "text"}),
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

    top_k, min_p, stop_token_ids and ignore_eos (completions: generate exactly max_tokens) are extensions, as in vLLM.
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
    stop_token_ids: list[int] | None = None
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
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(GenerationBody):
    """POST /v1/completions; allow_special_tokens (an extension) lets reserved-token names in prompt text become
    reserved tokens, which by default are plain text."""

    prompt: str | list[str] | list[int] | list[list[int]]
    allow_special_tokens: bool = False
    logprobs: int | None = None


# ---------------------------------------------------------------- checks


def check_supported(body: GenerationBody) -> None:
    """400 for an OpenAI option this server does not implement, rather than silently ignoring it."""
    for name, neutral in UNSUPPORTED.items():
        if (body.model_extra or {}).get(name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server", param=name)


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """Reject a sampling value outside [low, high] (or (low, high])."""
    if not (low < value <= high if low_open else low <= value <= high):
        raise APIError(400, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", param=name)


def sampling_params(body: GenerationBody, vocab_size: int, top_logprobs: int = 0) -> SamplingParams:
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
        return SamplingParams(float(temperature), top_k, float(top_p), float(min_p), seed & 0xFFFFFFFF, top_logprobs)
    except ValueError as err:  # anything the checks above let through that the sampler cannot hold
        raise APIError(400, str(err)) from None


def stop_strings(body: GenerationBody) -> tuple[str, ...]:
    """The body's stop strings as a tuple (at most MAX_STOP_STRINGS, none empty or over MAX_STOP_CHARS)."""
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: give at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                       "characters", param="stop")
    return stops


def stop_token_ids(body: GenerationBody, vocab_size: int) -> frozenset[int]:
    """The body's stop_token_ids (at most MAX_STOP_IDS, each in the vocabulary)."""
    ids = body.stop_token_ids or []
    if len(ids) > MAX_STOP_IDS:
        raise APIError(400, f"stop_token_ids: give at most {MAX_STOP_IDS} ids", param="stop_token_ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                       param="stop_token_ids")
    return frozenset(ids)


def logprob_count(body: ChatBody | CompletionBody) -> int | None:
    """How many top tokens each token's log-prob comes with (None: no log-probs): chat's top_logprobs (needs
    logprobs true), completions' logprobs; at most TOP_LOGPROBS."""
    if isinstance(body, ChatBody):
        count, param = body.top_logprobs, "top_logprobs"
        if count and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        count = (count or 0) if body.logprobs else None
    else:
        count, param = body.logprobs, "logprobs"
    if count is not None and not 0 <= count <= TOP_LOGPROBS:
        raise APIError(400, f"{param} must be in [0, {TOP_LOGPROBS}], got {count}", param=param)
    return count


def check_schema(schema: Any, where: str) -> None:
    """400 naming `where` unless `schema` is a valid JSON Schema (its $schema names the draft, default 2020-12)."""
    if not isinstance(schema, dict):
        raise APIError(400, f"{where} must be a JSON Schema object", param=where)
    if not isinstance(schema.get("$schema", ""), str):
        raise APIError(400, f"{where}['$schema'] must be a string", param=where)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as err:
        path = "".join(f"[{p!r}]" for p in err.absolute_path)
        raise APIError(400, f"{where}{path} is not a valid JSON Schema: {err.message}", param=where) from None


def response_schema(response_format: dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
    """(whether the answer must be JSON, the JSON Schema it must match: None for any object) from a chat
    response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}}."""
    kind = (response_format or {"type": "text"}).get("type")
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind != "json_schema":
        raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                       param="response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise APIError(400, "response_format.json_schema must be an object with a `name` and a `schema`",
                       param="response_format.json_schema")
    schema = spec.get("schema", {})
    check_schema(schema, "response_format.json_schema.schema")
    return True, schema


def check_tools(tools: Sequence[Tool]) -> None:
    """400 for a tool whose function name breaks OpenAI's rule or whose parameters are not a valid JSON Schema."""
    for i, tool in enumerate(tools):
        where = f"tools[{i}].function"
        if not FUNCTION_NAME.fullmatch(tool.function.name):
            raise APIError(400, f"{where}.name: must match {FUNCTION_NAME.pattern}, got {tool.function.name!r}",
                           param=f"{where}.name")
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"{where}.parameters")


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
                 default: int | None = None, param: str = "max_tokens") -> int:
    """max_tokens (the field `param`) checked against the context (default: `default`, capped by the room left, else
    all of it); a too-long prompt is a 413."""
    if prompt_len >= max_context:
        raise APIError(413, f"the prompt is {prompt_len} tokens; this server's context is {max_context} tokens",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return min(max_context - prompt_len, default or max_context)
    if max_tokens < 1:
        raise APIError(400, f"{param} must be >= 1, got {max_tokens}", param=param)
    if prompt_len + max_tokens > max_context:
        raise APIError(400, f"{param} {max_tokens} plus the prompt's {prompt_len} tokens exceeds this server's "
                       f"context of {max_context} tokens", param=param, code="context_length_exceeded")
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
        if isinstance(value, dict):
            for key in value:
                check_unicode(key, f"{path}.{key}" if path else key)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        # places are named only for what is kept: a prompt's thousands of token ids are skipped over
        stack.extend((item, depth + 1, f"{path}.{key}" if path else str(key)) for key, item in items
                     if isinstance(item, (str, dict, list)))


def check_unicode(text: str, where: str) -> None:
    """400 for a string that is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(400, f"{where}: the string holds a lone surrogate ({text[err.start]!a}); send valid "
                           "Unicode", param=where) from None


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """A raw body parsed and validated against `schema` (400 not JSON, 422 wrong shape)."""
    data = parse_json(raw)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None
