"""The engine step, decode-only and with a prefill chunk beside the decode rows, compiled for real accelerators with no
accelerator present.

TPU (libtpu, abstract v5e:2x2) with the rows split, the positions split, both, and heads split beside them;
GPU (a deviceless H200 pair through jax's CUDA plugin, in a child process). In every compiled program the
ragged MLA kernel is there, nothing of one layer's pages or more is copied, sliced or gathered, no weight stack is
copied whole (on TPU not even one layer of it: XLA:GPU copies a layer's dense weights out of their stacks before
its dots, see k2jax-plan's per-layer column), and the prefill chunk's temporaries do not grow with the context; also
with two prompt chunks in the step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from k2jax import plan
from k2jax.cache import make_layout
from k2jax.config import Int4Quant, K2Config
from k2jax.gpu_targets import plugin_installed
from sharding.mesh import mesh_from_devices

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other AOT compiles may hold libtpu's lockfile
pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU AOT compiles")

# K2's attention lanes (512 + 64 -> 640) and INT4 experts, small elsewhere; long enough for a 32k context.
CFG = K2Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
               num_hidden_layers=3, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, num_experts_per_tok=4,
               max_position_embeddings=32768, original_max_position_embeddings=4096, rope_factor=8.0,
               bos_token_id=0, eos_token_id=1, quant=Int4Quant())
CHUNK = 64
# The programs of a plan and their attention segments: decode rows, and beside them one prompt chunk (at the plan's
# context and at a short one) or engine.FULL_CHUNKS chunks of different rows.
PROGRAMS = (("decode", 1), ("prefill", 2), ("prefill_packed", 2), ("prefill_short", 2))


@pytest.mark.parametrize("spec,batch,split", [
    ("expert=4", 8, (("expert",), ())),  # rows split
    ("expert=4", 2, ((), ("expert",))),  # positions split
    ("data=2,expert=2", 2, (("data",), ("expert",))),  # both
    ("expert=2,tensor=2", 4, (("expert",), ("tensor",))),  # both, heads split over the position axis
])
@pytest.mark.slow
def test_tpu_programs_run_the_kernel_in_place(spec, batch, split):
    devices = plan.topology_devices("v5e:2x2")
    with plan.target_kernels("tpu"):
        r = plan.plan(CFG, devices, spec, batch, 32768, CHUNK, page_size=256)
    layout = make_layout(mesh_from_devices(devices, spec), batch, 32768, 256)
    assert (layout.row_axes, layout.seq_axes) == split
    for name, segments in PROGRAMS:
        assert not r[name].error, r[name].error
        assert r[name].attention_kernels == 2 * segments, "one ragged kernel call per layer stack and segment"
        assert name == "prefill_short" or r[name].cache_moves == 0, name  # the short context's pool is another
        assert r[name].weights_copied == 0, name  # k2jax-plan's "weights copied GB"
        assert r[name].layer_copies == 0, name  # XLA:TPU reads each layer's weights in place in their stacks
    assert r["prefill"].temp <= 1.5 * r["prefill_short"].temp, "prefill temporaries grow with the context"
    assert r["fits"]


@pytest.mark.skipif(not plugin_installed() and not os.environ.get("CI"),
                    reason="no CUDA plugin: python -m k2jax.gpu_targets")
@pytest.mark.slow
def test_gpu_programs_run_the_triton_kernel_in_place(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    command = [sys.executable, "-m", "k2jax.plan", "--config", str(tmp_path), "--topology", "h200:2",
               "--mesh", "expert=2", "--batch", "2", "--context", "32768", "--prefill-chunk", str(CHUNK), "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (r,) = json.loads(proc.stdout)
    assert r["topology"] == "h200:2: 2 x NVIDIA H200" and r["fits"]
    for name, segments in PROGRAMS:
        assert not r[name]["error"] and r[name]["attention_kernels"] == 2 * segments, (name, r[name])
        assert name == "prefill_short" or r[name]["cache_moves"] == 0, (name, r[name])
        assert r[name]["weights_copied"] == 0, (name, r[name])
    assert r["prefill"]["temp"] <= 1.5 * r["prefill_short"]["temp"]
