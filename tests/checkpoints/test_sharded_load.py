"""Streaming onto 8 CPU devices (a subprocess, since this process has one): placement, reads, peak host memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints.hf_writer import write_hf_checkpoint
from k2jax.config import Int4Quant, K2Config
from k2jax.synthetic import random_state

WORKER = Path(__file__).with_name("mesh_worker.py")
REPO = WORKER.parents[2]
DEVICES = 8
# ~108 MB of INT4 experts (9 MB per layer and projection with scales), ~13 MB of everything else.
CFG = K2Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
               num_hidden_layers=5, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
               qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=64, num_experts_per_tok=4,
               max_position_embeddings=512, original_max_position_embeddings=128, rope_factor=4.0,
               bos_token_id=0, eos_token_id=1, quant=Int4Quant())
SEED = 5
CHUNK_BYTES = 8 << 20  # one layer of one expert projection per chunk
# On CPU devices the loaded parameters live in host memory (replicated ones once per device, 210 MB in all here).
# The loader's own memory on top of them (blocks being read, a chunk in flight, runtime) must stay under
# SLACK_BYTES, less than the experts alone: they never sit on the host all at once. Measured: 30-60 MiB.
SLACK_BYTES = 96 << 20


def run_worker(*args: str) -> dict:
    """Run mesh_worker.py on 8 CPU devices and return its JSON result."""
    # glibc mmaps every buffer over 1 MiB, so freed memory leaves the RSS: the peak then counts live bytes,
    # not heap fragmentation.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"}
    proc = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-shard synthetic INT4 checkpoint written by k2jax's own writer."""
    path = tmp_path_factory.mktemp("synthetic")
    write_hf_checkpoint(path, CFG, random_state(CFG, SEED), max_shard_bytes=64 << 20)
    return path


def test_experts_sharded_8_ways_and_peak_host_memory_bounded(synthetic_checkpoint):
    result = run_worker("shard", str(synthetic_checkpoint), str(SEED), str(CHUNK_BYTES))
    per_device = CFG.n_routed_experts // DEVICES
    assert result["values_ok"]
    assert len(result["experts"]) == 6  # packed and scale of gate, up, down
    for name, shards in result["experts"].items():
        assert sorted((start, stop) for _, start, stop, _ in shards) == [
            (i * per_device, (i + 1) * per_device) for i in range(DEVICES)], name
        assert len({device for device, *_ in shards}) == DEVICES
        assert all(shape[1] == per_device for *_, shape in shards), name
    assert result["max_reads_per_tensor_and_parameter"] == 1
    assert result["peak_growth_bytes"] <= result["device_bytes"] + SLACK_BYTES, result


def test_orbax_restores_onto_another_mesh_with_identical_logits(int4_checkpoint, tmp_path):
    result = run_worker("orbax", str(int4_checkpoint().path), str(tmp_path / "orbax"))
    assert result["convert_rc"] == 0
    assert result["rel_err"] < 1e-5
    assert result["restored_devices"] == [4, 5, 6, 7]
    assert result["restored_spec"] == "P(None, 'expert', None, None)"
    assert result["restored_shard_shape"][1] == 8 // 2  # the tiny model's 8 experts over an expert axis of 2
