"""The Triton kernels lower for CUDA at Kimi K2's decode shapes and compile for sm_90 down to SASS, with no GPU.

jax.export(..., platforms=["cuda"]) runs the Pallas -> Triton lowering (block-shape and type rules) with no
plugin. benchmarks/sm90.py compiles every Triton kernel for a deviceless H200 through jax's CUDA plugin (kept in
its own folder, `python benchmarks/sm90.py --install`, part of the test install) and the CUDA 13 toolkit, and
reads registers, spills and shared memory from the artefacts: any spill, or shared memory over the sm_90 limit,
fails here. Outside CI (CI=true) a machine without the plugin or ptxas skips those compiles.
"""

import functools
import importlib.util
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import int4_matmul as I
from pallas_kernels import ragged_mla as R

HIDDEN, EXPERT_F, TOP_K = 7168, 2048, 8
GROUPED_SHAPES = [(1, 48, HIDDEN, 2 * EXPERT_F), (64, 6, EXPERT_F, HIDDEN), (256, 48, HIDDEN, 2 * EXPERT_F)]
# (batch, query tokens, heads, context per row, layers): decode and 512-token prefill chunks over a page pool.
RAGGED_SHAPES = [(1, 1, 64, 262144, 1), (64, 1, 8, 8192, 1), (1, 512, 64, 8192, 4), (1, 512, 8, 131072, 1)]
TRITON_CALL = "__gpu$xla.gpu.triton"


def _grouped_args(tokens, experts, k, n, sharding=None):
    """Abstract bf16 rows, packed weights, scales and group sizes at a decode shape."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return (sds((tokens * TOP_K, k), jnp.bfloat16), sds((experts, k // 2, n), jnp.uint8),
            sds((experts, k // 32, n), jnp.bfloat16), sds((experts,), jnp.int32))


def _ragged_args(b, t, h, context, layers, sharding=None):
    """Abstract absorbed queries, a bf16 page pool of GPU_PAGE_SIZE pages, tables, lengths, layer and shard."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    n = R.GPU_PAGE_SIZE
    pages = context // n
    return (sds((b, t, h, 640), jnp.bfloat16), sds((layers, b * pages, n, 640), jnp.bfloat16),
            sds((b, pages), jnp.int32), sds((b,), jnp.int32), sds((b,), jnp.int32), sds((), jnp.int32),
            sds((), jnp.int32))


def _export_cuda(fn, args) -> str:
    """StableHLO text of fn exported for CUDA (Triton custom calls allowed)."""
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("tokens,experts,k,n", GROUPED_SHAPES)
def test_grouped_int4_matmul_lowers_for_cuda(tokens, experts, k, n):
    assert TRITON_CALL in _export_cuda(I.grouped_int4_matmul_triton, _grouped_args(tokens, experts, k, n))


@pytest.mark.parametrize("b,t,h,context,layers", RAGGED_SHAPES)
def test_ragged_mla_lowers_for_cuda(b, t, h, context, layers):
    fn = functools.partial(R.ragged_mla_triton, sm_scale=0.1, rank=512)
    assert TRITON_CALL in _export_cuda(fn, _ragged_args(b, t, h, context, layers))


def test_stacked_layer_inputs_lower_for_cuda():
    layers = 4
    x, packed, scale, sizes = _grouped_args(*GROUPED_SHAPES[0])
    stack = [jax.ShapeDtypeStruct((layers, *a.shape), a.dtype) for a in (packed, scale)]
    layer = jax.ShapeDtypeStruct((), jnp.int32)

    def grouped(x, packed, scale, sizes, layer):
        return I.grouped_int4_matmul_triton(x, packed, scale, sizes, layer=layer)

    assert TRITON_CALL in _export_cuda(grouped, (x, *stack, sizes, layer))


