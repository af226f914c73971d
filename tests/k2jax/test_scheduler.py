"""Scheduler: continuous batching gives each request what generate() gives it alone, with or without the prefix cache
and under preemption; slots and pages never leak; serving compiles nothing."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import numpy as np
import pytest

import k2jax
from k2jax.grammar import RowConstraint, json_grammar, tool_calls_grammar, vocabulary
from k2jax.sampling import SamplingParams, StepMasks, drafts_exact
from k2jax import engine
from k2jax.scheduler import (HEADER, STEP, LinkedSlots, Output, QueueFull, Request, Scheduler, StepLink, pack_params,
                           unpack_params, unpack_step)

EOS = 255
TIMEOUT_S = 120.0
WARMUP_S = 900.0  # compiling every step bucket, on a loaded 2-core machine


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return k2jax.load(hf_checkpoint(seed=5, eos_token_id=EOS)[1])


@pytest.fixture(scope="module")
def scheduler(model):
    sched = Scheduler(model, n_slots=3, max_context=120, max_queue=64, prefill_chunk=16).start()
    assert sched.ready.wait(WARMUP_S)
    yield sched
    sched.close()


class Collector:
    """A request's outputs, gathered on the scheduler thread; wait() blocks until the finish reason arrives."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, out: Output) -> None:
        self.tokens.extend(out.tokens)
        self.first.set()
        if out.finish is not None:
            self.finish = out.finish
            self.done.set()

    def wait(self) -> Collector:
        assert self.done.wait(TIMEOUT_S), "request did not finish"
        return self


def request(prompt: list[int], max_tokens: int, **kw) -> tuple[Request, Collector]:
    sink = Collector()
    return Request(prompt, max_tokens, sink, **{"stop_ids": frozenset({EOS}), **kw}), sink


def wait_until(cond, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_batched_requests_match_generate(model, scheduler, rng):
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 40, 9, 23, 70)]  # 40 and 70: prefilled in chunks
    lengths = [12, 7, 20, 3, 9]
    jobs = [request(p, n) for p, n in zip(prompts, lengths)]
    for req, _ in jobs[:2]:
        scheduler.submit(req)
    jobs[0][1].first.wait(TIMEOUT_S)
    for req, _ in jobs[2:]:  # join while the first ones decode; more requests than slots
        scheduler.submit(req)
    for (req, sink), p, n in zip(jobs, prompts, lengths):
        ref = model.generate([p], max_new_tokens=n)
        assert sink.wait().tokens == ref.ids[0]
        assert sink.finish == ref.finish_reasons[0]
    wait_until(lambda: scheduler.running == 0)
    assert scheduler.free_slots == 3 and scheduler.queue_depth == 0


def test_a_running_stream_gets_a_token_in_every_step_that_prefills(scheduler, rng, monkeypatch):
    steps: list[tuple[bool, list[int]]] = []  # per step: whether it held a prefill chunk, the slots decoding
    step = scheduler.slots.step

    def spy(tokens, params, n_steps=1, masks=None, chunks=()):
        steps.append((bool(chunks), [s for s, p in enumerate(params) if p is not None]))
        return step(tokens, params, n_steps, masks, chunks)

    monkeypatch.setattr(scheduler.slots, "step", spy)
    decoding, decoding_sink = request(rng.integers(3, 250, 5).tolist(), 110, stop_ids=frozenset())
    scheduler.submit(decoding)
    assert decoding_sink.first.wait(TIMEOUT_S)
    seen_at_first: list[int] = []
    long, long_sink = request(rng.integers(3, 250, 100).tolist(), 2)

    def on_long_output(out: Output) -> None:
        if not seen_at_first:
            seen_at_first.append(len(decoding_sink.tokens))
        long_sink(out)

    long.emit = on_long_output
    first_step = len(steps)
    scheduler.submit(long)  # 99 tokens to prefill in chunks of 16: 7 steps, each with a decode row of the other
    long_sink.wait()
    decoding_sink.wait()
    chunked = [active for has_chunk, active in steps[first_step:] if has_chunk]
    assert len(chunked) == 7
    assert all(decoding.slot in active for active in chunked) and long.slot in chunked[-1]
    assert seen_at_first[0] >= 1 + 6  # and the first of `long` came in the step of its last chunk


