"""Continuous batching over cache slots: one background thread owns the model; requests join and leave between steps.

Each iteration frees the slots of cancelled requests, admits queued requests into free slots, prefills at most
`prefill_chunk` prompt tokens (so a long prompt is prefilled in chunks between decode calls), then runs one
multi-step decode of every slot that has its first token. Requests see tokens through their `emit` callback,
called on the scheduler thread; stop strings and text are the caller's business (see k2jax.server).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Callable, Sequence

import numpy as np

from k2jax import engine
from k2jax.sampling import SamplingParams
from k2jax.slots import Slots

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The scheduler's waiting queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class Output:
    """New tokens of a request with their log-probs; the last Output carries the finish reason.

    finish is "stop" (a stop token, not included), "length" (max_tokens reached) or "error" (then `error` says why).
    """

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish: str | None = None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to continue: prompt ids, token budget, sampling, stop ids, and where its outputs go.

    force_before_stop: tokens generated in place of the first stop token when force_before_stop[0] has not been
    generated yet (how tool_choice "required" makes the model open a tool call instead of ending its turn).
    """

    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[Output], None]
    params: SamplingParams = SamplingParams()
    stop_ids: frozenset[int] = frozenset()
    force_before_stop: tuple[int, ...] = ()
    slot: int | None = None
    prefilled: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    cancelled: bool = False


def check_request(request: Request, max_context: int, vocab_size: int) -> None:
    """Reject a request that cannot run: empty prompt, bad ids, no token budget, or over the context."""
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


