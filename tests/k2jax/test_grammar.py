"""Tool-call and JSON grammars against hand-written token sequences, jsonschema as the reference for arguments.

Token sequences are the bundled tokenizer's encoding of K2-format text (tool and think markers as their reserved
tokens, everything else as ordinary text tokens): a sequence is allowed when every token is in the mask of the
state before it and the stop token is allowed at the end.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher

import k2jax
from k2jax import chat
from k2jax.grammar import (MAX_CALLS, REASONING_EFFORT, GrammarError, RowConstraint, allowed_tokens, allows,
                           decode_plan, json_grammar, reasoning_budget, row_constraints, tool_calls_grammar,
                           vocabulary)
from k2jax.sampling import EDGES, SamplingParams
from k2jax.tokenizer import Tokenizer

BUNDLED = Path(k2jax.__file__).parent / "bundled"
MULTIPLY = {"type": "function", "function": {"name": "multiply", "description": "Multiply two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {"name": "book_room", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["room", "guests"],
    "properties": {"room": {"type": "string", "enum": ["single", "double", "suite"]},
                   "guests": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                         "properties": {"name": {"type": "string"},
                                                                        "age": {"type": "integer", "minimum": 0}},
                                                         "additionalProperties": False}, "minItems": 1},
                   "nights": {"type": "number"}, "breakfast": {"type": "boolean"}}}}}
PING = {"type": "function", "function": {"name": "ping"}}
TOOLS = [MULTIPLY, BOOK, PING]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(BUNDLED)


@pytest.fixture(scope="module")
def vocab(tok):
    return vocabulary(tok, tok.vocab_size)


def call(name: str, index: int, arguments: str) -> str:
    return f"{chat.CALL_BEGIN}functions.{name}:{index}{chat.ARGUMENT_BEGIN}{arguments}{chat.CALL_END}"


def section(*calls: str) -> str:
    return chat.SECTION_BEGIN + "".join(calls) + chat.SECTION_END


def allowed(vocab, tok, rules: str | None, text: str, budget: int | None = None) -> bool:
    """Whether the constraint allows `text` (encoded with reserved tokens) followed by <|im_end|>."""
    row = RowConstraint(vocab, rules, budget)
    for token in [*tok.encode(text), tok.im_end_id]:
        if not allows(row.mask(), token):
            return False
        row.accept([token])
    return True


THINK = f"{chat.THINK_BEGIN}The user wants a product.{chat.THINK_END}"
GOOD_BOOKING = '{"room": "suite", "guests": [{"name": "Ann", "age": 30}, {"name": "Bo"}], "nights": 2.5}'


@pytest.mark.parametrize("text", [
    THINK + section(call("multiply", 0, '{"a": 37, "b": 41}')),
    THINK + "Let me compute." + section(call("multiply", 0, '{"a":-3,"b":0}')),
    section(call("multiply", 0, '{"a": 1, "b": 2}'), call("book_room", 1, GOOD_BOOKING), call("ping", 2, "{}")),
    THINK + "No tool is needed: 4.",
    "Plain answer, no reasoning block.",
    THINK + section(call("book_room", 0, '{"room": "single", "guests": [{"name": "Zoë"}], "breakfast": true}')),
])
def test_valid_turns_are_allowed(vocab, tok, text):
    assert allowed(vocab, tok, tool_calls_grammar(TOOLS), text)


@pytest.mark.parametrize("text, why", [
    (THINK + section(call("calculate", 0, '{"expression": "37 * 41"}')), "undeclared tool"),
    (THINK + section(call("multiply", 1, '{"a": 37, "b": 41}')), "IDX is not the running count"),
    (THINK + section(call("multiply", 0, '{"a": 1, "b": 2}'), call("multiply", 0, '{"a": 1, "b": 2}')),
     "second call repeats IDX 0"),
    (THINK + section(call("multiply", 0, '{"a": 37}')), "required property missing"),
    (THINK + section(call("multiply", 0, '{"a": 37, "b": "41"}')), "wrong type"),
    (THINK + section(call("multiply", 0, '{"a": 3.5, "b": 1}')), "number for an integer"),
    (THINK + section(call("multiply", 0, '{"a": 1, "b": 2, "c": 3}')), "additionalProperties false"),
    (THINK + section(call("multiply", 0, '[1, 2]')), "arguments not an object"),
    (THINK + section(call("multiply", 0, '{"a": 1, "b": 2')), "unclosed JSON"),
    (THINK + section(call("book_room", 0, '{"room": "attic", "guests": [{"name": "A"}]}')), "enum"),
    (THINK + section(call("book_room", 0, '{"room": "suite", "guests": []}')), "minItems"),
    (THINK + section(call("book_room", 0, '{"room": "suite", "guests": [{"age": 3}]}')), "nested required"),
    (THINK + section(call("book_room", 0, '{"room": "suite", "guests": [{"name": "A", "age": -1}]}')), "minimum"),
    (THINK + section(call("ping", 0, '{"x": 1}')), "no parameters means no arguments"),
    (chat.THINK_BEGIN + "thinking" + section(call("multiply", 0, '{"a": 1, "b": 2}')) + chat.THINK_END,
     "section inside reasoning"),
    (f"{chat.THINK_BEGIN}never closed", "stop inside reasoning"),
    (THINK + section(call("multiply", 0, '{"a": 1, "b": 2}')) + "more text", "text after the section"),
    (THINK + section(call("multiply", 0, '{"a": 1, "b": 2}')) + section(call("ping", 1, "{}")), "second section"),
    (THINK + chat.SECTION_BEGIN + chat.SECTION_END, "empty section"),
    (THINK + chat.THINK_BEGIN + "again" + chat.THINK_END, "second think block"),
    (THINK + "<|im_user|>", "another reserved token"),
])
def test_invalid_turns_are_refused(vocab, tok, text, why):
    """Each sequence breaks the grammar somewhere, so some token (or the final stop) is outside its mask."""
    assert not allowed(vocab, tok, tool_calls_grammar(TOOLS), text), why


@pytest.mark.parametrize("head, spelled", [
    (THINK, section(call("multiply", 0, '{"a": 1, "b": 2}'))),  # the chat parser would read a call from text
    (chat.THINK_BEGIN, f"a{chat.THINK_END}b"),  # ... or end reasoning early, leaking it into content
])
def test_markers_spelled_as_text_are_refused(vocab, tok, head, spelled):
    row = RowConstraint(vocab, tool_calls_grammar(TOOLS))
    tokens = [*tok.encode(head), *tok.encode(spelled, allow_special=False)]
    assert tok.decode(tokens) == head + spelled
    taken = 0
    while taken < len(tokens) and allows(row.mask(), tokens[taken]):
        row.accept([tokens[taken]])
        taken += 1
    assert taken < len(tokens) and tok.decode(tokens[:taken + 1]).endswith(tok.decode([tokens[taken]]))


def test_call_ids_count_on_from_the_conversation(vocab, tok):
    rules = tool_calls_grammar(TOOLS, first_index=5)
    assert allowed(vocab, tok, rules, section(call("ping", 5, "{}"), call("multiply", 6, '{"a": 1, "b": 1}')))
    assert not allowed(vocab, tok, rules, section(call("ping", 0, "{}")))


def test_sections_hold_at_most_max_calls(vocab, tok):
    calls = [call("ping", k, "{}") for k in range(MAX_CALLS + 1)]
    assert allowed(vocab, tok, tool_calls_grammar(TOOLS), section(*calls[:MAX_CALLS]))
    assert not allowed(vocab, tok, tool_calls_grammar(TOOLS), section(*calls))


@pytest.mark.parametrize("choice, function, parallel, text, ok", [
    ("none", None, True, THINK + "Just text.", True),
    ("none", None, True, THINK + section(call("ping", 0, "{}")), False),
    ("required", None, True, THINK + "Just text.", False),
    ("required", None, True, THINK + section(call("ping", 0, "{}")), True),
    ("required", None, True, THINK + "Text first." + section(call("ping", 0, "{}")), False),
    ("required", "multiply", True, THINK + section(call("ping", 0, "{}")), False),
    ("required", "multiply", True, THINK + section(call("multiply", 0, '{"a": 2, "b": 3}')), True),
    ("required", "multiply", True, THINK + "text", False),
    ("auto", None, False, section(call("ping", 0, "{}")), True),
    ("auto", None, False, section(call("ping", 0, "{}"), call("ping", 1, "{}")), False),
])
def test_tool_choice_and_parallel_calls(vocab, tok, choice, function, parallel, text, ok):
    assert allowed(vocab, tok, tool_calls_grammar(TOOLS, choice, function, parallel), text) == ok


def test_after_the_only_parallel_call_the_section_must_close(vocab, tok):
    row = RowConstraint(vocab, tool_calls_grammar(TOOLS, parallel=False))
    for token in tok.encode(section(call("ping", 0, "{}"))[: -len(chat.SECTION_END)]):
        row.accept([token])
    assert np.flatnonzero(np.unpackbits(row.mask().view(np.uint8), bitorder="little")).tolist() == [
        tok.token_id(chat.SECTION_END)]


@pytest.mark.parametrize("tool, construct", [
    ({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}, "not"),
    ({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)b"}}}}}, "look-around"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}, "JSON object"),
])
def test_schemas_the_library_cannot_compile_name_the_tool_and_construct(tool, construct):
    with pytest.raises(GrammarError, match=construct) as err:
        tool_calls_grammar([MULTIPLY, tool])
    assert "tools[1].function.parameters" in str(err.value) and "`f`" in str(err.value)
    assert err.value.where == "tools[1].function.parameters"


def test_strict_false_frees_the_arguments_but_not_the_name(vocab, tok):
    loose = {**MULTIPLY, "function": {**MULTIPLY["function"], "strict": False,
                                      "parameters": {"type": "object", "properties": {"x": {"not": {}}}}}}
    rules = tool_calls_grammar([loose])  # its uncompilable schema is not compiled
    assert allowed(vocab, tok, rules, section(call("multiply", 0, '{"anything": [1, "two"]}')))
    assert not allowed(vocab, tok, rules, section(call("calculate", 0, "{}")))


def test_unknown_tool_choice_function():
    with pytest.raises(GrammarError, match="not among the tools") as err:
        tool_calls_grammar(TOOLS, "required", "divide")
    assert err.value.where == "tool_choice"


# ---------------------------------------------------------------- arguments against jsonschema


def booking_values():
    """Candidate booking arguments, about half of them valid: keys in the schema's order (the grammar fixes it)."""
    name = st.text(max_size=6)
    guest = (st.fixed_dictionaries({"name": name}, optional={"age": st.integers(0, 120)}) | st.fixed_dictionaries(
        {}, optional={"name": name | st.integers(), "age": st.integers(-3, 120) | st.booleans(), "pet": st.none()})
    ).map(lambda g: {key: g[key] for key in ("name", "age", "pet") if key in g})
    room = st.sampled_from(["single", "double", "suite"]) | st.sampled_from(["attic", "SUITE"]) | st.none()
    optional = {"nights": st.integers(0, 9) | st.floats(0, 30, allow_nan=False) | st.just("two"),
                "breakfast": st.booleans() | st.integers(0, 1)}
    guests = st.lists(guest, min_size=1, max_size=3) | st.lists(guest, max_size=0) | st.text(max_size=3)
    whole = st.fixed_dictionaries({"room": room, "guests": guests}, optional=optional)
    order = list(BOOK["function"]["parameters"]["properties"])
    return (whole | st.fixed_dictionaries({}, optional={"room": room, "guests": guests, **optional})).map(
        lambda d: {key: d[key] for key in order if key in d})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(booking_values(), st.booleans())
