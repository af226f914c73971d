"""Continuous batching over cache slots, the one engine loop: requests join and leave between steps.

A server starts the scheduler's background thread, which owns the model; Model.generate and the agent instead drive
the same loop on their own thread with run(requests), until those requests have finished.
Before serving, the thread compiles every program a step can need (warmup), so no request waits for a compile.
Each iteration frees the slots of cancelled requests, admits queued requests into free slots, then runs one engine
step (k2jax.engine.run_step): the next chunk of at most `prefill_chunk` tokens of the oldest request still
prefilling (and of the next ones, as engine.chunk_shape packs them), beside the decode rows of every request that
decodes, so a running stream gets a token in every step, also while a long prompt is prefilled. A prompt's last
token is not prefilled: the request's first decode row feeds it (in the step whose chunk ends its prefill) and
samples its first token on device. Steps with a chunk sample one
token per row; decode-only steps sample decode_steps tokens per row, scanned on device. A request with a constraint
(k2jax.grammar: tool calls, JSON, a reasoning budget) samples along its row's token automaton for the step
(grammar.RowConstraint.plan): the tokens its grammar forces (a call's header, a JSON key), then the grammar's own mask
at each state it reaches (a tool's name, `</think>`); past those, while its mask changes token by token, its later
steps draft from every token (at the turn's start and inside its reasoning block, from the first step; for top-k,
top-p and min-p, which drafts would skew, they keep the last mask, and the step stops after the first sampled token
only when no other row decodes); its run of tokens, up to its stop token, is checked against the constraint and cut
at the first draw that does not stand (the slot's cache is rewound to match). Rows without a constraint sample
exactly as they would alone. Requests see tokens through their `emit` callback, called on the scheduler thread; stop
strings and text are the caller's business (see k2jax.responses).

Prefix cache: every full page a request prefills or ends with stays cached (k2jax.prefix_cache); when a request
starts prefilling, the longest cached page-aligned prefix of its prompt is mapped into its slot and only the rest
is prefilled (shared system prompts, multi-turn chats, tool loops, resumed requests).

Preemption: the pool may hold fewer pages than every slot at full context. When a step needs pages that are neither
free nor cached-and-unused, the newest running request is preempted (its slot released, its full pages left in the
prefix cache) and queued first; it resumes by prefilling its prompt and what it had generated, which the prefix
cache mostly absorbs, so its output is the same.

Multi-host: process 0 runs the Scheduler over LinkedSlots, which broadcast every step / attach / rewind / release
(through jax.distributed) before running it; every other process runs follow(), replaying the same calls, so all
processes run the same jitted steps over the global mesh. A collective with a dead peer can block forever and
cannot be interrupted, so every broadcast runs under a deadline and a process whose deadline passes exits
(status 1), loudly: a step (broadcast plus model call, compiles included) gets step_timeout_s; an idle leader
broadcasts a no-op every IDLE_S, which peers must answer within peer_timeout_s once the link has worked.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from k2jax import engine, grammar
from k2jax.cache import PoolFull
from k2jax.grammar import RowConstraint
from k2jax.sampling import STATES, Logprobs, SamplingParams, StepMasks, host_row, token_logprobs
from k2jax.slots import Slots
from sharding.mesh import broadcast_from_process0

log = logging.getLogger(__name__)

IDLE_S = 1.0
MIN_REUSE = 16  # shorter cached prefixes are not worth a prefill program of a new shape
STEP_TIMEOUT_S = 600.0
PEER_TIMEOUT_S = 60.0
NOOP, STEP, RELEASE, STOP, ATTACH, REWIND = range(6)
HEADER = 5
PARAM_FIELDS = 7  # per slot: active, temperature bits, top_k, top_p bits, min_p bits, seed bits, top_logprobs


class QueueFull(Exception):
    """The scheduler's waiting queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class Output:
    """New tokens of a request with their log-probs (NaN for a token the grammar forced in place of a refused draw,
    when the request reads none: Request.logprobs); the last Output carries the finish reason.

    finish is "stop" (a stop token, not included), "length" (max_tokens reached) or "error" (then `error` says why).
    top_logprobs: per token, its request's params.top_logprobs most likely (id, log-prob) pairs (empty when it asks
    for none, and for tokens the scheduler forced).
    """

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish: str | None = None
    error: str | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to continue: prompt ids, token budget, sampling, stop ids, and where its outputs go.

    logprobs: whether the consumer reads its tokens' log-probs. When not, a constrained row whose draws stop standing
    where its grammar allows one token only takes that token at once (DecodePlan.fill), with a NaN log-prob: the step
    computed none for it.
    force_before_stop: tokens generated in place of the first stop token when force_before_stop[0] has not been
    generated yet (how tool_choice "required" makes the model open a tool call instead of ending its turn, when tool
    calls are not enforced). constraint: what the request may generate (k2jax.grammar); None allows anything.
    The scheduler fills in the rest: context (what to prefill: the prompt, after a preemption or forced tokens also
    what was generated), prefilled (how much of it the slot holds), cached_tokens (prompt tokens the prefix cache gave
    it when it first started).
    """

    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[Output], None]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    force_before_stop: tuple[int, ...] = ()
    constraint: RowConstraint | None = None
    logprobs: bool = True
    slot: int | None = None
    prefilled: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    cancelled: bool = False
    context: list[int] = dataclasses.field(default_factory=list)
    attached: bool = False
    admitted: int = 0
    cached_tokens: int | None = None


def check_request(request: Request, max_context: int, vocab_size: int) -> None:
    """Reject a request that cannot run: empty prompt, bad ids, no token budget, over the context, bad sampling."""
    if not request.prompt:
        raise ValueError("empty prompt: give at least one token")
    if request.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
    total = len(request.prompt) + request.max_tokens
    if total > max_context:
        raise ValueError(f"prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_tokens}) is {total}, "
                         f"over the context of {max_context} tokens")
    bad = [t for t in request.prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    host_row(request.params)


def resolve_context(model: engine.Engine, max_context: int | None, decode_steps: int) -> int:
    """Tokens a request may use (prompt + completion): default and limit leave decode_steps of slot headroom."""
    limit = model.config.max_position_embeddings - decode_steps
    context = limit if max_context is None else max_context
    if not 0 < context <= limit:
        raise ValueError(f"max_context must be in [1, {limit}] (max_position_embeddings minus {decode_steps} "
                         f"decode steps of headroom), got {context}")
    return context


class Scheduler:
    """Continuous batching of Requests over `n_slots` cache slots, run by one background thread.

    num_pages: KV pool size in pages (default: every slot at full context); prefix_cache: share cached prompt
    prefixes across requests; warmup: compile every program before serving (`ready` is set after).
    With a StepLink (multi-host, process 0), every model call is broadcast to the processes running follow().
    """

    def __init__(self, model: engine.Engine, n_slots: int = 8, max_context: int | None = None, max_queue: int = 256,
                 prefill_chunk: int = engine.PREFILL_CHUNK, decode_steps: int = engine.DECODE_STEPS,
                 link: StepLink | None = None, num_pages: int | None = None, prefix_cache: bool = True,
                 warmup: bool = True, progress: bool = False):
        if max_queue < 1 or prefill_chunk < 1 or decode_steps < 1:
            raise ValueError("max_queue, prefill_chunk and decode_steps must all be >= 1")
        if num_pages is not None and num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.max_context = resolve_context(model, max_context, decode_steps)
        self.model, self.max_queue, self.link = model, max_queue, link
        self.prefill_chunk, self.decode_steps = prefill_chunk, decode_steps
        self.warmup, self.progress = warmup, progress
        capacity = self.max_context + decode_steps
        self.slots = (Slots(model, n_slots, capacity, num_pages, prefix_cache, prefill_chunk, decode_steps)
                      if link is None else LinkedSlots(model, n_slots, capacity, link, num_pages, prefix_cache,
                                                       prefill_chunk, decode_steps))
        layout = self.slots.pages.layout
        self.row_pages = layout.pages_per_group * layout.seq_shards  # the most pages one sequence can hold
        if max_context is None:
            self.max_context = min(self.max_context, self.row_pages * layout.page_size - decode_steps)
        if self.max_context < 1:
            raise ValueError(f"a pool of {layout.num_pages} pages of {layout.page_size} tokens cannot hold a sequence")
        self.failure: Exception | None = None
        self.ready = threading.Event()
        self.programs = 0
        self.reused_tokens = 0
        self.looked_up_tokens = 0
        self.preemptions = 0
        self.grammar_seconds = 0.0  # host time planning constrained rows' automata and checking their draws
        self.on_step: Callable[[float, int], None] | None = None
        self._admissions = 0
        self._active: dict[int, Request] = {}
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None  # made by start(): until then no cycle keeps the pool alive
        self._inline = False  # run() drives it on the caller's thread: a consumer's exception reaches the caller
        self.steps = 0
        self.cancelled = 0

    def start(self) -> Scheduler:
        """Start the background thread; returns self."""
        if self._inline or self._thread is not None:
            raise RuntimeError("this scheduler is already running (start() or run())")
        self._thread = threading.Thread(target=self._loop, name="k2jax-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; queued and running requests end with an error; followers stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        for request in [*self._waiting, *self._active.values()]:
            request.finished = True
            self._emit(request, Output((), (), "error", "the server is shutting down"))
        self._waiting.clear()
        self._active.clear()
        if self.link is not None and self.failure is None:
            try:
                self.link.send(STOP)
            except LinkError as err:
                log.error("could not tell the other processes to stop: %s", err)

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._active)

    @property
    def free_slots(self) -> int:
        """Slots not held by any request."""
        return self.slots.n_slots - len(self._active)

    @property
    def total_pages(self) -> int:
        """Pages in the KV pool."""
        return self.slots.pages.layout.num_pages

    @property
    def free_pages(self) -> int:
        """Pages on the free lists (cached pages no request holds are not counted)."""
        return self.slots.pages.free_pages

    @property
    def cached_pages(self) -> int:
        """Pages the prefix cache holds, of which `evictable_pages` no request holds."""
        return int(np.count_nonzero(self.slots.pages.pinned))

    @property
    def evictable_pages(self) -> int:
        """Cached pages that no request holds (freed when pages run short)."""
        return int(np.count_nonzero(self.slots.pages.reclaimable))

    def check_fits(self, request: Request) -> None:
        """ValueError naming the request's length and the pool's size when the pool could never hold it."""
        layout = self.slots.pages.layout
        tokens = len(request.prompt) + request.max_tokens
        need = layout.pages_for(tokens + self.decode_steps)
        if need > self.row_pages:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_tokens}) is {tokens}"
                             f" tokens, which need {need} KV pages of {layout.page_size} tokens (with "
                             f"{self.decode_steps} decode steps of headroom); the KV pool holds {layout.num_pages} "
                             f"pages, at most {self.row_pages} for one sequence")

    def submit(self, request: Request) -> None:
        """Queue a request; raises ValueError if it cannot run, QueueFull if the queue is at its bound."""
        self._check(request)
        with self._cond:
            if not self.alive:
                raise RuntimeError("the scheduler is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._cond.notify()

    def run(self, requests: Sequence[Request]) -> None:
        """Serve `requests` on the calling thread until every queued and running request has finished: how
        Model.generate and the agent drive the engine (the scheduler's own thread must not be started). A failed step
        ends every request in flight, then raises; a request that fails alone ends with an error Output."""
        if self._thread is not None or self._closed:
            raise RuntimeError("this scheduler serves from its own thread (start()): submit requests to it instead")
        self._inline = True
        for request in requests:
            self._check(request)
        self._waiting.extend(requests)
        try:
            while self._waiting or self._active or self._cancelled:
                self._iterate()
        except BaseException:
            self._end_all("generation was interrupted")
            raise

    def _check(self, request: Request) -> None:
        """Validate a request before it queues (ValueError naming the problem) and set what it prefills."""
        check_request(request, self.max_context, self.model.config.vocab_size)
        self.check_fits(request)
        request.context = list(request.prompt)

    def cancel(self, request: Request) -> None:
        """Drop a request (e.g. its client disconnected); its slot is freed before the next model call."""
        with self._cond:
            if request.finished or request.cancelled:
                return
            request.cancelled = True
            self.cancelled += 1
            if request in self._waiting:
                self._waiting.remove(request)
            else:
                self._cancelled.append(request)
            self._cond.notify()

    def _loop(self) -> None:
        """The scheduler thread: compile, then wait for work, admit, prefill and decode until closed (or a peer is
        lost)."""
        if self.warmup:
            try:
                self.programs = self.slots.warmup(self.prefill_chunk, self.decode_steps, self.progress)
            except Exception as err:  # nothing can be served: end the thread, so health reports it
                log.exception("compiling the serving programs failed")
                self._fail_all(f"compiling the serving programs failed: {err}")
                return
        self.ready.set()
        while True:
            with self._cond:
                if not (self._closed or self._waiting or self._active or self._cancelled):
                    self._cond.wait(IDLE_S if self.link else None)
                if self._closed:
                    return
            try:
                if not self._iterate() and self.link is not None:
                    with self.link.deadline(idle=True):
                        self.link.send(NOOP)
            except LinkError as err:
                self._fail(err)
                return
            except Exception:  # a failed step ends its requests, never the thread
                log.exception("scheduler step failed")
                for request in list(self._active.values()):
                    self._finish(request, Output((), (), "error", "internal error while generating"))

    def _iterate(self) -> bool:
        """Free cancelled requests' slots, admit waiting requests, and run one engine step if any request holds a
        slot; returns whether a step ran."""
        with self._cond:
            cancelled, self._cancelled = self._cancelled, []
            self._admit()
        for request in cancelled:
            self._release(request)
        if not self._active:
            return False
        started = time.perf_counter()
        rows = self._step()
        if self.on_step is not None:
            self.on_step(time.perf_counter() - started, rows)
        return True

    def _fail(self, err: LinkError) -> None:
        """A peer process is gone: end every request and stop serving (alive turns False, health reports it)."""
        log.critical("multi-host step broadcast failed; the scheduler stops: %s", err)
        self.failure = err
        self._fail_all(f"a peer process failed: {err}")

    def _fail_all(self, message: str) -> None:
        """Stop serving and end every queued and running request with `message`."""
        with self._cond:
            self._closed = True
        self._end_all(message, give_back=False)

    def _end_all(self, message: str, give_back: bool = True) -> None:
        """End every queued and running request with `message`; their slots are given back unless the scheduler
        stops for good (a lost peer could not be told)."""
        with self._cond:
            requests = [*self._waiting, *self._active.values()]
            self._waiting.clear()
            self._cancelled.clear()
            if not give_back:
                self._active.clear()
        for request in requests:
            self._release(request)
            request.finished = True
            if not self._inline:  # run()'s caller gets the exception instead
                self._emit(request, Output((), (), "error", message))

    def _admit(self) -> None:
        """Move waiting requests into free slots, oldest (and preempted) first."""
        free = [s for s in range(self.slots.n_slots) if s not in self._active]
        while free and self._waiting:
            request = self._waiting.popleft()
            request.slot, request.prefilled, request.attached = free.pop(0), 0, False
            self._admissions += 1
            request.admitted = self._admissions
            self._active[request.slot] = request

    def _step(self) -> int:
        """One engine step: the next prompt chunks (engine.chunk_shape: one of at most prefill_chunk tokens, a few
        short ones, or two long ones) of the oldest requests still prefilling, beside every request that decodes (a
        request whose chunk ends its prefill decodes in the same step); returns the rows decoded.

        A request whose own part of the step fails (its chunk, or its sampling row) ends with an error alone.
        """
        planned = self._next_chunks()
        if planned:
            self._make_room({c.row: c.start + len(c.tokens) + self._completes(r, c) for c, r in planned})
            planned = [(c, r) for c, r in planned if r.slot is not None]  # preempted: they wait for pages
        decoding = {s: r for s, r in self._active.items() if self._prefilled(r) and self._row_ok(r)}
        for chunk, request in list(planned):
            if self._completes(request, chunk):
                if self._row_ok(request):
                    decoding[request.slot] = request
                else:  # it failed alone
                    planned.remove((chunk, request))
        constrained = {s: (r.constraint, r.params) for s, r in decoding.items() if r.constraint is not None}
        started = time.perf_counter()
        plan = grammar.decode_plan(constrained, self.slots.n_slots, 1 if planned else self.decode_steps, len(decoding))
        grammar_s = time.perf_counter() - started
        n_steps = plan.n_steps
        wants = {s: int(self.slots.lengths[s]) + n_steps for s in decoding}
        for chunk, _ in planned:
            wants[chunk.row] = chunk.start + len(chunk.tokens) + (n_steps if chunk.row in decoding else 0)
        self._make_room(wants)
        planned = [(c, r) for c, r in planned if r.slot is not None]
        decoding = {s: decoding[s] for s in wants if s in decoding}
        if not decoding and not planned:
            return 0
        last = np.zeros(self.slots.n_slots, np.int32)
        for slot, r in decoding.items():
            last[slot] = self._last(r)
        params = [decoding[s].params if s in decoding else None for s in range(self.slots.n_slots)]
        try:
            tokens, logprobs = self.slots.step(last, params, n_steps, plan.masks, [c for c, _ in planned])
        except LinkError:
            raise
        except Exception as err:
            if not planned:
                raise
            for _, request in planned:  # their chunks failed; the others go on next step
                self._fail_request(request, "prefill", err)
            return 0
        self.steps += 1
        for chunk, request in planned:
            request.prefilled += len(chunk.tokens)
        for slot, r in decoding.items():
            started = time.perf_counter()
            draws = tokens[slot].tolist()
            keepable = self._keepable(r, draws)
            taken = plan.take(slot, draws[:keepable])
            fill = plan.fill(slot) if taken < keepable and not r.logprobs else None
            grammar_s += time.perf_counter() - started
            kept = taken + (fill is not None)
            if kept < keepable:  # cut where the request goes on (a row that ends keeps its slot as it is)
                self.slots.rewind(slot, int(self.slots.lengths[slot]) - (n_steps - kept))
            chosen, tops = token_logprobs(Logprobs(*(x[slot, :taken] for x in logprobs)), r.params.top_logprobs)
            row_tokens = tokens[slot, :taken].tolist()
            if fill is not None:
                row_tokens, chosen, tops = row_tokens + [fill], chosen + [math.nan], tops + [()]
            self._accept(r, row_tokens, chosen, tops)
        if constrained:
            self.grammar_seconds += grammar_s
        return len(decoding)

    def _next_chunks(self) -> list[tuple[engine.Chunk, Request]]:
        """The next step's prompt chunks and their requests: the oldest running request's next chunk of at most
        prefill_chunk tokens of what it has left to write (all its context but the last token, which its first
        decode row feeds), then the next requests' while engine.chunk_shape holds them all. A new request's slot is
        started from the prefix cache only when its first chunk is planned, and not beside a chunk that writes the
        page it would continue with, so requests arriving together with a common prefix wait for the first one's
        pages instead of each prefilling it. A chunk that cannot be written fails its request alone."""
        planned: list[tuple[engine.Chunk, Request]] = []
        for request in [r for r in self._active.values() if not self._prefilled(r)]:
            try:
                if not request.attached:
                    cached = self.slots.cached(request.slot, request.context)
                    left = len(request.context) - 1 - cached
                    lengths = [len(c.tokens) for c, _ in planned] + [min(self.prefill_chunk, left)]
                    if planned and left > 0 and (engine.chunk_shape(lengths, self.slots.max_chunk) is None
                                                 or self._written_beside(request, cached, planned)):
                        break
                    self._attach(request)
                n = min(self.prefill_chunk, len(request.context) - 1 - request.prefilled)
                if n <= 0:
                    continue
                chunk = engine.Chunk(request.slot, request.context[request.prefilled:request.prefilled + n],
                                     request.prefilled)
                self.slots.check_chunk(chunk)
            except LinkError:
                raise
            except Exception as err:  # this request could not start; the others go on
                self._fail_request(request, "prefill", err)
                continue
            lengths = [len(c.tokens) for c, _ in planned] + [n]
            if planned and engine.chunk_shape(lengths, self.slots.max_chunk) is None:
                break
            planned.append((chunk, request))
        return planned

    def _written_beside(self, request: Request, cached: int, planned: list[tuple[engine.Chunk, Request]]) -> bool:
        """Whether a planned chunk writes the page of `request`'s context after its `cached` tokens (another prompt
        with the same prefix): it then starts next step from that page, cached, instead of computing it again."""
        lo, hi = cached, cached + self.slots.pages.layout.page_size
        return any(c.start < hi and lo < c.start + len(c.tokens) and r.context[lo:hi] == request.context[lo:hi]
                   for c, r in planned)

    @staticmethod
    def _completes(request: Request, chunk: engine.Chunk) -> bool:
        """Whether `chunk` writes the last of what `request` must prefill (it then decodes in the same step)."""
        return request.prefilled + len(chunk.tokens) == len(request.context) - 1

    @staticmethod
    def _keepable(request: Request, draws: list[int]) -> int:
        """How many of a row's draws its request could keep: through its first stop token and within its token
        budget (_accept drops the rest), so its grammar never walks what the device drew after them."""
        room = request.max_tokens - len(request.generated)
        stop = next((i + 1 for i, token in enumerate(draws[:room]) if token in request.stop_ids), room)
        return min(stop, len(draws))

    @staticmethod
    def _last(request: Request) -> int:
        """The token a decoding request feeds next: its newest generated token, or its context's last one before its
        first step since it was (re)admitted."""
        since = len(request.generated) - (len(request.context) - len(request.prompt))
        return request.generated[-1] if since > 0 else request.context[-1]

    @staticmethod
    def _prefilled(request: Request) -> bool:
        """Whether a running request's slot holds all its context but the last token (it decodes from here on)."""
        return request.attached and request.prefilled == len(request.context) - 1

    def _attach(self, request: Request) -> None:
        """Start a request's slot with the longest cached prefix of its context."""
        request.prefilled = self.slots.attach(request.slot, request.context)
        request.attached = True
        self.looked_up_tokens += len(request.context)
        self.reused_tokens += request.prefilled
        if request.cached_tokens is None:
            request.cached_tokens = min(request.prefilled, len(request.prompt))

    def _make_room(self, wants: dict[int, int]) -> None:
        """Preempt the newest running requests until the slots left in `wants` can hold that many tokens; preempted
        slots leave `wants`."""
        while wants and self.slots.shortfall(wants):
            victim = max(self._active.values(), key=lambda r: r.admitted, default=None)
            if victim is None:
                raise PoolFull(f"{self.slots.shortfall(wants)} KV pages short with no request left to preempt")
            wants.pop(victim.slot, None)
            self._preempt(victim)

    def _preempt(self, request: Request) -> None:
        """Free a running request's slot and queue it first; it resumes by prefilling prompt and generated tokens."""
        log.info("preempting a request of %d + %d tokens: the KV pool is full", len(request.prompt),
                 len(request.generated))
        self._release(request)
        self.preemptions += 1
        request.slot, request.prefilled, request.attached = None, 0, False
        request.context = [*request.prompt, *request.generated]
        with self._cond:
            if not request.cancelled:
                self._waiting.appendleft(request)

    def _row_ok(self, request: Request) -> bool:
        """Whether a request's sampling row can join the decode call (else the request ends with an error)."""
        try:
            host_row(request.params)
        except Exception as err:  # e.g. a value that does not fit the step's dtypes
            self._fail_request(request, "sampling settings", err)
            return False
        return True

    def _fail_request(self, request: Request, stage: str, err: Exception) -> None:
        """End one request with an error (its slot's cache is dropped); the other requests are untouched."""
        log.warning("request failed in %s: %s", stage, err, exc_info=not isinstance(err, ValueError))
        self._finish(request, Output((), (), "error", f"{stage} failed: {err}"))

    def _accept(self, request: Request, tokens: list[int], logprobs: list[float],
                tops: list[tuple[tuple[int, float], ...]]) -> None:
        """Append sampled tokens (with their log-probs and top tokens) up to a stop token or max_tokens, emit them,
        and free the slot when finished."""
        new_tokens: list[int] = []
        new_logprobs: list[float] = []
        new_tops: list[tuple[tuple[int, float], ...]] = []
        finish = None
        i = 0
        while i < len(tokens) and finish is None:
            token, logprob, top = tokens[i], logprobs[i], tops[i]
            i += 1
            if token in request.stop_ids:
                if not self._can_force(request):
                    finish = "stop"
                    continue
                self._force(request)
                tokens[i:] = request.force_before_stop[1:]
                logprobs[i:] = (0.0,) * (len(request.force_before_stop) - 1)
                tops[i:] = ((),) * (len(request.force_before_stop) - 1)
                token, logprob, top = request.force_before_stop[0], 0.0, ()
            request.generated.append(token)
            new_tokens.append(token)
            new_logprobs.append(logprob)
            new_tops.append(top)
            if len(request.generated) >= request.max_tokens:
                finish = "length"
        output = Output(tuple(new_tokens), tuple(new_logprobs), finish,
                        top_logprobs=tuple(new_tops) if request.params.top_logprobs else ())
        if finish is not None:
            self._finish(request, output)
        else:
            self._emit(request, output)

    def _can_force(self, request: Request) -> bool:
        """Whether a stop token should be replaced by the forced tokens (not yet generated, and they fit)."""
        forced = request.force_before_stop
        return bool(forced) and forced[0] not in request.generated and (
            len(request.generated) + len(forced) < request.max_tokens)

    def _force(self, request: Request) -> None:
        """Put the forced tokens in place of the stop token: the slot keeps the accepted tokens, and the request's next
        steps prefill all forced tokens but the last, as chunks of the step plan, then decode feeding the last."""
        start = len(request.prompt) + len(request.generated)
        self.slots.rewind(request.slot, start)
        request.context = [*request.prompt, *request.generated, *request.force_before_stop]
        request.prefilled = start

    def _emit(self, request: Request, output: Output) -> None:
        """Hand an Output to the request's consumer (none once cancelled); a failing consumer cancels its request."""
        if request.cancelled:
            return
        try:
            request.emit(output)
        except Exception:  # a broken consumer must not stop the others
            if self._inline:
                raise
            log.exception("request consumer failed; cancelling it")
            self.cancel(request)

    def _finish(self, request: Request, output: Output) -> None:
        """Emit a request's last Output and free its slot (keeping its cache unless it failed)."""
        request.finished = True
        self._release(request)
        self._emit(request, output)

    def _release(self, request: Request) -> None:
        """Give a request's slot back (its full pages stay in the prefix cache)."""
        slot = request.slot
        if slot is None or self._active.get(slot) is not request:
            return
        del self._active[slot]
        self.slots.release(slot)


