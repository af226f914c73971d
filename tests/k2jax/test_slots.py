"""Cache slots: prefix reuse equals full recompute; slots decode together like separate generate calls; a step mixing
a prefill chunk with decode rows equals separate steps; slots that are not running are not in the step."""

from __future__ import annotations

import numpy as np
import pytest

import k2jax
from k2jax import engine
from k2jax.sampling import SamplingParams
from k2jax.cache import PoolFull
from k2jax import slots as slots_module
from k2jax.slots import Slots

LOGPROB_ATOL = 1e-4  # float32 against float32, summation order only


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return k2jax.load(hf_checkpoint(seed=5, eos_token_id=255)[1])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def prefill(slots: Slots, slot: int, tokens: list[int], start: int = 0) -> None:
    """Write `tokens` at positions start.. of `slot`: a step per chunk of at most max_chunk tokens, none decoded."""
    for lo in range(0, len(tokens), slots.max_chunk):
        slots.step(np.zeros(slots.n_slots, np.int32), [None] * slots.n_slots, 1,
                   chunks=[engine.Chunk(slot, tokens[lo:lo + slots.max_chunk], start + lo)])


def check_continues(model, slots: Slots, slot: int, held: list[int], last: int, n: int = 8) -> list[int]:
    """Greedy-decode n tokens in `slot` (which holds `held`) feeding `last`: each token is the argmax of a full
    recompute's logits and its log-prob equals the recompute's, so the slot's cache equals recomputing it."""
    params = [SamplingParams() if s == slot else None for s in range(slots.n_slots)]
    toks, logps = slots.decode(np.array([last if s == slot else 0 for s in range(slots.n_slots)]), params, n)
    seq = held + [last] + toks[slot, :-1].tolist()
    ref = log_softmax(model.logits(np.array([seq]))[0, len(held):])
    assert (ref[np.arange(n), toks[slot]] >= ref.max(-1) - LOGPROB_ATOL).all()  # the argmax (up to exact ties)
    np.testing.assert_allclose(logps.chosen[slot], ref[np.arange(n), toks[slot]], atol=LOGPROB_ATOL, rtol=0)
    return toks[slot].tolist()


def test_prefix_reuse_equals_recompute(model, rng):
    slots = Slots(model, n_slots=2, capacity=128)
    a, b, c = (rng.integers(3, 250, n).tolist() for n in (10, 7, 9))
    prefill(slots, 0, a)
    prefill(slots, 0, b, start=len(a))
    check_continues(model, slots, 0, a + b, 5)
    prefill(slots, 0, c, start=6)  # history rewritten after the first 6 tokens
    assert slots.lengths[0] == 15
    check_continues(model, slots, 0, a[:6] + c, 9)


def test_slots_decode_like_generate(model, rng):
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 12)]
    ref = [model.generate([p], max_new_tokens=9).ids[0] for p in prompts]
    slots = Slots(model, n_slots=3, capacity=64)
    greedy = SamplingParams()
    for s, p in enumerate(prompts):
        prefill(slots, s, p[:-1])
    toks, _ = slots.decode(np.array([p[-1] for p in prompts] + [0]), [greedy, greedy, None], n_steps=8)
    toks2, _ = slots.decode(toks[:, -1], [greedy, greedy, None], n_steps=8)
    for s, r in enumerate(ref):
        assert (toks[s].tolist() + toks2[s].tolist())[: len(r)] == r


def test_inactive_slot_keeps_its_prefix(model, rng):
    slots = Slots(model, n_slots=2, capacity=64)
    a, b, more = (rng.integers(3, 250, n).tolist() for n in (8, 6, 5))
    prefill(slots, 1, a)
    prefill(slots, 0, b)
    slots.decode(np.array([b[-1], 0]), [SamplingParams(), None], n_steps=8)
    prefill(slots, 1, more, start=len(a))
    check_continues(model, slots, 1, a + more, 7)


def test_a_mixed_step_equals_unmixed_steps(model, rng):
    """A step holding a prefill chunk (which ends one prompt, whose row samples its first token in the same step),
    a decode row of another slot and a sampled one gives each row what it gets in steps of its own."""
    prompts = [rng.integers(3, 250, n).tolist() for n in (9, 14, 21)]
    params = [SamplingParams(), SamplingParams(temperature=0.9, seed=4), SamplingParams(temperature=0.7, top_k=20)]

    def setup() -> Slots:
        slots = Slots(model, n_slots=4, capacity=64)
        for s in (0, 1):
            prefill(slots, s, prompts[s][:-1])
        prefill(slots, 2, prompts[2][:12])
        return slots

    mixed = setup()
    tokens = np.array([p[-1] for p in prompts] + [0])
    chunk = engine.Chunk(2, prompts[2][12:-1], 12)
    toks, logps = mixed.step(tokens, params + [None], 1, chunks=[chunk])
    alone = setup()
    prefill(alone, 2, chunk.tokens, start=12)
    for s in range(3):
        ref_toks, ref_logps = alone.decode(tokens, [params[s] if t == s else None for t in range(4)], 1)
        assert toks[s, 0] == ref_toks[s, 0]
        np.testing.assert_allclose(logps.chosen[s], ref_logps.chosen[s], atol=LOGPROB_ATOL, rtol=0)
    assert (mixed.lengths == alone.lengths).all() and mixed.tokens == alone.tokens
    check_continues(model, mixed, 2, prompts[2], int(toks[2, 0]))


