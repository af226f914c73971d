"""Generation engine: batching, chunked prefill, seeds, n samples, stops and limits."""

from __future__ import annotations

import gc
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax import chat, engine
from k2jax.grammar import RowConstraint, allowed_tokens, tool_calls_grammar, vocabulary, write_automaton
from k2jax.sampling import SamplingParams, StepMasks
from k2jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return k2jax.load(hf_checkpoint(seed=3, eos_token_id=255)[1])


def prompts_of(rng, lengths):
    return [rng.integers(3, 250, n).tolist() for n in lengths]


def test_batch_invariance(model, rng):
    prompts = prompts_of(rng, (3, 11, 6, 1))
    batched = model.generate(prompts, max_new_tokens=10).ids
    alone = [model.generate([p], max_new_tokens=10).ids[0] for p in prompts]
    assert batched == alone


def test_decode_rate_starts_once_every_row_holds_its_first_token(model, rng, monkeypatch):
    """A long prompt prefills alone, then three short ones together, each chunk's step sampling its row's first token
    (and one token of every row decoding beside it); decode tokens/s counts the tokens and steps after the last
    first token only (a clock that ticks once per model call)."""
    clock, run, sampled = [0.0], engine.Engine.run, []

    def ticking(self, pages, pool, rows, *args, **kw):
        clock[0] += 1.0
        sampled.append(len(rows))  # rows sampling one token each: every step with a chunk
        return run(self, pages, pool, rows, *args, **kw)

    prompts = prompts_of(rng, (200, 3, 11, 6))
    while min(len(ids) for ids in model.generate(prompts, max_new_tokens=2).ids) < 2:  # an early EOS: 5 tokens below
        prompts = prompts_of(rng, (200, 3, 11, 6))  # would not all be there by the last first token
    monkeypatch.setattr(engine.Engine, "run", ticking)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    stats = model.generate(prompts, max_new_tokens=17).stats
    assert stats["time_to_first_token_s"] == 1 and stats["prefill_s"] == 2 and sampled[:2] == [1, 4]
    decode_calls = stats["total_s"] - stats["prefill_s"]
    assert decode_calls >= 2 and stats["decode_tokens_per_s"] == (stats["generated_tokens"] - 5) / decode_calls


def test_chunked_prefill_equals_one_chunk(model, rng, monkeypatch):
    prompts = prompts_of(rng, (37, 20))
    whole = model.generate(prompts, max_new_tokens=6, logprobs=True)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 16)
    chunked = model.generate(prompts, max_new_tokens=6, logprobs=True)
    assert chunked.ids == whole.ids
    for got, ref in zip(chunked.logprobs, whole.logprobs):  # rows may end at EOS at different lengths
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_logprobs_match_full_prefill(model, rng):
    prompt = prompts_of(rng, (9,))[0]
    out = model.generate([prompt], max_new_tokens=5, logprobs=True)
    n = len(out.ids[0])  # fewer than 5 when the model emitted EOS
    logits = model.logits(np.array([prompt + out.ids[0]]))[0, len(prompt) - 1:len(prompt) - 1 + n]
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(out.logprobs[0], ref[np.arange(n), out.ids[0]], rtol=1e-4, atol=1e-4)


def test_sampling_seeds_and_n(model, rng):
    prompt = prompts_of(rng, (5,))
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = model.generate(prompt, seed=11, n=3, **kw)
    assert a.ids == model.generate(prompt, seed=11, n=3, **kw).ids
    assert a.ids[1] == model.generate(prompt, seed=12, **kw).ids[0]  # sample j uses seed + j
    assert len({tuple(x) for x in a.ids}) > 1
    assert model.generate(prompt, top_k=1, temperature=2.0, max_new_tokens=8).ids == model.generate(
        prompt, max_new_tokens=8).ids


