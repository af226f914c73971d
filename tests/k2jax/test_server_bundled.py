"""Tool calling with the bundled model through the server and the official `openai` client.

A question from its training distribution with the tools it was trained on: it must answer with a streamed, parsed
tool call; the tool's result goes back; the answer streams with its reasoning. Then enforcement (k2jax.grammar) with
tools it never saw: every returned call is declared, valid and numbered K2's way, and tool_choice holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import k2jax
from k2jax.scheduler import Scheduler
from k2jax.server import BackgroundServer, create_app
from k2jax.service import Service
from k2jax.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
make_corpus = pytest.importorskip("tools.make_corpus")

BUNDLED = Path(k2jax.__file__).parent / "bundled"
NAME = "bundled"
TIMEOUT_S = 300.0
pytestmark = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="the bundled model is not installed")


TOKENIZER = Tokenizer.from_dir(BUNDLED) if (BUNDLED / "config.json").exists() else None


@pytest.fixture(scope="module")
def client():
    model = k2jax.load(BUNDLED)
    scheduler = Scheduler(model, n_slots=2, max_context=1024, warmup=False).start()
    with BackgroundServer(create_app(Service(model, scheduler, NAME))) as http:
        yield openai.OpenAI(base_url=http.url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    scheduler.close()


def stream_turn(client, messages: list[dict], max_tokens: int = 128, **kw) -> tuple[str, str, list[dict], str, int]:
    """One streamed chat turn: (content, reasoning, tool calls assembled from deltas, finish reason, tokens)."""
    content, reasoning, calls, finish, tokens = "", "", {}, None, 0
    for chunk in client.chat.completions.create(model=NAME, messages=messages, tools=make_corpus.TOOLS, stream=True,
                                                stream_options={"include_usage": True}, temperature=0,
                                                max_tokens=max_tokens, **kw):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
        finish = chunk.choices[0].finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish, tokens


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    content, reasoning, calls, finish, tokens = stream_turn(client, messages)
    assert finish == "tool_calls" and reasoning and 0 < tokens <= 128
    assert len(calls) >= 1 and calls[0]["name"] in {t["function"]["name"] for t in make_corpus.TOOLS}
    arguments = json.loads(calls[0]["arguments"])
    assert isinstance(arguments, dict) and calls[0]["id"].startswith(f"functions.{calls[0]['name']}:")

    whole = client.chat.completions.create(model=NAME, messages=messages, tools=make_corpus.TOOLS, temperature=0,
                                           max_tokens=128).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.tool_calls[0].function.arguments == calls[0]["arguments"]

    result = make_corpus.run_tool(calls[0]["name"], arguments)
    messages += [{"role": "assistant", "content": content, "reasoning_content": reasoning,
                  "tool_calls": [{"id": calls[0]["id"], "type": "function",
                                  "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": result}]
    answer, answer_reasoning, more_calls, finish, _ = stream_turn(client, messages)
    assert finish == "stop" and answer.strip() and answer_reasoning and not more_calls


def test_tool_choice_none_never_calls(client):
    _, _, calls, finish, _ = stream_turn(client, [{"role": "user", "content": "What is the capital of Japan?"}],
                                         max_tokens=48, tool_choice="none")
    assert not calls and finish in ("stop", "length")


def test_reasoning_cut_by_max_tokens_stays_reasoning(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    content, reasoning, calls, finish, tokens = stream_turn(client, messages, max_tokens=6)
    whole = client.chat.completions.create(model=NAME, messages=messages, tools=make_corpus.TOOLS, temperature=0,
                                           max_tokens=6).choices[0]
    assert finish == whole.finish_reason == "length" and tokens == 6 and not calls
    assert reasoning and reasoning == whole.message.reasoning_content  # the unfinished think block, in both modes
    assert content == "" and not whole.message.content and "<think>" not in reasoning


# ---------------------------------------------------------------- enforced tool calls, tools the model never saw

UNSEEN = [
    {"type": "function", "function": {"name": "multiply", "description": "Multiply two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "capital_of", "description": "The capital city of a nation.",
                                      "parameters": {"type": "object", "properties": {"nation": {"type": "string"}},
                                                     "required": ["nation"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "length_in", "description": "Convert a length.", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["amount", "unit"],
        "properties": {"amount": {"type": "number"}, "unit": {"type": "string", "enum": ["m", "km", "mi"]}}}}},
]
QUESTIONS = ["What is 37 times 41?", "What is the capital of Kenya?", "How many miles is 12 km?"]


def check_calls(choice, tools: list[dict], first_index: int = 0) -> None:
    """Every returned call parses, names a declared tool, validates against its schema and has K2's running id;
    finish_reason is tool_calls exactly when there are calls."""
    calls = choice.message.tool_calls or []
    assert (choice.finish_reason == "tool_calls") == bool(calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for k, call in enumerate(calls):
        assert call.function.name in schemas and call.id == f"functions.{call.function.name}:{first_index + k}"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_enforced_calls_are_declared_and_valid_at_temperature_1(client):
    called = 0
    for seed, question in enumerate(QUESTIONS):
        out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                             tools=UNSEEN, temperature=1.0, seed=seed, n=4, max_tokens=96)
        for choice in out.choices:
            check_calls(choice, UNSEEN)
            called += bool(choice.message.tool_calls)
    assert called >= 6  # the model does call: the checks above ran on real calls


def test_tool_choice_none_required_named_and_one_call(client):
    def ask(question: str, **kw):
        return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                              tools=UNSEEN, max_tokens=96, **kw).choices
    for choice in ask("What is the capital of Kenya?", tool_choice="none", temperature=1.0, seed=1, n=4):
        assert not choice.message.tool_calls and "<|tool_call" not in (choice.message.content or "")
    # The model answers an echo request without a tool; "required" makes it call one anyway.
    [plain] = ask("Repeat exactly: blue sky 12", temperature=0)
    [forced] = ask("Repeat exactly: blue sky 12", temperature=0, tool_choice="required")
    assert not plain.message.tool_calls and forced.message.tool_calls
    check_calls(forced, UNSEEN)
    named = {"type": "function", "function": {"name": "capital_of"}}
    for choice in ask("What is 37 times 41?", tool_choice=named, temperature=1.0, seed=2, n=3):
        assert [c.function.name for c in choice.message.tool_calls] == ["capital_of"]
        check_calls(choice, UNSEEN)
    for choice in ask("What is 37 times 41?", parallel_tool_calls=False, temperature=1.0, seed=3, n=3):
        assert len(choice.message.tool_calls or []) <= 1
        check_calls(choice, UNSEEN)


def test_strict_false_opts_out(client):
    """The issue's case: asked for a product with only `multiply` declared, the unenforced model does not call it (it
    calls a tool from its training or none: which depends on the weights); enforced, it calls multiply."""
    messages = [{"role": "user", "content": "What is 37 times 41?"}]
    loose = [{"type": "function", "function": {**UNSEEN[0]["function"], "strict": False}}]
    free = client.chat.completions.create(model=NAME, messages=messages, tools=loose, temperature=0, max_tokens=96)
    strict = client.chat.completions.create(model=NAME, messages=messages, tools=UNSEEN[:1], temperature=0,
                                            max_tokens=96)  # a call after reasoning of up to ~60 tokens
    assert [c.function.name for c in free.choices[0].message.tool_calls or []] != ["multiply"]
    assert [c.function.name for c in strict.choices[0].message.tool_calls] == ["multiply"]
    check_calls(strict.choices[0], UNSEEN[:1])


def test_history_ids_from_a_client_and_the_next_call_id(client):
    history = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_9f8e7d", "type": "function",
                    "function": {"name": "lookup_capital", "arguments": '{"country": "France"}'}}]},
               {"role": "tool", "tool_call_id": "call_9f8e7d", "content": "Paris"},
               {"role": "user", "content": "And the capital of Peru?"}]
    out = client.chat.completions.create(model=NAME, messages=history, tools=make_corpus.TOOLS, temperature=0,
                                         max_tokens=64, tool_choice="required")
    check_calls(out.choices[0], make_corpus.TOOLS, first_index=1)


def test_reasoning_budget_ends_reasoning(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for extra in ({"max_reasoning_tokens": 3}, {"reasoning_effort": "low"}):
        out = client.chat.completions.create(model=NAME, messages=messages, tools=make_corpus.TOOLS, temperature=0,
                                             max_tokens=64, extra_body=extra).choices[0]
        reasoning = out.message.reasoning_content or ""
        assert "</think>" not in (out.message.content or "") and "<|tool_call" not in reasoning
        if "max_reasoning_tokens" in extra:
            assert len(TOKENIZER.encode(reasoning, allow_special=False)) == 3
        check_calls(out, make_corpus.TOOLS)