def test_a_prompt_extending_a_finished_one_reuses_its_cache(model, scheduler, rng):
    prompt = rng.integers(3, 250, 30).tolist()
    first, first_sink = request(prompt, 6, stop_ids=frozenset())
    scheduler.submit(first)
    first_sink.wait()
    follow_up = prompt + first_sink.tokens + rng.integers(3, 250, 5).tolist()
    reused = scheduler.reused_tokens
    second, sink = request(follow_up, 5)
    scheduler.submit(second)
    assert sink.wait().tokens == model.generate([follow_up], max_new_tokens=5).ids[0]
    page = scheduler.slots.pages.layout.page_size  # whole pages of what the first request's cache held
    assert scheduler.reused_tokens - reused == second.cached_tokens == (len(prompt) + 6 - 1) // page * page > 0


def test_cancel_frees_the_slot_at_once(scheduler, rng):
    req, sink = request(rng.integers(3, 250, 8).tolist(), 100, stop_ids=frozenset())
    scheduler.submit(req)
    assert sink.first.wait(TIMEOUT_S)
    cancelled = scheduler.cancelled
    scheduler.cancel(req)
    steps = scheduler.steps
    wait_until(lambda: scheduler.running == 0)
    assert scheduler.steps <= steps + 1 and not sink.done.is_set() and scheduler.cancelled == cancelled + 1
    again, again_sink = request(rng.integers(3, 250, 8).tolist(), 4)
    scheduler.submit(again)
    assert len(again_sink.wait().tokens) <= 4


def test_forced_tokens_replace_the_first_stop(model, scheduler, rng):
    for _ in range(20):  # a prompt whose greedy continuation runs 6 tokens without EOS
        prompt = rng.integers(3, 250, 10).tolist()
        plain = model.generate([prompt], max_new_tokens=6).ids[0]  # generate stops at EOS, so plain holds none
        if len(plain) == 6:
            break
    stop = plain[3]
    forced = tuple(t for t in (7, 8, 9, 10) if t not in plain)[:2]
    req, sink = request(prompt, 12, force_before_stop=forced, stop_ids=frozenset({stop, EOS}))
    scheduler.submit(req)
    sink.wait()
    head = plain[:plain.index(stop)]
    assert sink.tokens[: len(head) + 2] == head + list(forced)
    rest = model.generate([prompt + head + list(forced)], max_new_tokens=12 - len(head) - 2).ids[0]
    tail = sink.tokens[len(head) + 2:]
    assert tail == rest[: len(tail)]
    if sink.finish == "stop":
        assert len(rest) == len(tail) or rest[len(tail)] == stop


def test_queue_bound_and_request_checks(model, rng):
    sched = Scheduler(model, n_slots=1, max_context=64, max_queue=1, warmup=False).start()
    try:
        accepted = 0
        with pytest.raises(QueueFull, match="max_queue 1"):
            for _ in range(3):
                sched.submit(request(rng.integers(3, 250, 4).tolist(), 50)[0])
                accepted += 1
        assert accepted >= 1
        with pytest.raises(ValueError, match="over the context of 64"):
            sched.submit(request([3] * 60, 5)[0])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sched.submit(request([3, 999], 5)[0])
        with pytest.raises(ValueError, match="max_tokens must be >= 1"):
            sched.submit(request([3], 0)[0])
    finally:
        sched.close()
    with pytest.raises(ValueError, match="max_context must be in"):
        Scheduler(model, max_context=10**6, warmup=False)


def forged(params: SamplingParams, **values) -> SamplingParams:
    """SamplingParams holding values its checks refuse (as a caller bypassing them could): a row that cannot build."""
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.parametrize("bad", [{"top_k": 2**40}, {"seed": -1}, {"temperature": float("nan")}])
def test_a_row_that_fails_to_prepare_fails_only_its_request(model, scheduler, rng, bad):
    good = [request(rng.integers(3, 250, 6).tolist(), 40, stop_ids=frozenset(),
                    params=SamplingParams(temperature=0.8, seed=i)) for i in range(2)]
    for req, _ in good:
        scheduler.submit(req)
    assert all(sink.first.wait(TIMEOUT_S) for _, sink in good)
    broken, broken_sink = request(rng.integers(3, 250, 6).tolist(), 40)
    with pytest.raises(ValueError, match=next(iter(bad))):
        scheduler.submit(request([3], 4, params=forged(SamplingParams(), **bad))[0])  # refused at submit
    scheduler.submit(broken)
    forged(broken.params, **bad)  # broken after its checks, while the others decode
    assert broken_sink.wait().finish == "error"
    for req, sink in good:
        assert sink.wait().finish == "length" and len(sink.tokens) == 40
    wait_until(lambda: scheduler.running == 0)
    assert scheduler.free_slots == 3


