"""Sampling filters on known distributions, seeded reproducibility, and allowed-token masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.sampling import (TOP_LOGPROBS, SamplingParams, drafts_exact, filter_logits, sample, stack_params,
                            token_logprobs, unpack_mask)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def kept(rng, **kw) -> set[int]:
    """Indices left finite by the filters, for PROBS shuffled into a random vocabulary order."""
    perm = rng.permutation(len(PROBS))
    logits = np.log(PROBS[perm])[None] + rng.normal()  # a constant shift changes nothing
    out = np.asarray(filter_logits(jnp.asarray(logits), stack_params([SamplingParams(temperature=1.0, **kw)])))[0]
    return {int(perm[i]) for i in np.flatnonzero(np.isfinite(out))}


@pytest.mark.parametrize("kw, expected", [
    ({}, {0, 1, 2, 3}),
    ({"top_k": 1}, {0}),
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.45}, {0}),  # not 0.5: the top token holds 0.5 only up to float rounding
    ({"top_p": 0.79}, {0, 1}),
    ({"top_p": 0.81}, {0, 1, 2}),
    ({"min_p": 0.5}, {0, 1}),
    ({"min_p": 0.2}, {0, 1, 2}),
    ({"top_k": 2, "top_p": 0.99}, {0, 1}),
])
def test_filters_keep_exactly_the_right_tokens(rng, kw, expected):
    assert kept(rng, **kw) == expected


def test_draws_follow_the_filtered_distribution(rng):
    n = 4000
    params = stack_params([SamplingParams(temperature=1.0, top_p=0.81, seed=int(s)) for s in rng.integers(0, 2**31, n)])
    logits = jnp.asarray(np.tile(np.log(PROBS), (n, 1)))
    toks, logp = sample(logits, params, jnp.zeros(n, jnp.int32))
    freq = np.bincount(np.asarray(toks), minlength=4) / n
    expected = np.array([0.5, 0.3, 0.15, 0]) / 0.95
    assert np.abs(freq - expected).max() < 4 * np.sqrt(0.25 / n)  # four standard deviations
    np.testing.assert_allclose(np.asarray(logp.chosen), np.log(PROBS)[np.asarray(toks)], rtol=1e-5)


def test_seeds_reproduce_and_differ(rng):
    logits = jnp.asarray(rng.normal(size=(64, 50)))
    pos = jnp.arange(64)

    def draw(seed):
        return np.asarray(sample(logits, stack_params([SamplingParams(temperature=1.0, seed=seed)] * 64), pos)[0])

    assert (draw(7) == draw(7)).all()
    assert (draw(7) != draw(8)).any()


def test_top_k_one_and_zero_temperature_are_greedy(rng):
    logits = jnp.asarray(rng.normal(size=(16, 100)))
    greedy = np.argmax(np.asarray(logits), -1)
    for p in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=1, seed=3)):
        assert (np.asarray(sample(logits, stack_params([p] * 16), jnp.arange(16))[0]) == greedy).all()


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"),
])
def test_bad_values_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


# ---------------------------------------------------------------- allowed-token masks


def random_masks(rng, rows: int, vocab: int) -> np.ndarray:
    """Packed int32 masks [rows, ceil(vocab/32)] allowing a random non-empty set of tokens per row."""
    allowed = rng.random((rows, vocab)) < rng.uniform(0.01, 0.5, (rows, 1))
    allowed[np.arange(rows), rng.integers(0, vocab, rows)] = True
    padded = np.zeros((rows, -(-vocab // 32) * 32), bool)
    padded[:, :vocab] = allowed
    return np.packbits(padded.reshape(rows, -1, 32)[:, :, ::-1], axis=-1).view(">u4").astype(np.uint32).view(
        np.int32).reshape(rows, -1)


def test_unpacked_mask_matches_llguidance_layout(rng):
    llg_numpy = pytest.importorskip("llguidance.numpy")
    vocab = 1000
    masks = random_masks(rng, 5, vocab)
    reference = np.zeros((5, vocab), np.float32)
    llg_numpy.apply_token_bitmask_inplace(reference, masks)  # the library's own reading of its layout: -inf = banned
    np.testing.assert_array_equal(np.asarray(unpack_mask(jnp.asarray(masks), vocab)), np.isfinite(reference))


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.5, "top_k": 5},
                                {"temperature": 1.0, "top_p": 0.5}, {"temperature": 1.0, "min_p": 0.3}])
def test_masked_rows_only_pick_allowed_tokens(rng, kw):
    rows, vocab = 64, 300
    masks = random_masks(rng, rows, vocab)
    allowed = np.asarray(unpack_mask(jnp.asarray(masks), vocab))
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 3)
    params = stack_params([SamplingParams(seed=int(s), **kw) for s in rng.integers(0, 2**31, rows)])
    toks, logp = sample(logits, params, jnp.arange(rows), jnp.asarray(masks))
    toks = np.asarray(toks)
    assert allowed[np.arange(rows), toks].all()
    model_logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(rows), toks]
    np.testing.assert_allclose(np.asarray(logp.chosen), model_logp, rtol=1e-5)  # the model's, not the mask's
    if kw["temperature"] == 0:
        best = np.where(allowed, np.asarray(logits), -np.inf).argmax(-1)
        assert (toks == best).all()


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.7},
                                {"temperature": 1.0, "top_k": 3}, {"temperature": 1.0, "top_p": 0.5},
                                {"temperature": 1.0, "min_p": 0.2}])
def test_a_draft_the_mask_allows_is_the_masked_draw_when_drafts_are_exact(rng, kw):
    """What a drafting row relies on: the same key's draw from every token, where the mask allows it, is the draw
    under the mask (drafts_exact); the filters cut differently under a mask, so some kept drafts differ there."""
    rows, vocab = 4096, 40  # enough kept drafts that a filter's difference shows (min-p: 0-6 of ~130 at 512 rows)
    masks = random_masks(rng, rows, vocab)
    allowed = np.asarray(unpack_mask(jnp.asarray(masks), vocab))
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 2)
    params = stack_params([SamplingParams(seed=int(s), **kw) for s in rng.integers(0, 2**31, rows)])
    pos = jnp.asarray(rng.integers(0, 10_000, rows))
    drafts, masked = np.asarray(sample(logits, params, pos)[0]), np.asarray(sample(logits, params, pos, masks)[0])
    kept = allowed[np.arange(rows), drafts]
    assert rows // 10 < kept.sum() < rows - rows // 10
    same = (drafts == masked)[kept]
    assert same.all() if drafts_exact(SamplingParams(**kw)) else not same.all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_rows_take_their_token_with_the_models_logprob(rng, temperature):
    """A row given a forced token takes it (whatever its mask and logits) with its log-prob under the model; the
    other rows draw as they would without any forced row."""
    rows, vocab = 16, 300
    masks = jnp.asarray(random_masks(rng, rows, vocab))
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 3)
    params = stack_params([SamplingParams(temperature=temperature, seed=int(s)) for s in rng.integers(0, 2**31, rows)])
    forced = np.where(rng.random(rows) < 0.5, rng.integers(0, vocab, rows), -1).astype(np.int32)
    toks, logp = sample(logits, params, jnp.arange(rows), masks, jnp.asarray(forced))
    free, free_logp = sample(logits, params, jnp.arange(rows), masks)
    toks, free = np.asarray(toks), np.asarray(free)
    assert (toks == np.where(forced >= 0, forced, free)).all() and (forced >= 0).any() and (forced < 0).any()
    model_logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(rows), toks]
    np.testing.assert_allclose(np.asarray(logp.chosen), model_logp, rtol=1e-5)


def test_an_all_allowed_mask_changes_nothing(rng):
    logits = jnp.asarray(rng.normal(size=(8, 100)))
    params = stack_params([SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in range(8)])
    full = jnp.full((8, 4), -1, jnp.int32)
    plain, masked = sample(logits, params, jnp.arange(8)), sample(logits, params, jnp.arange(8), full)
    np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(masked[0]))


@pytest.mark.parametrize("vocab", [300, 7])
def test_top_logprobs_are_the_models_most_likely_tokens(rng, vocab):
    rows = 6
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 3)
    masks = jnp.asarray(random_masks(rng, rows, vocab))
    asks = [0, 1, 5, TOP_LOGPROBS, 0, 3]
    params = stack_params([SamplingParams(temperature=1.0, seed=k, top_logprobs=n) for k, n in enumerate(asks)])
    toks, logp = sample(logits, params, jnp.arange(rows), masks)
    model_logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    for row, n in enumerate(asks):
        chosen, tops = token_logprobs(type(logp)(*(np.asarray(x)[row:row + 1] for x in logp)), n)
        np.testing.assert_allclose(chosen, model_logp[row, [int(toks[row])]], rtol=1e-5)
        best = np.argsort(-model_logp[row], kind="stable")[:min(n, vocab)]  # under the model, masks aside
        assert [i for i, _ in tops[0]][:len(best)] == best.tolist() and len(tops[0]) == n
        np.testing.assert_allclose([v for _, v in tops[0]][:len(best)], model_logp[row, best], rtol=1e-5)
    none = stack_params([SamplingParams(temperature=1.0, seed=k) for k in range(rows)])
    toks_none, logp_none = sample(logits, none, jnp.arange(rows), masks)
    assert not np.asarray(logp_none.top).any()  # nobody asked: the top-k is skipped
    np.testing.assert_array_equal(np.asarray(toks_none), np.asarray(toks))  # and the draw is the same
