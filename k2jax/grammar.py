"""Constrained decoding: K2 tool calls, JSON output and a reasoning budget as per-row allowed-token masks.

A request's constraint is a Lark grammar (llguidance's dialect) over the whole assistant turn: an optional
`<think>` block, free text, and then, as the request allows, a tool-calls section whose calls name declared tools,
count their ids up from the conversation's earlier calls and carry arguments that match the tool's JSON schema; or
a JSON value (response_format). llguidance compiles it against the model's tokenizer; a RowConstraint follows one
sequence token by token and gives the mask of the tokens allowed next: ceil(V/32) int32 words, bit k of word j
allowing token 32j + k (llguidance's layout), which `k2jax.sampling.sample` applies inside the jitted sampler.

Free text may not spell the markers the chat parser splits on (`</think>` inside reasoning, the tool-calls section
opener in content), so what the grammar allows is exactly what `k2jax.chat` parses: calls only from the grammar's
section, never from text, and never inside reasoning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer

from k2jax import chat
from k2jax.sampling import SamplingParams, StepMasks, drafts_exact, mask_words
from k2jax.tokenizer import KIMI_PATTERN, Tokenizer

MAX_CALLS = 16  # calls one tool-calls section may hold
REASONING_EFFORT = {"low": 1024, "medium": 4096, "high": 16384}  # reasoning_effort -> max reasoning tokens
# JSON is written as json.dumps writes it, with or without the spaces after separators: no other whitespace, so a
# weak model cannot pad its arguments with blanks indefinitely.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}
SAFE_INTEGER = 2**53
VALUE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas
ANY_OBJECT: dict[str, Any] = {"type": "object"}
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class GrammarError(ValueError):
    """A tool schema or response format that the grammar library cannot compile; the message names which and why,
    `where` the request field (e.g. tools[0].function.parameters)."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where


# ---------------------------------------------------------------- grammars


def literal(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text)


def text_without(marker: str) -> str:
    """A Lark terminal: any text that does not contain `marker`."""
    escaped = "".join(f"\\{c}" if c in r"\/|.^$*+?()[]{}" else c for c in marker)
    return f"/(?s:.*)/ & ~/(?s:.*){escaped}(?s:.*)/"


TURN_HEAD = f"""\
think: {chat.THINK_BEGIN} THINK {chat.THINK_END}
THINK: {text_without(chat.THINK_END)}
CONTENT: {text_without(chat.SECTION_BEGIN)}
"""


def is_strict(tool: Mapping[str, Any]) -> bool:
    """Whether a tool's arguments are enforced (OpenAI's `"strict": false` on the function opts out)."""
    return tool["function"].get("strict", True) is not False


def arguments_schema(tool: Mapping[str, Any], where: str = "parameters") -> dict[str, Any]:
    """The JSON schema a tool's arguments must match: its parameters (an object; none means no arguments)."""
    if not is_strict(tool):
        return ANY_OBJECT
    schema = tool["function"].get("parameters")
    if schema is None:
        return NO_PARAMETERS
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise GrammarError(f"{where} (tool `{tool['function']['name']}`): must describe a JSON object (type "
                           f"'object'), got type {kind!r}", where)
    return {**schema, "type": "object"}


