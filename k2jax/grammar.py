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
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer

from k2jax import chat
from k2jax.sampling import EDGES, STATES, SamplingParams, StepMasks, drafts_exact, mask_words
from k2jax.tokenizer import KIMI_PATTERN, Tokenizer

MAX_CALLS = 16  # calls one tool-calls section may hold
COMPILED = 64  # compiled grammars a Vocabulary keeps to copy
REASONING_EFFORT = {"low": 1024, "medium": 4096, "high": 16384}  # reasoning_effort -> max reasoning tokens
# JSON is written as json.dumps writes it, with or without the spaces after separators: no other whitespace, so a
# weak model cannot pad its arguments with blanks indefinitely.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}
SAFE_INTEGER = 2**53
VALUE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas
ANY_OBJECT: dict[str, Any] = {"type": "object"}
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# where a wide mask's grammar turns: a decode call's automaton follows these (RowConstraint.plan)
MARKERS = (chat.THINK_END, chat.SECTION_BEGIN, chat.CALL_BEGIN, chat.ARGUMENT_BEGIN, chat.CALL_END, chat.SECTION_END)
# a grammar's state as masks see it: the tokens allowed next, and the tokens it forces from there (empty unless the
# mask allows one token, their first)
Next = tuple[np.ndarray, tuple[int, ...]]


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
        self.markers = tuple(tokenizer.token_id(m) for m in MARKERS if m in tokenizer.special_tokens)
        self._compiled = functools.lru_cache(maxsize=COMPILED)(self._compile)

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
        """A fresh matcher of a Lark grammar: a copy of the one compiled for it, kept for the last COMPILED grammars
        (n samples of a request, requests declaring the same tools: compiling takes ~2 ms, a copy ~5 us); GrammarError
        if it does not compile."""
        return self._compiled(grammar).deep_copy()

    def _compile(self, grammar: str) -> LLMatcher:
        """A Lark grammar compiled against this vocabulary, never advanced (matcher copies it)."""
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


def allowed_tokens(mask: np.ndarray, at_most: int) -> list[int] | None:
    """The tokens a mask allows, in order, or None if more than `at_most` (bits popped in Python: the words holding
    any are at most `at_most`, and numpy's per-call cost exceeds theirs)."""
    bits = mask.view(np.uint32)
    if np.count_nonzero(bits) > at_most:
        return None
    tokens: list[int] = []
    for word in np.flatnonzero(bits).tolist():
        value = int(bits[word])
        while value:
            low = value & -value
            tokens.append(32 * word + low.bit_length() - 1)
            value ^= low
        if len(tokens) > at_most:
            return None
    return tokens


def mask_delta(mask: np.ndarray, root: np.ndarray) -> tuple[bool, list[int], list[int]] | None:
    """How a StepMasks state writes `mask` beside its row's root mask: (base, tokens added, tokens dropped): its own
    tokens if at most EDGES, else the root's with at most EDGES added and dropped; None if neither fits."""
    if (own := allowed_tokens(mask, EDGES)) is not None:
        return False, own, []
    add, drop = allowed_tokens(mask & ~root, EDGES), allowed_tokens(root & ~mask, EDGES)
    return None if add is None or drop is None else (True, add, drop)


@dataclasses.dataclass
class PlanState:
    """A state of a row's automaton for one decode call (k2jax.sampling.StepMasks, built by RowConstraint.plan): the
    tokens from the call's start to where it samples (its chain last), its chain, the grammar's state there (Next),
    how StepMasks writes that mask (mask_delta), whether the mask holds after a draw that is no edge, and its edges
    (token -> state); `drafts` when its mask allows every token and its first draw is a draft too (accept checks it
    where it falls)."""

    path: tuple[int, ...]
    chain: tuple[int, ...]
    after: Next | None
    lists: tuple[bool, list[int], list[int]]
    hold: bool
    edges: dict[int, int] = dataclasses.field(default_factory=dict)
    drafts: bool = False


