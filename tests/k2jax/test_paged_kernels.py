"""The model through the ragged paged MLA kernels (Mosaic and Triton, in the Pallas interpreter) equals the XLA path.

Chunked prefill (8-token chunks over 4-token pages, so pages fill and roll over mid-chunk) of prompts of
different lengths, each forked into two rows that share its whole prompt pages, then 32 greedy decode steps.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import k2jax
from k2jax import engine
from k2jax.llm import GenerateOutput, Model
from pallas_kernels import dispatch

# float32 throughout; the kernels and the XLA path differ in summation order only.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    model = k2jax.load(hf_checkpoint(seed=7, eos_token_id=255)[1])
    model.page_size = 4
    return model


def generate(model: Model, mode: str, prompts: list[list[int]], monkeypatch) -> GenerateOutput:
    """Greedy generation with the kernels of `mode` (jit caches cleared: the mode is read when tracing)."""
    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 8)
    jax.clear_caches()
    return model.generate(prompts, max_new_tokens=32, n=2, logprobs=True)


@pytest.mark.parametrize("mode", ["interpret", "interpret-triton"])
@pytest.mark.slow
def test_kernels_generate_like_the_xla_path(model, rng, mode, monkeypatch):
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 13, 2)]
    ref = generate(model, "xla", prompts, monkeypatch)
    got = generate(model, mode, prompts, monkeypatch)
    assert got.ids == ref.ids
    for a, b in zip(got.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, atol=LOGPROB_ATOL, rtol=0)
