"""Long-horizon agent runtime: a K2 Thinking tool loop whose conversation keeps its cache between steps.

Each step renders the conversation with the chat template, finds the longest common token prefix with what
the conversation's cache slot already holds, prefills only the rest, decodes in that slot, parses reasoning,
content and tool calls, and runs the tools. Tool failures become tool results the model reads. Tool calls are
enforced by a grammar (k2jax.grammar): the model can only call the declared tools, with arguments that match their
declarations, and never inside its reasoning. When the
conversation outgrows its slot, the oldest turns (then the oldest steps of the current loop) leave the window
in one batch, down to half the budget, so the recompute this forces stays rare. `PrefixCache` keeps host
copies of conversations' cached rows (LRU, byte-limited) so a server can resume follow-up requests.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import json
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from k2jax import engine, grammar
from k2jax.chat import Delta, ParsedOutput, StreamParser, call_count
from k2jax.engine import Model
from k2jax.grammar import RowConstraint
from k2jax.sampling import SamplingParams
from k2jax.slots import Slots
from k2jax.tokenizer import TextStream

Message = dict[str, Any]
JSON_TYPES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
                               tuple: "array", dict: "object"}
DEFAULT_CAPACITY = 32768
GREEDY = SamplingParams()
EVICT_TO = 0.5  # after an eviction the window uses at most this share of its token budget


# ---------------------------------------------------------------- tools


@dataclasses.dataclass(frozen=True)
class Tool:
    """A Python callable the model may call, and its OpenAI-style declaration as the chat template renders it."""

    fn: Callable[..., Any]
    declaration: dict[str, Any]

    @property
    def name(self) -> str:
        return self.declaration["function"]["name"]


def json_schema(annotation: Any) -> dict[str, Any]:
    """JSON schema of a type annotation: builtins, list/dict generics, Optional/Union, Literal; {} for anything."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in JSON_TYPES or origin in JSON_TYPES:
        return {"type": JSON_TYPES[origin or annotation]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [json_schema(a) for a in args if a is not type(None)]
        return options[0] if len(options) == 1 else {"anyOf": options}
    return {}


def docstring_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """A function's description (docstring up to its Args: section) and per-parameter texts from that section."""
    doc = inspect.getdoc(fn) or ""
    head, _, args = doc.partition("\nArgs:\n")
    described = {}
    for line in args.splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name.split(" ")[0].isidentifier():
            described[name.split(" ")[0]] = text.strip()
    return " ".join(head.split()), described


def declare(fn: Callable[..., Any], name: str | None = None) -> dict[str, Any]:
    """The OpenAI-style function declaration of `fn`, from its signature, type hints and docstring."""
    description, described = docstring_parts(fn)
    hints = typing.get_type_hints(fn) if inspect.isfunction(fn) or inspect.ismethod(fn) else {}
    properties, required = {}, []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        schema = json_schema(hints.get(param.name))
        properties[param.name] = {**schema, "description": described[param.name]} if param.name in described else schema
        if param.default is param.empty:
            required.append(param.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    function = {"name": name or fn.__name__, "description": description, "parameters": parameters}
    return {"type": "function", "function": function}


def as_tool(tool: Callable[..., Any] | Tool) -> Tool:
    """A Tool as given, or a callable declared from its signature and docstring."""
    if isinstance(tool, Tool):
        if not tool.declaration.get("function", {}).get("name"):
            raise ValueError(f"tool declaration needs {{'function': {{'name': str, ...}}}}, got {tool.declaration}")
        return tool
    if not callable(tool):
        raise TypeError(f"a tool must be a callable or a k2jax.agent.Tool, got {type(tool).__name__}")
    return Tool(tool, declare(tool))


def enforced_declaration(tool: Tool) -> dict[str, Any]:
    """The declaration the tool grammar enforces: a function without **kwargs takes no arguments beyond its
    declared ones (additionalProperties false, unless its declaration says otherwise)."""
    parameters = tool.declaration["function"].get("parameters")
    try:
        open_ended = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(tool.fn).parameters.values())
    except (TypeError, ValueError):  # a callable without a signature: keep its declaration as it is
        open_ended = True
    if open_ended or not isinstance(parameters, dict) or "additionalProperties" in parameters:
        return tool.declaration
    function = {**tool.declaration["function"], "parameters": {**parameters, "additionalProperties": False}}
    return {**tool.declaration, "function": function}


def tool_table(tools: Sequence[Callable[..., Any] | Tool]) -> dict[str, Tool]:
    """Tools by name; two tools with one name are an error."""
    table: dict[str, Tool] = {}
    for tool in map(as_tool, tools):
        if tool.name in table:
            raise ValueError(f"two tools are named {tool.name!r}")
        table[tool.name] = tool
    return table


def result_text(name: str, value: Any) -> str:
    """A tool's return value as the text the model reads: strings verbatim, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return f"error: tool {name!r} returned a value that is not JSON ({type(value).__name__}): {value!r:.200}"


def call_with_timeout(fn: Callable[..., Any], arguments: dict[str, Any], timeout: float | None) -> Any:
    """fn(**arguments), raising TimeoutError after `timeout` seconds (the call itself runs on, in a daemon thread)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(**arguments)
        except BaseException as err:  # noqa: BLE001 - any failure is reported to the model
            outcome["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no result after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_tool_call(tools: Mapping[str, Tool], call: Mapping[str, Any], timeout: float | None) -> str:
    """Run one parsed tool call; an unknown tool, bad arguments, an exception or a timeout become 'error: ...'."""
    name = call["function"]["name"]
    if name not in tools:
        return f"error: unknown tool {name!r}; available tools: {', '.join(sorted(tools)) or 'none'}"
    try:
        arguments = json.loads(call["function"]["arguments"])
        return result_text(name, call_with_timeout(tools[name].fn, arguments, timeout))
    except Exception as err:  # noqa: BLE001 - the model sees the error and may retry
        return f"error: {type(err).__name__}: {err}"


# ---------------------------------------------------------------- one sequence in a cache slot


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


@dataclasses.dataclass
class Generation:
    """One generation in a slot: ids (stop token excluded), text, why it ended, and what the prefill cost."""

    ids: list[int]
    text: str
    finish: str
    prompt_tokens: int
    reused_tokens: int

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens


class SlotSession:
    """One sequence in a cache slot; knows the tokens its cache holds, so a new prompt reuses their common prefix."""

    def __init__(self, slots: Slots, slot: int = 0, reuse: bool = True):
        if not 0 <= slot < slots.n_slots:
            raise ValueError(f"slot {slot} does not exist: there are {slots.n_slots} slots")
        self.slots, self.slot, self.reuse = slots, slot, reuse
        self.held: list[int] = []
        slots.release(slot)

    def prefill(self, tokens: Sequence[int]) -> int:
        """Make the slot hold `tokens`, computing only past their common prefix with what it holds; returns the
        length of that prefix."""
        tokens = list(tokens)
        start = common_prefix(self.held, tokens) if self.reuse else 0
        if start < len(tokens):
            self.slots.prefill(self.slot, tokens[start:], start=start)
        else:
            self.slots.rewind(self.slot, start)
        self.held = tokens
        return start

    def generate(self, prompt: Sequence[int], params: SamplingParams, max_new_tokens: int,
                 on_text: Callable[[str], None] | None = None, constraint: RowConstraint | None = None) -> Generation:
        """Continue `prompt` in this slot until <|im_end|> / EOS, max_new_tokens, or the slot's capacity; only with
        tokens `constraint` allows, if given. The slot holds all of the prompt but its last token, which the first
        decode step feeds."""
        model = self.slots.model
        if model.tokenizer is None:
            raise ValueError("generating text in a slot needs a model with a tokenizer")
        if not prompt:
            raise ValueError("cannot generate from an empty prompt")
        start = self.prefill(prompt[:-1])
        ids: list[int] = []
        pending: list[int] = []
        stream, stop_ids = TextStream(model.tokenizer), model._stop_ids()

        def show(text: str) -> None:
            if on_text and text:
                on_text(text)

        def done(finish: str) -> Generation:
            show(stream.feed([], final=True))
            return Generation(ids, stream.text, finish, len(prompt), start)

        while True:
            for tok in pending:
                if tok in stop_ids:
                    return done("stop")
                ids.append(tok)
                show(stream.feed([tok]))
                if len(ids) >= max_new_tokens:
                    return done("length")
            if len(self.held) + engine.DECODE_STEPS > self.slots.capacity:
                return done("length")
            pending = self._decode(ids[-1] if ids else prompt[-1], params, constraint)

    def _decode(self, last: int, params: SamplingParams, constraint: RowConstraint | None = None) -> list[int]:
        """Feed `last` and sample DECODE_STEPS tokens in this slot alone (under a constraint as grammar.decode_plan
        says; a run is cut at its first draw that does not stand); the cache then holds last + all but the last token
        returned."""
        tokens = np.zeros(self.slots.n_slots, np.int32)
        tokens[self.slot] = last
        active = [params if s == self.slot else None for s in range(self.slots.n_slots)]
        plan = grammar.decode_plan({} if constraint is None else {self.slot: (constraint, params)},
                                   self.slots.n_slots, engine.DECODE_STEPS)
        out = self.slots.decode(tokens, active, plan.n_steps, plan.masks)[0][self.slot].tolist()
        out = out[:plan.take(self.slot, out)]
        self.held += [last, *out[:-1]]
        if len(out) < plan.n_steps:
            self.slots.rewind(self.slot, len(self.held))
        return out


# ---------------------------------------------------------------- the agent


@dataclasses.dataclass(frozen=True)
class Event:
    """Agent activity for callbacks: 'reasoning' or 'content' text as generated, a 'tool_call', a 'tool_result'."""

    kind: Literal["reasoning", "content", "tool_call", "tool_result"]
    step: int
    text: str = ""
    call: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one step cost: prompt length, tokens reused from the slot, prefilled, generated, and messages evicted."""

    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    evicted_messages: int
    tool_calls: int
    seconds: float


@dataclasses.dataclass
class AgentResult:
    """How a run ended ('answer', 'length' when the last reply was cut off, 'max_steps'), its answer and steps."""

    stop_reason: Literal["answer", "length", "max_steps"]
    answer: str
    reasoning: str
    messages: list[Message]
    steps: list[StepStats]


def default_capacity(model: Model) -> int:
    """Tokens a conversation's slot holds unless told: the model's context, at most DEFAULT_CAPACITY."""
    return min(model.config.max_position_embeddings, DEFAULT_CAPACITY)


def visible_messages(messages: Sequence[Message], start: int) -> list[Message]:
    """The window from `start`, after the system messages before it and, when it starts mid-turn, that turn's task."""
    mid_turn = start < len(messages) and messages[start]["role"] != "user"
    task = max((i for i in range(start) if messages[i]["role"] == "user"), default=-1) if mid_turn else -1
    pinned = [m for i, m in enumerate(messages[:start]) if m["role"] == "system" or i == task]
    return pinned + list(messages[start:])


def window_starts(messages: Sequence[Message], start: int) -> list[int]:
    """Where a window may begin after `start`: earlier turns at their user message, the current turn at a step."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    role = [m["role"] for m in messages]
    return [i for i in range(start + 1, len(messages))
            if (role[i] == "user" and i <= last_user) or (role[i] == "assistant" and i > last_user)]


def assistant_message(parsed: ParsedOutput) -> Message:
    """The assistant turn to append for a parsed generation (reasoning kept; the template drops it when due)."""
    message: Message = {"role": "assistant", "content": parsed.content,
                        "reasoning_content": parsed.reasoning_content or ""}
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    return message


class Agent:
    """A conversation with tools in one cache slot; `run(task)` loops generate -> tools until an answer.

    Follow-up `run` calls continue the same conversation and reuse its cache. The window of messages the model
    sees is cut when the prompt plus max_new_tokens would not fit the slot's capacity. With tool_grammar (the
    default) tool calls are enforced (a tool declared with "strict": false keeps free arguments), and an agent
    without tools never opens a tool-call section; max_reasoning_tokens bounds each step's reasoning.
    """

    def __init__(self, model: Model, tools: Sequence[Callable[..., Any] | Tool] = (), *, system: str | None = None,
                 sampling: SamplingParams = GREEDY, max_new_tokens: int = 512, capacity: int | None = None,
                 tool_timeout: float | None = 30.0, reuse: bool = True, on_event: Callable[[Event], None] | None = None,
                 slots: Slots | None = None, slot: int = 0, tool_grammar: bool = True,
                 max_reasoning_tokens: int | None = None):
        if model.tokenizer is None:
            raise ValueError("the agent needs a model with a tokenizer (its checkpoint ships tiktoken.model)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        slots = slots or Slots(model, 1, capacity or default_capacity(model))
        self.budget = slots.capacity - max_new_tokens - engine.DECODE_STEPS
        if self.budget < 1:
            raise ValueError(f"slot capacity {slots.capacity} leaves no room for a prompt with "
                             f"max_new_tokens={max_new_tokens}")
        self.model, self.tools = model, tool_table(tools)
        self.enforced = [enforced_declaration(t) for t in self.tools.values()]
        self.tool_grammar = tool_grammar and (not self.enforced or any(map(grammar.is_strict, self.enforced)))
        if self.tool_grammar:
            self._tool_rules()  # GrammarError now, naming a tool that cannot be enforced
        self.max_reasoning_tokens = grammar.reasoning_budget(max_reasoning_tokens, None)
        self.sampling, self.max_new_tokens, self.tool_timeout = sampling, max_new_tokens, tool_timeout
        self.on_event = on_event or (lambda event: None)
        self.session = SlotSession(slots, slot, reuse)
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.window_start = 0
        self.steps: list[StepStats] = []

    def run(self, task: str, max_steps: int = 300) -> AgentResult:
        """Add `task` as a user message and step until a reply without tool calls, or `max_steps` steps."""
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.messages.append({"role": "user", "content": task})
        first = len(self.steps)
        for _ in range(max_steps):
            reply, finish = self.step()
            if not reply.get("tool_calls"):
                return self._result("answer" if finish == "stop" else "length", first)
        return self._result("max_steps", first)

    def step(self) -> tuple[Message, str]:
        """One model turn: generate in the slot, append the reply, run its tool calls; (reply, finish reason)."""
        began, step = time.perf_counter(), len(self.steps)
        evicted, prompt = self._fit()
        parser = StreamParser()
        emit = functools.partial(self._emit_deltas, step)
        gen = self.session.generate(prompt, self.sampling, self.max_new_tokens, lambda text: emit(parser.feed(text)),
                                    self._constraint())
        emit(parser.finish())
        reply = assistant_message(parser.output())
        self.messages.append(reply)
        for call in reply.get("tool_calls", []):
            self.on_event(Event("tool_call", step, call=call))
            result = run_tool_call(self.tools, call, self.tool_timeout)
            self.on_event(Event("tool_result", step, text=result, call=call))
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        self.steps.append(StepStats(len(prompt), gen.reused_tokens, gen.prefilled_tokens, len(gen.ids), evicted,
                                    len(reply.get("tool_calls", [])), time.perf_counter() - began))
        return reply, gen.finish

    def _tool_rules(self, first_index: int = 0) -> str:
        """The tool-call grammar: calls to the declared tools, or (with none declared) no tool-call section."""
        return grammar.tool_calls_grammar(self.enforced, "auto" if self.enforced else "none", first_index=first_index)

    def _constraint(self) -> RowConstraint | None:
        """This step's constraint: the tool grammar (call ids counting on from the conversation's calls) and the
        reasoning budget; None when neither applies."""
        rules = None
        if self.tool_grammar:
            rules = self._tool_rules(call_count(self.messages))
        if rules is None and self.max_reasoning_tokens is None:
            return None
        vocab = grammar.vocabulary(self.model.tokenizer, self.model.config.vocab_size)
        return RowConstraint(vocab, rules, self.max_reasoning_tokens)

    def prompt_tokens(self, start: int | None = None) -> list[int]:
        """The rendered, tokenized prompt of the window from `start` (default: the current window)."""
        window = visible_messages(self.messages, self.window_start if start is None else start)
        declarations = [t.declaration for t in self.tools.values()] or None
        return self.model.tokenizer.apply_chat_template(window, tools=declarations, tokenize=True)

    def _fit(self) -> tuple[int, list[int]]:
        """(messages evicted, prompt); over budget, the window moves to the first start within EVICT_TO of it, else
        to the latest start that fits at all."""
        prompt = self.prompt_tokens()
        if len(prompt) <= self.budget:
            return 0, prompt
        before = len(visible_messages(self.messages, self.window_start))
        starts = window_starts(self.messages, self.window_start)
        for start in starts:
            prompt = self.prompt_tokens(start)
            if len(prompt) <= self.budget * EVICT_TO or (start == starts[-1] and len(prompt) <= self.budget):
                self.window_start = start
                return before - len(visible_messages(self.messages, start)), prompt
        raise ValueError(f"the latest step alone needs {len(prompt)} prompt tokens; the slot's capacity of "
                         f"{self.session.slots.capacity} leaves {self.budget} beside max_new_tokens="
                         f"{self.max_new_tokens}")

    def _emit_deltas(self, step: int, deltas: list[Delta]) -> None:
        """Forward parsed reasoning and content text to the callback (tool calls are reported when they run)."""
        for delta in deltas:
            for kind, text in (("reasoning", delta.reasoning_content), ("content", delta.content)):
                if text:
                    self.on_event(Event(kind, step, text=text))

    def _result(self, reason: Literal["answer", "length", "max_steps"], first: int) -> AgentResult:
        """The run's outcome: its final assistant turn's content and reasoning, the transcript, its steps."""
        last = next(m for m in reversed(self.messages) if m["role"] == "assistant")
        return AgentResult(reason, last["content"], last["reasoning_content"], list(self.messages), self.steps[first:])


def run_agent(model: Model, task: str, tools: Sequence[Callable[..., Any] | Tool] = (), max_steps: int = 300,
              **options: Any) -> AgentResult:
    """Solve `task` with `tools` in a fresh conversation: K2 Thinking's interleaved reasoning and tool calls.

    Options are Agent's: system, sampling, max_new_tokens, capacity, tool_timeout, reuse, on_event, slots, slot,
    tool_grammar, max_reasoning_tokens.
    """
    return Agent(model, tools, **options).run(task, max_steps)


# ---------------------------------------------------------------- prefix cache for follow-up requests


@dataclasses.dataclass(frozen=True)
class CachedPrefix:
    """Host copy of a sequence's cached pages: the tokens they encode and per-stack arrays [L, pages, page_size, C]."""

    tokens: tuple[int, ...]
    pages: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.pages.values())