def test_sampling_params_refuse_values_the_sampler_cannot_hold():
    for bad in ({"top_k": 2**31}, {"top_k": -1}, {"seed": 2**32}, {"seed": -1}, {"temperature": float("inf")},
                {"top_p": float("nan")}, {"min_p": 1.5}, {"top_k": True}, {"top_logprobs": 21}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_sampling_settings_survive_the_step_message():
    params = [SamplingParams(0.7, 40, 0.9, 0.05, 2**32 - 1, 20), None, SamplingParams(), SamplingParams(seed=12345)]
    back = unpack_params(pack_params(params), len(params))
    assert back[1] is None and back[2:] == params[2:]
    assert np.float32(back[0].temperature) == np.float32(0.7) and back[0].top_k == 40 and back[0].seed == 2**32 - 1
    assert back[0].top_logprobs == 20


class RecordingLink(StepLink):
    """A link to no other process: it keeps what process 0 broadcasts."""

    def __init__(self, n_slots: int, max_prefill: int):
        super().__init__(n_slots, max_prefill)
        self.sent: list[np.ndarray] = []

    def _broadcast(self, message: np.ndarray) -> np.ndarray:
        self.sent.append(message.copy())
        return message


@pytest.mark.parametrize("lengths", [(9, 30, 17), (128, 100)])
def test_packed_chunks_and_masks_survive_the_step_message(model, rng, lengths):
    """What another process replays (unpack_step over the STEP message, then the shared masks) is the step process
    0 ran: several packed prompt chunks (short ones, or long ones filling the message), then decode rows under token
    masks."""
    link = RecordingLink(4, 128)
    slots = LinkedSlots(model, 4, 256, link, max_chunk=128)
    chunks = [engine.Chunk(s, rng.integers(0, 250, n).tolist(), 0) for s, n in zip((0, 2, 3), lengths)]
    assert engine.chunk_shape([len(c.tokens) for c in chunks], 128)[0] > 1
    idle = [None] * 4
    slots.step(np.zeros(4, np.int32), idle, 1, chunks=chunks)
    masks = StepMasks.unconstrained(4, slots.mask_words, 8)
    masks.words[:] = rng.integers(-2**31, 2**31, masks.words.shape, dtype=np.int64).astype(np.int32)
    masks.words[:, 0] = -1  # each row may sample some token
    for lists in (masks.add, masks.drop, masks.edges, masks.to):
        lists[:, :2, :3] = rng.integers(0, 250, (4, 2, 3))
    masks.chain[0, 0, :2], masks.chain[3, :2, 0] = rng.integers(0, 250, 2), rng.integers(0, 250, 2)
    masks.base[:], masks.hold[:] = rng.random(masks.base.shape) < 0.5, rng.random(masks.hold.shape) < 0.5
    params = [SamplingParams(seed=1), None, SamplingParams(temperature=1.0, seed=2), SamplingParams(seed=3)]
    tokens = np.array([5, 0, 7, 9], np.int32)
    slots.step(tokens, params, 2, masks)
    (first, second, shared) = link.sent
    assert first[0] == second[0] == STEP
    got = unpack_step(first[HEADER:], 4, *first[1:3].tolist())
    assert [(c.row, list(c.tokens), c.start) for c in got[4]] == [(c.row, c.tokens, c.start) for c in chunks]
    assert got[1] == idle and got[2] == 1 and got[3] is None and not first[3]
    replayed = (engine.unpack_host(shared, engine.host_layout(StepMasks.unconstrained(4, slots.mask_words, 2)))
                if second[3] else None)
    got = unpack_step(second[HEADER:], 4, *second[1:3].tolist(), replayed)
    assert np.array_equal(got[0], tokens) and got[1] == params and got[2] == 2 and got[4] == []
    assert all(np.array_equal(a, b) for a, b in zip(got[3], masks._replace(chain=masks.chain[:, :, :2])))


def run_all(sched: Scheduler, jobs: list[tuple[list[int], int]], **kw) -> list[Request]:
    """Submit every (prompt, max_tokens) at once and wait for all; the requests, their tokens in their sinks."""
    reqs = [request(p, n, **kw) for p, n in jobs]
    for req, _ in reqs:
        sched.submit(req)
    for req, sink in reqs:
        sink.wait()
        req.emit = sink
    return [req for req, _ in reqs]


def no_page_leaks(sched: Scheduler) -> None:
    """Every page is free or cached for nobody; the allocator agrees with itself; the cache empties."""
    wait_until(lambda: sched.running == 0)
    sched.slots.pages.check()
    assert sched.free_pages + sched.evictable_pages == sched.total_pages and sched.free_slots == sched.slots.n_slots
    sched.slots.prefix.clear()
    assert sched.free_pages == sched.total_pages


def test_shared_prefixes_are_cached_and_change_no_output(model, scheduler, rng):
    page = scheduler.slots.pages.layout.page_size
    system = rng.integers(3, 250, 2 * page + 5).tolist()
    jobs = [(system + rng.integers(3, 250, n).tolist(), 6) for n in (4, 9, 1)]
    first = run_all(scheduler, jobs[:1])[0]  # the others start once its pages are cached
    cached = run_all(scheduler, jobs[1:])
    plain = Scheduler(scheduler.model, n_slots=3, max_context=120, prefill_chunk=16, prefix_cache=False).start()
    try:
        uncached = run_all(plain, jobs)
    finally:
        plain.close()
    assert [r.cached_tokens for r in cached] == [2 * page, 2 * page] and not any(r.cached_tokens for r in uncached)
    assert [r.emit.tokens for r in [first, *cached]] == [r.emit.tokens for r in uncached]
    assert [r.emit.tokens for r in uncached] == [model.generate([p], max_new_tokens=n).ids[0] for p, n in jobs]


def test_long_prompts_arriving_together_prefill_two_per_step(model, rng):
    """Two prompts of two full chunks each, arriving together: every step writes a chunk of both (FULL_CHUNKS), so
    their prefill takes two steps, not four, and each first token is generate()'s."""
    sched = Scheduler(model, n_slots=2, max_context=64, prefill_chunk=16, warmup=False)
    jobs = [(rng.integers(3, 250, 2 * 16 + 1).tolist(), 1) for _ in range(2)]
    reqs = [request(p, n) for p, n in jobs]
    sched.run([r for r, _ in reqs])
    assert sched.steps == 2
    assert [sink.tokens for _, sink in reqs] == [model.generate([p], max_new_tokens=n).ids[0] for p, n in jobs]


def test_requests_arriving_together_share_their_common_prefix(model, scheduler, rng):
    """A burst of requests with one system prompt: the first prefills it, the others start from its cached pages
    (each waits for its own first chunk to start from the cache), and every output is generate()'s."""
    page = scheduler.slots.pages.layout.page_size
    system = rng.integers(3, 250, 2 * page + 5).tolist()
    jobs = [(system + rng.integers(3, 250, n).tolist(), 6) for n in (4, 9, 1)]
    burst = run_all(scheduler, jobs)
    assert [r.cached_tokens for r in burst] == [0, 2 * page, 2 * page]
    assert [r.emit.tokens for r in burst] == [model.generate([p], max_new_tokens=n).ids[0] for p, n in jobs]


@pytest.fixture(scope="module")
def tight(model):
    """Six slots over a pool of twelve pages (room for three sequences of 120 tokens): requests get preempted."""
    sched = Scheduler(model, n_slots=6, max_context=120, max_queue=256, prefill_chunk=64, num_pages=12).start()
    assert sched.ready.wait(WARMUP_S)
    yield sched
    sched.close()


def test_a_pool_too_small_for_the_load_preempts_and_changes_no_output(model, scheduler, tight, rng):
    prompts = [rng.integers(3, 250, int(rng.integers(30, 60))).tolist() for _ in range(6)]
    jobs = [(p, 120 - len(p)) for p in prompts]  # no stop id: four pages each at the end, twelve in the pool
    preemptions = tight.preemptions
    loaded = run_all(tight, jobs, stop_ids=frozenset())
    assert tight.preemptions > preemptions
    alone = [run_all(scheduler, [job], stop_ids=frozenset())[0] for job in jobs]  # a full pool, one at a time
    for req, ref, (prompt, n) in zip(loaded, alone, jobs):
        assert req.emit.tokens == ref.emit.tokens and len(req.emit.tokens) == n
        until_eos = model.generate([prompt], max_new_tokens=n).ids[0]
        assert req.emit.tokens[: len(until_eos)] == until_eos
    no_page_leaks(tight)


def test_200_requests_with_random_cancels_leak_no_page(tight, rng):
    reqs = [request(rng.integers(3, 250, int(rng.integers(1, 90))).tolist(), int(rng.integers(1, 24)),
                    stop_ids=frozenset()) for _ in range(200)]
    cancel_after = rng.random(200) < 0.4
    cancelled = tight.cancelled
    for (req, _), cancel in zip(reqs, cancel_after):
        tight.submit(req)
        if cancel:
            time.sleep(float(rng.random()) * 0.02)
            tight.cancel(req)
    for (req, sink), cancel in zip(reqs, cancel_after):
        assert cancel or sink.wait().finish == "length"
    assert tight.cancelled > cancelled  # some left before finishing
    no_page_leaks(tight)


def test_a_request_the_pool_can_never_hold_is_refused_naming_both(model):
    sched = Scheduler(model, n_slots=2, max_context=200, num_pages=4, warmup=False)  # 128 tokens for one sequence
    with pytest.raises(ValueError, match=r"prompt \(100 tokens\) plus max_tokens \(40\) is 140 tokens, which need 5 "
                                         r"KV pages of 32 tokens .* the KV pool holds 4 pages"):
        sched.check_fits(Request([3] * 100, 40, print))
    assert Scheduler(model, n_slots=2, num_pages=4, warmup=False).max_context == 4 * 32 - sched.decode_steps


def test_serving_a_mixed_load_compiles_nothing(model, scheduler, rng, compiles):
    assert scheduler.ready.wait(WARMUP_S) and scheduler.programs > 0
    with compiles() as events:
        lengths = [1, 2, 15, 16, 17, 33, 64, 100, 119]
        jobs = [(rng.integers(3, 250, n).tolist(), int(rng.integers(1, 121 - n))) for n in lengths]
        run_all(scheduler, jobs, params=SamplingParams(temperature=0.9, top_k=5, seed=1))
        run_all(scheduler, jobs[:3], force_before_stop=(7, 8), stop_ids=frozenset(range(3, 250)))
    assert events == []


def test_short_prompts_arriving_together_prefill_in_one_step(model, rng):
    """Four requests with short prompts arriving together are prefilled by one step (packed chunks) and each gets
    what generate() gives it alone."""
    sched = Scheduler(model, n_slots=4, max_context=100, prefill_chunk=128, prefix_cache=False, warmup=False).start()
    try:
        chunks: list[list[int]] = []
        step = sched.slots.step
        sched.slots.step = lambda *args: chunks.append([len(c.tokens) for c in args[4]]) or step(*args)
        jobs = [(rng.integers(3, 250, n).tolist(), 6) for n in (5, 30, 17, 26)]
        with sched._cond:  # all four wait before the scheduler thread looks
            done = [request(p, n) for p, n in jobs]
            for req, _ in done:
                sched.submit(req)
        outputs = [sink.wait().tokens for _, sink in done]
    finally:
        sched.close()
    assert chunks[0] == [4, 29, 16, 25] and not any(chunks[1:])
    assert outputs == [model.generate([p], max_new_tokens=n).ids[0] for p, n in jobs]


class RunLog(RowConstraint):
    """A RowConstraint that records each accepted run: (drafted, tokens offered, tokens taken, tokens forced)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.runs: list[tuple[bool, int, int, int]] = []
        self.offered: list[list[int]] = []  # the tokens of each run

    def accept(self, tokens, exact=False, drafted=False, forced=0, states=None):
        taken = super().accept(tokens, exact, drafted, forced, states)
        self.runs.append((not states[0].hold, len(tokens), taken, len(states[0].chain)))
        self.offered.append(list(tokens))
        return taken


def test_a_rows_grammar_walks_no_draw_past_its_stop_token_or_its_budget():
    """The device draws every step of a call for every row; a constrained row's grammar is offered only the draws its
    request can keep: through its first stop token, and within its token budget."""
    model = k2jax.load()  # the bundled model: it has a tokenizer
    tok = model.tokenizer
    tools = [{"type": "function", "function": {"name": "calculate", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    vocab, stops = vocabulary(tok, model.config.vocab_size), frozenset(tok.stop_ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 37 times 41?"}], tools=tools, tokenize=True)
    logs = [RunLog(vocab, tool_calls_grammar(tools)) for _ in range(2)]
    (ends, ends_sink), (cut, cut_sink) = (request(prompt, budget, stop_ids=stops, constraint=log)
                                          for budget, log in zip((96, 13), logs))
    sched = Scheduler(model, n_slots=2, max_context=512, warmup=False).start()
    try:
        for job in (ends, cut):
            sched.submit(job)
        ends_sink.wait(), cut_sink.wait()
    finally:
        sched.close()
    assert ends_sink.finish == "stop" and cut_sink.finish == "length" and len(cut_sink.tokens) == 13
    offered = [token for run in logs[0].offered for token in run]
    assert offered[-1] in stops and not stops & set(offered[:-1])
    assert max(len(run) for run in logs[0].offered) > 1  # runs of several draws, the last one cut at the stop
    taken = 0
    for run, (*_, took, _) in zip(logs[1].offered, logs[1].runs):
        assert taken + len(run) <= 13
        taken += took


def test_rows_beside_a_prompt_chunk_are_planned_for_its_one_step():
    """A step that writes a prompt chunk samples one token per decode row, so its rows' automata hold no edges (the
    host plans no state past the first draw), while the calls around it do: a row in reasoning leads by `</think>`."""
    model = k2jax.load()  # the bundled model: it has a tokenizer
    tok = model.tokenizer
    sched = Scheduler(model, n_slots=2, max_context=512, warmup=False)
    calls, step = [], sched.slots.step  # (whether it writes a chunk, whether its automata have edges)

    def logging_step(tokens, params, n_steps, masks, chunks):
        if masks is not None:
            calls.append((bool(chunks), bool((masks.to > 0).any())))
        return step(tokens, params, n_steps, masks, chunks)

    sched.slots.step = logging_step
    chat_prompt = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
    late, late_sink = request(chat_prompt("Name three rivers of Europe, please."), 4)
    sched.on_step = lambda seconds, rows: sched.submit(late) if sched.steps == 3 else None
    tools = [{"type": "function", "function": {"name": "multiply", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    constraint = RowConstraint(vocabulary(tok, model.config.vocab_size), tool_calls_grammar(tools))
    first, sink = request(chat_prompt("What is 37 times 41?"), 48, stop_ids=frozenset(tok.stop_ids),
                          constraint=constraint)
    sched.start()
    sched.submit(first)
    sink.wait(), late_sink.wait()
    sched.close()
    assert (True, False) in calls and (False, True) in calls and (True, True) not in calls
    assert sched.grammar_seconds > 0


class LogprobCollector(Collector):
    """A Collector that also keeps each token's log-prob."""

    def __init__(self) -> None:
        super().__init__()
        self.logprobs: list[float] = []

    def __call__(self, out: Output) -> None:
        self.logprobs.extend(out.logprobs)
        super().__call__(out)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 0.9)])
