"""The Mosaic kernels compile for real TPUs (v5e, v5p, v6e) at Kimi K2's decode and prefill shapes, with no TPU
present.

Abstract devices come from jax.experimental.topologies and libtpu (pip install "jax[tpu]"); Mosaic checks
block rules and VMEM at compile time, so a kernel that does not fit fails here rather than on a pod.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from pallas_kernels import int4_matmul as I
from pallas_kernels import ragged_mla as R

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU AOT compiles")
pytestmark = pytest.mark.usefixtures("no_persistent_cache")

TOPOLOGIES = ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
HIDDEN, EXPERT_F, TOP_K = 7168, 2048, 8
# (tokens, local experts of 384 split 8/16/64 ways, K, N): gate|up fused (N = 2F) and down projections.
GROUPED_SHAPES = [(1, 48, HIDDEN, 2 * EXPERT_F), (16, 24, EXPERT_F, HIDDEN), (64, 6, HIDDEN, EXPERT_F),
                  (256, 48, EXPERT_F, HIDDEN)]
# (batch, heads on the device, cache length): 64 heads, or 8 per device under 8-way head sharding.
KV_LORA, CACHE_LANES = 512, 640
# (batch, query tokens, heads on the device, context per row): decode at 64 heads and 8 per device, and 512-token
# prefill chunks; the pool holds exactly the rows' pages.
RAGGED_SHAPES = [(1, 1, 64, 262144), (64, 1, 8, 8192), (1, 512, 64, 8192), (1, 512, 8, 8192)]
# Temporaries of the ragged kernel come from the chunk (split outputs, lse relayout), never from the context.
RAGGED_TEMP_BYTES = 4 << 20


@functools.cache
def _sharding(topology: str) -> SingleDeviceSharding:
    """One abstract device of the named TPU topology."""
    return SingleDeviceSharding(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0])


def _abstract(topology: str, shape, dtype) -> jax.ShapeDtypeStruct:
    """An abstract input placed on the topology's first device."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=_sharding(topology))


def _compile_grouped(topology: str, m: int, e: int, k: int, n: int):
    """AOT-compile the grouped INT4 matmul for [m, k] bf16 rows over e experts [k, n]."""
    args = [_abstract(topology, (m, k), jnp.bfloat16), _abstract(topology, (e, k // 2, n), jnp.uint8),
            _abstract(topology, (e, k // 32, n), jnp.bfloat16), _abstract(topology, (e,), jnp.int32)]
    return jax.jit(I.grouped_int4_matmul).lower(*args).compile()


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("tokens,experts,k,n", GROUPED_SHAPES)
def test_grouped_int4_matmul_compiles(topology, tokens, experts, k, n):
    compiled = _compile_grouped(topology, tokens * TOP_K, experts, k, n)
    assert "tpu_custom_call" in compiled.as_text()
    # No copy of the weights: temporaries are x in the kernel's K order, x and the output in the padded row space
    # (each expert's rows padded to whole row tiles: under twice the rows, or 8 per expert) and small constants.
    x_and_out_bytes = tokens * TOP_K * (k + n) * 2
    assert compiled.memory_analysis().temp_size_in_bytes <= 3 * x_and_out_bytes + (4 << 20)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_dense_int4_matmul_compiles(topology):
    args = [_abstract(topology, (256, HIDDEN), jnp.bfloat16), _abstract(topology, (HIDDEN // 2, EXPERT_F), jnp.uint8),
            _abstract(topology, (HIDDEN // 32, EXPERT_F), jnp.bfloat16)]
    assert "tpu_custom_call" in jax.jit(I.int4_matmul).lower(*args).compile().as_text()


def _compile_ragged(topology: str, b: int, t: int, h: int, context: int, layers: int = 1, pool_pages=None):
    """AOT-compile ragged_mla (bf16, K2 lanes, TPU_PAGE_SIZE pages) over a pool of `layers` x pool_pages pages
    (default: every row's pages)."""
    n = R.TPU_PAGE_SIZE
    pages = context // n
    args = [_abstract(topology, (b, t, h, CACHE_LANES), jnp.bfloat16),
            _abstract(topology, (layers, pool_pages or b * pages, n, CACHE_LANES), jnp.bfloat16),
            _abstract(topology, (b, pages), jnp.int32), _abstract(topology, (b,), jnp.int32),
            _abstract(topology, (b,), jnp.int32), _abstract(topology, (), jnp.int32),
            _abstract(topology, (), jnp.int32)]
    return jax.jit(functools.partial(R.ragged_mla, sm_scale=0.1, rank=KV_LORA)).lower(*args).compile()


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("b,t,h,context", RAGGED_SHAPES)
def test_ragged_mla_compiles(topology, b, t, h, context):
    compiled = _compile_ragged(topology, b, t, h, context)
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes <= RAGGED_TEMP_BYTES


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("t,h", [(1, 64), (512, 64)])
def test_ragged_mla_temp_is_flat_in_context(topology, t, h):
    """A pool and table sized for 131072 tokens take the same temporaries as for 8192 (16x less)."""
    short, long = (_compile_ragged(topology, 1, t, h, s).memory_analysis().temp_size_in_bytes for s in (8192, 131072))
    assert long <= 1.5 * short and short <= RAGGED_TEMP_BYTES


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_ragged_mla_compiles_with_a_table_larger_than_smem(topology):
    """512 rows x 1024 pages of table (2 MiB, twice the SMEM) compile: the kernel reads it 8 rows at a time."""
    compiled = _compile_ragged(topology, 512, 1, 8, 262144, pool_pages=4096)
    assert compiled.memory_analysis().temp_size_in_bytes <= RAGGED_TEMP_BYTES


def test_oversized_tiles_fail_to_compile(monkeypatch):
    """The compile really checks VMEM: double-buffered ~2 MiB weight blocks do not fit a 2 MiB VMEM limit."""
    monkeypatch.setattr(I, "VMEM_LIMIT_BYTES", 2 * 1024 * 1024)
    with pytest.raises(Exception, match="(?i)vmem"):
        _compile_grouped("v5e:2x2", 8, 4, HIDDEN, EXPERT_F)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_stacked_layer_inputs_are_read_in_place(topology):
    """With `layer`, the whole layer stack goes in and nothing of its size is copied (temporaries stay small)."""
    layers, experts, b, s = 4, 48, 1, 262144
    k, n = HIDDEN, 2 * EXPERT_F
    stack = [_abstract(topology, (layers, experts, k // 2, n), jnp.uint8),
             _abstract(topology, (layers, experts, k // 32, n), jnp.bfloat16)]
    grouped = jax.jit(I.grouped_int4_matmul).lower(
        _abstract(topology, (TOP_K, k), jnp.bfloat16), *stack, _abstract(topology, (experts,), jnp.int32),
        layer=_abstract(topology, (), jnp.int32)).compile()
    assert grouped.memory_analysis().temp_size_in_bytes <= 2 * TOP_K * (k + n) * 2 + (4 << 20)
    ragged = _compile_ragged(topology, b, 1, 64, s, layers=layers)
    layer_pool_bytes = b * s * CACHE_LANES * 2
    assert ragged.memory_analysis().temp_size_in_bytes <= min(RAGGED_TEMP_BYTES, layer_pool_bytes // 64)
