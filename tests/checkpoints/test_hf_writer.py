"""The writer reproduces a compressed-tensors INT4 checkpoint tensor for tensor, in K2's multi-shard layout."""

from __future__ import annotations

import json

import numpy as np

import k2jax
from checkpoints.hf_reader import INDEX_FILE, open_checkpoint
from checkpoints.hf_writer import write_hf_checkpoint
from checkpoints.safetensors_io import read_tensor
from k2jax.config import K2Config

MAX_SHARD_BYTES = 32 << 10


def test_writer_reproduces_compressed_tensors_checkpoint(int4_checkpoint, tmp_path):
    source = int4_checkpoint().path
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tiktoken.model").write_text("IQ== 0\n")
    (tokenizer / "tokenizer_config.json").write_text('{"bos_token": "[BOS]"}')
    model = k2jax.load(source)
    out = tmp_path / "written"
    write_hf_checkpoint(out, model.config, model.state, tokenizer_dir=tokenizer, max_shard_bytes=MAX_SHARD_BYTES)

    expected, written = open_checkpoint(source), open_checkpoint(out)
    assert sorted(written) == sorted(expected)
    for name, info in expected.items():
        got, want = read_tensor(written[name]), read_tensor(info)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)

    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for file in shards:
        sizes = [info.nbytes for info in written.values() if info.file.name == file]
        assert len(sizes) == 1 or sum(sizes) <= MAX_SHARD_BYTES, file  # a lone larger tensor gets its own shard
    assert index["metadata"]["total_size"] == sum(info.nbytes for info in expected.values())
    assert K2Config.from_json(out) == model.config
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tokenizer / name).read_bytes()