class Scheduler:
    """Continuous batching of Requests over `n_slots` cache slots, run by one background thread."""

    def __init__(self, model: engine.Model, n_slots: int = 8, max_context: int | None = None, max_queue: int = 256,
                 prefill_chunk: int = engine.PREFILL_CHUNK, decode_steps: int = engine.DECODE_STEPS):
        limit = model.config.max_position_embeddings - decode_steps
        self.max_context = limit if max_context is None else max_context
        if not 0 < self.max_context <= limit:
            raise ValueError(f"max_context must be in [1, {limit}] (max_position_embeddings minus {decode_steps} "
                             f"decode steps of headroom), got {self.max_context}")
        if max_queue < 1 or prefill_chunk < 1 or decode_steps < 1:
            raise ValueError("max_queue, prefill_chunk and decode_steps must all be >= 1")
        self.model, self.max_queue = model, max_queue
        self.prefill_chunk, self.decode_steps = prefill_chunk, decode_steps
        self.slots = Slots(model, n_slots, self.max_context + decode_steps)
        self._active: dict[int, Request] = {}
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="k2jax-scheduler", daemon=True)
        self.steps = 0
        self.cancelled = 0

    def start(self) -> Scheduler:
        """Start the background thread; returns self."""
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; queued and running requests end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for request in [*self._waiting, *self._active.values()]:
            self._finish(request, Output((), (), "error", "the server is shutting down"))
        self._waiting.clear()

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running."""
        return self._thread.is_alive() and not self._closed

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

    def submit(self, request: Request) -> None:
        """Queue a request; raises ValueError if it cannot run, QueueFull if the queue is at its bound."""
        check_request(request, self.max_context, self.model.config.vocab_size)
        with self._cond:
            if not self.alive:
                raise RuntimeError("the scheduler is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._cond.notify()

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
        """The scheduler thread: wait for work, then admit, prefill and decode until closed."""
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._active or self._cancelled):
                    self._cond.wait()
                if self._closed:
                    return
                cancelled, self._cancelled = self._cancelled, []
                for request in cancelled:
                    self._release(request)
                self._admit()
            try:
                self._step()
            except Exception:  # noqa: BLE001 -- a failed step ends its requests, never the thread
                log.exception("scheduler step failed")
                for request in list(self._active.values()):
                    self._finish(request, Output((), (), "error", "internal error while generating"))

    def _admit(self) -> None:
        """Move waiting requests into free slots, oldest first (caller holds the lock)."""
        free = [s for s in range(self.slots.n_slots) if s not in self._active]
        while free and self._waiting:
            request = self._waiting.popleft()
            request.slot = free.pop(0)
            self._active[request.slot] = request

    def _step(self) -> None:
        """Prefill up to prefill_chunk prompt tokens, then one decode call over every request that has a token."""
        budget = self.prefill_chunk
        for request in [r for r in self._active.values() if r.prefilled < len(r.prompt)]:
            if budget <= 0:
                break
            n = min(budget, len(request.prompt) - request.prefilled)
            budget -= n
            logits = self.slots.prefill(request.slot, request.prompt[request.prefilled:request.prefilled + n],
                                        start=request.prefilled)
            request.prefilled += n
            if request.prefilled == len(request.prompt):
                token, logprob = self.slots.sample(logits[-1], request.params, len(request.prompt))
                self._accept(request, [token], [logprob])
        decoding = {s: r for s, r in self._active.items() if r.generated}
        if not decoding:
            return
        last = np.array([decoding[s].generated[-1] if s in decoding else 0 for s in range(self.slots.n_slots)])
        params = [decoding[s].params if s in decoding else None for s in range(self.slots.n_slots)]
        tokens, logprobs = self.slots.decode(last, params, self.decode_steps)
        self.steps += 1
        for slot, request in decoding.items():
            self._accept(request, tokens[slot].tolist(), logprobs[slot].tolist())

    def _accept(self, request: Request, tokens: list[int], logprobs: list[float]) -> None:
        """Append sampled tokens up to a stop token or max_tokens, emit them, and free the slot when finished."""
        new_tokens: list[int] = []
        new_logprobs: list[float] = []
        finish = None
        i = 0
        while i < len(tokens) and finish is None:
            token, logprob = tokens[i], logprobs[i]
            i += 1
            if token in request.stop_ids:
                if not self._can_force(request):
                    finish = "stop"
                    continue
                forced_next, forced_logprob = self._force(request)
                tokens[i:] = [*request.force_before_stop[1:], forced_next]
                logprobs[i:] = [*(0.0,) * (len(request.force_before_stop) - 1), forced_logprob]
                token, logprob = request.force_before_stop[0], 0.0
            request.generated.append(token)
            new_tokens.append(token)
            new_logprobs.append(logprob)
            if len(request.generated) >= request.max_tokens:
                finish = "length"
        output = Output(tuple(new_tokens), tuple(new_logprobs), finish)
        if finish is not None:
            self._finish(request, output)
        else:
            self._emit(request, output)

    def _can_force(self, request: Request) -> bool:
        """Whether a stop token should be replaced by the forced tokens (not yet generated, and they fit)."""
        forced = request.force_before_stop
        return bool(forced) and forced[0] not in request.generated and (
            len(request.generated) + len(forced) < request.max_tokens)

    def _force(self, request: Request) -> tuple[int, float]:
        """Write the forced tokens after the accepted ones and sample the token that follows them."""
        start = len(request.prompt) + len(request.generated)
        forced = list(request.force_before_stop)
        logits = self.slots.prefill(request.slot, forced, start=start)
        return self.slots.sample(logits[-1], request.params, start + len(forced))

    def _emit(self, request: Request, output: Output) -> None:
        """Hand an Output to the request's consumer (none once cancelled); a failing consumer cancels its request."""
        if request.cancelled:
            return
        try:
            request.emit(output)
        except Exception:  # noqa: BLE001 -- a broken consumer must not stop the others
            log.exception("request consumer failed; cancelling it")
            self.cancel(request)

    def _finish(self, request: Request, output: Output) -> None:
        """Emit a request's last Output and free its slot."""
        request.finished = True
        self._release(request)
        self._emit(request, output)

    def _release(self, request: Request) -> None:
        """Give a request's slot back."""
        if request.slot is not None and self._active.get(request.slot) is request:
            del self._active[request.slot]
            self.slots.release(request.slot)

