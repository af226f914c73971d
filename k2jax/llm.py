"""The user-facing Model: a loaded engine (k2jax.engine.Engine) with generate(), whose prompts run as requests of a
Scheduler driven on the calling thread, so generate, the agent and the server share one engine loop."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

from k2jax import chat, engine, grammar
from k2jax.engine import Engine
from k2jax.grammar import RowConstraint
from k2jax.sampling import SamplingParams
from k2jax.scheduler import Output, Request, Scheduler
from k2jax.tokenizer import TextStream


@dataclasses.dataclass
class GenerateOutput:
    """Generated ids and texts per sequence (prompt excluded, stop token excluded), and run statistics: seconds to
    the first row's first token and to every row's (prefill_s), and decode tokens/s after that (compiles excluded)."""

    ids: list[list[int]]
    texts: list[str] | None
    stats: dict[str, float]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None = None
    tool_calls: list[list[dict[str, Any]]] | None = None  # OpenAI-style calls per sequence, when tools were given


@dataclasses.dataclass
class Continuation:
    """One generated sequence on the host: its ids and log-probs, its text (when there is a tokenizer; a stop string
    ends it), and why it ended."""

    text: TextStream | None
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    def add(self, out: Output) -> str:
        """Take a scheduler Output up to the token that completes a stop string; returns the new text (a tail that
        could start a stop string waits until it is decided)."""
        if self.finish is not None:
            return ""
        text = "" if self.text is None else self.text.feed(out.tokens)
        taken = len(out.tokens) if self.text is None else self.text.used - len(self.ids)
        self.ids += out.tokens[:taken]
        self.logprobs += out.logprobs[:taken]
        stopped = self.text is not None and self.text.stopped
        self.finish, self.error = ("stop", None) if stopped else (out.finish, out.error)
        if self.finish is not None and self.text is not None:
            text += self.text.feed([], final=True)
        return text


class Model(Engine):
    """A loaded Kimi K2 model (see Engine) that continues batches of prompts: `generate`."""

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, min_p: float = 0.0,
                 n: int = 1, stop: Sequence[str] = (), logprobs: bool = False,
                 on_text: Callable[[int, str], None] | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
                 tool_choice: str = "auto", max_reasoning_tokens: int | None = None) -> GenerateOutput:
        """Continue each prompt (text, or token ids); `n` samples per prompt share its cached prefill pages.

        Sequences end at <|im_end|> / EOS, a stop string, or max_new_tokens. Sample j of a prompt uses seed + j.
        `on_text(row, delta)` streams each row's new text as the engine produces it.
        With `tools` (OpenAI-style declarations; the prompt an assistant turn's opening, as
        tokenizer.apply_chat_template(messages, tools) renders it), tool calls are grammar-enforced: declared names,
        schema-valid arguments, `tool_choice` "auto", "required", "none" or a tool's name; the output's tool_calls
        holds each sequence's parsed calls. `max_reasoning_tokens` ends the reasoning block after that many tokens.
        The prompts run as requests of one Scheduler (one slot each) on this thread: the server's engine loop.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings or of token-id lists, not a single string")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if (stop or on_text) and self.tokenizer is None:
            raise ValueError("stop strings and streamed text need a tokenizer")
        ids = [self._encode(p) for p in prompts]
        longest = max(len(p) for p in ids) + max_new_tokens
        self._check_ids([t for p in ids for t in p], longest)
        params = [SamplingParams(temperature, top_k, top_p, min_p, seed + j) for _ in ids for j in range(n)]
        constraints = self._constraints(tools, tool_choice, max_reasoning_tokens, len(params))
        rows = [Continuation(TextStream(self.tokenizer, stop) if self.tokenizer else None) for _ in params]
        # The context rounds up to a power of two (a pool of at most twice the pages): the pool's shape, and with it
        # every program, is shared by calls of the same batch size whose prompt plus max_new_tokens fall in a bucket.
        context = min(engine.bucket(longest), self.config.max_position_embeddings - engine.DECODE_STEPS)
        scheduler = Scheduler(self, len(rows), context, prefill_chunk=engine.PREFILL_CHUNK,
                              decode_steps=engine.DECODE_STEPS, warmup=False)
        self._compile_s = 0.0
        timing = _Timing(len(rows), self)
        requests: list[Request] = []

        def emit(r: int, out: Output) -> None:
            text = rows[r].add(out)
            timing.took(r, len(out.tokens))
            if rows[r].finish is not None and out.finish is None:  # a stop string: the row ends here
                scheduler.cancel(requests[r])
            if on_text and text:
                on_text(r, text)

        stop_ids = self._stop_ids()
        requests += [Request(ids[r // n], max_new_tokens, lambda out, r=r: emit(r, out), params[r], stop_ids,
                             constraint=constraints[r], logprobs=logprobs) for r in range(len(rows))]
        try:
            scheduler.run(requests)
        finally:
            requests.clear()  # emit refers to them: free the page pool on return, not at a later garbage collection
        failed = next((row.error for row in rows if row.finish == "error"), None)
        if failed is not None:
            raise RuntimeError(f"generation failed: {failed}")
        texts = [r.text.text for r in rows] if self.tokenizer is not None else None
        calls = [chat.parse_output(t).tool_calls for t in texts] if tools is not None else None
        return GenerateOutput(ids=[r.ids for r in rows], texts=texts,
                              stats=timing.stats(sum(len(p) for p in ids), sum(len(r.ids) for r in rows)),
                              finish_reasons=[r.finish or "length" for r in rows],
                              logprobs=[r.logprobs for r in rows] if logprobs else None, tool_calls=calls)

    def _constraints(self, tools: Sequence[Mapping[str, Any]] | None, tool_choice: str,
                     max_reasoning_tokens: int | None, n_rows: int) -> list[RowConstraint | None]:
        """Each row's constraint: the tools' grammar (unless every tool opts out with strict false) and the reasoning
        budget; None for every row when neither applies."""
        if tools is None and max_reasoning_tokens is None:
            return [None] * n_rows
        if self.tokenizer is None:
            raise ValueError("tools and max_reasoning_tokens need a model with a tokenizer")
        rules = None
        if tools is not None:
            chat.check_tools(tools)
            named = None if tool_choice in ("auto", "required", "none") else tool_choice
            if any(map(grammar.is_strict, tools)) or tool_choice == "none":
                rules = grammar.tool_calls_grammar(tools, "required" if named else tool_choice, named)
        budget = grammar.reasoning_budget(max_reasoning_tokens, None)
        return grammar.row_constraints(self.tokenizer, self.config.vocab_size, rules, budget, n_rows)


class _Timing:
    """generate()'s clock: time to the first row's first token and to every row's (prefill_s), with the compile time
    and tokens counted by then, so decode tokens/s counts the tokens and steps after prefill, compiles excluded."""

    def __init__(self, n_rows: int, model: Engine):
        self.n_rows, self.model = n_rows, model
        self.start = time.perf_counter()
        self.started: set[int] = set()
        self.tokens = self.prefill_tokens = 0
        self.first = self.first_compile = self.prefill = self.prefill_compile = 0.0

    def took(self, row: int, tokens: int) -> None:
        """Row `row` got an Output of `tokens` tokens (or its end)."""
        self.tokens += tokens
        if row in self.started:
            return
        now = time.perf_counter() - self.start
        if not self.started:
            self.first, self.first_compile = now, self.model._compile_s
        self.started.add(row)
        if len(self.started) == self.n_rows:
            self.prefill, self.prefill_compile, self.prefill_tokens = now, self.model._compile_s, self.tokens

    def stats(self, prompt_tokens: int, generated_tokens: int) -> dict[str, float]:
        """The run's statistics, once it has ended."""
        elapsed, compile_s = time.perf_counter() - self.start, self.model._compile_s
        decode_s = elapsed - self.prefill - (compile_s - self.prefill_compile)
        decode_rate = (generated_tokens - self.prefill_tokens) / max(decode_s, 1e-9)
        return {"prompt_tokens": prompt_tokens, "time_to_first_token_s": self.first,
                "compile_before_first_token_s": self.first_compile, "prefill_s": self.prefill,
                "generated_tokens": generated_tokens, "compile_s": compile_s, "decode_tokens_per_s": decode_rate,
                "total_s": elapsed}
