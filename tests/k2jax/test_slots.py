"""Cache slots: prefix reuse equals full recompute; slots decode together like separate generate calls."""

from __future__ import annotations

import numpy as np
import pytest

import k2jax
from k2jax.sampling import SamplingParams
from k2jax.cache import PoolFull
from k2jax.slots import Slots

RTOL = 1e-4  # float32 against float32, summation order only


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return k2jax.load(hf_checkpoint(seed=5, eos_token_id=255)[1])


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max() / np.abs(b).max()) <= RTOL


def test_prefix_reuse_equals_recompute(model, rng):
    slots = Slots(model, n_slots=2, capacity=128)
    a, b, c = (rng.integers(3, 250, n).tolist() for n in (10, 7, 9))
    slots.prefill(0, a)
    appended = slots.prefill(0, b, start=len(a))
    assert close(appended, model.logits(np.array([a + b]))[0, len(a):])
    rewritten = slots.prefill(0, c, start=6)  # history rewritten after the first 6 tokens
    assert close(rewritten, model.logits(np.array([a[:6] + c]))[0, 6:])
    assert slots.lengths[0] == 15


def test_slots_decode_like_generate(model, rng):
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 12)]
    ref = [model.generate([p], max_new_tokens=9).ids[0] for p in prompts]
    slots = Slots(model, n_slots=3, capacity=64)
    greedy = SamplingParams()
    first = [slots.sample(slots.prefill(s, p)[-1], greedy, len(p))[0] for s, p in enumerate(prompts)]
    toks, _ = slots.decode(np.array(first + [0]), [greedy, greedy, None], n_steps=8)
    got = [[first[s]] + toks[s].tolist() for s in range(2)]
    for g, r in zip(got, ref):
        assert g[: len(r)] == r


def test_inactive_slot_keeps_its_prefix(model, rng):
    slots = Slots(model, n_slots=2, capacity=64)
    a, b, more = (rng.integers(3, 250, n).tolist() for n in (8, 6, 5))
    slots.prefill(1, a)
    slots.prefill(0, b)
    slots.decode(np.array([b[-1], 0]), [SamplingParams(), None], n_steps=8)
    assert close(slots.prefill(1, more, start=len(a)), model.logits(np.array([a + more]))[0, len(a):])


def test_slot_limits(model):
    slots = Slots(model, n_slots=1, capacity=16)
    with pytest.raises(ValueError, match="capacity of 16"):
        slots.prefill(0, list(range(3, 20)))
    with pytest.raises(ValueError, match="cannot keep a prefix of 4"):
        slots.prefill(0, [3, 4], start=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Slots(model, 1, 10**6)


def test_a_slot_that_outgrows_the_pool_is_named_and_others_keep_their_pages(model, rng):
    slots = Slots(model, n_slots=2, capacity=128, num_pages=3)  # 3 pages of 32 tokens for both slots
    slots.prefill(0, rng.integers(3, 250, 40).tolist())
    held = slots.pages.pages(0).tolist()
    with pytest.raises(PoolFull, match=r"slot 1 \(holding 0 tokens\): row 1: 70 tokens need 3 more pages of 32, "
                                       r"the pool has 1 free"):
        slots.prefill(1, rng.integers(3, 250, 70).tolist())
    assert slots.pages.pages(0).tolist() == held and slots.lengths[1] == 0
    slots.pages.check()