def test_arguments_are_allowed_exactly_when_jsonschema_validates_them(vocab, tok, arguments, compact):
    text = json.dumps(arguments, separators=(",", ":") if compact else None, ensure_ascii=False)
    text = text.replace("\x7f", "\\u007f")  # llguidance's JSON strings take DEL escaped, as control characters
    expected = jsonschema.Draft202012Validator(BOOK["function"]["parameters"]).is_valid(arguments)
    assert allowed(vocab, tok, tool_calls_grammar([BOOK]), section(call("book_room", 0, text))) == expected


# ---------------------------------------------------------------- JSON answers and the reasoning budget


def test_json_answers(vocab, tok):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert allowed(vocab, tok, json_grammar(), THINK + '{"any": [1, {"x": null}]}')
    assert not allowed(vocab, tok, json_grammar(), THINK + "Sure: {}")
    assert allowed(vocab, tok, json_grammar(schema), THINK + '{"city": "Paris"}')
    assert not allowed(vocab, tok, json_grammar(schema), THINK + '{"town": "Paris"}')
    with pytest.raises(GrammarError, match="response_format"):
        json_grammar({"type": "object", "properties": {"x": {"not": {}}}})


@pytest.mark.parametrize("rules", [None, "tools"])
def test_reasoning_budget_forces_the_end_of_reasoning(vocab, tok, rules):
    grammar_text = tool_calls_grammar(TOOLS) if rules else None
    row = RowConstraint(vocab, grammar_text, reasoning_budget=3)
    think_end = tok.token_id(chat.THINK_END)
    row.accept([tok.token_id(chat.THINK_BEGIN)])
    for token in tok.encode(" one two three")[:3]:
        assert allows(row.mask(), token) and allows(row.mask(), think_end)
        row.accept([token])
    only = np.flatnonzero(np.unpackbits(row.mask().view(np.uint8), bitorder="little"))
    assert only.tolist() == [think_end] and row.forced(4)[0] == [think_end]
    row.accept([think_end])
    assert not allows(row.mask(), think_end) and not allows(row.mask(), tok.token_id(chat.THINK_BEGIN))
    assert allows(row.mask(), tok.encode("Paris")[0]) and allows(row.mask(), tok.im_end_id)