class PrefixCache:
    """Conversations' cached rows kept on the host for follow-up requests; least recently used leave first.

    `save(session)` after a request, `restore(session, tokens)` before the next: the slot then holds the
    longest cached prefix of `tokens`, and `session.prefill` / `generate` compute only the rest.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[tuple[int, ...], CachedPrefix] = collections.OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, session: SlotSession) -> bool:
        """Keep a host copy of what the session's slot holds; False when a longer entry covers it or it is too big."""
        tokens = tuple(session.held)
        n = len(tokens)
        if n == 0:
            return False
        covering = next((key for key in self.entries if key[:n] == tokens), None)
        if covering is not None:
            self.entries.move_to_end(covering)
            return False
        entry = CachedPrefix(tokens, session.slots.read(session.slot))
        if entry.nbytes > self.max_bytes:
            return False
        for key in [k for k in self.entries if tokens[:len(k)] == k]:
            del self.entries[key]
        self.entries[tokens] = entry
        while self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)
        return True

    def restore(self, session: SlotSession, tokens: Sequence[int]) -> int:
        """Load the longest cached prefix of `tokens` into the session's slot if it beats what the slot holds."""
        here = common_prefix(session.held, tokens)
        best = max(self.entries.values(), key=lambda e: common_prefix(e.tokens, tokens), default=None)
        if best is None or common_prefix(best.tokens, tokens) <= here:
            return here
        self.entries.move_to_end(best.tokens)
        session.slots.write(session.slot, best.pages, len(best.tokens))
        session.held = list(best.tokens)
        return common_prefix(best.tokens, tokens)
