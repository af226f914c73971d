"""Read an unquantized Hugging Face DeepseekV3 / Kimi K2 checkpoint directory into k2jax parameter arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from checkpoints.hf_names import Source, dense_expert_sources, sources
from k2jax.config import K2Config


class CheckpointError(ValueError):
    """A checkpoint is missing a file or tensor, or holds one of the wrong shape or dtype; names both."""


def weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or the single shard(s)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
        out = {name: path / file for name, file in names.items()}
        missing = sorted({str(f) for f in out.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"{index}: names shard file(s) that do not exist: {', '.join(missing)}")
        return out
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors.index.json and no *.safetensors files")
    out = {}
    for file in files:
        with safe_open(file, "np") as f:
            out.update({name: file for name in f.keys()})
    return out


def read_tensor(files: dict[str, Path], name: str) -> np.ndarray:
    """One tensor as numpy (bf16 arrives as ml_dtypes.bfloat16)."""
    if name not in files:
        raise CheckpointError(f"checkpoint has no tensor {name!r}")
    try:
        with safe_open(files[name], "flax") as f:
            return np.asarray(f.get_tensor(name))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{files[name]}: cannot read tensor {name!r}: {err}") from None


def assemble(files: dict[str, Path], src: Source, expected: tuple[int, ...]) -> np.ndarray:
    """Read and stack every HF tensor of one k2jax parameter, checking the final shape."""
    parts = [src.to_k2(read_tensor(files, name)) for name in src.names()]
    lead = ((len(src.layers),) if src.layers is not None else ()) + ((src.experts,) if src.experts else ())
    out = np.stack(parts).reshape(lead + parts[0].shape) if lead else parts[0]
    if out.shape != expected:
        raise CheckpointError(
            f"{src.names()[0]}: gives k2jax parameter {'/'.join(src.path)} shape {out.shape}, expected {expected}"
        )
    return out


def read_params(path: str | Path, cfg: K2Config, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> dict:
    """k2jax parameter path -> numpy array, for every parameter in `shapes`, from an unquantized checkpoint."""
    path = Path(path)
    files = weight_map(path)
    table = sources(cfg)
    if cfg.num_moe_layers:
        table += dense_expert_sources(cfg, tuple(range(cfg.first_k_dense_replace, cfg.num_hidden_layers)))
    by_path = {src.path: src for src in table}
    missing = sorted("/".join(p) for p in shapes if p not in by_path)
    if missing:
        raise CheckpointError(f"{path}: no HF source for k2jax parameters {missing}")
    return {p: assemble(files, by_path[p], shape) for p, shape in shapes.items()}