def test_a_refused_draw_where_the_grammar_allows_one_token_is_filled_with_it(temperature, top_p):
    """A tool the bundled model never saw: some of its draws where the grammar allows one token only (the tool's name,
    a JSON key) are refused. A request that reads no log-probs keeps that token in place of the refused draw (every
    masked draw there takes it), one that reads them draws it again next call. Same tokens either way, in no more
    engine steps without log-probs; NaN log-probs at the filled tokens, the same ones elsewhere."""
    model = k2jax.load()  # the bundled model: it has a tokenizer
    tok = model.tokenizer
    tools = [{"type": "function", "function": {"name": "unit_convert", "parameters": {
        "type": "object", "properties": {"quantity": {"type": "number"}, "src": {"type": "string"},
                                         "dst": {"type": "string"}},
        "required": ["quantity", "src", "dst"], "additionalProperties": False}}}]
    vocab = vocabulary(tok, model.config.vocab_size)
    prompt = tok.apply_chat_template([{"role": "user", "content": "How many km is 79 miles?"}], tools=tools,
                                     tokenize=True)
    sched = Scheduler(model, n_slots=1, max_context=512, warmup=False).start()
    runs = []
    try:
        for logprobs in (True, False):
            sink, steps = LogprobCollector(), sched.steps
            sched.submit(Request(prompt, 64, sink, SamplingParams(temperature=temperature, top_p=top_p, seed=4),
                                 frozenset(tok.stop_ids), constraint=RowConstraint(vocab, tool_calls_grammar(tools)),
                                 logprobs=logprobs))
            runs.append((sink.wait(), sched.steps - steps))
    finally:
        sched.close()
    (read, read_steps), (filled, filled_steps) = runs
    assert filled.tokens == read.tokens and "functions.unit_convert:0" in tok.decode(read.tokens)
    nan = np.isnan(filled.logprobs)
    assert nan.any() and not np.isnan(read.logprobs).any() and filled_steps <= read_steps
    np.testing.assert_allclose(np.asarray(filled.logprobs)[~nan], np.asarray(read.logprobs)[~nan], atol=1e-5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.0, 0.9), (0.0, 0.9)])