def check_schema(schema: Mapping[str, Any], where: str, what: str) -> None:
    """GrammarError naming the field `where`, `what` it belongs to and the construct, unless llguidance can compile
    this JSON schema."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(dict(schema))
    except ValueError as err:
        raise GrammarError(f"{where} ({what}): {err}", where) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"{where} ({what}): the grammar library cannot enforce this schema: {messages[0]}", where)


def safe_integers(schema: Any) -> Any:
    """`schema` with every integer that has no bound kept within +-2**53 (what a JSON parser's doubles hold exactly),
    so a model cannot write digits forever; the values it allows stay valid under the original schema."""
    if isinstance(schema, list):
        return [safe_integers(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {key: value if key in VALUE_KEYWORDS else safe_integers(value) for key, value in schema.items()}
    if out.get("type") == "integer":
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
    return out


def json_value(schema: Mapping[str, Any]) -> str:
    """The Lark rule body of a JSON value matching `schema`, laid out as JSON_LAYOUT says, integers kept safe."""
    return f"%json {json.dumps({**safe_integers(schema), 'x-guidance': JSON_LAYOUT})}"


def tool_calls_grammar(tools: Sequence[Mapping[str, Any]], choice: str = "auto", function: str | None = None,
                       parallel: bool = True, first_index: int = 0) -> str:
    """The Lark grammar of an assistant turn that may ("auto"), must ("required", or when `function` names the one
    tool to call: then the section follows the reasoning at once) or must not ("none") end with a tool-calls section;
    call k's id is functions.NAME:{first_index + k}.

    Raises GrammarError naming the tool whose parameters cannot be compiled.
    """
    if choice not in ("auto", "required", "none"):
        raise ValueError(f"choice must be 'auto', 'required' or 'none', got {choice!r}")
    if choice == "none":
        return f"start: think? CONTENT\n{TURN_HEAD}"
    names = [t["function"]["name"] for t in tools]
    callable_ = [i for i, name in enumerate(names) if function is None or name == function]
    if not callable_:
        raise GrammarError(f"tool_choice names `{function}`, which is not among the tools {names}", "tool_choice")
    rules = []
    for i in callable_:
        schema = arguments_schema(tools[i], f"tools[{i}].function.parameters")
        check_schema(schema, f"tools[{i}].function.parameters", f"tool `{names[i]}`")
        rules.append(f"args_{i}: {json_value(schema)}")
    count = MAX_CALLS if parallel else 1
    for k in range(count):
        heads = " | ".join(f"{literal(f'functions.{names[i]}:{first_index + k}')} {chat.ARGUMENT_BEGIN} args_{i}"
                           for i in callable_)
        more = f" calls_{k + 1}?" if k + 1 < count else ""
        rules.append(f"calls_{k}: {chat.CALL_BEGIN} ({heads}) {chat.CALL_END}{more}")
    answer = "CONTENT section?" if choice == "auto" and function is None else "section"
    return (f"start: think? {answer}\n{TURN_HEAD}"
            f"section: {chat.SECTION_BEGIN} calls_0 {chat.SECTION_END}\n" + "\n".join(rules) + "\n")


def json_grammar(schema: Mapping[str, Any] | None = None) -> str:
    """The Lark grammar of an assistant turn whose answer is one JSON value matching `schema` (None: any object).

    Raises GrammarError if the schema cannot be compiled.
    """
    schema = ANY_OBJECT if schema is None else schema
    check_schema(schema, "response_format.json_schema.schema", "the response format")
    return f"start: think? answer\nanswer: {json_value(schema)}\n{TURN_HEAD}"


# ---------------------------------------------------------------- masks


class Vocabulary:
    """The model's tokens as llguidance sees them (tiktoken ranks + reserved tokens) and the shape of their masks."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.size = max(vocab_size, tokenizer.vocab_size)
        self.words = mask_words(self.size)
        self.lltokenizer = LLTokenizer.from_tiktoken(
            encoder={token: rank for rank, token in enumerate(tokenizer.tokens)},
            special_tokens=dict(tokenizer.special_tokens), pattern=KIMI_PATTERN,
            eos_token=list(tokenizer.stop_ids), n_vocab=self.size)
        self.think_begin = tokenizer.token_id(chat.THINK_BEGIN)
        self.think_end = tokenizer.token_id(chat.THINK_END)
        self.stop_ids = tuple(tokenizer.stop_ids)

    def all_allowed(self) -> np.ndarray:
        """A mask allowing every token."""
        return np.full(self.words, -1, np.int32)

    def only(self, tokens: Sequence[int]) -> np.ndarray:
        """A mask allowing just `tokens`."""
        words = np.zeros(self.words, np.uint32)
        for token in tokens:
            words[token // 32] |= np.uint32(1 << (token % 32))
        return words.view(np.int32)

    def matcher(self, grammar: str) -> LLMatcher:
        """A fresh matcher of a Lark grammar; GrammarError if it does not compile."""
        matcher = LLMatcher(self.lltokenizer, LLMatcher.grammar_from_lark(grammar), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"grammar does not compile: {matcher.get_error()}")
        return matcher


@functools.lru_cache(maxsize=4)
def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> Vocabulary:
    """The (cached) Vocabulary of a tokenizer for a model of `vocab_size` ids; building one takes about a second
    at K2's 163,840 tokens."""
    return Vocabulary(tokenizer, vocab_size)


def allows(mask: np.ndarray, token: int) -> bool:
    """Whether a mask allows `token`."""
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


class RowConstraint:
    """One sequence's constraint: an optional grammar and an optional reasoning budget.

    The budget counts tokens inside the opening `<think>` block; once spent, `</think>` is the only token allowed
    (as soon as the grammar allows it). Where the grammar forces text (a call's `functions.NAME:IDX` once NAME is
    told apart, a JSON key), the mask allows only the first token of llguidance's canonical tokenization of it, so
    forced stretches are single tokens that a decode call takes without sampling (see `forced`). `steady` says
    whether the last token left the mask unchanged: while it does, several tokens can be sampled under one mask and
    checked afterwards; while it does not, a row whose sampling makes draws exact (k2jax.sampling.drafts_exact)
    samples its first token under the mask and drafts the rest from every token (see accept and decode_plan).
    """

    def __init__(self, vocab: Vocabulary, grammar: str | None = None, reasoning_budget: int | None = None):
        if reasoning_budget is not None and reasoning_budget < 0:
            raise ValueError(f"the reasoning budget must be >= 0 tokens, got {reasoning_budget}")
        self.vocab, self.budget = vocab, reasoning_budget
        self.matcher = vocab.matcher(grammar) if grammar is not None else None
        self.phase = "start"  # -> "reasoning" (after <think>) -> "answer"
        self.reasoning_tokens = 0
        self.steady = False
        self._mask: tuple[np.ndarray, int | None] | None = None
        self._ahead: tuple[tuple[int, ...], tuple[np.ndarray, int | None]] | None = None  # forced()'s run, mask after

    def mask(self) -> np.ndarray:
        """The tokens allowed next, [words] int32."""
        return self._state()[0]

    def forced(self, limit: int) -> tuple[list[int], np.ndarray]:
        """The next tokens (at most `limit`) that the mask allows alone, one after another, and the mask after them;
        the constraint itself does not move."""
        saved = (self.phase, self.reasoning_tokens, self._mask)
        tokens: list[int] = []
        while len(tokens) < limit and (token := self._state()[1]) is not None:
            self._consume(token)
            tokens.append(token)
        after = self._state()
        if tokens:
            if self.matcher is not None:
                self.matcher.rollback(len(tokens))
            self.phase, self.reasoning_tokens, self._mask = saved
            self._ahead = (tuple(tokens), after)
        return tokens, after[0]

    def accept(self, tokens: Sequence[int], exact: bool = False, drafted: bool = False, forced: int = 0) -> int:
        """Advance over a run of draws: the first `forced` ones taken as `forced` gave them, the next made under the
        mask after those, the later ones under it too or, `drafted`, from every token; returns how many were taken.
        The run ends before the first later draw that does not stand where it falls: one the grammar does not allow
        there, or, unless the row's sampling makes draws `exact` (see k2jax.sampling.drafts_exact), one made after
        the mask changed. An exact draw that the mask where it falls allows stands when that mask allows no token the
        draw's did not: it is the draw under that mask. What follows a void draw is void too: it was drawn after it."""
        forced = min(forced, len(tokens))
        for token in tokens[:forced]:
            self._consume(int(token))
        if forced and self._ahead is not None and self._ahead[0] == tuple(int(t) for t in tokens[:forced]):
            self._mask = self._ahead[1]  # the look-ahead's mask after these tokens
        self._ahead = None
        if forced == len(tokens):
            self.steady = False
            return forced
        used = self.mask()
        for i, token in enumerate(tokens[forced:]):
            if i and not self._stands(int(token), used, exact, drafted):
                self.steady = False
                return forced + i
            self._consume(int(token))
        self.steady = np.array_equal(self.mask(), used)
        return len(tokens)

    def _stands(self, token: int, used: np.ndarray, exact: bool, drafted: bool) -> bool:
        """Whether a later draw of a run (see accept) stands where the grammar is now."""
        mask = self.mask()
        if not exact:
            return np.array_equal(mask, used)
        return allows(mask, token) and (drafted or not (mask & ~used).any())

    def _consume(self, token: int) -> None:
        """Take one token: the matcher's state and the reasoning phase advance."""
        if self.matcher is not None:
            self.matcher.consume_token(token)
        if self.phase == "start":
            self.phase = "reasoning" if token == self.vocab.think_begin else "answer"
        elif self.phase == "reasoning":
            if token == self.vocab.think_end:
                self.phase = "answer"
            else:
                self.reasoning_tokens += 1
        self._mask = None

    def _state(self) -> tuple[np.ndarray, int | None]:
        """The mask, and the one token it allows if just one."""
        if self._mask is None:
            self._mask = self._compute()
        return self._mask

    def _compute(self) -> tuple[np.ndarray, int | None]:
        """The grammar's mask (the canonical first token of text it forces; stop tokens only once it failed or
        finished), narrowed by a spent budget; and its one token if it allows just one."""
        vocab, single = self.vocab, None
        if self.matcher is None:
            words = vocab.all_allowed()
            if self.phase != "start":  # no second think block, nor a stray </think> in the answer
                words &= ~vocab.only([vocab.think_begin] + ([vocab.think_end] if self.phase == "answer" else []))
        elif self.matcher.is_error():
            words = vocab.only(vocab.stop_ids)
        elif forced := self.matcher.compute_ff_tokens():
            single = int(forced[0])
            words = vocab.only([single])
        else:
            words = np.empty(vocab.words, np.int32)
            self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            if not words.any():
                words = vocab.only(vocab.stop_ids)
        spent = self.budget is not None and self.phase == "reasoning" and self.reasoning_tokens >= self.budget
        if spent and allows(words, vocab.think_end):
            single, words = vocab.think_end, vocab.only([vocab.think_end])
        return words, single


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """A decode call's masks over its rows (None without constraints; all tokens for unconstrained rows), its step
    count, which constrained rows' sampling makes drafts exact (k2jax.sampling.drafts_exact), and how many tokens
    each constrained row takes forced."""

    masks: StepMasks | None
    n_steps: int
    constraints: Mapping[int, RowConstraint]
    exact: frozenset[int]
    n_forced: Mapping[int, int]

    def take(self, row: int, tokens: Sequence[int]) -> int:
        """How many of a row's sampled tokens stand (all of an unconstrained row's), its constraint advanced over
        them (see RowConstraint.accept)."""
        constraint = self.constraints.get(row)
        if constraint is None:
            return len(tokens)
        return constraint.accept(tokens, row in self.exact, bool(self.masks.drafts[row]), self.n_forced[row])


def decode_plan(rows: Mapping[int, tuple[RowConstraint, SamplingParams]], n_rows: int, decode_steps: int,
                decoding: int | None = None) -> DecodePlan:
    """The plan of a decode call over n_rows rows, `decoding` of them sampling (default: the constrained ones, given
    with their sampling). A row first takes the tokens its grammar forces; then, if its mask changes from token to
    token (or it took forced ones), it drafts its later steps when its sampling makes drafts exact; when it does not,
    its later draws are refused (see RowConstraint.accept). The count is decode_steps, unless every row that decodes
    is one that cannot draft: then the longest of their forced runs and one more, so no row's steps are cut short for
    another's."""
    constraints = {row: c for row, (c, _) in rows.items()}
    exact = frozenset(row for row, (_, params) in rows.items() if drafts_exact(params))
    if not rows:
        return DecodePlan(None, decode_steps, constraints, exact, {})
    first = next(iter(constraints.values())).vocab
    masks = StepMasks(np.tile(first.all_allowed(), (n_rows, 1)), np.zeros(n_rows, bool),
                      np.full((n_rows, decode_steps), -1, np.int32))
    held, n_forced = [], {}
    for row, constraint in constraints.items():
        forced, masks.words[row] = constraint.forced(decode_steps)
        masks.forced[row, :len(forced)] = forced
        n_forced[row] = len(forced)
        changing = bool(forced) or not constraint.steady
        masks.drafts[row] = changing and row in exact
        if changing and row not in exact:
            held.append(len(forced) + 1)
    alone = bool(held) and len(held) == (len(rows) if decoding is None else decoding)
    return DecodePlan(masks, min(decode_steps, max(held)) if alone else decode_steps, constraints, exact, n_forced)


def row_constraints(tokenizer: Tokenizer, vocab_size: int, rules: str | None, budget: int | None,
                    n: int) -> list[RowConstraint | None]:
    """n rows' constraints under one grammar and reasoning budget; None for every row when neither applies."""
    if rules is None and budget is None:
        return [None] * n
    vocab = vocabulary(tokenizer, vocab_size)
    return [RowConstraint(vocab, rules, budget) for _ in range(n)]


def reasoning_budget(max_reasoning_tokens: int | None, effort: str | None) -> int | None:
    """Reasoning tokens allowed: max_reasoning_tokens if given, else reasoning_effort's budget, else no limit."""
    if max_reasoning_tokens is not None:
        if max_reasoning_tokens < 0:
            raise ValueError(f"max_reasoning_tokens must be >= 0, got {max_reasoning_tokens}")
        return max_reasoning_tokens
    if effort is None:
        return None
    if effort not in REASONING_EFFORT:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORT)}, got {effort!r}")
    return REASONING_EFFORT[effort]
