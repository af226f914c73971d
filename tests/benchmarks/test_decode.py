"""benchmarks/decode.py's bytes floors: the experts a batch's tokens read."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import decode  # noqa: E402
from k2jax import preset  # noqa: E402


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_routed_experts_match_uniform_picks(batch):
    """The expected count of distinct experts that `batch` tokens pick (each its top-k of E at random) is what
    a simulation of such picks counts, within its sampling error."""
    cfg = preset("small")
    rng = np.random.default_rng()
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    counts = [len(np.unique(np.argsort(rng.random((batch, E)), axis=1)[:, :k])) for _ in range(2000)]
    assert decode.routed_experts(cfg, 1) == pytest.approx(k)
    error = np.std(counts) / np.sqrt(len(counts))
    assert decode.routed_experts(cfg, batch) == pytest.approx(np.mean(counts), abs=5 * error + 1e-9)


def test_step_bytes_grow_with_batch_by_experts_and_cache():
    """A step of more rows reads the same non-expert weights, more routed experts, and each row's cache."""
    cfg = preset("small")
    one, eight = (decode.step_bytes(cfg, 100, itemsize=2, expert_itemsize=0.5625, batch=b) for b in (1, 8))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    extra_experts = cfg.num_moe_layers * (decode.routed_experts(cfg, 8) - cfg.num_experts_per_tok) * expert * 0.5625
    extra_cache = 7 * cfg.num_hidden_layers * 100 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert eight - one == pytest.approx(extra_experts + extra_cache, abs=2)