def test_budget_zero_closes_reasoning_at_once(vocab, tok):
    row = RowConstraint(vocab, None, reasoning_budget=0)
    row.accept([tok.token_id(chat.THINK_BEGIN)])
    assert np.count_nonzero(np.unpackbits(row.mask().view(np.uint8))) == 1


def test_reasoning_effort_budgets():
    assert [reasoning_budget(None, e) for e in ("low", "medium", "high")] == list(REASONING_EFFORT.values())
    assert reasoning_budget(7, "high") == 7 and reasoning_budget(None, None) is None
    with pytest.raises(ValueError, match="reasoning_effort"):
        reasoning_budget(None, "maximal")
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        reasoning_budget(-1, None)


# ---------------------------------------------------------------- runs sampled under one mask


def test_rows_of_one_grammar_share_its_compile_and_advance_alone(vocab, tok, monkeypatch):
    """A grammar is compiled once for every row that uses it (n samples; requests declaring the same tools): each row
    gets its own copy, which advances alone, and one that fails fails alone."""

    class Compiles:  # counts the matchers compiled through k2jax.grammar
        count = 0
        grammar_from_lark = staticmethod(LLMatcher.grammar_from_lark)

        def __new__(cls, *args, **kw):
            cls.count += 1
            return LLMatcher(*args, **kw)

    rules = tool_calls_grammar([{"type": "function", "function": {"name": f"tool_{np.random.randint(1 << 30)}"}}])
    monkeypatch.setattr(k2jax.grammar, "LLMatcher", Compiles)
    first, second, third = row_constraints(tok, tok.vocab_size, rules, None, 3)
    again = row_constraints(tok, tok.vocab_size, rules, None, 1)[0]
    assert Compiles.count == 1
    text = f"{chat.THINK_BEGIN}I will call it.{chat.THINK_END}"
    for token in tok.encode(text):
        first.accept([token])
    third.matcher.consume_token(tok.token_id(chat.SECTION_END))  # refused at the start: its matcher fails
    assert third.matcher.is_error()
    fresh = RowConstraint(vocab, rules)
    assert all(np.array_equal(row.mask(), fresh.mask()) for row in (second, again))
    assert np.array_equal(first.mask(), constraint_after(vocab, tok, rules, text).mask())
    assert not np.array_equal(first.mask(), second.mask())


