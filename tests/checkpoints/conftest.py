"""INT4 checkpoints made by the compressed-tensors library itself, and their dequantized HF references."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file

# The planar INT4 packing needs K (hidden_size, moe_intermediate_size) to be a multiple of 64.
INT4_HF = {"hidden_size": 64, "moe_intermediate_size": 64}
EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
K2_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]


def ct_scheme(num_bits: int = 4, group_size: int = 32, symmetric: bool = True) -> QuantizationScheme:
    """A compressed-tensors weight-only int scheme (K2's: 4 bits, group 32, symmetric)."""
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy="group",
                            group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args)


def compress_weight(w: torch.Tensor, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """One [out, in] weight through compressed-tensors: min-max group qparams, then its pack-quantized compressor."""
    g = w.unflatten(-1, (-1, scheme.weights.group_size))
    scale, zero_point = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
    return PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale,
                                                  "weight_zero_point": zero_point}, scheme)


def quantize_checkpoint(src: Path, dst: Path, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """Write `src` to `dst` with its routed experts pack-quantized (bf16 in, bf16 scales out).

    Returns the dequantized expert weights (by compressed-tensors' own decompressor, in float32, where q * scale
    is exact; in bf16 it would be rounded).
    """
    dst.mkdir(parents=True, exist_ok=True)
    tensors, dequantized = {}, {}
    for name, value in load_file(src / "model.safetensors").items():
        if not EXPERT.fullmatch(name):
            tensors[name] = value
            continue
        compressed = compress_weight(value.to(torch.bfloat16), scheme)
        prefix = name.removesuffix("weight")
        tensors.update({prefix + key: v.contiguous() for key, v in compressed.items()})
        exact = {**compressed, "weight_scale": compressed["weight_scale"].float()}  # q * scale is exact in fp32
        dequantized[name] = PackedQuantizationCompressor.decompress(exact, scheme)["weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed",
        ignore=K2_IGNORE).model_dump(mode="json")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def dequantized_reference(src: Path, dst: Path, dequantized: dict[str, torch.Tensor]) -> Any:
    """transformers' DeepseekV3ForCausalLM (float32) with the experts replaced by their dequantized weights."""
    from transformers import DeepseekV3ForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    save_file({**load_file(src / "model.safetensors"), **dequantized}, dst / "model.safetensors",
              metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return DeepseekV3ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()


@dataclasses.dataclass(frozen=True)
class Int4Checkpoint:
    """An INT4 checkpoint dir, the float32 HF checkpoint it came from, and its dequantized expert weights."""

    path: Path
    source: Path
    dequantized: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def int4_checkpoint(hf_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Int4Checkpoint]:
    """Factory: a tiny HF checkpoint with routed experts quantized by compressed-tensors; cached per arguments."""
    cache: dict[str, Int4Checkpoint] = {}

    def make(scheme: dict[str, Any] | None = None, **overrides: Any) -> Int4Checkpoint:
        """`scheme`: ct_scheme arguments (K2's INT4 when None); `overrides`: the HF model config's."""
        key = repr((sorted((scheme or {}).items()), sorted(overrides.items())))
        if key not in cache:
            _, src = hf_checkpoint(**{**INT4_HF, **overrides})
            dst = tmp_path_factory.mktemp("int4")
            cache[key] = Int4Checkpoint(dst, src, quantize_checkpoint(src, dst, ct_scheme(**(scheme or {}))))
        return cache[key]

    return make


@pytest.fixture
def dequantized_model(tmp_path: Path) -> Callable[[Int4Checkpoint], Any]:
    """Factory: the transformers reference model of an INT4 checkpoint, on its dequantized weights."""
    return lambda ckpt: dequantized_reference(ckpt.source, tmp_path / "dequantized", ckpt.dequantized)