def _load_sm90():
    """benchmarks/sm90.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sm90.py"
    spec = importlib.util.spec_from_file_location("benchmarks_sm90", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sm90 = _load_sm90()


@pytest.fixture(scope="module")
def sm90_rows() -> list[dict]:
    """Every Triton kernel compiled for a deviceless H200: one row per kernel launch."""
    missing = [] if sm90.plugin_installed() else [f"no CUDA plugin in {sm90.PLUGIN_DIR}"]
    try:
        sm90.find_ptxas()
    except RuntimeError as err:
        missing.append(str(err))
    if missing and not os.environ.get("CI"):
        pytest.skip("; ".join(missing) + " (python benchmarks/sm90.py --install; CUDA 13 toolkit)")
    rows = sm90.run_report()
    print(sm90.table(rows))
    return rows


def test_every_triton_kernel_compiles_for_sm90(sm90_rows):
    assert {r["label"] for r in sm90_rows} == {k.label for k in sm90.KERNELS}
    assert all(r["kernel"] in ("_gmm_triton_kernel", "_ragged_triton_kernel", "_layer_matmul_kernel")
               for r in sm90_rows)


def test_no_spills_and_shared_memory_within_sm90(sm90_rows):
    bad = [r for r in sm90_rows if r["spill_stores"] or r["spill_loads"] or r["stack"]
           or r["smem"] > sm90.SM90_SMEM_PER_BLOCK or r["registers"] > sm90.SM90_REGS_PER_THREAD
           or r["blocks_per_sm"] < 1]
    assert not bad, "\n" + sm90.table(bad)


def test_weight_kernels_hold_no_copy_of_a_layers_weights(sm90_rows):
    """The programs of the weight-streaming kernels (INT4 experts, dense layer matmul) read their weights in place:
    their temporaries (float32 partial sums) stay under one layer's weights, which a copy of them would fill."""
    kernels = {k.label: k for k in sm90.KERNELS if k.loop_bytes}
    for row in (r for r in sm90_rows if r["label"] in kernels):
        shape, dtype = kernels[row["label"]].args[1]
        weight_bytes = math.prod(shape) * jnp.dtype(dtype).itemsize
        one_layer = weight_bytes // shape[0] if kernels[row["label"]].fn == sm90.LAYER else weight_bytes
        assert row["temp"] < one_layer, (row["label"], row["temp"], one_layer)
    assert len({r["label"] for r in sm90_rows} & set(kernels)) == len(kernels)


def test_ptxas_report_is_read(tmp_path):
    """Registers and static shared memory come from ptxas -v on real PTX (a 4 KiB shared buffer here)."""
    try:
        ptxas = sm90.find_ptxas()
    except RuntimeError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    ptx = tmp_path / "k.ptx"
    ptx.write_text(PTX_WITH_SHARED_BUFFER)
    info = sm90.ptxas_info(ptx, ptxas, tmp_path / "k.cubin")
    assert info["static_smem"] == 4096 and 1 <= info["registers"] <= 16
    assert info["spill_stores"] == info["spill_loads"] == 0
    assert "EXIT" in sm90.sass_of(tmp_path / "k.cubin")


PTX_WITH_SHARED_BUFFER = """.version 8.0
.target sm_90a
.address_size 64
.visible .entry k(.param .u64 out)
{
  .shared .align 4 .b8 buf[4096];
  .reg .b32 %r<4>;
  .reg .b64 %rd<4>;
  mov.u32 %r1, %tid.x;
  shl.b32 %r2, %r1, 2;
  mov.u32 %r3, buf;
  add.u32 %r3, %r3, %r2;
  st.shared.u32 [%r3], %r1;
  bar.sync 0;
  ld.shared.u32 %r1, [%r3];
  ld.param.u64 %rd1, [out];
  cvta.to.global.u64 %rd2, %rd1;
  st.global.u32 [%rd2], %r1;
  ret;
}
"""


@pytest.mark.parametrize("regs,threads,smem,blocks,limited_by", [
    (24, 128, 0, 16, "warps"),              # 4 warps a block: 64 warps fill the SM
    (65, 128, 34816, 6, "shared memory"),   # 35.8 KiB a block (1 KiB reserved): 6 fit in 228 KiB
    (188, 128, 0, 2, "registers"),          # 192 x 32 = 6144 registers a warp: 2 warps per scheduler
    (255, 1024, 0, 0, "registers"),         # 8160 registers a warp: 32 warps cannot be resident
    (16, 32, 0, 32, "blocks"),
])
def test_occupancy(regs, threads, smem, blocks, limited_by):
    got = sm90.occupancy(regs, threads, smem)
    assert (got["blocks_per_sm"], got["limited_by"]) == (blocks, limited_by)
    assert got["occupancy"] == blocks * (threads // 32) / 64


def test_loop_instructions_counts_the_longest_loop():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS R2, [R3] ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   IADD3 R3, R3, 0x10, RZ ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   BRA `(.L_x_2);
.L_x_2:
        /*0070*/                   EXIT ;
"""
    assert sm90.loop_instructions(sass) == 5  # .L_x_0 through its branch back; the forward BRA is no loop


def test_int4_kernels_report_instructions_per_weight_byte(sm90_rows):
    int4 = [r for r in sm90_rows if r["label"].startswith("int4")]
    assert int4 and all(r["loop_instructions"] > 0 and 0 < r["instr_per_byte"] < 10 for r in int4)
