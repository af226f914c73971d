"""What the HTTP routes call: a raw request body becomes scheduler requests and a Call that answers it.

Worker threads parse, check, render and tokenize requests (off the event loop); the model runs only on the scheduler's
thread. Tool calls are enforced whenever tools are declared: a grammar (k2jax.grammar) lets the model call only
declared tools, with K2's ids and arguments that match each tool's schema, and honours tool_choice and
parallel_tool_calls; `"strict": false` on a tool lifts its schema (on every tool: no enforcement), as does
Service(enforce_tools=False). Call ids of a client's history that are not K2's `functions.NAME:IDX` are renumbered into
that form for the prompt, and responses carry K2 ids. response_format (json_object, json_schema) constrains the answer
with a JSON grammar the same way; max_reasoning_tokens / reasoning_effort bound the reasoning block. Message text never
becomes reserved tokens (see Tokenizer.apply_chat_template); completions read their prompt as plain text unless the
request sets allow_special_tokens.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from k2jax import chat, grammar
from k2jax.api_schema import (MAX_BODY_BYTES, MAX_CHOICES, APIError, ChatBody, CompletionBody, NamedToolChoice,
                              check_prompt_chars, check_supported, check_tools, chat_messages, choice_count,
                              completion_prompts, logprob_count, parse_body, response_schema, sampling_params,
                              stop_strings, stop_token_ids, token_budget)
from k2jax.grammar import GrammarError, RowConstraint
from k2jax.jobs import Job, Metrics
from k2jax.responses import Call, Choice
from k2jax.sampling import SamplingParams
from k2jax.scheduler import Scheduler
from k2jax.tokenizer import TextStream

PROMPT_WORKERS = 4


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
    logprobs: int | None = None


class Service:
    """What the HTTP routes need: the model's tokenizer, the scheduler, the served name, the key, the metrics.

    default_max_tokens: a chat completion's max_tokens when it sets none (None: all the context left).
    enforce_tools: whether declared tools are enforced by a grammar (each tool may still opt out with strict false).
    """

    def __init__(self, model: Any, scheduler: Scheduler, name: str = "k2jax", api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, default_max_tokens: int | None = None,
                 enforce_tools: bool = True):
        if model.tokenizer is None:
            raise ValueError("serving needs a checkpoint with a tokenizer (tiktoken.model)")
        self.tokenizer, self.scheduler, self.name, self.api_key = model.tokenizer, scheduler, name, api_key
        self.vocab_size = model.config.vocab_size
        self.max_body_bytes, self.default_max_tokens = max_body_bytes, default_max_tokens
        self.enforce_tools = enforce_tools
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

    def answer_grammar(self, body: ChatBody, call_offset: int) -> str | None:
        """The grammar of the answer: JSON as response_format asks (not with tools unless tool_choice is "none"),
        else the tools' grammar, if any; a schema the grammar library cannot compile is a 400 naming it."""
        json_answer, schema = response_schema(body.response_format)
        if not json_answer:
            return self.tool_grammar(body, call_offset)
        if body.tools and body.tool_choice != "none":
            raise APIError(400, "response_format cannot be combined with tools unless tool_choice is \"none\"",
                           param="response_format")
        try:
            return grammar.json_grammar(schema)
        except GrammarError as err:
            raise APIError(400, str(err), param=err.where) from None

    def constraints(self, body: ChatBody, n: int, call_offset: int) -> tuple[RowConstraint | None, ...]:
        """One constraint per choice: the answer's grammar (response_format or tools) and the reasoning budget."""
        try:
            budget = grammar.reasoning_budget(body.max_reasoning_tokens, body.reasoning_effort)
        except ValueError as err:
            param = "max_reasoning_tokens" if body.max_reasoning_tokens is not None else "reasoning_effort"
            raise APIError(400, str(err), param=param) from None
        rules = self.answer_grammar(body, call_offset)
        try:
            return tuple(grammar.row_constraints(self.tokenizer, self.vocab_size, rules, budget, n))
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
        """A chat completion's prompt ids (user text stays text), budget, sampling, log-probs, tools and answer format."""
        logprobs = logprob_count(body)
        n, params, stops = choice_count(body), sampling_params(body, self.vocab_size, logprobs or 0), stop_strings(body)
        tools, stop_ids, forced = self.tool_setup(body)
        stop_ids |= stop_token_ids(body, self.vocab_size)
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
        param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        budget = token_budget(len(ids), getattr(body, param), max_context, "messages", self.default_max_tokens, param)
        return Prepared([ids], [budget], n, params, stops, stop_ids, forced, True, body.stream,
                        bool(body.stream_options and body.stream_options.include_usage), constraints, call_offset,
                        logprobs)

    def prepare_completion(self, body: CompletionBody) -> Prepared:
        """A text completion's prompts (plain text unless allow_special_tokens), budgets, sampling and log-probs."""
        logprobs = logprob_count(body)
        n, params, stops = choice_count(body), sampling_params(body, self.vocab_size, logprobs or 0), stop_strings(body)
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
        return Prepared(prompts, budgets, n, params, stops, stop_ids | stop_token_ids(body, self.vocab_size), (), False,
                        body.stream, bool(body.stream_options and body.stream_options.include_usage),
                        logprobs=logprobs)

    def start(self, prepared: Prepared) -> Call:
        """Submit a prepared request to the scheduler (on the event loop): its Call."""
        job = Job(self.scheduler, self.metrics)
        constraints = iter(prepared.constraints)
        for ids, budget in zip(prepared.prompts, prepared.budgets):
            for j in range(prepared.n):
                job.add(ids, budget, prepared.params, prepared.stop_ids, prepared.forced, sample=j,
                        constraint=next(constraints, None), logprobs=prepared.logprobs is not None)
        job.submit()
        choices = [Choice(TextStream(self.tokenizer, prepared.stops), chat.StreamParser() if prepared.is_chat else None,
                          logprobs=None if prepared.logprobs is None else [])
                   for _ in range(len(prepared.prompts) * prepared.n)]
        kind = ("chat.completion.chunk" if prepared.stream else "chat.completion") if prepared.is_chat \
            else "text_completion"
        return Call(job, choices, sum(map(len, prepared.prompts)), self.head(kind), prepared.stream,
                    prepared.include_usage, len(prepared.prompts), prepared.call_offset, self.tokenizer)