def test_a_run_is_cut_where_the_mask_changed(vocab, tok):
    """Free text keeps one mask (the whole run is taken); entering the section changes it (the run is cut)."""
    row = RowConstraint(vocab, tool_calls_grammar(TOOLS))
    text = tok.encode(f"{chat.THINK_BEGIN}I will call a tool now")
    assert row.accept(text[:1]) == 1
    assert row.accept(text[1:3]) == 2 and row.accept(text[3:]) == len(text) - 3 and row.steady
    rest = tok.encode(f"{chat.THINK_END}{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions")
    taken = row.accept(rest)
    assert 1 <= taken < len(rest) and not row.steady


def test_an_exact_run_computes_no_mask_to_say_whether_it_is_steady(vocab, tok):
    """Only a held row's plan reads `steady`: accepting an exact row's run in running text computes no mask for it,
    and asking computes the one mask that tells."""
    row = constraint_after(vocab, tok, tool_calls_grammar(TOOLS), f"{chat.THINK_BEGIN}I will{chat.THINK_END}Sure")
    states = row.plan(8, exact=True)
    row.matcher = counting = CountingMatcher(row.matcher)
    run = tok.encode(", I can do that")
    assert row.accept(run, exact=True, states=states) == len(run) and counting.masks == 0
    assert row.steady and counting.masks == 1


def longest_allowed(vocab, rules: str, tokens: list[int]) -> int:
    """How many of `tokens` the grammar allows in a row, checked one token at a time."""
    row = RowConstraint(vocab, rules)
    for i, token in enumerate(tokens):
        if not allows(row.mask(), token):
            return i
        row.accept([token])
    return len(tokens)


@pytest.mark.parametrize("text", [
    THINK + section(call("multiply", 0, '{"a": 37, "b": 41}')),
    THINK + section(call("divide", 0, '{"a": 37, "b": 41}')),
    THINK + section(call("multiply", 0, '{"a": 37, "b": "41"}')),
    THINK + section(call("multiply", 3, '{"a": 37}')),
])
def test_a_drafted_run_stands_up_to_its_first_draft_the_grammar_refuses(vocab, tok, text):
    """Drafted from every token, a run is kept as far as the grammar allows it token by token (a whole valid call,
    or up to a wrong name, type or index); drawn under one mask, it is cut where the mask first changed."""
    rules = tool_calls_grammar(TOOLS)
    tokens = tok.encode(text)
    expected = longest_allowed(vocab, rules, tokens)
    row = RowConstraint(vocab, rules)
    assert row.accept(tokens, exact=True, drafted=True) == expected
    assert RowConstraint(vocab, rules).accept(tokens) < expected


