"""The reader's INT4 path is bit-exact against compressed-tensors' own unpacking, on every expert shape."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import save_file

from checkpoints import hf_names
from checkpoints.hf_names import expert_sources
from checkpoints.hf_reader import open_checkpoint
from checkpoints.safetensors_io import read_tensor
from k2jax.config import Int4Quant, preset
from pallas_kernels import int4_layout

# (out, in) of every routed-expert matrix: K2 Thinking's gate/up and down, the 'small' preset's, the tests'.
EXPERT_SHAPES = [(2048, 7168), (7168, 2048), (512, 1024), (1024, 512), (64, 64), (128, 64)]


@pytest.mark.parametrize("compiled", [True, False], ids=["xla_cpu", "numpy"])
@pytest.mark.parametrize("out_features,in_features", EXPERT_SHAPES)
def test_unpack_bit_exact_against_compressed_tensors(tmp_path, out_features, in_features, compiled, monkeypatch):
    if not compiled:  # the numpy path, taken when JAX has no CPU backend
        monkeypatch.setattr(hf_names.jax, "local_devices", lambda backend: (_ for _ in ()).throw(RuntimeError()))
    rng = np.random.default_rng(out_features * 7 + in_features)
    words = rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, (out_features, in_features // 8),
                         dtype=np.int64).astype(np.int32)
    scale = torch.from_numpy(rng.uniform(1e-3, 1e-1, (out_features, in_features // 32)).astype(np.float32))
    name = "model.layers.1.mlp.experts.0.down_proj"
    save_file({f"{name}.weight_packed": torch.from_numpy(words), f"{name}.weight_scale": scale.bfloat16()},
              tmp_path / "model.safetensors")
    cfg = dataclasses.replace(preset("tiny"), moe_intermediate_size=64, quant=Int4Quant())
    by_path = {src.path[2:]: src for src in expert_sources(cfg, (1,))}
    packed_src, scale_src = by_path[("down", "packed")], by_path[("down", "scale")]
    tensors = open_checkpoint(tmp_path)

    packed_KN = packed_src.to_k2(read_tensor(tensors[f"{name}.weight_packed"]))
    scale_GN = scale_src.to_k2(read_tensor(tensors[f"{name}.weight_scale"]))

    expect_NK = unpack_from_int32(torch.from_numpy(words), 4, torch.Size((out_features, in_features))).numpy()
    assert packed_KN.dtype == np.uint8 and packed_KN.shape == (in_features // 2, out_features)
    np.testing.assert_array_equal(int4_layout.unpack(packed_KN), expect_NK.T)
    np.testing.assert_array_equal(scale_GN.astype(np.float32), scale.bfloat16().float().T.numpy())
