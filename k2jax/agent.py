"""Long-horizon agent runtime: a K2 Thinking tool loop whose conversation keeps its cache between steps.

Each step renders the conversation with the chat template and runs it as one request of a Scheduler (the server's
engine loop, driven on the agent's thread): the prefix cache maps the pages the previous steps left that the new
prompt starts with, so only the rest is prefilled. The step then parses reasoning, content and tool calls, and runs
the tools. Tool failures become tool results the model reads. Tool calls are enforced by a grammar (k2jax.grammar):
the model can only call the declared tools, with arguments that match their declarations, and never inside its
reasoning. When the conversation outgrows its context, the oldest turns (then the oldest steps of the current loop)
leave the window in one batch, down to half the budget, so the recompute this forces stays rare.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from k2jax import engine, grammar
from k2jax.chat import Delta, ParsedOutput, StreamParser, call_count
from k2jax.engine import Engine
from k2jax.grammar import RowConstraint
from k2jax.llm import Continuation
from k2jax.sampling import SamplingParams
from k2jax.scheduler import Output, Request, Scheduler
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
    """What one step cost: prompt length, tokens the prefix cache held, prefilled, generated, and messages evicted."""

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


def default_capacity(model: Engine) -> int:
    """Tokens a conversation's slot holds unless told: the model's context, at most DEFAULT_CAPACITY."""
    return min(model.config.max_position_embeddings, DEFAULT_CAPACITY)


def conversation_scheduler(model: Engine, capacity: int | None = None, reuse: bool = True) -> Scheduler:
    """A Scheduler for agents, which drive it on their own thread one step at a time: one slot of `capacity` tokens
    (default_capacity), with the prefix cache unless not `reuse`."""
    context = (capacity or default_capacity(model)) - engine.DECODE_STEPS
    return Scheduler(model, 1, context, prefix_cache=reuse, warmup=False)


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
    """A conversation with tools; `run(task)` loops generate -> tools until an answer.

    Each step is one request of `scheduler` (default: conversation_scheduler(model, capacity, reuse)), which may be
    shared by agents that step one at a time: its prefix cache keeps what their conversations share. Follow-up `run`
    calls continue the same conversation and reuse its cached pages. The window of messages the model sees is cut
    when the prompt plus max_new_tokens would not fit the scheduler's context. With tool_grammar (the default) tool
    calls are enforced (a tool declared with "strict": false keeps free arguments), and an agent without tools never
    opens a tool-call section; max_reasoning_tokens bounds each step's reasoning.
    """

    def __init__(self, model: Engine, tools: Sequence[Callable[..., Any] | Tool] = (), *, system: str | None = None,
                 sampling: SamplingParams = GREEDY, max_new_tokens: int = 512, capacity: int | None = None,
                 tool_timeout: float | None = 30.0, reuse: bool = True, on_event: Callable[[Event], None] | None = None,
                 scheduler: Scheduler | None = None, tool_grammar: bool = True,
                 max_reasoning_tokens: int | None = None):
        if model.tokenizer is None:
            raise ValueError("the agent needs a model with a tokenizer (its checkpoint ships tiktoken.model)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        context = scheduler.max_context if scheduler else (capacity or default_capacity(model)) - engine.DECODE_STEPS
        self.budget = context - max_new_tokens
        if self.budget < 1:
            raise ValueError(f"a context of {context} tokens leaves no room for a prompt with "
                             f"max_new_tokens={max_new_tokens}")
        self.scheduler = scheduler or conversation_scheduler(model, capacity, reuse)
        self.model, self.tools = model, tool_table(tools)
        self.enforced = [enforced_declaration(t) for t in self.tools.values()]
        self.tool_grammar = tool_grammar and (not self.enforced or any(map(grammar.is_strict, self.enforced)))
        if self.tool_grammar:
            self._tool_rules()  # GrammarError now, naming a tool that cannot be enforced
        self.max_reasoning_tokens = grammar.reasoning_budget(max_reasoning_tokens, None)
        self.sampling, self.max_new_tokens, self.tool_timeout = sampling, max_new_tokens, tool_timeout
        self.on_event = on_event or (lambda event: None)
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
        """One model turn: generate, append the reply, run its tool calls; (reply, finish reason)."""
        began, step = time.perf_counter(), len(self.steps)
        evicted, prompt = self._fit()
        reply_text, parser = Continuation(TextStream(self.model.tokenizer)), StreamParser()

        def take(out: Output) -> None:
            self._emit_deltas(step, parser.feed(reply_text.add(out)))

        request = Request(prompt, self.max_new_tokens, take, self.sampling, self.model._stop_ids(),
                          constraint=self._constraint(), logprobs=False)
        self.scheduler.run([request])
        if reply_text.finish == "error":
            raise RuntimeError(f"generation failed: {reply_text.error}")
        self._emit_deltas(step, parser.finish())
        reply = assistant_message(parser.output())
        self.messages.append(reply)
        for call in reply.get("tool_calls", []):
            self.on_event(Event("tool_call", step, call=call))
            result = run_tool_call(self.tools, call, self.tool_timeout)
            self.on_event(Event("tool_result", step, text=result, call=call))
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        reused = request.cached_tokens or 0
        self.steps.append(StepStats(len(prompt), reused, len(prompt) - reused, len(reply_text.ids), evicted,
                                    len(reply.get("tool_calls", [])), time.perf_counter() - began))
        return reply, reply_text.finish or "length"

    def _tool_rules(self, first_index: int = 0) -> str:
        """The tool-call grammar: calls to the declared tools, or (with none declared) no tool-call section."""
        return grammar.tool_calls_grammar(self.enforced, "auto" if self.enforced else "none", first_index=first_index)

    def _constraint(self) -> RowConstraint | None:
        """This step's constraint: the tool grammar (call ids counting on from the conversation's calls) and the
        reasoning budget; None when neither applies."""
        rules = self._tool_rules(call_count(self.messages)) if self.tool_grammar else None
        return grammar.row_constraints(self.model.tokenizer, self.model.config.vocab_size, rules,
                                       self.max_reasoning_tokens, 1)[0]

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
        raise ValueError(f"the latest step alone needs {len(prompt)} prompt tokens; a context of "
                         f"{self.scheduler.max_context} leaves {self.budget} beside max_new_tokens="
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


def run_agent(model: Engine, task: str, tools: Sequence[Callable[..., Any] | Tool] = (), max_steps: int = 300,
              **options: Any) -> AgentResult:
    """Solve `task` with `tools` in a fresh conversation: K2 Thinking's interleaved reasoning and tool calls.

    Options are Agent's: system, sampling, max_new_tokens, capacity, tool_timeout, reuse, on_event, scheduler,
    tool_grammar, max_reasoning_tokens.
    """
    return Agent(model, tools, **options).run(task, max_steps)
