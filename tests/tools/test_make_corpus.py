"""The offline corpus: echo drills repeat the user's text verbatim in the K2 chat format and stay in training; tool
chats with tools drawn at random call a declared tool with arguments copied from the question, valid against its
schema, and share no tool name, parameter name or description with the held-out tool-call benchmark."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import jsonschema

from k2jax import chat
from tools import make_corpus

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "tool_calls.py"


def benchmark_module() -> ModuleType:
    """benchmarks/tool_calls.py, imported from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tool_calls_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_echo_drill_answers_with_the_users_text_verbatim() -> None:
    rng = random.Random(random.randrange(2**32))
    for _ in range(20):
        drill = make_corpus.echo_drill(rng)
        asked, answer = drill.rsplit(chat.THINK_END, 1)
        text = answer.removesuffix(chat.IM_END)
        assert answer.endswith(chat.IM_END) and text and chat.IM_END not in text
        user_turn = asked.split("<|im_user|>user<|im_middle|>")[1].split(chat.IM_END)[0]
        assert user_turn.endswith(text)  # every request puts the text last
        assert chat.parse_output(text).content == text


def test_echo_and_tool_drills_are_training_documents_only() -> None:
    plain = make_corpus.make_corpus(0, code_chars=20_000, n_chats=10, n_heldout_chats=5)
    drilled = make_corpus.make_corpus(0, code_chars=20_000, n_chats=10, n_heldout_chats=5, n_echoes=7, n_tool_chats=9)
    assert len(drilled.train) == len(plain.train) + 7 + 9 and sorted(drilled.heldout) == sorted(plain.heldout)
    assert sum("repeated exactly" in doc for doc in drilled.train) >= 7
    demo_tools = '"name": "lookup_capital"'  # declared by the demo chats and some echo drills, never drawn at random
    assert sum("<|im_system|>tool_declare" in doc and demo_tools not in doc for doc in drilled.train) == 9


def test_random_tool_tasks_copy_the_question_into_schema_valid_arguments() -> None:
    rng = random.Random(random.randrange(2**32))
    kinds: set[str] = set()
    for _ in range(300):
        tools, makers = make_corpus.random_toolset(rng)
        assert 1 <= len(tools) <= 3 and len({t["function"]["name"] for t in tools}) == len(tools)
        for tool, maker in zip(tools, makers):
            task = maker(rng)
            assert task.tool is tool
            parameters = tool["function"]["parameters"]
            jsonschema.Draft202012Validator(parameters).validate(task.arguments)
            assert list(task.arguments) == parameters["required"] == list(parameters["properties"])
            for name, value in task.arguments.items():
                schema = parameters["properties"][name]
                kinds.add("enum" if "enum" in schema else schema["type"])
                if schema["type"] == "boolean" or (isinstance(value, str) and value in make_corpus.UNIT_NAMES):
                    continue  # said as yes/no/on/off, or a unit said by its long name
                said = make_corpus.format_number(value) if isinstance(value, (int, float)) else value
                assert said in task.question, (said, task.question)
    assert kinds == {"integer", "number", "string", "boolean", "enum"}


def test_random_tool_chat_calls_a_declared_tool_at_any_place_with_running_ids() -> None:
    rng = random.Random(random.randrange(2**32))
    places, histories, echoes = set(), 0, 0
    for _ in range(200):
        doc = make_corpus.random_tool_chat(rng)
        tools = json.loads(doc.split("tool_declare<|im_middle|>")[1].split(chat.IM_END)[0])
        names = [t["function"]["name"] for t in tools]
        turns = doc.split("<|im_assistant|>assistant<|im_middle|>")[1:]
        calls = [c for turn in turns for c in chat.parse_output(turn.split(chat.IM_END)[0]).tool_calls]
        if not calls:
            echoes += 1
            continue
        histories += len(calls) > 1
        for index, call in enumerate(calls):
            assert call["id"] == f"functions.{call['function']['name']}:{index}"
            name = call["function"]["name"]
            schema = tools[names.index(name)]["function"]["parameters"]
            jsonschema.Draft202012Validator(schema).validate(json.loads(call["function"]["arguments"]))
        places.add((len(names), names.index(calls[-1]["function"]["name"])))
        assert turns[-1].endswith(chat.IM_END) and not chat.parse_output(turns[-1]).tool_calls
    assert {(3, 0), (3, 1), (3, 2)} <= places  # the right tool is not always the first declared
    assert histories > 20 and echoes > 5


def test_random_tools_share_no_name_with_the_benchmarks_heldout_tools() -> None:
    bench = benchmark_module()
    bench_names = {n for names, _ in bench.ARITHMETIC.values() for n in names} | {*bench.CAPITAL_TOOLS,
                                                                                  *bench.CONVERT_TOOLS}
    bench_params = {p for pair in bench.PAIRS for p in pair} | {*bench.CAPITAL_PARAMS,
                                                                *(p for ps in bench.CONVERT_PARAMS for p in ps)}
    rng = random.Random(random.randrange(2**32))
    names: set[str] = set()
    params: set[str] = set()
    descriptions = {t["function"]["description"] for t in make_corpus.TOOLS}  # the demo tools'
    for _ in range(2000):
        for tool in make_corpus.random_toolset(rng)[0]:
            names.add(tool["function"]["name"])
            params |= set(tool["function"]["parameters"]["properties"])
            descriptions.add(tool["function"]["description"])
    assert len(names) > 200 and len(params) > 50 and len(descriptions) > 50
    assert not names & bench_names and not params & bench_params
    bench_tools = [t for req in bench.make_requests(60, random.randrange(2**32)) for t in req["body"]["tools"]]
    assert not {t["function"]["name"] for t in bench_tools} & names
    assert not {t["function"]["description"] for t in bench_tools} & descriptions


def test_reasoning_quotes_the_called_tool_as_the_tool_list_renders_it() -> None:
    """The reasoning before a call quotes its tool's description and name exactly as they appear in the tool list,
    so the name follows the same text in both (the model can copy it); no other declared tool's entry matches."""
    rng = random.Random(random.randrange(2**32))
    checked = 0
    for _ in range(200):
        doc = make_corpus.random_tool_chat(rng)
        declared = doc.split("tool_declare<|im_middle|>")[1].split(chat.IM_END)[0]
        for turn in doc.split("<|im_assistant|>assistant<|im_middle|>")[1:]:
            parsed = chat.parse_output(turn.split(chat.IM_END)[0])
            if not parsed.reasoning_content:  # an earlier turn's call: the template drops its reasoning
                continue
            for call in parsed.tool_calls:
                quoted = parsed.reasoning_content.removeprefix("The tool for this: ").rsplit(". I will call ", 1)[0]
                name = call["function"]["name"]
                assert quoted.endswith(f'"name": "{name}"') and declared.count(quoted) == 1, (quoted, declared)
                checked += 1
    assert checked > 100
