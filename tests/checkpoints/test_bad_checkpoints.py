"""Bad checkpoints fail fast, before any weight data is read, with errors that name the file and the tensor."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import checkpoints.hf_reader
import k2jax
from checkpoints.hf_reader import INDEX_FILE
from checkpoints.hf_writer import write_hf_checkpoint
from checkpoints.safetensors_io import CheckpointError, read_header, read_tensor
from k2jax.config import ConfigError, Int4Quant, preset
from k2jax.synthetic import random_state

CFG = dataclasses.replace(preset("tiny"), moe_intermediate_size=64, quant=Int4Quant())
PACKED = "model.layers.1.mlp.experts.3.up_proj.weight_packed"
Q_A = "model.layers.1.self_attn.q_a_proj.weight"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid multi-shard INT4 checkpoint (written by k2jax's writer)."""
    path = tmp_path_factory.mktemp("good")
    write_hf_checkpoint(path, CFG, random_state(CFG), max_shard_bytes=64 << 10)
    return path


@pytest.fixture
def ckpt(good_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the good checkpoint, to break."""
    return Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt"))


def shard_of(path: Path, name: str) -> Path:
    """The shard file the index maps a tensor to."""
    return path / json.loads((path / INDEX_FILE).read_text())["weight_map"][name]


def replace_tensor(path: Path, name: str, value: np.ndarray | None) -> Path:
    """Rewrite the shard holding `name` with the tensor replaced (or removed, from shard and index, when None)."""
    file = shard_of(path, name)
    tensors = {n: read_tensor(info) for n, info in read_header(file).items()}
    if value is None:
        del tensors[name]
        index = json.loads((path / INDEX_FILE).read_text())
        del index["weight_map"][name]
        (path / INDEX_FILE).write_text(json.dumps(index))
    else:
        tensors[name] = value
    save_file(tensors, str(file))
    return file


def load_fails(path: Path, error: type[Exception], *fragments: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """k2jax.load raises `error` naming every fragment, without reading any tensor data."""
    def no_reads(info, out=None):
        raise AssertionError(f"read {info.name} before the checkpoint was validated")

    monkeypatch.setattr(checkpoints.hf_reader, "read_tensor", no_reads)
    with pytest.raises(error) as caught:
        k2jax.load(path)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_good_checkpoint_loads(good_checkpoint):
    assert k2jax.load(good_checkpoint).config == CFG


def test_missing_tensor(ckpt, monkeypatch):
    replace_tensor(ckpt, PACKED, None)
    load_fails(ckpt, CheckpointError, str(ckpt / INDEX_FILE), PACKED, monkeypatch=monkeypatch)


def test_wrong_shape(ckpt, monkeypatch):
    file = replace_tensor(ckpt, Q_A, np.zeros((CFG.hidden_size, CFG.q_lora_rank), np.float32))
    load_fails(ckpt, CheckpointError, str(file), Q_A, "[64, 32]", "[32, 64]", monkeypatch=monkeypatch)


def test_wrong_dtype(ckpt, monkeypatch):
    file = replace_tensor(ckpt, PACKED, np.zeros((CFG.hidden_size, CFG.moe_intermediate_size // 8), np.int64))
    load_fails(ckpt, CheckpointError, str(file), PACKED, "I64", "I32", monkeypatch=monkeypatch)


def test_truncated_shard(ckpt, monkeypatch):
    file = shard_of(ckpt, PACKED)
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    last = max(read_header_unchecked(data).items(), key=lambda item: item[1])[0]
    load_fails(ckpt, CheckpointError, str(file), last, "truncated", monkeypatch=monkeypatch)


def read_header_unchecked(data: bytes) -> dict[str, int]:
    """Tensor name -> end offset, parsed from a shard's bytes (to name the tensor a truncation cuts)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return {n: e["data_offsets"][1] for n, e in header.items() if n != "__metadata__"}


def test_index_names_missing_file(ckpt, monkeypatch):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    index["weight_map"][Q_A] = "model-00099-of-00099.safetensors"
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    load_fails(ckpt, CheckpointError, str(ckpt / INDEX_FILE), "model-00099-of-00099.safetensors",
               monkeypatch=monkeypatch)


@pytest.mark.parametrize("scheme,field", [
    ({"symmetric": False}, "weights.symmetric=False"),
    ({"group_size": 128}, "weights.group_size=128"),
    ({"num_bits": 8}, "weights.num_bits=8"),
], ids=["asymmetric", "group128", "int8"])
def test_unsupported_quantization(int4_checkpoint, scheme, field, monkeypatch):
    path = int4_checkpoint(scheme, hidden_size=128, moe_intermediate_size=128).path
    load_fails(path, ConfigError, str(path / "config.json"), field, monkeypatch=monkeypatch)


@pytest.mark.parametrize("edit,fragments", [
    ({"moe_intermediate_size": 128}, ["model.layers.1.mlp.experts.0.", "config.json implies"]),
    ({"n_routed_experts": 16}, ["model.layers.1.mlp.experts.8.", "no tensor"]),
    ({"quantization_config": None}, ["weight_packed", "no quantization_config"]),
    ({"num_hidden_layers": 2}, ["model.layers.2.", "not described by config.json"]),
], ids=["moe_intermediate_size", "n_routed_experts", "no_quantization_config", "num_hidden_layers"])
def test_config_disagrees_with_tensors(ckpt, edit, fragments, monkeypatch):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in {**config, **edit}.items() if v is not None}))
    load_fails(ckpt, CheckpointError, *fragments, monkeypatch=monkeypatch)
