"""k2jax.load: a checkpoint directory (Hugging Face or orbax) -> a ready Model, parameters on a device mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from checkpoints.orbax_io import is_orbax_dir, restore_orbax
from checkpoints.streaming import DEFAULT_CHUNK_BYTES, load_hf_state
from k2jax.config import K2Config
from k2jax.engine import enable_compilation_cache
from k2jax.llm import Model
from k2jax.model import K2Model
from sharding.mesh import make_mesh


def default_dtype() -> Any:
    """bfloat16 on TPU/GPU; float32 on CPU, which has no fast bf16 matmuls."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def abstract_model(cfg: K2Config, param_dtype: Any = jnp.bfloat16) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating them."""
    return nnx.split(nnx.eval_shape(lambda: K2Model(cfg, nnx.Rngs(0), param_dtype)))


def load_state(path: Path, cfg: K2Config, mesh: Mesh, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               progress: bool | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and its parameters from an HF or orbax checkpoint, sharded over `mesh`."""
    graphdef, abstract = abstract_model(cfg)
    if is_orbax_dir(path):
        return graphdef, restore_orbax(path, abstract, mesh)
    return graphdef, load_hf_state(path, cfg, abstract, mesh, chunk_bytes=chunk_bytes, progress=progress)


def load(path: str | Path | None = None, mesh: Mesh | str | None = None, dtype: Any = None,
         progress: bool | None = None) -> Model:
    """Load a Hugging Face or orbax checkpoint dir; weights keep their stored precision, compute runs in `dtype`.

    `mesh`: a Mesh, a spec such as "expert=8" or "data=2,expert=4,tensor=2", or None / "auto" (experts
    over as many devices as divide them, the rest over 'tensor'); parameters are placed by sharding.rules.
    """
    if path is None:
        path = Path(__file__).resolve().parent / "bundled"
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    cfg = K2Config.from_json(path)
    enable_compilation_cache()  # before the loader's own small programs
    graphdef, state = load_state(path, cfg, make_mesh(mesh, cfg.n_routed_experts), progress=progress)
    return Model(cfg, graphdef, state, tokenizer=_tokenizer(path), dtype=dtype or default_dtype())


def _tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer when it ships tiktoken.model, else None (token-id prompts only)."""
    if not (path / "tiktoken.model").exists():
        return None
    from k2jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