class RowConstraint:
    """One sequence's constraint: an optional grammar and an optional reasoning budget.

    The budget counts tokens inside the opening `<think>` block; once spent, `</think>` is the only token allowed
    (as soon as the grammar allows it). Where the grammar forces text (a call's `functions.NAME:IDX` once NAME is
    told apart, a JSON key), the mask allows only the first token of llguidance's canonical tokenization of it, so
    forced stretches are single tokens that a decode call takes without sampling. A row whose sampling makes draws
    exact (k2jax.sampling.drafts_exact) drafts past the states a decode call's automaton holds, each draft checked
    where it falls (the grammar walks the token's bytes; no mask is computed). Another row samples under one mask
    past them; `steady` says whether the last token left the mask unchanged, and while it does, those draws stand
    while the mask stays the same (see plan, accept and decode_plan).
    """

    def __init__(self, vocab: Vocabulary, grammar: str | None = None, reasoning_budget: int | None = None):
        if reasoning_budget is not None and reasoning_budget < 0:
            raise ValueError(f"the reasoning budget must be >= 0 tokens, got {reasoning_budget}")
        self.vocab, self.budget = vocab, reasoning_budget
        self.matcher = vocab.matcher(grammar) if grammar is not None else None
        self.phase = "start"  # -> "reasoning" (after <think>) -> "answer"
        self.reasoning_tokens = 0
        self._used: np.ndarray | None = None  # the mask the last accepted run was sampled under (steady)
        self.refused = False  # whether the last run accepted was cut at a draw the grammar refused
        self._mask: Next | None = None
        self._below: dict[tuple[int, int, bool], tuple[np.ndarray, list[PlanState]]] = {}  # plan's, by marker

    @property
    def steady(self) -> bool:
        """Whether the last token left the mask unchanged (the last run ended where its draws' mask still holds);
        computed when asked, as only a held row's plan asks: an exact row would pay a mask it never uses."""
        return self._used is not None and np.array_equal(self.mask(), self._used)

    def mask(self) -> np.ndarray:
        """The tokens allowed next, [words] int32."""
        return self._state()[0]

    def sole(self) -> int | None:
        """The one token the mask allows, which every masked draw takes whatever its sampling; None if it allows
        more."""
        one = allowed_tokens(self.mask(), 1)
        return one[0] if one else None

    def forced(self, limit: int) -> tuple[list[int], np.ndarray]:
        """The next tokens (at most `limit`) that the mask allows alone, one after another, and the mask after them;
        the constraint itself does not move."""
        tokens, after = self._look((), limit)
        return tokens, after[0]

    def plan(self, steps: int, exact: bool) -> list[PlanState]:
        """The row's automaton for a decode call of `steps` steps (the constraint itself does not move). State 0 takes
        the tokens the grammar forces, then samples under the mask after them, which holds for the later steps unless
        the row's draws are `exact` (those draft). Then, breadth first up to STATES states, a mask that allows at most
        EDGES tokens leads by each to a state of its own (a tool's name, a JSON key), and a wider one at the root by
        each chat marker it allows (`</think>`, a tool-calls section): a row that takes one samples next under the
        grammar's own mask, where a drafting row would draw from every token and a held one under a stale mask. Past
        them an exact row drafts, another holds.

        The states past a chat marker drawn in running text (no forced tokens, a wide mask) are planned once per
        row: a turn's grammar (tool_calls_grammar, json_grammar) reaches the marker there only at the end of a
        reasoning or content terminal, and a row without one only changes phase there, so what follows it does not
        depend on the text before it. Looking past
        `</think>` walks the whole vocabulary for the answer's first mask (about 3 ms at K2's 163,840 tokens, where a
        mask in running text takes microseconds), and past the tool-calls section's opener every declared tool's
        name.

        An exact row at its turn's start or inside its reasoning block (under a grammar, with no budget to enforce)
        drafts from its first step instead, with no mask computed: there the grammar allows `<think>` among other
        openings, then any text that does not spell `</think>`, and forces none, so a mask would cost more than the
        rare draft the grammar refuses. Every draft is checked where it falls (accept), so the tokens are those of
        masked sampling; after a run cut at a refused draw the next call samples under the mask again, or the row
        would draw the same refused token (its key is the position's) for ever."""
        if exact and self.matcher is not None and self.budget is None and self.phase != "answer" and (
                not self.refused):
            return [PlanState((), (), (self.vocab.all_allowed(), ()), (True, [], []), False, drafts=True)]
        chain, after = self._look((), steps)
        states = [PlanState(tuple(chain), tuple(chain), after, (True, [], []), not exact)]
        root, root_few = after[0], allowed_tokens(after[0], EDGES)
        root_choices = self._choices(root, root_few, True)
        key = self._marker_key(chain, root_few, root_choices, steps, exact)
        if key is not None and (below := self._below_marker(key, root)) is not None:
            states[0].edges[key[0]] = 1
            return [*states, *below]
        queue = deque([0])
        while queue and len(states) < STATES:
            state = states[queue.popleft()]
            if len(state.path) + 1 >= steps:
                continue
            choices = root_choices if state is states[0] else self._choices(
                state.after[0], None if state.lists[0] else state.lists[1], False)
            for token in choices[:STATES - len(states)]:
                path = state.path + (token,)
                chain, after = self._look(path, steps - len(path))
                if (lists := mask_delta(after[0], root)) is None:
                    continue
                state.edges[token] = len(states)
                queue.append(len(states))
                states.append(PlanState(path + tuple(chain), tuple(chain), after, lists, not exact))
        if key is not None and states[0].edges == {key[0]: 1}:
            self._below[key] = root, states[1:]
        return states

    @staticmethod
    def _marker_key(chain: Sequence[int], few: list[int] | None, choices: list[int], steps: int, exact: bool
                    ) -> tuple[int, int, bool] | None:
        """(marker, steps, exact) when a plan's root is running text (no chain; `few`, its allowed tokens if at most
        EDGES, is None) whose one choice (_choices) is a chat marker, else None."""
        if chain or few is not None or len(choices) != 1:
            return None
        return choices[0], steps, exact

    def _below_marker(self, key: tuple[int, int, bool], root: np.ndarray) -> list[PlanState] | None:
        """The states planned before past this marker, written beside `root` (None if not planned or if one of their
        masks does not fit beside it)."""
        if key not in self._below:
            return None
        planned_root, below = self._below[key]
        if np.array_equal(planned_root, root):
            return below
        lists = [mask_delta(state.after[0], root) for state in below]
        if any(written is None for written in lists):
            return None
        return [dataclasses.replace(state, lists=written) for state, written in zip(below, lists)]

    def accept(self, tokens: Sequence[int], exact: bool = False, drafted: bool = False, forced: int = 0,
               states: Sequence[PlanState] | None = None) -> int:
        """Advance over a decode call's draws as the device made them under the automaton `states` (plan; without,
        the one state whose chain is the first `forced` tokens, held unless `drafted`); returns how many were taken.
        Chain tokens, and draws at a state reached by chains and edges, were made under the grammar's own mask and
        stand (but at a state that `drafts`, whose first draw is a draft as the later ones are). After a draw that is
        no edge the row's later draws were made under that state's mask (held) or from every token; the run ends
        before the first that does not stand where it falls: one the grammar does not allow there, or, unless the
        row's sampling makes draws `exact` (see k2jax.sampling.drafts_exact), one made after the mask changed. An
        exact draw that the mask where it falls allows stands when that mask allows no token the draw's did not: it
        is the draw under that mask. What follows a void draw is void too: it was drawn after it."""
        if states is None:
            chain = tuple(int(t) for t in tokens[:forced])
            states = [PlanState(chain, chain, None, (True, [], []), not drafted)]
        tokens = [int(t) for t in tokens]
        state, at, used = states[0], 0, None
        on, free = not state.drafts, state.drafts  # a drafting state's draws are drafts from the first
        start = self._take_reasoning(tokens) if state.drafts and exact else 0
        for i, token in enumerate(tokens[start:], start):
            if on and at < len(state.chain):
                self._consume(token)
                at += 1
            elif on:
                used = self.mask()
                if not allows(used, token):  # only a device that broke its automaton samples this
                    self._used, self.refused = None, True
                    return i
                self._consume(token)
                if token in state.edges:
                    state, at = states[state.edges[token]], 0
                else:
                    on, free = False, not state.hold
            elif self._stands(token, used, exact, free):
                self._consume(token)
            else:
                self._used, self.refused = None, True
                return i
            if on and at == len(state.chain) and state.after is not None:
                self._mask = state.after  # the plan's mask here
        self._used, self.refused = used, False
        return len(tokens)

    def _take_reasoning(self, tokens: list[int]) -> int:
        """Take a drafting row's leading drafts that stand inside its reasoning, up to `</think>`, in one walk of the
        grammar; returns how many. There the grammar forces no text, so a draft stands where the walk takes it (as
        _allows says); the first it refuses is left to accept's own check. (A drafting state has a grammar and no
        budget: plan.)"""
        if self.phase != "reasoning":
            return 0
        end = tokens.index(self.vocab.think_end) if self.vocab.think_end in tokens else len(tokens)
        taken = self.matcher.try_consume_tokens(tokens[:end]) if end else 0
        if taken:
            self.reasoning_tokens += taken
            self._mask = None
        return taken

    def _choices(self, mask: np.ndarray, few: list[int] | None, root: bool) -> list[int]:
        """The tokens by which a plan's state leads to others: all it allows if at most EDGES (`few`, from
        allowed_tokens; but stop tokens), else, at the root, the chat markers it allows; without a grammar only
        `</think>`, the one marker that changes such a row's mask."""
        markers = self.vocab.markers if self.matcher is not None else (self.vocab.think_end,)
        tokens = (markers if root else []) if few is None else few
        return [t for t in tokens if allows(mask, t) and t not in self.vocab.stop_ids]

    def _look(self, path: Sequence[int], limit: int) -> tuple[list[int], Next]:
        """The tokens the grammar forces after `path` (at most `limit`) and its state after them (Next); the
        constraint itself does not move. It looks on a copy of the matcher: llguidance 1.9's rollback after a mask
        leaves a stale mask for a different path taken after it. With nothing to take, no copy: the matcher itself
        answers, from the lexer states it has cached (a copy computes a wide mask afresh, ~3 ms at K2's vocabulary)."""
        if not path and not self._state()[1]:
            return [], self._state()
        saved = (self.matcher, self.phase, self.reasoning_tokens, self._mask)
        if self.matcher is not None:
            self.matcher = self.matcher.deep_copy()
        for token in path:
            self._consume(token)
        tokens: list[int] = []
        while len(tokens) < limit and (run := self._state()[1]):
            for token in run[:limit - len(tokens)]:
                self._consume(token)
                tokens.append(token)
        after = self._state()
        self.matcher, self.phase, self.reasoning_tokens, self._mask = saved
        return tokens, after

    def _stands(self, token: int, used: np.ndarray, exact: bool, drafted: bool) -> bool:
        """Whether a later draw of a run (see accept) stands where the grammar is now: a draft where the grammar allows
        it, a draw under a held mask where the mask is the same (or, for an exact draw, allows no token it did not)."""
        if exact and drafted:
            return self._allows(token)
        mask = self.mask()
        if not exact:
            return np.array_equal(mask, used)
        return allows(mask, token) and not (mask & ~used).any()

    def _allows(self, token: int) -> bool:
        """Whether the mask allows `token`, as allows(self.mask(), token) says, without computing the mask where the
        grammar alone decides: the token must be the first forced one if the grammar forces text, else one the
        grammar can take (llguidance's validate_tokens walks the token's bytes, not the vocabulary)."""
        if self._mask is not None or self.matcher is None or self.matcher.is_error() or self.budget is not None:
            return allows(self.mask(), token)
        if forced := self.matcher.compute_ff_tokens():
            return token == forced[0]
        return self.matcher.validate_tokens([token]) == 1 or allows(self.mask(), token)

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

    def _state(self) -> Next:
        """The mask, and the tokens the grammar forces from here (Next)."""
        if self._mask is None:
            self._mask = self._compute()
        return self._mask

    def _compute(self) -> Next:
        """The grammar's mask (the first token of llguidance's canonical tokenization of text it forces; stop tokens
        only once it failed or finished), narrowed by a spent budget; and the tokens it forces, as llguidance
        tokenizes the forced text. Taken at once they lead where taking the first and asking again would: llguidance
        holds back a last token that the text after it could merge with."""
        vocab, run = self.vocab, ()
        if self.matcher is None:
            words = vocab.all_allowed()
            if self.phase != "start":  # no second think block, nor a stray </think> in the answer
                words &= ~vocab.only([vocab.think_begin] + ([vocab.think_end] if self.phase == "answer" else []))
        elif self.matcher.is_error():
            words = vocab.only(vocab.stop_ids)
        elif forced := self.matcher.compute_ff_tokens():
            run = tuple(int(t) for t in forced)
            words = vocab.only(run[:1])
        else:
            words = np.empty(vocab.words, np.int32)
            self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            if not words.any():
                words = vocab.only(vocab.stop_ids)
        spent = self.budget is not None and self.phase == "reasoning" and self.reasoning_tokens >= self.budget
        if spent and allows(words, vocab.think_end):
            run, words = (vocab.think_end,), vocab.only([vocab.think_end])
        return words, run


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """A decode call's token automata over its rows (None without constraints; rows without one allow every token),
    its step count, which constrained rows' sampling makes drafts exact (k2jax.sampling.drafts_exact), and each
    constrained row's plan (RowConstraint.plan)."""

    masks: StepMasks | None
    n_steps: int
    constraints: Mapping[int, RowConstraint]
    exact: frozenset[int]
    automata: Mapping[int, list[PlanState]]

    def take(self, row: int, tokens: Sequence[int]) -> int:
        """How many of a row's sampled tokens stand (all of an unconstrained row's), its constraint advanced over
        them (see RowConstraint.accept)."""
        constraint = self.constraints.get(row)
        if constraint is None:
            return len(tokens)
        return constraint.accept(tokens, row in self.exact, states=self.automata[row])

    def fill(self, row: int) -> int | None:
        """After take() kept fewer than all of a constrained row's draws: the token the draw where they stopped
        standing takes under the grammar's mask when the mask allows that one only (a forced JSON key or tool name
        the model drafted otherwise), taken; else None. The draw under the mask is that token whatever the row's
        sampling, so the row keeps it instead of drawing it again next call."""
        constraint = self.constraints.get(row)
        token = None if constraint is None else constraint.sole()
        if token is not None:
            constraint.accept([token])
        return token