def test_constrained_rows_sample_exactly_and_leave_other_rows_alone(temperature, top_p):
    """A row under a JSON grammar (its mask changing token by token) beside plain rows: the plain rows give
    generate()'s greedy tokens, and the constrained row's tokens, taken in runs of decode_steps (first the tokens
    its grammar forces, a JSON key, then drafted while its mask changes, when top_p leaves drafts exact) that are cut
    at the first draw that does not stand, equal those sampled one token per step under each token's own mask. While
    plain rows decode beside it, every call samples decode_steps tokens: a row that cannot draft holds back no other."""
    model = k2jax.load()  # the bundled model: it has a tokenizer
    tok = model.tokenizer
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer"}}, "required": ["city", "days"]}
    vocab = vocabulary(tok, model.config.vocab_size)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Plan a trip as JSON."}], tokenize=True)
    plain = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
             for q in ("What is the capital of Peru?", "Compute 12 * 3.")]
    runs = []
    for steps in (8, 1):
        sched = Scheduler(model, n_slots=3, max_context=512, decode_steps=steps, warmup=False)
        calls, step = [], sched.slots.step  # (rows decoding, steps) of every decode-only call

        def counting_step(tokens, params, n_steps, masks, chunks):
            if not chunks:
                calls.append((sum(p is not None for p in params), n_steps))
            return step(tokens, params, n_steps, masks, chunks)

        sched.slots.step = counting_step
        sched.start()
        constraint = RunLog(vocab, json_grammar(schema), reasoning_budget=6)
        jobs = [request(prompt, 48, stop_ids=frozenset(tok.stop_ids),
                        params=SamplingParams(temperature=temperature, top_p=top_p, seed=3), constraint=constraint)]
        jobs += [request(p, 24, stop_ids=frozenset(tok.stop_ids)) for p in plain]
        for req, _ in jobs:
            sched.submit(req)
        runs.append([sink.wait() for _, sink in jobs])
        sched.close()
        if steps == 8:
            drafted = [taken for was_drafted, _, taken, _ in constraint.runs if was_drafted]
            assert (max(drafted) > 1) if drafts_exact(SamplingParams(temperature=temperature, top_p=top_p)) \
                else not drafted
            assert max(forced for *_, forced in constraint.runs) > 1  # `{"city":` at least
            assert all(n == steps for rows, n in calls if rows > 1)  # the constrained row holds no other row back
    (constrained, *beside), (one_by_one, *_) = runs
    assert constrained.tokens == one_by_one.tokens
    for sink, p in zip(beside, plain):
        assert sink.tokens == model.generate([p], max_new_tokens=24).ids[0]
    text = tok.decode(constrained.tokens)
    reasoning, _, answer = text.partition("</think>")
    assert len(tok.encode(reasoning, allow_special=True)) <= 1 + 6  # <think> and at most 6 reasoning tokens
    if constrained.finish == "stop":
        jsonschema.validate(json.loads(answer), schema)
    else:  # cut by max_tokens: what there is is a prefix of the grammar's JSON
        assert answer.startswith("{")