# ---------------------------------------------------------------- multi-host


class LinkError(RuntimeError):
    """A step broadcast between processes failed: a peer is gone."""


def lost_peer(timeout: float) -> None:
    """A collective has waited past its deadline: no peer will complete it, so stop this process now."""
    message = f"k2jax: a multi-host step did not finish within {timeout:g} s; a peer process is gone"
    log.critical(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def float_bits(values: Sequence[float]) -> np.ndarray:
    """float32 values as their int32 bit patterns (broadcast as ints, exactly)."""
    return np.asarray(values, np.float32).view(np.int32)


def pack_params(params: Sequence[SamplingParams | None]) -> np.ndarray:
    """Per-slot sampling settings (None: inactive) as PARAM_FIELDS int32 rows, flattened field-major."""
    real = [p or SamplingParams() for p in params]
    return np.concatenate([
        np.array([p is not None for p in params], np.int32), float_bits([p.temperature for p in real]),
        np.array([p.top_k for p in real], np.int32), float_bits([p.top_p for p in real]),
        float_bits([p.min_p for p in real]), np.array([p.seed & 0xFFFFFFFF for p in real], np.uint32).view(np.int32),
        np.array([p.top_logprobs for p in real], np.int32)])


def unpack_params(packed: np.ndarray, n_slots: int) -> list[SamplingParams | None]:
    """The inverse of pack_params."""
    rows = np.ascontiguousarray(packed[: PARAM_FIELDS * n_slots], np.int32).reshape(PARAM_FIELDS, n_slots)
    temp, top_p, min_p = (rows[k].view(np.float32) for k in (1, 3, 4))
    seed = rows[5].view(np.uint32)
    return [SamplingParams(float(temp[i]), int(rows[2, i]), float(top_p[i]), float(min_p[i]), int(seed[i]),
                           int(rows[6, i])) if rows[0, i] else None for i in range(n_slots)]


class StepLink:
    """One fixed-size int32 message per model call, broadcast from process 0 to all (compiles once).

    Message: [op, a, b, c, d] then the payload (a step's decode tokens, packed sampling settings, each chunk's
    slot, start and length, and the chunks' tokens).
    """

    def __init__(self, n_slots: int, max_prefill: int, step_timeout_s: float = STEP_TIMEOUT_S,
                 peer_timeout_s: float = PEER_TIMEOUT_S):
        self.n_slots, self.step_timeout_s, self.peer_timeout_s = n_slots, step_timeout_s, peer_timeout_s
        chunks = max(engine.PACKED_CHUNKS, engine.FULL_CHUNKS)
        self.size = HEADER + (1 + PARAM_FIELDS) * n_slots + 3 * chunks + engine.FULL_CHUNKS * max_prefill
        self._worked = False

    @contextlib.contextmanager
    def deadline(self, idle: bool = False) -> Iterator[None]:
        """Exit the process unless the enclosed broadcast (and model call) finishes in time: a peer is gone."""
        timeout = self.peer_timeout_s if idle and self._worked else self.step_timeout_s
        timer = threading.Timer(timeout, lost_peer, (timeout,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def send(self, op: int, header: Sequence[int] = (), payload: Sequence[int] | np.ndarray = ()) -> None:
        """Broadcast one call (process 0)."""
        if len(payload) > self.size - HEADER:
            raise ValueError(f"step message of {len(payload)} values exceeds the link's {self.size - HEADER}")
        message = np.zeros(self.size, np.int32)
        message[0], message[1:1 + len(header)] = op, header
        message[HEADER:HEADER + len(payload)] = payload
        self._broadcast(message)

    def receive(self) -> np.ndarray:
        """The next call from process 0 (other processes)."""
        return self._broadcast(np.zeros(self.size, np.int32))

    def share(self, array: np.ndarray) -> np.ndarray:
        """Process 0's `array` on every process (the others pass one of the same shape and dtype): a step's token
        masks, sent after its STEP message, so steps without masks never carry them."""
        return self._broadcast(np.ascontiguousarray(array))

    def _broadcast(self, message: np.ndarray) -> np.ndarray:
        """jax.distributed broadcast from process 0; a failure means a peer is gone."""
        try:
            received = np.asarray(broadcast_from_process0(message))
        except Exception as err:  # any failed collective means a lost peer
            raise LinkError(str(err)) from err
        self._worked = True
        return received


def unpack_step(payload: np.ndarray, n_slots: int, n_steps: int, n_chunks: int, masks: StepMasks | None = None
                ) -> tuple[np.ndarray, list[SamplingParams | None], int, StepMasks | None, list[engine.Chunk]]:
    """A STEP message's payload (as LinkedSlots.step sends it, its masks shared after it) as Slots.step's
    arguments."""
    fields = (1 + PARAM_FIELDS) * n_slots
    spans = payload[fields:fields + 3 * n_chunks].reshape(n_chunks, 3)
    offsets = fields + 3 * n_chunks + np.concatenate([[0], np.cumsum(spans[:, 2])])
    chunks = [engine.Chunk(int(row), payload[lo:hi].tolist(), int(start))
              for (row, start, _), lo, hi in zip(spans, offsets[:-1], offsets[1:])]
    return payload[:n_slots], unpack_params(payload[n_slots:fields], n_slots), n_steps, masks, chunks


class LinkedSlots(Slots):
    """Slots whose every step, attach, rewind and release is first broadcast to the processes running follow()."""

    def __init__(self, model: engine.Engine, n_slots: int, capacity: int, link: StepLink, num_pages: int | None = None,
                 prefix_cache: bool = False, max_chunk: int | None = None, max_steps: int | None = None):
        super().__init__(model, n_slots, capacity, num_pages, prefix_cache, max_chunk, max_steps)
        self.link = link

    def attach_cached(self, slot: int, page: int) -> int:
        """Broadcast, then attach."""
        with self.link.deadline():
            self.link.send(ATTACH, (slot, page))
        return super().attach_cached(slot, page)

    def step(self, tokens: np.ndarray, params: Sequence[SamplingParams | None], n_steps: int = engine.DECODE_STEPS,
             masks: StepMasks | None = None, chunks: Sequence[engine.Chunk] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Broadcast (the token masks, if any, in a second message), then step, within the link's deadline."""
        payload = [np.asarray(tokens, np.int32), pack_params(params),
                   np.array([(c.row, c.start, len(c.tokens)) for c in chunks], np.int32).reshape(-1),
                   *(np.asarray(c.tokens, np.int32) for c in chunks)]
        if masks is not None and (masks.words.shape != (self.n_slots, self.mask_words)
                                  or masks.hold.shape != (self.n_slots, STATES)):
            raise ValueError(f"token masks must be [{self.n_slots}, {self.mask_words}] words with automata of "
                             f"[{self.n_slots}, {STATES}] states, got {masks.words.shape} and {masks.hold.shape}")
        with self.link.deadline():
            self.link.send(STEP, (n_steps, len(chunks), masks is not None), np.concatenate(payload))
            if masks is not None:
                self.link.share(engine.pack_host(masks.with_steps(n_steps))[0])
            return super().step(tokens, params, n_steps, masks, chunks)

    def rewind(self, slot: int, length: int) -> None:
        """Broadcast, then rewind."""
        with self.link.deadline():
            self.link.send(REWIND, (slot, length))
        super().rewind(slot, length)

    def release(self, slot: int) -> None:
        """Broadcast, then release."""
        with self.link.deadline():
            self.link.send(RELEASE, (slot,))
        super().release(slot)


def follow(model: engine.Engine, n_slots: int, max_context: int | None, link: StepLink,
           decode_steps: int = engine.DECODE_STEPS, num_pages: int | None = None, prefix_cache: bool = True,
           prefill_chunk: int = engine.PREFILL_CHUNK, warmup: bool = True) -> None:
    """Replay process 0's model calls on this process until it stops; raises LinkError if process 0 is gone.

    The arguments must be process 0's Scheduler's, so both hold the same slots, pool, prefix cache and programs.
    """
    slots = Slots(model, n_slots, resolve_context(model, max_context, decode_steps) + decode_steps, num_pages,
                  prefix_cache, prefill_chunk, decode_steps)
    if warmup:
        slots.warmup(prefill_chunk, decode_steps)
    while True:
        with link.deadline():
            message = link.receive()
            op, (a, b), payload = int(message[0]), message[1:3].tolist(), message[HEADER:]
            if op == STOP:
                return
            try:
                if op == STEP:
                    masks = None
                    if message[3]:  # the masks follow as pack_host's words
                        layout = engine.host_layout(StepMasks.unconstrained(n_slots, slots.mask_words, a))
                        masks = engine.unpack_host(link.share(np.zeros(layout.words, np.int32)), layout)
                    slots.step(*unpack_step(payload, n_slots, a, b, masks))
                elif op == RELEASE:
                    slots.release(a)
                elif op == ATTACH:
                    slots.attach_cached(a, b)
                elif op == REWIND:
                    slots.rewind(a, b)
            except ValueError:  # process 0 met the same error and went on
                log.warning("replayed step %d failed as it did on process 0", op, exc_info=True)
