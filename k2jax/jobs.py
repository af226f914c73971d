"""The scheduler side of one HTTP call: its requests, the queue their outputs reach on the event loop, cancellation
when the client leaves, and the server's Prometheus metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import Receive

from k2jax.api_schema import APIError
from k2jax.grammar import RowConstraint
from k2jax.sampling import SamplingParams
from k2jax.scheduler import Output, QueueFull, Request, Scheduler

POLL_S = 0.5
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW_S = 10.0


class Metrics:
    """Prometheus metrics of one server: queue depth, running requests, tokens, tokens/s, time to first token,
    KV pages, prefix-cache hits, preemptions, grammar host time, step times and decode rows per step."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        gauges = {
            "k2jax_queue_depth": ("Requests waiting for a slot", lambda: scheduler.queue_depth),
            "k2jax_running_requests": ("Requests holding a cache slot", lambda: scheduler.running),
            "k2jax_generation_tokens_per_second": (f"Generated tokens per second over the last {RATE_WINDOW_S:g} s",
                                                   self.tokens_per_second),
            "k2jax_kv_pages_total": ("Pages in the KV pool", lambda: scheduler.total_pages),
            "k2jax_kv_pages_free": ("KV pages on the free lists", lambda: scheduler.free_pages),
            "k2jax_kv_pages_used": ("KV pages held by requests or the prefix cache",
                                    lambda: scheduler.total_pages - scheduler.free_pages),
            "k2jax_kv_pages_cached": ("KV pages held by the prefix cache", lambda: scheduler.cached_pages),
            "k2jax_kv_pages_evictable": ("Cached KV pages no request holds", lambda: scheduler.evictable_pages),
            "k2jax_prefix_cache_hit_tokens": ("Tokens the prefix cache gave to starting requests (total)",
                                              lambda: scheduler.reused_tokens),
            "k2jax_prefix_cache_lookup_tokens": ("Tokens of starting requests looked up in the prefix cache (total)",
                                                 lambda: scheduler.looked_up_tokens),
            "k2jax_prefix_cache_hit_rate": ("Prefix-cache hit tokens over looked-up tokens",
                                            lambda: scheduler.reused_tokens / max(scheduler.looked_up_tokens, 1)),
            "k2jax_preemptions": ("Requests preempted because the KV pool was full (total)",
                                  lambda: scheduler.preemptions),
            "k2jax_grammar_seconds": ("Host seconds spent planning constrained rows' token automata and checking "
                                      "their draws (total)", lambda: scheduler.grammar_seconds),
        }
        for name, (doc, value) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(value)
        self.step_time = Histogram("k2jax_step_seconds", "Time of one scheduler step (prefill chunks, a decode call)",
                                   buckets=STEP_BUCKETS, registry=self.registry)
        self.step_rows = Histogram("k2jax_step_decode_rows", "Requests decoded by one scheduler step",
                                   buckets=tuple(2.0**k for k in range(11)), registry=self.registry)
        scheduler.on_step = self.observe_step
        self.prompt_tokens = Counter("k2jax_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.generation_tokens = Counter("k2jax_generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("k2jax_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.ttft = Histogram("k2jax_time_to_first_token_seconds", "Time from submission to first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def observe_step(self, seconds: float, rows: int) -> None:
        """Record one scheduler step (called on the scheduler thread)."""
        self.step_time.observe(seconds)
        self.step_rows.observe(rows)

    def add_tokens(self, n: int) -> None:
        """Count n generated tokens now."""
        self.generation_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        """Forget counts older than the window."""
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()


def cancel_all(scheduler: Scheduler, requests: list[Request]) -> None:
    """Cancel every request of a job that is still running (no-op for finished ones)."""
    for request in requests:
        scheduler.cancel(request)


class Job:
    """The scheduler requests of one HTTP call (n choices, or several prompts) and the queue their outputs reach.

    Its requests are cancelled by close(), when its client disconnects (see watch), or when the Job is
    garbage-collected, so a response that is dropped frees its slots even if its body was never iterated.
    """

    def __init__(self, scheduler: Scheduler, metrics: Metrics):
        self.scheduler, self.metrics = scheduler, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output] | None] = asyncio.Queue()
        self.requests: list[Request] = []
        self.pending: set[int] = set()
        self.started = time.monotonic()
        self.cancelled = False
        self._watcher: asyncio.Task | None = None
        self._cancel_requests = weakref.finalize(self, cancel_all, scheduler, self.requests)

    def add(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: frozenset[int],
            force_before_stop: tuple[int, ...] = (), sample: int = 0, constraint: RowConstraint | None = None,
            logprobs: bool = True) -> None:
        """Add one sequence (sample j of its prompt draws with seed + j; logprobs: whether its log-probs are read);
        its outputs arrive tagged with its index."""
        index = len(self.requests)
        params = dataclasses.replace(params, seed=(params.seed + sample) & 0xFFFFFFFF)
        emit = functools.partial(self.loop.call_soon_threadsafe, self.queue.put_nowait)
        self.pending.add(index)
        self.requests.append(Request(prompt, max_tokens, lambda out: emit((index, out)), params, stop_ids,
                                     force_before_stop, constraint, logprobs))

    def submit(self) -> None:
        """Queue every request; a full queue (429) or a rejected request (400) cancels those already queued."""
        try:
            for request in self.requests:
                self.scheduler.submit(request)
        except QueueFull as err:
            self.close()
            raise APIError(429, f"server busy: {err}; retry later", type="rate_limit_exceeded") from None
        except ValueError as err:
            self.close()
            raise APIError(400, str(err)) from None
        except RuntimeError as err:
            self.close()
            raise APIError(503, str(err), type="server_error") from None
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in self.requests))
        self.started = time.monotonic()

    def watch(self, receive: Receive) -> None:
        """Cancel this job the moment the ASGI channel reports that the client has gone (the body is read)."""
        self._watcher = self.loop.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        """Wait for http.disconnect, then cancel."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    def cancel(self) -> None:
        """The client is gone: cancel every request (slots freed before the next model call) and end outputs()."""
        if not self.cancelled:
            self.cancelled = True
            self._cancel_requests()
            self.queue.put_nowait(None)

    def close(self) -> None:
        """The response is over: stop watching the client and cancel whatever still runs."""
        if self._watcher is not None:
            self._watcher.cancel()
        self._cancel_requests()

    def cached_tokens(self, n: int) -> int:
        """Prompt tokens the prefix cache gave, counting each prompt once (its requests come in groups of n)."""
        return sum(r.cached_tokens or 0 for r in self.requests[::n])

    def stop(self, index: int) -> None:
        """End one sequence early (its stop string was found): no more outputs are awaited for it."""
        if index in self.pending:
            self.pending.discard(index)
            self.scheduler.cancel(self.requests[index])
            self.metrics.requests.labels("stop").inc()

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """(index, Output) until every request finished or the job is cancelled; 503 if the scheduler dies."""
        seen: set[int] = set()
        while self.pending and not self.cancelled:
            try:
                item = await asyncio.wait_for(self.queue.get(), POLL_S)
            except TimeoutError:
                if not self.scheduler.alive:
                    raise APIError(503, "the model thread has stopped", type="server_error") from None
                continue
            if item is None:
                return
            index, out = item
            if index not in seen:
                seen.add(index)
                self.metrics.ttft.observe(time.monotonic() - self.started)
            self.metrics.add_tokens(len(out.tokens))
            if index not in self.pending:
                continue
            if out.finish is not None:
                self.pending.discard(index)
                self.metrics.requests.labels(out.finish).inc()
            yield index, out