@pytest.mark.parametrize("lengths, shape", [((9, 30, 17), (engine.PACKED_CHUNKS, 128, 128)),
                                            ((90, 120), (engine.FULL_CHUNKS, 128, 256))])
def test_packed_chunks_equal_one_chunk_per_step(model, rng, lengths, shape):
    """Prompt chunks of several slots in one step, three short ones or two long ones (one continuing a held prefix,
    one ending its prompt and decoding in the same step), leave every slot as chunks written one per step do."""
    prompts = [rng.integers(3, 250, n).tolist() for n in lengths]
    tokens = np.array([0, prompts[1][-1], 0, 0])
    params = [None, SamplingParams(), None, None]

    def setup() -> Slots:
        slots = Slots(model, n_slots=4, capacity=128, max_chunk=128)
        prefill(slots, 0, prompts[0][:4])
        return slots

    chunks = [engine.Chunk(0, prompts[0][4:], 4), engine.Chunk(1, prompts[1][:-1], 0)]
    chunks += [engine.Chunk(3, p, 0) for p in prompts[2:]]
    assert engine.chunk_shape([len(c.tokens) for c in chunks], 128) == shape
    packed = setup()
    toks, logps = packed.step(tokens, params, 1, chunks=chunks)
    alone = setup()
    for chunk in chunks:
        prefill(alone, chunk.row, chunk.tokens, start=chunk.start)
    ref_toks, ref_logps = alone.decode(tokens, params, 1)
    assert toks[1, 0] == ref_toks[1, 0]
    np.testing.assert_allclose(logps.chosen[1], ref_logps.chosen[1], atol=LOGPROB_ATOL, rtol=0)
    assert (packed.lengths == alone.lengths).all() and packed.tokens == alone.tokens
    check_continues(model, packed, 0, prompts[0], 7)
    for p in prompts[2:]:
        check_continues(model, packed, 3, p, 7)
    with pytest.raises(ValueError, match="one chunk per slot"):
        packed.step(tokens, params, 1, chunks=[engine.Chunk(2, [5], 0), engine.Chunk(2, [6], 0)])


def test_rows_that_are_not_running_are_not_in_the_step(model, rng, monkeypatch):
    """Eight slots, two decoding: the compiled step's decode rows are the bucket of two, not eight."""
    slots = Slots(model, n_slots=8, capacity=64)
    for s in (2, 5):
        prefill(slots, s, rng.integers(3, 250, 6).tolist())
    shapes = []
    pack = engine.pack_host

    def spy(tree):
        shapes.append(tree[0].tok_D.shape)
        return pack(tree)

    monkeypatch.setattr(engine, "pack_host", spy)
    slots.decode(np.full(8, 7), [SamplingParams() if s in (2, 5) else None for s in range(8)], 4)
    assert shapes == [(2,)]
    assert engine.row_buckets(8) == (1, 2, 4, 8) and engine.row_bucket(3, 8) == 4
    assert engine.row_buckets(8, chunk=True) == (1, 4, 8)  # beside a prefill chunk


def test_warmup_stops_with_a_clear_error_before_the_memory_map_limit(model, monkeypatch):
    monkeypatch.setattr(slots_module, "MAP_HEADROOM", 0.0)
    with pytest.raises(RuntimeError, match=r"memory maps this process may have \(vm.max_map_count\)"):
        Slots(model, n_slots=2, capacity=64).warmup(16, 8)


def test_slot_limits(model):
    slots = Slots(model, n_slots=1, capacity=16)
    with pytest.raises(ValueError, match="capacity of 16"):
        slots.step(np.zeros(1, np.int32), [None], 1, chunks=[engine.Chunk(0, list(range(3, 20)), 0)])
    with pytest.raises(ValueError, match="cannot keep a prefix of 4"):
        prefill(slots, 0, [3, 4], start=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Slots(model, 1, 10**6)


def test_a_slot_that_outgrows_the_pool_is_named_and_others_keep_their_pages(model, rng):
    slots = Slots(model, n_slots=2, capacity=128, num_pages=3)  # 3 pages of 32 tokens for both slots
    prefill(slots, 0, rng.integers(3, 250, 40).tolist())
    held = slots.pages.pages(0).tolist()
    with pytest.raises(PoolFull, match=r"slot 1 \(holding 0 tokens\): row 1: 70 tokens need 3 more pages of 32, "
                                       r"the pool has 1 free"):
        prefill(slots, 1, rng.integers(3, 250, 70).tolist())
    assert slots.pages.pages(0).tolist() == held and slots.lengths[1] == 0
    slots.pages.check()
