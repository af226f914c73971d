"""Streaming details: large stacked parameters are read a chunk of layers at a time; progress shows bytes/s."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

import checkpoints.streaming
from checkpoints.hf_writer import write_hf_checkpoint
from k2jax.config import Int4Quant, preset
from k2jax.loading import load_state, make_mesh
from k2jax.synthetic import random_state

CFG = dataclasses.replace(preset("tiny"), moe_intermediate_size=64, num_hidden_layers=5, quant=Int4Quant())
LAYER_BYTES = CFG.n_routed_experts * CFG.hidden_size * CFG.moe_intermediate_size // 2  # one layer of packed INT4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic INT4 checkpoint and the parameters it was written from."""
    path = tmp_path_factory.mktemp("stream")
    state = random_state(CFG, seed=1)
    write_hf_checkpoint(path, CFG, state)
    return path, {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def test_large_params_are_read_one_chunk_of_layers_at_a_time(checkpoint, monkeypatch):
    path, expected = checkpoint
    spans = []
    read_block = checkpoints.streaming.read_block

    def recording(tensors, p, index, on_read):
        spans.append((p.key, len(range(p.shape[0])[index[0]])))
        return read_block(tensors, p, index, on_read)

    monkeypatch.setattr(checkpoints.streaming, "read_block", recording)
    _, state = load_state(path, CFG, make_mesh(None), chunk_bytes=LAYER_BYTES, progress=False)
    packed = [n for key, n in spans if key[-1] == "packed"]
    assert len(packed) == 3 * CFG.num_moe_layers and set(packed) == {1}
    for key, var in nnx.to_flat_state(state):
        np.testing.assert_array_equal(np.asarray(var.get_value()), expected[key], err_msg="/".join(key))


def test_progress_bar_shows_bytes_and_rate(checkpoint, capsys):
    path, _ = checkpoint
    load_state(path, CFG, make_mesh(None), progress=True)
    err = capsys.readouterr().err
    assert f"loading {path.name}" in err and "B/s" in err and "100%" in err
