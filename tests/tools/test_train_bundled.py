"""The training script's pieces that a run relies on: resumable state files and the training expert matmul."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tools import train_bundled


def test_run_state_round_trips_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng()
    params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=5))}}
    opt = optax.adamw(1e-3)
    state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)[1]
    path = tmp_path / "run_state.npz"
    train_bundled.save_run_state(path, 7, params, state)
    fresh = jax.tree.map(jnp.zeros_like, params)
    steps, got_params, got_state = train_bundled.resume(path, range(0, 20), fresh, opt.init(fresh))
    assert steps == range(7, 20)
    for got, want in zip(jax.tree.leaves((got_params, got_state)), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert train_bundled.resume(tmp_path / "missing.npz", range(3), params, state)[0] == range(3)


def test_tiled_grouped_matmul_equals_ragged_dot() -> None:
    rng = np.random.default_rng()
    sizes = rng.multinomial(200, np.ones(8) / 8).astype(np.int32)
    x = jnp.asarray(rng.normal(size=(200, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 16, 12)), jnp.float32)
    ref = jax.lax.ragged_dot(x, w, jnp.asarray(sizes))
    got = train_bundled.tiled_grouped_matmul(x, w, jnp.asarray(sizes))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_aligned_rows_start_at_documents_and_the_rest_anywhere() -> None:
    rng = np.random.default_rng()
    eos = 9
    stream = rng.integers(0, eos, 5000).astype(np.int32)
    stream[rng.choice(np.arange(1, 4990), 40, replace=False)] = eos
    doc_starts = train_bundled.document_starts(stream, eos, seq_len=16)
    assert doc_starts[0] == 0 and set(doc_starts[1:]) <= set(np.flatnonzero(stream == eos) + 1)
    settings = train_bundled.TrainSettings(seq_len=16, batch=8, aligned=0.5, seed=int(rng.integers(1000)))
    firsts = set()
    for step in range(50):
        windows = train_bundled.batch_at(stream, step, settings, doc_starts)
        assert windows.shape == (8, 17)
        np.testing.assert_array_equal(windows, train_bundled.batch_at(stream, step, settings, doc_starts))
        for row in windows[:4]:  # each aligned row is the window at some document's start
            assert any(np.array_equal(row, stream[s:s + 17]) for s in doc_starts)
        firsts |= {tuple(row) for row in windows[4:]}
    starts = {tuple(stream[s:s + 17]) for s in doc_starts}
    assert len(firsts - starts) > 150  # the other rows start anywhere
    later = dataclasses.replace(settings, windows=1)  # another draw over the same stream
    assert not np.array_equal(train_bundled.batch_at(stream, 0, later, doc_starts),
                              train_bundled.batch_at(stream, 0, settings, doc_starts))
