"""The Triton kernels lower for CUDA at Kimi K2's decode (and ragged prefill) shapes, and compile for sm_90 where
the plugin exists.

jax.export(..., platforms=["cuda"]) runs the Pallas -> Triton lowering (block-shape and type rules) with no
GPU and no plugin. With jax[cuda13-local] installed and a CUDA toolkit on PATH, a deviceless H200 topology
also compiles Triton to SASS (register and shared-memory limits included); otherwise that test skips.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from pallas_kernels import int4_matmul as I
from pallas_kernels import mla_decode as M
from pallas_kernels import ragged_mla as R

HIDDEN, EXPERT_F, TOP_K = 7168, 2048, 8
GROUPED_SHAPES = [(1, 48, HIDDEN, 2 * EXPERT_F), (64, 6, EXPERT_F, HIDDEN), (256, 48, HIDDEN, 2 * EXPERT_F)]
MLA_SHAPES = [(1, 64, 262144), (1, 8, 262144), (256, 8, 4096)]
# (batch, query tokens, heads, context per row, layers): decode and 512-token prefill chunks over a page pool.
RAGGED_SHAPES = [(1, 1, 64, 262144, 1), (64, 1, 8, 8192, 1), (1, 512, 64, 8192, 4), (1, 512, 8, 131072, 1)]
TRITON_CALL = "__gpu$xla.gpu.triton"
# Hardware facts of an H200 (sm_90) for the deviceless compile's target description.
H200_TARGET = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 151397597184 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H200"
"""


def _grouped_args(tokens, experts, k, n, sharding=None):
    """Abstract bf16 rows, packed weights, scales and group sizes at a decode shape."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return (sds((tokens * TOP_K, k), jnp.bfloat16), sds((experts, k // 2, n), jnp.uint8),
            sds((experts, k // 32, n), jnp.bfloat16), sds((experts,), jnp.int32))


def _mla_args(b, h, s, sharding=None):
    """Abstract absorbed queries, a 640-lane latent cache and lengths at a decode shape."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return (sds((b, h, 512), jnp.bfloat16), sds((b, h, 64), jnp.bfloat16), sds((b, s, 640), jnp.bfloat16),
            sds((b,), jnp.int32))


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


@pytest.mark.parametrize("b,h,s", MLA_SHAPES)
def test_mla_decode_lowers_for_cuda(b, h, s):
    fn = functools.partial(M.mla_decode_triton, sm_scale=0.1)
    assert TRITON_CALL in _export_cuda(fn, _mla_args(b, h, s))


@pytest.mark.parametrize("b,t,h,context,layers", RAGGED_SHAPES)
def test_ragged_mla_lowers_for_cuda(b, t, h, context, layers):
    fn = functools.partial(R.ragged_mla_triton, sm_scale=0.1, rank=512)
    assert TRITON_CALL in _export_cuda(fn, _ragged_args(b, t, h, context, layers))


@functools.cache
def _h200() -> SingleDeviceSharding:
    """A compile-only H200 device from the CUDA plugin and the local CUDA toolkit."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    topology = topologies.get_topology_desc("h200", "cuda", target_config=H200_TARGET, topology="1x1x1")
    return SingleDeviceSharding(topology.devices[0])


def _has_cuda_plugin() -> bool:
    """Whether jax's CUDA 13 PJRT plugin is importable."""
    return importlib.util.find_spec("jax_plugins") is not None and \
        importlib.util.find_spec("jax_plugins.xla_cuda13") is not None


needs_cuda_plugin = pytest.mark.skipif(
    not _has_cuda_plugin(),
    reason="no CUDA plugin (pip install 'jax[cuda13-local]' and a CUDA 13 toolkit): no deviceless sm_90 compile")


@needs_cuda_plugin
def test_kernels_compile_for_sm90():
    grouped = jax.jit(I.grouped_int4_matmul_triton).lower(*_grouped_args(*GROUPED_SHAPES[0], _h200())).compile()
    mla = jax.jit(functools.partial(M.mla_decode_triton, sm_scale=0.1)).lower(*_mla_args(*MLA_SHAPES[0], _h200()))
    ragged = [jax.jit(functools.partial(R.ragged_mla_triton, sm_scale=0.1, rank=512)).lower(
        *_ragged_args(*shape, _h200())).compile() for shape in RAGGED_SHAPES[:3:2]]
    assert grouped.as_text() and mla.compile().as_text() and all(r.as_text() for r in ragged)


def test_stacked_layer_inputs_lower_for_cuda():
    layers = 4
    x, packed, scale, sizes = _grouped_args(*GROUPED_SHAPES[0])
    stack = [jax.ShapeDtypeStruct((layers, *a.shape), a.dtype) for a in (packed, scale)]
    layer = jax.ShapeDtypeStruct((), jnp.int32)

    def grouped(x, packed, scale, sizes, layer):
        return I.grouped_int4_matmul_triton(x, packed, scale, sizes, layer=layer)

    def mla(q_lat, q_pe, kv, lengths, layer):
        return M.mla_decode_triton(q_lat, q_pe, kv, lengths, sm_scale=0.1, layer=layer)

    assert TRITON_CALL in _export_cuda(grouped, (x, *stack, sizes, layer))
    q_lat, q_pe, kv, lengths = _mla_args(*MLA_SHAPES[0])
    kv_stack = jax.ShapeDtypeStruct((layers, *kv.shape), kv.dtype)
    assert TRITON_CALL in _export_cuda(mla, (q_lat, q_pe, kv_stack, lengths, layer))
