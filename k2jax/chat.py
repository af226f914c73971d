"""The K2 Thinking chat format: conversations -> prompt text, and generated text -> reasoning, content, tool calls."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
IM_END = "<|im_end|>"
IM_MIDDLE = "<|im_middle|>"
STOP_MARKERS = (IM_END, "[EOS]")
ROLE_TAGS = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}
SYSTEM_TAG = "<|im_system|>"
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"
TEMPLATE_RESOURCE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")
# A Unicode noncharacter, refused in conversations: it brackets user text in a marked prompt (see mark) and is
# inserted into every reserved-token name inside user text, so that only the template's own names become tokens.
MARK = "\ufdd0"

Message = Mapping[str, Any]


# ---------------------------------------------------------------- rendering


def bundled_template() -> str:
    """The jinja template of the K2 Thinking format shipped with k2jax (same output as the built-in renderer)."""
    return resources.files("k2jax").joinpath(TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def sort_keys_deep(value: Any) -> Any:
    """`value` with every dict's keys sorted, recursively, as Kimi's tokenizer does to tools before rendering."""
    if isinstance(value, Mapping):
        return {key: sort_keys_deep(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [sort_keys_deep(v) for v in value]
    return value


def check_content(content: Any, where: str) -> None:
    """Reject content that is neither None, a string, nor a list of text parts (the model reads text only)."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: must be a string, a list of text parts, or null, got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"{where}[{j}]: only {{'type': 'text', 'text': str}} parts are supported (K2 Thinking reads text only)"
            )


def check_optional_str(message: Message, key: str, where: str) -> None:
    """Reject a field that is present but neither a string nor null."""
    if message.get(key) is not None and not isinstance(message[key], str):
        raise ValueError(f"{where}.{key}: must be a string, got {type(message[key]).__name__}")


def check_tool_call(call: Any, where: str) -> None:
    """Reject a tool call that is not {id: str, function: {name: str, arguments: str | dict}}."""
    if not isinstance(call, Mapping) or not isinstance(call.get("id"), str):
        raise ValueError(f"{where}: needs a string 'id' (K2 uses 'functions.NAME:IDX')")
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where}.function: needs a string 'name'")
    if not isinstance(function.get("arguments"), (str, Mapping)):
        raise ValueError(f"{where}.function.arguments: must be a JSON string or an object")


def check_message(message: Any, i: int) -> None:
    """Reject a message the K2 format cannot render, naming the offending field."""
    where = f"messages[{i}]"
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise ValueError(f"{where}: must be an object with a string 'role'")
    if message["role"] not in ROLES:
        raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}, got {message['role']!r}")
    check_unmarked(message, where)
    check_content(message.get("content"), f"{where}.content")
    for key in ("name", "reasoning_content"):
        check_optional_str(message, key, where)
    if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise ValueError(f"{where}.tool_call_id: a tool result needs the string id of the call it answers")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where}.tool_calls: must be a list")
    for j, call in enumerate(calls):
        check_tool_call(call, f"{where}.tool_calls[{j}]")


def check_tools(tools: Any) -> None:
    """Reject tools that are not a list of JSON objects."""
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools: must be a list of objects (OpenAI-style function declarations)")
    check_unmarked(tools, "tools")


def check_unmarked(value: Any, where: str) -> None:
    """Reject MARK anywhere in a message or tool (keys and strings, at any depth), naming where it is."""
    if isinstance(value, str):
        if MARK in value:
            raise ValueError(f"{where}: contains U+FDD0, a Unicode noncharacter that k2jax reserves")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_unmarked(key, f"{where} (a key)")
            check_unmarked(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            check_unmarked(item, f"{where}[{j}]")


# ---------------------------------------------------------------- user text as data


@lru_cache(maxsize=8)
def names_pattern(names: frozenset[str]) -> re.Pattern[str] | None:
    """A regex for these reserved-token names, longest first as the tokenizer matches them (None: no names).

    Names shorter than two characters cannot be defused by a MARK inside them, so they are left out: such a
    name never becomes its id in a chat prompt.
    """
    usable = sorted((n for n in names if len(n) >= 2 and MARK not in n), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, usable))) if usable else None


def defuse(text: str, names: frozenset[str]) -> str:
    """`text` with MARK after the first character of every reserved-token name in it, until none is left."""
    pattern = names_pattern(names)
    while pattern is not None and (out := pattern.sub(lambda m: m[0][0] + MARK + m[0][1:], text)) != text:
        text = out
    return text


def mark(text: str, names: frozenset[str]) -> str:
    """User text as data in a prompt: names defused, MARK at both ends so no name forms across its edges."""
    return f"{MARK}{defuse(text, names)}{MARK}" if text else text