def constraint_after(vocab, tok, rules: str | None, text: str) -> RowConstraint:
    """A constraint that took `text`'s tokens one at a time."""
    row = RowConstraint(vocab, rules)
    for token in tok.encode(text):
        row.accept([token])
    return row


def test_rows_take_forced_tokens_then_draft_while_their_mask_changes(vocab, tok):
    """grammar.decode_plan: a steady row keeps one mask for every step; a row whose grammar forces text takes its
    tokens first (the constraint itself unmoved by planning), then drafts when its sampling makes drafts exact; when
    it does not, its later draws are refused, and it holds the call to its forced tokens and one more only when it
    decodes alone; take() takes the forced tokens, cuts a drafted run where it stops standing and leaves
    unconstrained rows whole."""
    rules = tool_calls_grammar(TOOLS)
    steady, changing = (constraint_after(vocab, tok, rules, f"{chat.THINK_BEGIN}I will"),
                        constraint_after(vocab, tok, rules, f"{THINK}{chat.SECTION_BEGIN}"))
    assert steady.steady and not changing.steady
    before = changing.mask().copy()
    greedy, filtered = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5)
    plan = decode_plan({0: (steady, filtered), 2: (changing, greedy)}, 4, 8)
    head = tok.encode(f"{chat.CALL_BEGIN}functions")  # then the model picks the tool
    assert plan.n_steps == 8 and (~plan.masks.hold[:, 0]).tolist() == [False, False, True, False]
    chains = plan.masks.chain[:, 0]
    assert chains[2].tolist() == head + [-1] * (8 - len(head)) and (chains[[0, 1, 3]] == -1).all()
    assert np.array_equal(changing.mask(), before)
    after = constraint_after(vocab, tok, rules, f"{THINK}{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions")
    assert np.array_equal(plan.masks.words[2], after.mask()) and (plan.masks.words[[1, 3]] == -1).all()
    assert np.array_equal(plan.masks.words[0], steady.mask())
    prefix, wrong = tok.encode(f"{THINK}{chat.SECTION_BEGIN}"), tok.encode(call("multiply", 0, '{"a": 37, "b": "41"}'))
    stands = longest_allowed(vocab, rules, prefix + wrong) - len(prefix)
    assert len(head) < stands < len(wrong) and plan.take(2, wrong) == stands
    assert plan.take(1, wrong) == len(wrong)
    held = constraint_after(vocab, tok, rules, f"{THINK}{chat.SECTION_BEGIN}")
    plan = decode_plan({2: (held, filtered)}, 4, 8)  # decoding alone: the call stops where its draws would
    assert plan.n_steps == len(head) + 1 and plan.masks.hold[:, 0].all()
    for beside in (decode_plan({0: (steady, greedy), 2: (held, filtered)}, 4, 8),
                   decode_plan({2: (held, filtered)}, 4, 8, decoding=3)):
        assert beside.n_steps == 8 and beside.masks.hold[1:, 0].all()  # other rows are not held back
    assert not decode_plan({0: (steady, greedy)}, 4, 8).masks.hold[0, 0]  # an exact row drafts even when steady
    states = beside.automata[2]
    state = states[0]  # follow its automaton's chains and edges along the run
    while len(state.path) < len(wrong) and wrong[len(state.path)] in state.edges:
        state = states[state.edges[wrong[len(state.path)]]]
    assert list(state.path) == wrong[:len(state.path)] and len(head) + 1 < len(state.path) < stands
    # drawn under the grammar's own masks, and one more draw there; the next, under a mask since changed, is refused
    assert beside.take(2, wrong) == len(state.path) + 1
    assert decode_plan({}, 4, 8).masks is None and decode_plan({}, 4, 8).n_steps == 8


@pytest.mark.parametrize("arguments, filled", [('{"a": 37, "c": 41}', True), ('{"a": "37", "b": 41}', False)])
def test_a_cut_row_is_filled_only_where_its_grammar_allows_one_token(vocab, tok, arguments, filled):
    """DecodePlan.fill after take() cut a drafted run: where the schema forces the next key (`b`), that key's first
    token, the constraint advanced over it as taking it would; where the mask allows more (an integer's digits),
    nothing, and the constraint stays where the cut left it."""
    rules = tool_calls_grammar(TOOLS)
    prefix, wrong = tok.encode(f"{THINK}{chat.SECTION_BEGIN}"), tok.encode(call("multiply", 0, arguments))
    plan = decode_plan({0: (constraint_after(vocab, tok, rules, f"{THINK}{chat.SECTION_BEGIN}"),
                            SamplingParams(temperature=0.0))}, 1, 8)
    taken = plan.take(0, wrong)
    reference = RowConstraint(vocab, rules)
    for token in prefix + wrong[:taken]:
        reference.accept([token])
    one = allowed_tokens(reference.mask(), 1)
    token = plan.fill(0)
    assert taken < len(wrong) and bool(one) == filled and token == (one[0] if one else None)
    if one:
        reference.accept(one)
    assert np.array_equal(plan.constraints[0].mask(), reference.mask())


