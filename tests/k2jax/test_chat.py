"""K2 Thinking chat format: built-in renderer vs jinja (ours and HF's engine), and the output parsers."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from k2jax import chat
from k2jax.chat import Delta, ParsedOutput, StreamParser, parse_output

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MARKERS = [
    "<think>",
    "</think>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<|im_end|>",
    "[EOS]",
]

# ---------------------------------------------------------------- conversation generators


def plain_text(max_size: int) -> st.SearchStrategy[str]:
    """Text without chat.MARK, the one character conversations may not hold."""
    return st.text(st.characters(exclude_characters=chat.MARK), max_size=max_size)


texts = plain_text(30) | st.sampled_from(
    ["", "Hello!", "多语言 テキスト 🎉", "line\nbreak", '{"json": [1, 2]}', "<|im_end|>"]
)
names = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
json_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | plain_text(10)
)
json_values = st.recursive(
    json_leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(plain_text(8), c, max_size=3), max_leaves=8
)
argument_objects = st.dictionaries(plain_text(8), json_values, max_size=4)
call_ids = st.builds("functions.{}:{}".format, names, st.integers(0, 30)) | st.sampled_from(
    ["call_0", "toolu_01AbC", "get:3"]
)
contents = st.none() | texts | st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), max_size=3)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": call_ids,
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": names, "arguments": argument_objects | argument_objects.map(json.dumps)}
            ),
        }
    ),
    min_size=1,
    max_size=3,
)
tool_declarations = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": names, "description": texts, "parameters": st.dictionaries(names, json_values, max_size=4)}
            ),
        }
    ),
    max_size=3,
)


def with_optional(draw, message: dict, key: str, values: st.SearchStrategy) -> dict:
    """`message` with `key` set from `values`, or left out."""
    if draw(st.booleans()):
        message[key] = draw(values)
    return message


@st.composite
def conversations(draw) -> list[dict]:
    """Conversations with optional system prompt, plain turns, tool loops, names and reasoning."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(texts)})
    for _ in range(draw(st.integers(0, 4))):
        messages.append(with_optional(draw, {"role": "user", "content": draw(contents)}, "name", names | st.none()))
        for _ in range(draw(st.integers(0, 2))):
            calls = draw(tool_calls)
            messages.append(
                with_optional(
                    draw,
                    {"role": "assistant", "content": draw(contents), "tool_calls": calls},
                    "reasoning_content",
                    texts | st.none(),
                )
            )
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(contents)} for c in calls]
        if draw(st.booleans()):
            messages.append(
                with_optional(
                    draw, {"role": "assistant", "content": draw(contents)}, "reasoning_content", texts | st.none()
                )
            )
    return messages


# ---------------------------------------------------------------- rendering


@SETTINGS
@given(conversations(), tool_declarations | st.none(), st.booleans())
def test_builtin_renderer_equals_bundled_jinja(messages, tools, add_generation_prompt):
    builtin = chat.render(messages, tools, add_generation_prompt)
    assert builtin == chat.render(messages, tools, add_generation_prompt, template=chat.bundled_template())


@settings(max_examples=60, deadline=None)
@given(conversations(), tool_declarations | st.none(), st.booleans())
def test_bundled_jinja_renders_the_same_in_transformers(messages, tools, add_generation_prompt):
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    sorted_tools = chat.sort_keys_deep(tools) if tools else None
    [reference], _ = utils.render_jinja_template(
        conversations=[messages],
        tools=sorted_tools,
        chat_template=chat.bundled_template(),
        add_generation_prompt=add_generation_prompt,
    )
    assert chat.render(messages, tools, add_generation_prompt) == reference


def test_default_system_prompt_and_generation_prompt():
    expected = (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert chat.render([{"role": "user", "content": "Hi"}]) == expected
    assert chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == expected.removesuffix(
        "<|im_assistant|>assistant<|im_middle|>"
    )
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (
        chat.render(own, add_generation_prompt=False)
        == "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"
    )


def test_reasoning_dropped_before_last_plain_reply_and_kept_in_tool_loop():
    call = {
        "id": "functions.lookup:0",
        "type": "function",
        "function": {"name": "lookup", "arguments": {"q": "ü", "n": 2}},
    }
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": None, "reasoning_content": "need a lookup", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "functions.lookup:0", "content": "42"},
    ]
    expected = (
        "<|im_system|>system<|im_middle|>S<|im_end|>"
        "<|im_user|>user<|im_middle|>U1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>A1<|im_end|>"
        "<|im_user|>user<|im_middle|>U2<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>need a lookup</think>"
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.lookup:0"
        '<|tool_call_argument_begin|>{"q": "ü", "n": 2}'
        "<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.lookup:0\n42<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert chat.render(messages) == expected
    closed = messages + [{"role": "assistant", "content": "It is 42.", "reasoning_content": "done"}]
    assert "need a lookup" not in chat.render(closed) and "done" not in chat.render(closed)


def test_tools_are_declared_first_with_keys_sorted_recursively():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}},
            },
        }
    ]
    rendered = chat.render([{"role": "user", "content": "x"}], tools, add_generation_prompt=False)
    declared = (
        '[{"function": {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, '
        '"type": "object"}}, "type": "function"}]'
    )
    assert rendered.startswith(
        f"<|im_system|>tool_declare<|im_middle|>{declared}<|im_end|><|im_system|>system<|im_middle|>"
    )