def write_automaton(masks: StepMasks, row: int, states: Sequence[PlanState]) -> None:
    """Write a row's plan into a call's StepMasks."""
    masks.words[row] = states[0].after[0]
    for s, state in enumerate(states):
        masks.chain[row, s, :len(state.chain)] = state.chain
        masks.base[row, s], add, drop = state.lists
        masks.add[row, s, :len(add)], masks.drop[row, s, :len(drop)] = add, drop
        masks.edges[row, s, :len(state.edges)] = list(state.edges)
        masks.to[row, s, :len(state.edges)] = list(state.edges.values())
        masks.hold[row, s] = state.hold


def decode_plan(rows: Mapping[int, tuple[RowConstraint, SamplingParams]], n_rows: int, decode_steps: int,
                decoding: int | None = None) -> DecodePlan:
    """The plan of a decode call over n_rows rows, `decoding` of them sampling (default: the constrained ones, given
    with their sampling): each constrained row's automaton (RowConstraint.plan). A row whose mask changes from token
    to token (or that takes forced tokens) drafts past its automaton's states when its sampling makes drafts exact;
    when it does not, it holds the last mask there, and its draws stand only while the mask stays the same (see
    RowConstraint.accept). The count is decode_steps, unless every row that decodes is one that cannot draft: then
    the longest of their forced runs and one more, so no row's steps are cut short for another's."""
    constraints = {row: c for row, (c, _) in rows.items()}
    exact = frozenset(row for row, (_, params) in rows.items() if drafts_exact(params))
    if not rows:
        return DecodePlan(None, decode_steps, constraints, exact, {})
    masks = StepMasks.unconstrained(n_rows, next(iter(constraints.values())).vocab.words, decode_steps)
    held, automata = [], {}
    for row, constraint in constraints.items():
        automata[row] = states = constraint.plan(decode_steps, row in exact)
        write_automaton(masks, row, states)
        if row not in exact and (states[0].chain or not constraint.steady):
            held.append(len(states[0].chain) + 1)
    alone = bool(held) and len(held) == (len(rows) if decoding is None else decoding)
    return DecodePlan(masks, min(decode_steps, max(held)) if alone else decode_steps, constraints, exact, automata)


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
