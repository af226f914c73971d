"""Shared fixtures: tiny random DeepseekV3 models built and saved by HF transformers (the reference)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs go to a cache of this test session (shared with its xdist workers and the processes its tests
# start), never to the user's ~/.cache/k2jax/xla or JAX_COMPILATION_CACHE_DIR.
TEST_CACHE_PREFIX = "k2jax-test-xla-"
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
if TEST_CACHE_PREFIX not in os.environ.get("K2JAX_COMPILATION_CACHE", ""):
    os.environ["K2JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix=TEST_CACHE_PREFIX)
    atexit.register(shutil.rmtree, os.environ["K2JAX_COMPILATION_CACHE"], ignore_errors=True)

# The suite is mostly compiling programs of tiny models. With LLVM's optimizations off they compile ~35% faster (a
# tiny decode step: 2.5 -> 1.5 s) and compute the same IEEE float32 arithmetic (XLA's CPU fast math stays off). TPU
# AOT compiles ignore the flag (same programs, same memory); children that compile for a GPU drop it
# (k2jax.gpu_targets.plugin_env), so the PTX and SASS the GPU tests read are the real ones.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402 - after the variables above
import k2jax  # noqa: E402,F401 - after the variables above; quiets libtpu on a host without TPU

TINY_HF = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1,
                  "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1},
    bos_token_id=0, eos_token_id=1, pad_token_id=2,
)


def build_hf_model(seed: int = 0, **overrides: Any):
    """A random HF DeepseekV3ForCausalLM (float32, eval mode) with weights large enough to route sharply."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY_HF, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(0.1 * torch.randn_like(bias))
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Any, Path]]:
    """Factory: (hf_model, saved_dir) for a tiny config with overrides; cached per set of overrides."""
    cache: dict[str, tuple[Any, Path]] = {}

    def make(seed: int = 0, **overrides: Any) -> tuple[Any, Path]:
        key = repr((seed, sorted(overrides.items())))
        if key not in cache:
            model = build_hf_model(seed, **overrides)
            path = tmp_path_factory.mktemp("hf")
            model.save_pretrained(path)
            cache[key] = (model, path)
        return cache[key]

    return make


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow first (a stable sort): xdist hands tests out in this order, so each worker starts on a long
    one and the short ones fill in around them, instead of one worker finishing a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop every compiled program after each test module.

    Each CPU executable holds a few memory maps; a long-lived xdist worker that keeps them all passes Linux's
    vm.max_map_count (65,530) and LLVM's next mmap fails inside a compile as a segfault.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh random inputs every run; the seed is printed by pytest on failure via the test id."""
    return np.random.default_rng()


@pytest.fixture
def user_env() -> dict[str, str]:
    """A user's shell environment for a CLI run: without what this session sets for JAX, libtpu and the cache."""
    session = ("JAX_PLATFORMS", "TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES", "K2JAX_COMPILATION_CACHE")
    return {k: v for k, v in os.environ.items() if k not in session}


@contextlib.contextmanager
def recorded_compiles() -> Iterator[list[str]]:
    """The jax compile events (event and function name) of the code inside: empty when it traced, lowered and
    compiled nothing."""
    events: list[str] = []

    def on_event(event: str, _seconds: float, **kw) -> None:
        if event.startswith("/jax/core/compile/"):
            events.append(f"{event} {kw.get('fun_name')}")

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


@pytest.fixture
def compiles() -> Callable[[], contextlib.AbstractContextManager[list[str]]]:
    """recorded_compiles, for a test to wrap what must compile nothing."""
    return recorded_compiles
