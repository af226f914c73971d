"""A tool-calling round trip with the bundled model through the server and the official `openai` client.

The model is asked a question from its training distribution with the tools it was trained on: it must answer with
a streamed, parsed tool call; the tool's result goes back; the answer streams with its reasoning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import k2jax
from k2jax.scheduler import Scheduler
from k2jax.server import BackgroundServer, Service, create_app

openai = pytest.importorskip("openai")
make_corpus = pytest.importorskip("tools.make_corpus")

BUNDLED = Path(k2jax.__file__).parent / "bundled"
NAME = "bundled"
TIMEOUT_S = 300.0
pytestmark = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="the bundled model is not installed")


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