MEASURE = {"type": "function", "function": {"name": "measure", "parameters": {
    "type": "object", "properties": {"unit": {"type": "string", "enum": ["m", "cm", "inch"]}, "x": {"type": "number"}},
    "additionalProperties": False}}}


@pytest.mark.parametrize("text, exact", [
    (f"{chat.THINK_BEGIN}I will", False),  # </think> (an exact row drafts there: the test below)
    (f"{THINK}Sure.", True),  # a section opener, then the tools' names
    (f"{THINK}{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions", True),  # the tools' names, then their first keys
    (f"{THINK}{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.measure:0{chat.ARGUMENT_BEGIN}" + "{", True),  # keys
])
def test_a_plans_states_hold_what_the_grammar_finds_after_their_paths(vocab, tok, text, exact):
    """RowConstraint.plan: each state's chain is what the grammar forces after the edge that leads to it, and its mask
    the one a constraint that took the state's path finds (sibling states, looked at one after another, do not see
    each other's: llguidance's rollback after a mask leaves a stale one for the next path); edges are tokens the
    mask allows; the constraint itself does not move."""
    rules = tool_calls_grammar(TOOLS + [MEASURE])
    row = constraint_after(vocab, tok, rules, text)
    before = row.mask().copy()
    states = row.plan(8, exact=exact)
    assert len(states) >= 2 and np.array_equal(row.mask(), before)
    for state in states:
        walked = constraint_after(vocab, tok, rules, text)
        head = state.path[:len(state.path) - len(state.chain)]
        for token in head:
            walked.accept([token])
        assert walked.forced(len(state.chain))[0] == list(state.chain)
        for token in state.chain:
            walked.accept([token])
        assert np.array_equal(walked.mask(), state.after[0])
        assert all(allows(state.after[0], t) for t in state.edges)
        assert all(states[to].path[:len(state.path) + 1] == state.path + (t,) for t, to in state.edges.items())


class CountingMatcher:
    """An LLMatcher that counts the calls made through it, by method (`masks`: the masks computed)."""

    def __init__(self, matcher):
        self.matcher, self.calls = matcher, collections.Counter()

    def __getattr__(self, name):
        method = getattr(self.matcher, name)

        def counted(*args):
            self.calls[name] += 1
            return method(*args)
        return counted

    @property
    def masks(self) -> int:
        return self.calls["unsafe_compute_mask_ptr"]


def test_an_exact_row_drafts_at_its_start_and_inside_its_reasoning_with_no_mask_and_every_draft_checked(vocab, tok):
    """At the turn's start and inside `<think>` an exact row's plan is one state that allows every token (no mask
    computed for it), and accept checks each draw where it falls: the reasoning's text in one walk of the grammar,
    then `</think>` and what follows where the grammar takes them; the run is cut at a section opener inside the
    reasoning, or at an opening the tool choice refuses, which the grammar refuses; the next call then samples under
    the mask. A row whose sampling is not exact, or whose reasoning has a budget, keeps the masked plan."""
    rules = tool_calls_grammar(TOOLS)
    row = RowConstraint(vocab, rules)
    row.matcher = counting = CountingMatcher(row.matcher)
    opening = tok.encode(f"{chat.THINK_BEGIN}I will")
    assert row.accept(opening, exact=True, states=row.plan(8, exact=True)) == len(opening) and counting.masks == 0
    states = row.plan(8, exact=True)
    assert len(states) == 1 and states[0].drafts and not states[0].chain and not states[0].edges
    assert (states[0].after[0] == -1).all() and counting.masks == 0
    text = tok.encode(f" call it.{chat.THINK_END}{chat.SECTION_BEGIN}")
    counting.calls.clear()
    assert row.accept(text, exact=True, states=states) == len(text)
    assert counting.masks == 0  # checked by the grammar's walk of each token, not by masks
    assert counting.calls["try_consume_tokens"] == 1 and counting.calls["consume_token"] == 2  # </think>, opener
    walked = constraint_after(vocab, tok, rules, f"{chat.THINK_BEGIN}I will call it.{chat.THINK_END}"
                                                 f"{chat.SECTION_BEGIN}")
    assert np.array_equal(row.mask(), walked.mask()) and row.phase == "answer"

    row = constraint_after(vocab, tok, rules, f"{chat.THINK_BEGIN}I will")
    draws = tok.encode(f" go{chat.SECTION_BEGIN} on")
    opener = draws.index(tok.token_id(chat.SECTION_BEGIN))
    assert row.accept(draws, exact=True, states=row.plan(8, exact=True)) == opener
    assert row.phase == "reasoning" and not allows(row.mask(), tok.token_id(chat.SECTION_BEGIN))
    # the draw at the refused position is made under the mask next call (a draft would be the same refused token)
    masked = row.plan(8, exact=True)
    assert not masked[0].drafts and np.array_equal(masked[0].after[0], row.mask())
    assert row.accept(tok.encode(" on"), exact=True, states=masked) == 1 and row.plan(8, exact=True)[0].drafts

    required = RowConstraint(vocab, tool_calls_grammar(TOOLS, "required"))
    assert required.accept(tok.encode("Sure"), exact=True, states=required.plan(8, exact=True)) == 0
    masked = required.plan(8, exact=True)
    assert not masked[0].drafts and not allows(masked[0].after[0], tok.encode("Sure")[0])

    assert not constraint_after(vocab, tok, rules, f"{chat.THINK_BEGIN}I will").plan(8, exact=False)[0].drafts
    budgeted = RowConstraint(vocab, rules, reasoning_budget=64)
    for token in tok.encode(f"{chat.THINK_BEGIN}I will"):
        budgeted.accept([token])
    assert not budgeted.plan(8, exact=True)[0].drafts