def unmark(text: str) -> str:
    """A marked prompt as plain text."""
    return text.replace(MARK, "")


def defuse_tree(value: Any, names: frozenset[str]) -> Any:
    """A JSON value (tools, tool-call arguments) with every key and string defused."""
    if isinstance(value, str):
        return defuse(value, names)
    if isinstance(value, Mapping):
        return {defuse(key, names) if isinstance(key, str) else key: defuse_tree(item, names)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [defuse_tree(item, names) for item in value]
    return value


def mark_call(call: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """A tool call with its id, function name and arguments marked as user text."""
    function = call["function"]
    arguments = function["arguments"]
    return {**call, "id": mark(call["id"], names), "function": {
        **function, "name": mark(function["name"], names),
        "arguments": mark(arguments, names) if isinstance(arguments, str) else defuse_tree(arguments, names)}}


def mark_message(message: Message, names: frozenset[str]) -> dict[str, Any]:
    """A (checked) message with every piece of its text marked: content, name, reasoning, tool-call ids and calls."""
    out = dict(message)
    for key in ("content", "name", "reasoning_content", "tool_call_id"):
        if isinstance(out.get(key), str):
            out[key] = mark(out[key], names)
    if isinstance(out.get("content"), (list, tuple)):
        out["content"] = [{**part, "text": mark(part["text"], names)} for part in out["content"]]
    if out.get("tool_calls"):
        out["tool_calls"] = [mark_call(c, names) for c in out["tool_calls"]]
    return out


def content_text(message: Message) -> str:
    """A message's content as one string (text parts joined)."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content)


def arguments_text(arguments: str | Mapping[str, Any]) -> str:
    """Tool-call arguments as rendered: a string verbatim, an object as JSON (HF's tojson)."""
    return arguments if isinstance(arguments, str) else tojson(arguments)


def render_tool_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant's tool-calls section."""
    rendered = (
        f"{CALL_BEGIN}{c['id']}{ARGUMENT_BEGIN}{arguments_text(c['function']['arguments'])}{CALL_END}" for c in calls
    )
    return SECTION_BEGIN + "".join(rendered) + SECTION_END


def render_turn(role_tag: str, name: str, body: str) -> str:
    """One `<|im_x|>name<|im_middle|>body<|im_end|>` turn."""
    return f"{role_tag}{name}{IM_MIDDLE}{body}{IM_END}"


def message_body(message: Message, keep_reasoning: bool) -> str:
    """What goes between <|im_middle|> and <|im_end|> for one message."""
    role = message["role"]
    if role == "tool":
        return f"## Return of {message['tool_call_id']}\n{content_text(message)}"
    if role != "assistant":
        return content_text(message)
    reasoning = (message.get("reasoning_content") or "") if keep_reasoning else ""
    calls = render_tool_calls(message["tool_calls"]) if message.get("tool_calls") else ""
    return f"{THINK_BEGIN}{reasoning}{THINK_END}{content_text(message)}{calls}"


def last_plain_assistant(messages: Sequence[Message]) -> int:
    """Index of the last assistant message without tool calls (-1 if none): reasoning up to it is dropped."""
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")), default=-1)


def render_builtin(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool
) -> str:
    """The K2 Thinking prompt rendered in Python (used when a checkpoint ships no template)."""
    head = [render_turn(SYSTEM_TAG, "tool_declare", tojson(tools))] if tools else []
    if not messages or messages[0]["role"] != "system":
        head.append(render_turn(SYSTEM_TAG, "system", DEFAULT_SYSTEM_PROMPT))
    keep_from = last_plain_assistant(messages) + 1
    turns = [
        render_turn(ROLE_TAGS.get(m["role"], SYSTEM_TAG), m.get("name") or m["role"], message_body(m, i >= keep_from))
        for i, m in enumerate(messages)
    ]
    return "".join(head + turns + ([GENERATION_PROMPT] if add_generation_prompt else []))


def tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON as Hugging Face's chat templates define the tojson filter (no HTML escaping, unicode kept).

    With ensure_ascii, MARK stays a character (its \\u escape would survive unmark as text).
    """
    text = json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    return _NON_ASCII.sub(_ascii_escape, text) if ensure_ascii else text


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _ascii_escape(match: re.Match[str]) -> str:
    """json's \\u escape of one non-ASCII character (MARK is kept)."""
    return match[0] if match[0] == MARK else json.dumps(match[0])[1:-1]


def raise_exception(message: str) -> None:
    """The raise_exception() global HF chat templates call to reject a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(format: str) -> str:
    """The strftime_now() global HF chat templates may call for today's date."""
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str, where: str = "chat template") -> jinja2.Template:
    """A chat template compiled in a sandbox with HF's settings, filters and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}, line {e.lineno}: {e.message}") from None


def render_jinja(
    template: str,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    **variables: Any,
) -> str:
    """A conversation rendered by a jinja chat template in a sandboxed environment."""
    try:
        return compile_template(template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def render_marked(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    names: frozenset[str] = frozenset(),
    **variables: Any,
) -> str:
    """A conversation's prompt with its user text marked (see mark; `names`: the reserved-token names to defuse).

    Checked, tools key-sorted, rendered by `template` or the built-in renderer. Tokenizer.encode_marked turns it
    into ids where only names the template itself wrote become reserved tokens.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError("messages: must be a list of message objects")
    for i, message in enumerate(messages):
        check_message(message, i)
    if tools:
        check_tools(tools)
    marked = [mark_message(m, names) for m in messages]
    sorted_tools = defuse_tree(sort_keys_deep(tools), names) if tools else None
    if template is None:
        return render_builtin(marked, sorted_tools, add_generation_prompt)
    return render_jinja(template, marked, sorted_tools, add_generation_prompt, **variables)


def render(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **variables: Any,
) -> str:
    """Prompt text for a conversation: checked, tools key-sorted, rendered by `template` or the built-in renderer.

    Encoding this text with reserved tokens allowed would turn names inside user text into tokens: token ids come
    from Tokenizer.apply_chat_template(tokenize=True), which keeps them text.
    """
    return unmark(render_marked(messages, tools, add_generation_prompt, template, **variables))


# ---------------------------------------------------------------- tool-call ids


def call_id(name: str, index: int) -> str:
    """K2's id of a tool call: functions.NAME:IDX, IDX counting the conversation's calls from 0."""
    return f"functions.{name}:{index}"


def is_call_id(value: str, name: str) -> bool:
    """Whether `value` is K2's id form for a call of function `name`."""
    head = f"functions.{name}:"
    return value.startswith(head) and value[len(head):].isdigit() and value[len(head):].isascii()


def call_parts(call: Any) -> tuple[str, str] | None:
    """A tool call's (id, function name), or None if it lacks either (the renderer's checks report that)."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if isinstance(function, Mapping) and isinstance(call.get("id"), str) and isinstance(function.get("name"), str):
        return call["id"], function["name"]
    return None


def normalize_call_ids(messages: Sequence[Message]) -> list[Message]:
    """Messages whose tool-call ids are all in K2's form, for histories from OpenAI-style clients (`call_abc123`).

    A call whose id is not functions.NAME:IDX (NAME its own function) gets functions.NAME:IDX, IDX its position
    among the conversation's calls, which is also what K2 itself numbers; tool results follow their call's new id
    (a reused id means its latest call). Ids already in K2's form are kept, so ids this server returned map to
    themselves and a conversation renders the same on every turn.
    """
    out: list[Message] = []
    renamed: dict[str, str] = {}
    count = 0
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, Mapping) else None
        if isinstance(calls, (list, tuple)):
            new_calls = []
            for call in calls:
                parts = call_parts(call)
                if parts is not None:
                    old, name = parts
                    renamed[old] = old if is_call_id(old, name) else call_id(name, count)
                    call = {**call, "id": renamed[old]}
                    count += 1
                new_calls.append(call)
            message = {**message, "tool_calls": new_calls}
        elif isinstance(message, Mapping) and message.get("tool_call_id") in renamed:
            message = {**message, "tool_call_id": renamed[message["tool_call_id"]]}
        out.append(message)
    return out


def call_count(messages: Sequence[Message]) -> int:
    """Tool calls in a conversation: the IDX of the next call K2 makes."""
    calls = (m.get("tool_calls") for m in messages if isinstance(m, Mapping))
    return sum(len(c) for c in calls if isinstance(c, (list, tuple)))


# ---------------------------------------------------------------- parsing

_CALL = re.compile(
    re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(ARGUMENT_BEGIN) + r"(.*?)" + re.escape(CALL_END), re.DOTALL
)
_CALL_ID = re.compile(r"(?:functions\.)?(.+):\d+", re.DOTALL)


@dataclass
class ParsedOutput:
    """Generated text split OpenAI-style: reasoning (None without a think block), content, tool calls."""

    reasoning_content: str | None = None
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    """One streaming increment; exactly one of its fields is non-empty."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()


def tool_name(call_id: str) -> str:
    """The function name in a K2 tool-call id: 'functions.NAME:IDX' or 'NAME:IDX'; any other id is its own name."""
    match = _CALL_ID.fullmatch(call_id)
    return match.group(1) if match else call_id.removeprefix("functions.")


def parse_call(call_id: str, arguments: str) -> dict[str, Any] | None:
    """An OpenAI-style tool call, or None when the id is empty or the arguments are not a JSON object."""
    call_id, arguments = call_id.strip(), arguments.strip()
    try:
        valid = isinstance(json.loads(arguments), dict)
    except ValueError:
        valid = False
    name = tool_name(call_id)
    if not valid or not name or "<|" in call_id:
        return None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_section(section: str) -> list[dict[str, Any]] | None:
    """The tool calls of one complete tool-calls section (markers included), or None if it is malformed."""
    body = section[len(SECTION_BEGIN) : -len(SECTION_END)]
    calls, position = [], 0
    for match in _CALL.finditer(body):
        call = parse_call(match.group(1), match.group(2))
        if call is None or body[position : match.start()].strip():
            return None
        calls.append(call)
        position = match.end()
    return calls if not body[position:].strip() else None


def held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a marker or could still grow into one."""
    return max(
        (n for marker in markers for n in range(min(len(marker), len(text)), 0, -1) if marker.startswith(text[-n:])),
        default=0,
    )


def strip_stop(text: str) -> str:
    """`text` without one trailing stop marker (<|im_end|> or [EOS])."""
    return next((text[: -len(m)] for m in STOP_MARKERS if text.endswith(m)), text)


class StreamParser:
    """Splits generated text into reasoning / content / tool-call deltas as it arrives.

    Text is held back only while it may still be a marker; a tool-calls section is emitted when it closes.
    A malformed section becomes content. A <think> that never closes (generation cut inside it) stays reasoning.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "start"
        self._output = ParsedOutput()
        self._finished = False

    def feed(self, text: str) -> list[Delta]:
        """Deltas that `text`, appended to what came before, makes certain."""
        if self._finished:
            raise RuntimeError("StreamParser.feed() after finish()")
        self._buffer += text
        deltas: list[Delta] = []
        while (delta := self._step()) is not None:
            if delta != Delta():
                deltas.append(self._record(delta))
        return deltas

    def finish(self) -> list[Delta]:
        """Deltas for the held-back tail once generation has ended."""
        if self._finished:
            return []
        self._finished = True
        tail = strip_stop(self._buffer)
        self._buffer = ""
        if not tail:
            return []
        return [self._record(Delta(reasoning_content=tail) if self._state == "reasoning" else Delta(content=tail))]

    def output(self) -> ParsedOutput:
        """Everything parsed so far (the final result once finish() has run)."""
        return self._output

    def _record(self, delta: Delta) -> Delta:
        """Add `delta` to the accumulated output and return it."""
        out = self._output
        if delta.reasoning_content:
            out.reasoning_content = (out.reasoning_content or "") + delta.reasoning_content
        out.content += delta.content
        out.tool_calls.extend(delta.tool_calls)
        return delta

    def _take(self, n: int) -> str:
        """Remove and return the first n characters of the buffer."""
        head, self._buffer = self._buffer[:n], self._buffer[n:]
        return head

    def _step(self) -> Delta | None:
        """Advance the state machine once: a (possibly empty) delta, or None when it needs more text."""
        buffer = self._buffer
        if self._state == "start":
            if buffer.startswith(THINK_BEGIN):
                self._take(len(THINK_BEGIN))
                self._state, self._output.reasoning_content = "reasoning", ""
                return Delta()
            if THINK_BEGIN.startswith(buffer):
                return None
            self._state = "content"
            return Delta()
        if self._state == "reasoning":
            end = buffer.find(THINK_END)
            if end < 0:
                safe = len(buffer) - held_suffix(buffer, [THINK_END, *STOP_MARKERS])
                return Delta(reasoning_content=self._take(safe)) if safe else None
            reasoning = self._take(end)
            self._take(len(THINK_END))
            self._state = "content"
            return Delta(reasoning_content=reasoning)
        if self._state == "content":
            begin = buffer.find(SECTION_BEGIN)
            if begin >= 0:
                self._state = "section"
                return Delta(content=self._take(begin))
            safe = len(buffer) - held_suffix(buffer, [SECTION_BEGIN, *STOP_MARKERS])
            return Delta(content=self._take(safe)) if safe else None
        end = buffer.find(SECTION_END)
        if end < 0:
            return None
        section = self._take(end + len(SECTION_END))
        self._state = "content"
        calls = parse_section(section)
        return Delta(content=section) if calls is None else Delta(tool_calls=tuple(calls))


def parse_output(text: str) -> ParsedOutput:
    """Split a whole generated text into reasoning, content and tool calls; malformed parts become content."""
    parser = StreamParser()
    parser.feed(text)
    parser.finish()
    return parser.output()
