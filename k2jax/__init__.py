"""k2jax: Kimi K2 Thinking in JAX."""

from k2jax.config import K2Config, preset
from k2jax.engine import GenerateOutput, Model
from k2jax.loading import load

__all__ = ["GenerateOutput", "K2Config", "Model", "load", "preset"]
