"""Pallas kernels for k2jax: INT4 (grouped) matmul, MLA decode attention, and their backend dispatch."""