def test_stop_id_ends_a_row(model, rng):
    for _ in range(20):  # a prompt whose greedy continuation runs 12 tokens without EOS
        prompt = prompts_of(rng, (4,))
        free = model.generate(prompt, max_new_tokens=12).ids[0]
        if len(free) == 12:
            break
    stopped = k2jax.Model(model.config, model.graphdef, model.state)
    stopped._stop_ids = lambda: frozenset({free[5]})
    out = stopped.generate(prompt, max_new_tokens=12)
    assert out.ids[0] == free[: free.index(free[5])] and out.finish_reasons == ["stop"]


def test_generate_frees_its_page_pool_on_return(model, rng):
    """Nothing generate() made outlives it in a reference cycle, so its page pool is freed when it returns, not at
    some later garbage collection."""
    model.generate(prompts_of(rng, (5, 7)), max_new_tokens=12)  # compiles
    gc.collect()
    gc.disable()
    try:
        before = sum(a.nbytes for a in jax.live_arrays())
        model.generate(prompts_of(rng, (5, 7)), max_new_tokens=12)
        after = sum(a.nbytes for a in jax.live_arrays())
    finally:
        gc.enable()
    assert after == before


def test_calls_of_one_size_bucket_share_their_page_pool(model, rng, monkeypatch):
    """generate() sizes its page pool (an input of every step program, so its shape decides what compiles) by the
    power of two covering prompt plus max_new_tokens, not by the call: another prompt length or max_new_tokens
    within the bucket compiles no new step for a shape it has seen."""
    pools = []
    paged = type(model).paged

    def record(self, *args, **kwargs):
        pages, pool = paged(self, *args, **kwargs)
        pools.append(jax.tree.map(jnp.shape, pool))
        return pages, pool

    monkeypatch.setattr(type(model), "paged", record)
    model.generate(prompts_of(rng, (9, 14, 11)), max_new_tokens=20)  # 34 tokens
    model.generate(prompts_of(rng, (12, 10, 15)), max_new_tokens=45)  # 60 tokens
    model.generate(prompts_of(rng, (30, 8, 9)), max_new_tokens=60)  # 90 tokens
    assert pools[0] == pools[1] != pools[2]


def test_a_repeated_call_traces_nothing(model, rng, compiles):
    """A second generate() of the same batch and size bucket, whose rows run to max_new_tokens as the first's, traces
    and compiles no program, its new page pool's included: every jit it calls is one it has seen. (A row of random
    weights that draws EOS early leaves steps with fewer rows, a shape of their own: such a call is drawn again.)"""
    model.generate(prompts_of(rng, (5, 7)), max_new_tokens=12)  # compiles
    for _ in range(8):
        with compiles() as events:
            out = model.generate(prompts_of(rng, (6, 4)), max_new_tokens=12)
        if all(len(ids) == 12 for ids in out.ids):
            break
    assert all(len(ids) == 12 for ids in out.ids) and events == []


def test_limits_are_clear_errors(model):
    too_long = [[5] * (model.config.max_position_embeddings - 3)]
    with pytest.raises(ValueError, match="over the model's context of 512"):
        model.generate(too_long, max_new_tokens=10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[1, 99999]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1, 2]], temperature=-0.5)