def assert_same_plan(got: list, want: list) -> None:
    """Two automata (RowConstraint.plan) are the same: paths, chains, masks, how they are written, holds, edges."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.path, a.chain, a.lists, a.hold, a.edges, a.drafts) == (b.path, b.chain, b.lists, b.hold, b.edges,
                                                                          b.drafts)
        assert np.array_equal(a.after[0], b.after[0]) and a.after[1] == b.after[1]


MEASURED = section(call("measure", 0, '{"unit": "cm", "x": 2}'))


@pytest.mark.parametrize("choice, answer", [("auto", "Sure, I can measure that." + MEASURED), ("required", MEASURED),
                                            ("none", "Sure, I can measure that."), ("json", '{"unit": "cm", "x": 2}'),
                                            ("budget", "Sure, I can measure that." + MEASURED)])
@pytest.mark.parametrize("exact", [True, False])
def test_what_follows_a_marker_in_running_text_is_planned_once_per_row(vocab, tok, choice, answer, exact):
    """RowConstraint.plan along a turn, one row planning at every token: its automata equal those of rows that took
    the same tokens and never planned, while in running text it looks only at its own next mask (the states past
    `</think>` and past the section's opener are the ones it planned before); an exact row under a grammar drafts
    at its start and inside its reasoning, looking at nothing."""
    rules = (json_grammar(MEASURE["function"]["parameters"]) if choice == "json" else None if choice == "budget"
             else tool_calls_grammar(TOOLS + [MEASURE], choice))
    budget = 100 if choice == "budget" else None  # a reasoning budget alone: no grammar
    text = f"{chat.THINK_BEGIN}I will call it (not a </think tag).{chat.THINK_END}{answer}"
    row, tokens, looks, markers, drafts = RowConstraint(vocab, rules, budget), tok.encode(text), [], 0, 0
    planned = set()  # the markers whose states the row planned
    look = row._look
    row._look = lambda path, limit: looks.append(path) or look(path, limit)
    for i, token in enumerate(tokens):
        looks.clear()
        states = row.plan(8, exact)
        fresh = RowConstraint(vocab, rules, budget)
        for taken in tokens[:i]:
            fresh.accept([taken])
        assert_same_plan(states, fresh.plan(8, exact))
        if states[0].drafts:
            assert exact and rules is not None and row.phase != "answer" and looks == []
            drafts += 1
        running = allowed_tokens(states[0].after[0], EDGES) is None and not states[0].chain and states[0].edges
        if running and set(states[0].edges) <= planned:
            assert looks == [()], tok.decode(tokens[:i])
            markers += 1
        planned |= set(states[0].edges) if running else set()
        row.accept([token])
    assert markers > 5 or drafts > 5


@pytest.mark.parametrize("text", [
    THINK + section(call("multiply", 0, '{"a": 37, "b": 41}')),
    THINK + section(call("book_room", 0, GOOD_BOOKING), call("ping", 1, "{}")),
])
def test_forced_tokens_are_the_ones_the_mask_allows_alone(vocab, tok, text):
    """Along a valid turn, wherever the grammar forces text its mask allows one token, the next of the text's own
    tokens (the canonical tokenization); forced(n) lists the next n of those that follow in a row, and a named tool
    choice forces the whole call header from the reasoning's end."""
    row, tokens, n_forced = RowConstraint(vocab, tool_calls_grammar(TOOLS)), tok.encode(text), 0
    for i, token in enumerate(tokens):
        allowed_ = np.flatnonzero(np.unpackbits(row.mask().view(np.uint8), bitorder="little"))
        forced, _ = row.forced(len(tokens))
        run = next((k for k, t in enumerate(tokens[i:]) if k >= len(forced) or forced[k] != t), len(tokens) - i)
        assert run == len(forced) and (allowed_.tolist() == [token]) == bool(forced)
        n_forced += bool(forced)
        row.accept([token])
    assert n_forced > len(tokens) // 3
    named = constraint_after(vocab, tok, tool_calls_grammar(TOOLS, function="multiply"), THINK)
    header = f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.multiply:0{chat.ARGUMENT_BEGIN}" + '{"a":'
    assert named.forced(64)[0] == tok.encode(header)


def test_a_forced_run_is_taken_whole_and_then_checked(vocab, tok):
    """accept(forced=k) takes k tokens as forced, the next under the mask after them, the drafts after that where
    the grammar allows them; a run that is all forced leaves the row unsteady."""
    rules = tool_calls_grammar(TOOLS)
    row = constraint_after(vocab, tok, rules, f"{THINK}{chat.SECTION_BEGIN}")
    forced, _ = row.forced(8)
    rest = tok.encode(".multiply:0")
    assert row.accept(forced[:1], exact=True, drafted=True, forced=1) == 1 and not row.steady
    assert row.accept(forced[1:] + rest, exact=True, drafted=True, forced=len(forced) - 1) == len(forced) - 1 + len(rest)
    assert row.forced(8)[0] == [tok.token_id(chat.ARGUMENT_BEGIN), *tok.encode('{"a":')]


@pytest.mark.parametrize("rules, text", [
    (tool_calls_grammar(TOOLS + [MEASURE]), THINK + "Sure." + MEASURED),
    (tool_calls_grammar(TOOLS, "required"), THINK + section(call("book_room", 0, GOOD_BOOKING))),
    (json_grammar(MEASURE["function"]["parameters"]), '{"unit": "inch", "x": -2.5e3}'),
])
def test_a_draft_is_checked_as_the_mask_would(vocab, tok, rules, text):
    """RowConstraint._allows (how a draft is checked, without computing a mask) says what the mask says for every
    token of the vocabulary, at every point of a turn: in running text, where text is forced (only its canonical
    first token) and at the turn's end."""
    row, tokens = RowConstraint(vocab, rules), [*tok.encode(text), tok.im_end_id]
    for i, token in enumerate(tokens):
        mask = row.mask()
        drafts = []
        for candidate in range(tok.vocab_size):
            row._mask = None
            drafts.append(row._allows(candidate))
        assert drafts == [allows(mask, t) for t in range(tok.vocab_size)], tok.decode(tokens[:i])
        assert allows(mask, token)
        row.accept([token])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4351), max_size=24), st.integers(0, 20))
