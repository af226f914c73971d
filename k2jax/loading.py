"""k2jax.load: a checkpoint directory -> a ready Model (config, parameters on device, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints.hf_reader import read_params
from k2jax.config import K2Config
from k2jax.engine import Model
from k2jax.model import K2Model


def default_dtype() -> Any:
    """bfloat16 on TPU/GPU; float32 on CPU, which has no fast bf16 matmuls."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def abstract_model(cfg: K2Config, param_dtype: Any = jnp.bfloat16) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating them."""
    return nnx.split(nnx.eval_shape(lambda: K2Model(cfg, nnx.Rngs(0), param_dtype)))


def load(path: str | Path | None = None, mesh: Any = None, dtype: Any = None) -> Model:
    """Load a Hugging Face checkpoint directory; weights keep their stored precision, compute runs in `dtype`."""
    if path is None:
        raise FileNotFoundError("no bundled model is installed yet: pass the path of a checkpoint directory")
    if mesh is not None:
        raise NotImplementedError("mesh placement is not available yet; load on the default device")
    path = Path(path)
    cfg = K2Config.from_json(path)
    graphdef, state = abstract_model(cfg)
    flat = nnx.to_flat_state(state)
    shapes = {tuple(str(k) for k in key): var.shape for key, var in flat}
    arrays = read_params(path, cfg, shapes)
    for key, var in flat:
        var.set_value(jnp.asarray(arrays[tuple(str(k) for k in key)]))
    state = nnx.from_flat_state(flat)
    return Model(cfg, graphdef, state, tokenizer=_tokenizer(path), dtype=dtype or default_dtype())


def _tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer when it ships tiktoken.model, else None (token-id prompts only)."""
    if not (path / "tiktoken.model").exists():
        return None
    from k2jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