def test_host_inputs_travel_in_one_buffer_and_come_back_unchanged(rng):
    """pack_host / unpack_host: every dtype a step sends (int32, uint32, float32, bool, a 0-d step count) and a
    missing prefill chunk come back bit for bit, inside a jitted program and on the host; the layout k2jax-plan
    compiles ahead from the inputs' shapes alone is the one they travel in; a dtype the int32 words cannot carry is
    refused by name."""
    tree = ({"a": rng.integers(-2**31, 2**31 - 1, (3, 5)).astype(np.int32),
             "b": rng.integers(0, 2**32 - 1, 7, dtype=np.uint64).astype(np.uint32),
             "c": rng.standard_normal((2, 3)).astype(np.float32), "d": rng.random(9) < 0.5,
             "e": rng.integers(0, 9, (4, 6)).astype(np.int32)[:, ::2]}, None, np.int32(rng.integers(1, 9)))
    buf, layout = engine.pack_host(tree)
    assert buf.dtype == np.int32 and buf.size == layout.words == sum(np.size(x) for x in jax.tree.leaves(tree))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    assert engine.host_layout(abstract) == layout
    for back in (jax.jit(engine.unpack_host, static_argnums=1)(buf, layout), engine.unpack_host(buf, layout)):
        assert back[1] is None
        for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
            assert got.shape == np.shape(want) and got.dtype == np.asarray(want).dtype
            np.testing.assert_array_equal(np.asarray(got), want)
    assert isinstance(back[0]["c"], np.ndarray)  # from a numpy buffer (the multi-host link's), numpy arrays
    with pytest.raises(ValueError, match="float16 \\(3,\\)"):  # the buffer holds 4-byte words
        engine.pack_host({"a": np.zeros(3, np.float16)})