@pytest.mark.parametrize(
    ("messages", "tools", "field"),
    [
        ("not a list", None, "messages"),
        ([{"content": "no role"}], None, "messages[0]"),
        ([{"role": "user", "content": 3}], None, "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], None, "messages[0].content[0]"),
        ([{"role": "tool", "content": "r"}], None, "messages[0].tool_call_id"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
            None,
            "messages[0].tool_calls[0]",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": 1}}]}],
            None,
            "messages[0].tool_calls[0].function.arguments",
        ),
        ([{"role": "user", "content": "x", "name": 5}], None, "messages[0].name"),
        ([{"role": "user", "content": "x"}], [1], "tools"),
    ],
)
def test_bad_messages_are_named_in_the_error(messages, tools, field):
    for template in (None, chat.bundled_template()):
        with pytest.raises(ValueError, match="^" + re.escape(field)):
            chat.render(messages, tools, template=template)


def test_jinja_is_sandboxed_and_syntax_errors_are_clear():
    with pytest.raises(ValueError, match="chat template"):
        chat.render([], template="{{ messages.append(1) }}")
    with pytest.raises(ValueError, match="chat template"):
        chat.render([], template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="line 1"):
        chat.render([], template="{% if %}")
    with pytest.raises(ValueError, match="nope"):
        chat.render([], template="{{ raise_exception('nope') }}")


# ---------------------------------------------------------------- parsing


def call(call_id: str, name: str, arguments: dict) -> dict:
    """An OpenAI-style tool call as the parser should return it."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def normalized(output: ParsedOutput) -> tuple:
    """ParsedOutput with arguments decoded, to compare JSON values rather than spellings."""
    calls = [call(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in output.tool_calls]
    assert all(c["type"] == "function" for c in output.tool_calls)
    return output.reasoning_content, output.content, calls


def section(*calls: tuple[str, str]) -> str:
    """A tool-calls section from (id, raw arguments) pairs."""
    body = "".join(f"<|tool_call_begin|>{i}<|tool_call_argument_begin|>{a}<|tool_call_end|>" for i, a in calls)
    return f"<|tool_calls_section_begin|>{body}<|tool_calls_section_end|>"


NESTED = {
    "query": 'say "hi" {not a brace}',
    "filters": {"tags": ["a", {"b": [1, 2, {"c": None}]}]},
    "emoji": "🎉 中文 ü",
}
WELL_FORMED = [
    ("<think>plan</think>Hello there.<|im_end|>", ("plan", "Hello there.", [])),
    ("Just content, no thinking.", (None, "Just content, no thinking.", [])),
    ("<think></think>", ("", "", [])),
    (
        "<think>two calls</think>"
        + section(("functions.get_weather:0", '{"city": "Paris"}'), ("functions.get_time:1", '{"tz": "CET"}'))
        + "<|im_end|>",
        (
            "two calls",
            "",
            [
                call("functions.get_weather:0", "get_weather", {"city": "Paris"}),
                call("functions.get_time:1", "get_time", {"tz": "CET"}),
            ],
        ),
    ),
    (
        "<think>nested</think>Let me search."
        + section(("functions.search:2", json.dumps(NESTED, ensure_ascii=False)))
        + "[EOS]",
        ("nested", "Let me search.", [call("functions.search:2", "search", NESTED)]),
    ),
    (
        "<think>optional params omitted</think>"
        + section(("functions.book:0", '{"room": "A"}'), ("functions.book:1", '{"room": "B", "late": true}')),
        (
            "optional params omitted",
            "",
            [
                call("functions.book:0", "book", {"room": "A"}),
                call("functions.book:1", "book", {"room": "B", "late": True}),
            ],
        ),
    ),
    (
        section(("get_weather:0", "{}"), (" call_abc123 ", '{"x": 1}'), ("functions.ns.tool:7", '{"s": "<|x|>"}')),
        (
            None,
            "",
            [
                call("get_weather:0", "get_weather", {}),
                call("call_abc123", "call_abc123", {"x": 1}),
                call("functions.ns.tool:7", "ns.tool", {"s": "<|x|>"}),
            ],
        ),
    ),
    (
        "<think>r</think>before" + section(("functions.a:0", '{"k": "v"}')) + "after<|im_end|>",
        ("r", "beforeafter", [call("functions.a:0", "a", {"k": "v"})]),
    ),
    ("<think>a<thin</think>x</thi", ("a<thin", "x</thi", [])),
    ("text <|im_end|> more", (None, "text <|im_end|> more", [])),
]
MALFORMED = [
    "<think>never closed, generation cut off",
    "<think>never closed<|im_end|>",
    "reasoning without an opening tag</think>content",
    "<think>r</think>"
    + "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>",
    "<think>r</think>" + section(("functions.f:0", '{"unterminated": ')),
    "<think>r</think>" + section(("functions.f:0", "[1, 2]")),
    "<think>r</think>" + section(("", "{}")),
    "<think>r</think>"
    + "<|tool_calls_section_begin|>junk"
    + "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
    "<think>r</think>"
    + "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_end|><|tool_calls_section_end|>",
]
MALFORMED_EXPECTED = [
    ("never closed, generation cut off", "", []),  # an unfinished think block is still reasoning
    ("never closed", "", []),
    (None, "reasoning without an opening tag</think>content", []),
    ("r", MALFORMED[3].removeprefix("<think>r</think>"), []),
    ("r", MALFORMED[4].removeprefix("<think>r</think>"), []),
    ("r", MALFORMED[5].removeprefix("<think>r</think>"), []),
    ("r", MALFORMED[6].removeprefix("<think>r</think>"), []),
    ("r", MALFORMED[7].removeprefix("<think>r</think>"), []),
    ("r", MALFORMED[8].removeprefix("<think>r</think>"), []),
]


@pytest.mark.parametrize(("text", "expected"), WELL_FORMED + list(zip(MALFORMED, MALFORMED_EXPECTED)))
def test_parse_output(text, expected):
    assert normalized(parse_output(text)) == expected


def stream(chunks: list[str]) -> tuple[list[Delta], ParsedOutput]:
    """Feed chunks to a StreamParser: all deltas and the final output."""
    parser = StreamParser()
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    return deltas, parser.output()


def accumulated(deltas: list[Delta]) -> ParsedOutput:
    """What a streaming client builds by concatenating deltas."""
    reasoning = [d.reasoning_content for d in deltas if d.reasoning_content]
    return ParsedOutput(
        "".join(reasoning) if reasoning else None,
        "".join(d.content for d in deltas),
        [c for d in deltas for c in d.tool_calls],
    )


def check_stream(text: str, chunks: list[str]) -> None:
    """A stream of `chunks` (joining to `text`) ends where the whole-text parse does; deltas add up to it."""
    whole = parse_output(text)
    deltas, final = stream(chunks)
    assert final == whole
    assert all(sum(map(bool, (d.reasoning_content, d.content, d.tool_calls))) == 1 for d in deltas)
    summed = accumulated(deltas)
    assert (summed.reasoning_content or None, summed.content, summed.tool_calls) == (
        whole.reasoning_content or None,
        whole.content,
        whole.tool_calls,
    )


@pytest.mark.parametrize("text", [t for t, _ in WELL_FORMED] + MALFORMED)
def test_stream_split_at_every_boundary(text):
    for i in range(len(text) + 1):
        check_stream(text, [text[:i], text[i:]])
    check_stream(text, list(text))
    for i in range(0, len(text), 3):
        check_stream(text, [text[:i], text[i : i + 5], text[i + 5 :]])


def test_stream_reasoning_is_sent_before_the_think_block_closes():
    parser = StreamParser()
    assert parser.feed("<think>step one, ") == [Delta(reasoning_content="step one, ")]
    assert parser.feed("step two</th") == [Delta(reasoning_content="step two")]
    assert parser.feed("ink>Answer") == [Delta(content="Answer")]
    assert parser.feed("<|im_end|>") == []
    assert parser.finish() == []
    assert parser.output() == ParsedOutput("step one, step two", "Answer", [])


def test_stream_unclosed_think_stays_reasoning():
    parser = StreamParser()
    assert parser.feed("<think>cut") == [Delta(reasoning_content="cut")]
    assert parser.feed(" off</thi") == [Delta(reasoning_content=" off")]
    assert parser.finish() == [Delta(reasoning_content="</thi")]
    assert parser.output() == ParsedOutput("cut off</thi", "", [])


fragments = st.lists(
    st.sampled_from(MARKERS) | st.text(max_size=6) | st.sampled_from(['{"a": 1}', "functions.f:0", "{", "}", " "]),
    max_size=14,
)


@SETTINGS
@given(fragments, st.data())
def test_arbitrary_output_never_raises_and_streams_consistently(parts, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    check_stream(text, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])


@SETTINGS
@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.lists(st.tuples(names, st.integers(0, 99), argument_objects), max_size=3),
    st.sampled_from(["", "<|im_end|>", "[EOS]"]),
)
def test_rendered_assistant_turn_parses_back(reasoning, content, calls, stop):
    assume(not any(m in s for m in MARKERS for s in (reasoning, content)))
    tool_calls = [call(f"functions.{n}:{i}", n, a) for n, i, a in calls]
    sent = [
        {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
        for c in tool_calls
    ]
    text = f"<think>{reasoning}</think>{content}" + (chat.render_tool_calls(sent) if sent else "") + stop
    assert normalized(parse_output(text)) == (reasoning, content, tool_calls)


# ---------------------------------------------------------------- call ids from OpenAI-style clients


def openai_call(call_id: str, name: str, arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_client_call_ids_are_renumbered_in_k2_form_and_results_follow():
    history = [
        {"role": "user", "content": "Weather in Paris and Rome, then the time?"},
        {"role": "assistant", "content": None, "tool_calls": [openai_call("call_abc123", "weather"),
                                                              openai_call("toolu_01XyZ", "weather")]},
        {"role": "tool", "tool_call_id": "toolu_01XyZ", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "rain"},
        {"role": "assistant", "content": "", "tool_calls": [openai_call("functions.clock:2", "clock")]},
        {"role": "tool", "tool_call_id": "functions.clock:2", "content": "noon"},
        {"role": "assistant", "content": "", "tool_calls": [openai_call("call_0", "clock")]},  # ids reused per turn,
        {"role": "tool", "tool_call_id": "call_0", "content": "one"},
        {"role": "assistant", "content": "", "tool_calls": [openai_call("call_0", "weather")]},  # as some clients do
        {"role": "tool", "tool_call_id": "call_0", "content": "snow"},
    ]
    normal = chat.normalize_call_ids(history)
    ids = [c["id"] for m in normal for c in m.get("tool_calls") or []]
    assert ids == ["functions.weather:0", "functions.weather:1", "functions.clock:2", "functions.clock:3",
                   "functions.weather:4"]
    results = [(m["tool_call_id"], m["content"]) for m in normal if m["role"] == "tool"]
    assert results == [("functions.weather:1", "sunny"), ("functions.weather:0", "rain"),
                       ("functions.clock:2", "noon"), ("functions.clock:3", "one"), ("functions.weather:4", "snow")]
    assert chat.call_count(normal) == 5 and history[1]["tool_calls"][0]["id"] == "call_abc123"  # input untouched
    prompt = chat.render(normal)
    assert "call_abc" not in prompt and "call_0" not in prompt and "toolu" not in prompt
    assert "## Return of functions.weather:0\nrain" in prompt


def test_k2_ids_map_to_themselves_and_earlier_turns_render_the_same():
    """Ids this server returned come back unchanged, so each turn's prompt extends the last one's (prefix reuse)."""
    turn1 = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "", "tool_calls": [openai_call("call_x", "f")]},
             {"role": "tool", "tool_call_id": "call_x", "content": "1"}]
    turn2 = turn1 + [{"role": "assistant", "content": "", "tool_calls": [openai_call("functions.f:1", "f"),
                                                                          openai_call("functions.g:7", "f")]},
                     {"role": "tool", "tool_call_id": "functions.g:7", "content": "2"}]
    first, second = chat.normalize_call_ids(turn1), chat.normalize_call_ids(turn2)
    assert second[: len(first)] == first
    assert [c["id"] for c in second[3]["tool_calls"]] == ["functions.f:1", "functions.f:2"]  # g is not f's id
    assert second[4]["tool_call_id"] == "functions.f:2"
    assert chat.render(second, add_generation_prompt=False).startswith(chat.render(first, add_generation_prompt=False))
