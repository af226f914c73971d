"""k2jax-plan on a small TPU topology: the sharded INT4 decode step compiles for real, fits, never copies the cache."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import k2jax
from k2jax.config import Int4Quant, K2Config

# Small but K2-shaped where it matters: INT4 experts over an expert axis, latent cache of 640 lanes.
CFG = K2Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
               num_hidden_layers=3, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, num_experts_per_tok=4,
               max_position_embeddings=4096, original_max_position_embeddings=1024, rope_factor=4.0,
               bos_token_id=0, eos_token_id=1, quant=Int4Quant())

SCRIPT = f"""
import os, sys
os.environ["K2JAX_KERNELS"] = "pallas"
from k2jax import plan
from k2jax.config import *
cfg = {CFG!r}
r = plan.plan(cfg, plan.topology_devices("v5e:2x2"), "expert=4", batch=8, context=2048, prefill_chunk=0)
print(plan.table([r]))
d = r["decode"]
print("RESULT", r["fits"], d.error == "", d.cache_moves, d.expert_copies, d.temp < r["cache"], r["max_batch"] >= 8)
"""


def test_planner_compiles_a_sharded_int4_decode_step_for_tpu():
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # other AOT compiles may hold libtpu's lockfile
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| 4 x TPU v5 lite | expert=4 | 8 x 2048 |" in proc.stdout
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()[1:]
    assert result == ["True", "True", "0", "0", "True", "True"], proc.stdout


def test_plan_cli_is_quiet_and_keeps_tpu_programs_out_of_the_compilation_cache(user_env, tmp_path):
    """A user's JAX cache is on: the TPU program would be written, and fail to load with a warning on every later run."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU AOT compiles")
    cache = tmp_path / "jax-cache"
    env = {**user_env, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    command = [sys.executable, "-m", "k2jax.plan", "--config", str(Path(k2jax.__file__).parent / "bundled"),
               "--topology", "v5e:2x2", "--mesh", "expert=4", "--batch", "8", "--context", "256", "--prefill-chunk", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0 and "| v5e:2x2: 4 x TPU v5 lite | expert=4 | 8 x 256 |" in proc.stdout, proc.stderr[-4000:]
    assert proc.stderr == ""  # neither libtpu's start-up errors nor cache warnings
    assert not [p.name for p in cache.glob("jit_packed_step*")]  # the program compile_step lowers


def test_candidate_meshes_put_experts_first_and_the_rest_on_tensor_or_data():
    from k2jax.plan import candidate_specs

    assert candidate_specs(256, 384) == ["data=2,expert=128", "expert=128,tensor=2", "expert=64,tensor=4",
                                         "expert=32,tensor=8"]
    assert candidate_specs(6, 16) == ["data=3,expert=2", "data=3,tensor=2"]


def test_readme_plan_table_is_what_its_command_prints():
    """The README's pod table: the planner's own columns, one row per topology of its command, labelled as the
    planner labels them (topology, chip count, chip). Its figures come from running that command."""
    from k2jax.gpu_targets import parse_gpu_topology
    from k2jax.plan import table, topology_devices

    readme = (Path(k2jax.__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Kimi K2 Thinking on TPU pods and GPU boxes"):]
    command = next(line for line in section.splitlines() if line.startswith("k2jax-plan "))
    topologies = command.split("--topology ")[1:]
    rows = [line for line in section.split("\n\n") if line.startswith("| topology |")][0].splitlines()
    assert rows[0] == table([]).splitlines()[0]
    labels = [row.split(" | ")[0].removeprefix("| ") for row in rows[2:]]
    assert [label.split(":")[0] + ":" + label.split(":")[1] for label in labels] == [t.strip() for t in topologies]
    for label, name in zip(labels, topologies):
        gpu = parse_gpu_topology(name.strip())
        if gpu:
            assert label == f"{name.strip()}: {gpu[1]} x {gpu[0].description}"
        elif importlib.util.find_spec("libtpu"):
            devices = topology_devices(name.strip())
            assert label == f"{name.strip()}: {len(devices)} x {devices[0].device_kind}"


def test_a_weight_stack_copied_whole_is_told_apart_from_cache_moves():
    """Compiled-HLO lines as libtpu prints them: a copy of a weight parameter (the relayout it made of K2's
    replicated kv_a stack when its 576 lanes were not padded) names its parameter, whose metadata names one of the
    state's leaves (packed_step's `leaves`);
    a copy of the pool has its lanes; the MoE's routed rows [tokens x top-k, hidden] are neither."""
    from k2jax.plan import classify_moves, hlo_moves, weight_params

    hlo = "\n".join([
        "  %param.115 = bf16[60,7168,576]{1,2,0:T(8,128)(2,1)} parameter(16), sharding={replicated}, "
        "metadata={op_name=\"leaves[16]\"}",
        "  %param.3 = bf16[60,512,256,640]{3,2,1,0:T(8,128)(2,1)} parameter(3), "
        "metadata={op_name=\"pool[\\'moe\\']\"}",
        "  %copy.327 = bf16[60,7168,576]{2,1,0:T(8,128)(2,1)} copy(%param.115), "
        "metadata={op_name=\"jit(packed_step)/jit(run_step)/while\"}",
        "  %copy.9 = bf16[60,512,256,640]{3,2,1,0:T(8,128)(2,1)} copy(%param.3)",
        "  %fusion.2 = f32[8,640]{1,0:T(8,128)} fusion(%param.3), kind=kLoop",
        "  %gather.301 = bf16[14720,7168]{1,0:T(8,128)(2,1)} gather(%param_0.4357, %transpose.594), offset_dims={1}",
    ])
    assert weight_params(hlo) == {"%param.115"}
    assert hlo_moves(hlo, 1 << 20) == [("copy", "%param.115", (60, 7168, 576), 60 * 7168 * 576 * 2),
                                       ("copy", "%param.3", (60, 512, 256, 640), 60 * 512 * 256 * 640 * 2),
                                       ("gather", "%param_0.4357", (14720, 7168), 14720 * 7168 * 2)]
    assert classify_moves(hlo, 640, 512 * 256 * 640 * 2) == (1, 60 * 7168 * 576 * 2)


def test_a_weight_copied_through_a_view_counts_as_copied():
    """The Triton INT4 kernel reads the packed experts as uint16 byte pairs (a bitcast of the parameter): a copy of
    that view is a copy of the weights."""
    from k2jax.plan import classify_moves, weight_params

    hlo = "\n".join([
        "  %p.7 = u8[60,48,1024,7168]{3,2,1,0} parameter(7), "
        "metadata={op_name=\"leaves[7]\"}",
        "  %bitcast.1 = u8[60,48,1024,3584,2]{4,3,2,1,0} bitcast(%p.7)",
        "  %bitcast-convert.2 = u16[60,48,1024,3584]{3,2,1,0} bitcast-convert(%bitcast.1)",
        "  %copy.3 = u16[60,48,1024,3584]{2,3,1,0} copy(%bitcast-convert.2)",
    ])
    assert weight_params(hlo) == {"%p.7", "%bitcast.1", "%bitcast-convert.2"}
    assert classify_moves(hlo, 640, 1 << 40) == (0, 60 * 48 * 1024 * 7168)


def test_a_layer_sliced_out_of_its_stack_counts_as_copied():
    """XLA:GPU copies `stack[layer]` into a buffer of its own before a dot reads it (line from the deviceless H200
    decode step of K2, q_a): that fusion counts, at one layer's size; the dot, and a slice of another size, do not."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from k2jax.plan import layer_copies, layer_stacks

    mesh = jax.sharding.Mesh(jax.devices()[:1], ("tensor",))
    q_a = jax.ShapeDtypeStruct((60, 7168, 1536), jax.numpy.bfloat16, sharding=NamedSharding(mesh, P()))
    norm = jax.ShapeDtypeStruct((60, 1536), jax.numpy.bfloat16, sharding=NamedSharding(mesh, P()))
    stacks = layer_stacks({"moe_layers": {"attn": {"q_a": q_a, "q_a_norm": norm}}})
    assert stacks == {("bf16", 7168 * 1536)}
    slice_op = 'metadata={op_name="jit(packed_step)/jit(run_step)/while/body/while/body/closed_call/dynamic_slice"}'
    hlo = "\n".join([
        "  %loop_dynamic_slice_fusion.6 = bf16[1,7168,1536]{2,1,0} fusion(%get-tuple-element.676.0, "
        f"%get-tuple-element.677.0), kind=kLoop, calls=%fused_dynamic_slice.6, {slice_op}",
        "  ROOT %dynamic_slice.80.1 = bf16[1,7168,1536]{2,1,0} dynamic-slice(%param_0.600, %s.1, %c.7, %c.7), "
        f"dynamic_slice_sizes={{1,7168,1536}}, {slice_op}",
        "  %gemm_fusion_dot.57 = bf16[7168,1536]{1,0} fusion(%bitcast.383.0, %bitcast.382.0), kind=kCustom, "
        'metadata={op_name="jit(packed_step)/jit(run_step)/while/body/while/body/closed_call/dot_general"}',
        f"  %loop_dynamic_slice_fusion.7 = bf16[1,1536]{{1,0}} fusion(%g.1, %g.2), kind=kLoop, {slice_op}",
    ])
    assert layer_copies(hlo, stacks) == 7168 * 1536 * 2