def test_a_step_with_a_chunk_and_decode_rows_updates_the_pool_in_place(model):
    """Both segments' latents are written before either reads the pool. With a read between the two writes, XLA
    copied the whole pool twice per layer (136 MB of temporaries per step for 64 slots of the bundled model)."""
    pages, pool = model.paged(8, 4096)
    for row, tokens in ((0, 300), (1, 700), (2, 64)):
        pages.reserve(row, tokens)
    width = engine.table_width(pages.layout, pages.table.shape[1], 1024)
    rows = engine.decode_rows(pages.table, np.arange(2), [0, 1], [5, 6], [299, 699], [SamplingParams()] * 2,
                              None, 2, width, 0, -(-model.config.vocab_size // 32), 1)
    chunk = engine.prefill_chunks(pages.table, [engine.Chunk(2, list(range(3, 67)), 0)], 1, 64, 64, width)
    compiled = model.lower(pool, rows, chunk, 1, pages.layout, 1).compile()  # the program Engine.run calls
    mem = compiled.memory_analysis()
    stack_bytes = [x.size * x.dtype.itemsize for x in jax.tree.leaves(pool)]  # one per layer stack
    assert mem.alias_size_in_bytes >= sum(stack_bytes), "the pool is not donated into the output"
    assert mem.temp_size_in_bytes < min(stack_bytes) / 2, (mem.temp_size_in_bytes, stack_bytes)


@pytest.mark.parametrize("kernels", ["native", "xla"])
def test_a_step_never_widens_a_whole_weight_stack_or_the_embedding(kernels, monkeypatch):
    """XLA:CPU widens a bf16 dot or gather operand to float32 whole, and hoisted that out of the layer scan and the
    decode loop: every call wrote the widened embedding (on the "small" config 125 MB of fresh pages, 30% of a
    batch-1 step) and, in prefill chunks and on the XLA path, whole widened weight stacks. Only a layer's matrix
    may be widened: no float32 array of a stack's or the embedding's shape may be in the compiled program."""
    monkeypatch.setenv("K2JAX_KERNELS", kernels)
    jax.clear_caches()  # the kernel choice is made at trace time
    model = k2jax.load()  # the bundled model: bf16 weights
    stacks = [v.get_value() for k, v in nnx.to_flat_state(model.state) if k[0] in ("dense_layers", "moe_layers")]
    whole = [model.state["embed"].get_value()] + [x for x in stacks if x.ndim >= 3 and x.shape[0] > 1
                                                  and x.dtype == jnp.bfloat16]
    assert len(whole) > 10 and whole[0].dtype == jnp.bfloat16
    pages, pool = model.paged(2, 256)
    pages.reserve(0, 64)
    pages.reserve(1, 64)
    width = engine.table_width(pages.layout, pages.table.shape[1], 64)
    rows = engine.decode_rows(pages.table, np.arange(1), [0], [5], [20], [SamplingParams()], None, 1, width, 0,
                              -(-model.config.vocab_size // 32), 8)
    chunk = engine.prefill_chunks(pages.table, [engine.Chunk(1, list(range(3, 67)), 0)], 1, 64, 64, width)
    for step_chunk, steps in ((None, 8), (chunk, 1)):
        text = model.lower(pool, rows, step_chunk, steps, pages.layout, steps).compile().as_text()
        widened = {f"f32[{','.join(map(str, x.shape))}]" for x in whole} & materialized_f32_shapes(text)
        assert not widened, (steps, widened)


def materialized_f32_shapes(hlo: str) -> set[str]:
    """Shapes of the float32 arrays that a compiled program's instructions write to buffers: those outside fused
    computations (whose values live in registers), other than parameters, tuple elements and bitcasts."""
    fused = set(re.findall(r" fusion\(.*?calls=(%[\w.-]+)", hlo))
    shapes, inside = set(), None
    for line in hlo.splitlines():
        if header := re.match(r"(?:ENTRY )?(%[\w.-]+) \(.*\{$", line):
            inside = header.group(1)
        elif inside not in fused and (op := re.match(r"\s+(?:ROOT )?%\S+ = (f32\[[\d,]*\])\S* ([\w-]+)\(", line)):
            if op.group(2) not in ("parameter", "get-tuple-element", "bitcast", "tuple"):
                shapes.add(op.group(1))
    return shapes


def test_chunks_pack_when_short_or_two_long_ones_pad_no_more_than_alone():
    """A step carries one chunk, up to PACKED_CHUNKS short ones (limit tokens together, padded to the next
    PACKED_TOKENS count), or FULL_CHUNKS that each pad to the largest length alone too; other mixes are not packed
    (the scheduler sends the rest next step)."""
    assert engine.chunk_shape([512], 512) == (1, 512, 512) and engine.chunk_shape([200], 512) == (1, 256, 256)
    assert engine.chunk_shape([100, 120, 30], 512) == (engine.PACKED_CHUNKS, 128, 256)
    assert engine.chunk_shape([20, 30, 9, 32, 1], 512) == (engine.PACKED_CHUNKS, 128, 128)
    assert engine.chunk_shape([90] * 5, 512) == (engine.PACKED_CHUNKS, 128, 512)
    assert engine.chunk_shape([90] * 5, 256) is None
    assert engine.chunk_shape([512, 257], 512) == engine.chunk_shape([300, 400], 512) == (engine.FULL_CHUNKS, 512,
                                                                                          1024)
    for lengths in ([512, 256], [512, 300, 400], [100, 120, 300], [128] * 5, [1] * (engine.PACKED_CHUNKS + 1)):
        assert engine.chunk_shape(lengths, 512) is None, lengths


def test_packed_chunks_sit_one_after_another():
    """The prefill segment holds the chunks' tokens back to back (padding only at its end), each at its row's place
    in the kernels' [P, T] layout, and each place names its token."""
    table = np.arange(40, dtype=np.int32).reshape(4, 10)
    chunks = [engine.Chunk(2, [7, 8, 9], 5), engine.Chunk(0, [4], 0), engine.Chunk(3, [1, 2], 30)]
    seg = engine.prefill_chunks(table, chunks, 4, 4, 8, 3)
    assert seg.tok_N.tolist() == [7, 8, 9, 4, 1, 2, 0, 0]
    assert seg.place_N.tolist() == [0, 1, 2, 4, 8, 9, 16, 16]
    assert seg.token_PT[0, :3].tolist() == [0, 1, 2] and seg.token_PT[1, 0] == 3
    assert seg.token_PT[2, :2].tolist() == [4, 5]
    assert seg.start_P.tolist() == [5, 0, 30, 0] and seg.kv_len_P.tolist() == [8, 1, 32, 0]
    assert (seg.table_PM[:3] == table[[2, 0, 3], :3]).all()


def test_packed_chunks_reach_the_dense_layers_without_padding(model):
    """A packed step's program holds its hidden states as N + D rows (the segment's tokens and the decode rows): no
    array of the hidden width has a row per place of the kernels' [P, T] layout, as padding each chunk would make."""
    pages, pool = model.paged(4, 512)
    for row in range(4):
        pages.reserve(row, 300)
    width = engine.table_width(pages.layout, pages.table.shape[1], 300)
    rows = engine.decode_rows(pages.table, np.arange(1), [0], [5], [20], [SamplingParams()], None, 4, width, 0,
                              -(-model.config.vocab_size // 32), 1)
    chunks = [engine.Chunk(row, list(range(3, 3 + n)), 0) for row, n in ((1, 40), (2, 90), (3, 20))]
    P, T, N = engine.chunk_shape([len(c.tokens) for c in chunks], 512)
    assert P * T > N
    text = model.lower(pool, rows, engine.prefill_chunks(pages.table, chunks, P, T, N, width), 1, pages.layout,
                       1).compile().as_text()
    shapes, M = set(re.findall(r"f32\[([\d,]+)\]", text)), model.config.hidden_size
    assert f"{N + 4},{M}" in shapes
    assert not {f"{P * T + 4},{M}", f"{P * T},{M}", f"{P},{T},{M}"} & shapes


def test_native_cpu_attention_compiles_one_table_width(model, monkeypatch):
    """The native CPU kernel stops at each row's length, so its steps read the whole table (one program per bucket,
    not six: each CPU program holds a few hundred of the process's memory maps); the XLA path, which gathers the
    table, keeps the narrower widths."""
    pages, _ = model.paged(8, 1024)
    layout, columns = pages.layout, pages.table.shape[1]
    monkeypatch.setenv("K2JAX_KERNELS", "native")
    assert engine.table_widths(layout, columns) == (columns,)
    monkeypatch.setenv("K2JAX_KERNELS", "xla")
    assert len(engine.table_widths(layout, columns)) > 1


MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def bundled():
    return k2jax.load()


def tool_prompt(model, tools) -> str:
    return model.tokenizer.apply_chat_template([{"role": "user", "content": "What is 37 times 41?"}], tools=tools)


def test_generate_with_tools_calls_only_declared_tools_with_valid_arguments(bundled):
    """The bundled model never saw `multiply`: enforced, every sample calls multiply with schema-valid arguments,
    numbered from 0, and stays in its reasoning budget."""
    out = bundled.generate([tool_prompt(bundled, [MULTIPLY])], max_new_tokens=64, temperature=1.0, seed=0, n=4,
                           tools=[MULTIPLY], tool_choice="required", max_reasoning_tokens=4)
    for text, calls in zip(out.texts, out.tool_calls):
        assert calls, text
        for k, call in enumerate(calls):
            assert call["id"] == f"functions.multiply:{k}" and call["function"]["name"] == "multiply"
            jsonschema.validate(json.loads(call["function"]["arguments"]), MULTIPLY["function"]["parameters"])
        reasoning = chat.parse_output(text).reasoning_content or ""
        assert len(bundled.tokenizer.encode(reasoning)) <= 4 + 1, reasoning  # + a merge across the budget's edge
    none = bundled.generate([tool_prompt(bundled, [MULTIPLY])], max_new_tokens=48, temperature=1.0, seed=0, n=2,
                            tools=[MULTIPLY], tool_choice="none")
    assert none.tool_calls == [[], []] and not any(chat.SECTION_BEGIN in t for t in none.texts)


def test_constrained_runs_equal_token_by_token_masking(bundled, monkeypatch):
    """Runs of 8 tokens under one mask, cut where it changes, sample exactly what one token per step does."""
    kw = dict(max_new_tokens=40, temperature=1.0, seed=7, n=2, tools=[MULTIPLY], max_reasoning_tokens=6)
    runs = bundled.generate([tool_prompt(bundled, [MULTIPLY])], **kw)
    monkeypatch.setattr(engine, "DECODE_STEPS", 1)
    assert runs.ids == bundled.generate([tool_prompt(bundled, [MULTIPLY])], **kw).ids


MULTIPLY = {"type": "function", "function": {"name": "multiply", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
MEASURE = {"type": "function", "function": {"name": "measure", "parameters": {
    "type": "object", "properties": {"unit": {"type": "string", "enum": ["m", "cm", "inch"]}, "x": {"type": "number"}},
    "additionalProperties": False}}}
THINK = f"{chat.THINK_BEGIN}I will call a tool{chat.THINK_END}"


@pytest.mark.parametrize("text", [
    f"{chat.THINK_BEGIN}I will call",  # </think> leads to the answer's mask
    f"{THINK}Sure.",  # a section opener leads to the header and the tools' names
    f"{THINK}{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions",  # a tool's name, then its keys
    f"{THINK}{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.measure:0{chat.ARGUMENT_BEGIN}" + "{",  # keys, enums
])
def test_a_decode_row_walks_its_automaton_under_the_grammars_own_masks(rng, text):
    """engine.DecodeRows over a constrained row's plan (k2jax.grammar.RowConstraint.plan) beside a free row, taking
    random tokens its masks allow (the first edge it meets, then mostly edges): while the row follows chains and edges, its forced token is the one
    the grammar allows alone and its mask is the grammar's own mask there (every token at a state that drafts); once
    off them, it holds the last state's mask or allows every token, as that state says; the free row allows every
    token throughout."""
    tok = Tokenizer.from_dir(Path(k2jax.__file__).parent / "bundled")
    vocab = vocabulary(tok, tok.vocab_size)
    row, truth = (RowConstraint(vocab, tool_calls_grammar([MULTIPLY, MEASURE])) for _ in range(2))
    for token in tok.encode(text):
        row.accept([token])
        truth.accept([token])
    exact = bool(rng.random() < 0.5)
    states = row.plan(engine.DECODE_STEPS, exact)
    masks = StepMasks.unconstrained(2, vocab.words, engine.DECODE_STEPS)
    write_automaton(masks, 1, states)
    zeros = np.zeros(2, np.int32)
    rows = engine.DecodeRows(zeros, zeros, np.ones(2, bool), np.zeros((2, 1), np.int32), {}, masks)
    table, walk, on, followed, held = rows.states(), engine.Walk.start(2), True, 0, None
    for _ in range(engine.DECODE_STEPS):
        state_DK = rows.current(walk, table)
        mask, forced = (np.asarray(x) for x in rows.step_mask(walk, state_DK))
        assert (mask[0] == -1).all() and forced[0] == -1
        if on:
            alone = truth.forced(1)[0]
            assert forced[1] == (alone[0] if alone else -1)
            state = int(walk.state_D[1])
            if states[state].drafts:  # an exact row inside its reasoning: every token, each draw checked on the host
                assert (mask[1] == -1).all() and forced[1] == -1
            else:
                assert forced[1] >= 0 or np.array_equal(mask[1], truth.mask())
        else:
            assert np.array_equal(mask[1], held) if states[state].hold else (mask[1] == -1).all()
        edges = [t for t in masks.edges[1, max(int(walk.state_D[1]), 0)] if t >= 0 and on]
        allowed = allowed_tokens(mask[1], vocab.size)
        take_edge = edges and (not followed or rng.random() < 0.8)  # the first edge always, then mostly
        token = int(forced[1] if forced[1] >= 0 else rng.choice(edges if take_edge else allowed))
        if on and forced[1] < 0 and token not in edges:
            held = mask[1]
        walk = rows.advance(walk, state_DK, jnp.array([0, token], jnp.int32), forced)
        followed += on and token in edges
        on = bool(walk.on_D[1])
        assert int(walk.state_D[0]) == 0  # the free row keeps its one state
        truth.accept([token])
    assert followed or not any(state.edges for state in states)