def test_allowed_tokens_lists_the_set_bits(tokens, at_most):
    """allowed_tokens gives a mask's tokens in order, or None past at_most, as numpy's bit unpacking does."""
    words = np.zeros(136, np.uint32)
    for token in tokens:
        words[token // 32] |= np.uint32(1 << (token % 32))
    expected = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")).tolist()
    assert allowed_tokens(words.view(np.int32), at_most) == (expected if len(expected) <= at_most else None)


def test_masks_have_the_vocabulary_layout(vocab, tok):
    assert vocab.words == -(-tok.vocab_size // 32) and vocab.all_allowed().dtype == np.int32
    ids = [0, 31, 32, tok.vocab_size - 1]
    mask = vocab.only(ids)
    assert [t for t in range(tok.vocab_size) if allows(mask, t)] == ids


def test_unbounded_integers_stop_at_what_doubles_hold(vocab, tok):
    rules = tool_calls_grammar([MULTIPLY])
    assert allowed(vocab, tok, rules, section(call("multiply", 0, '{"a": 9007199254740992, "b": -9007199254740992}')))
    assert not allowed(vocab, tok, rules, section(call("multiply", 0, '{"a": 90071992547409930, "b": 1}')))


def test_integer_bounds_leave_constants_alone(vocab, tok):
    schema = {"type": "object", "properties": {"kind": {"const": {"type": "integer"}}}, "required": ["kind"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    assert allowed(vocab, tok, tool_calls_grammar([tool]), section(call("f", 0, '{"kind": {"type": "integer"}}')))
