"""Backend dispatch: mode selection, and the XLA and interpreted-kernel paths against the references."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import jax.numpy as jnp
import pytest
from kernel_testutils import INT4_F32_TOL, max_rel_err, random_int4, random_normal

from pallas_kernels import cpu_grouped_matmul, cpu_ragged_mla, dispatch
from pallas_kernels import int4_matmul as I
from pallas_kernels import ragged_mla as R


@pytest.mark.parametrize("backend,mode", [("tpu", "pallas"), ("gpu", "pallas"), ("cpu", "native")])
def test_default_mode_per_backend(monkeypatch, backend, mode):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch.cpu_build, "available", lambda: True)
    assert dispatch.kernel_mode(backend) == mode


def test_cpu_falls_back_to_xla_without_the_native_kernel(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch.cpu_build, "available", lambda: False)
    assert dispatch.kernel_mode("cpu") == "xla"


@pytest.mark.parametrize("forced", dispatch.MODES)
def test_env_overrides(monkeypatch, forced):
    monkeypatch.setenv(dispatch.ENV_VAR, forced.upper())
    assert dispatch.kernel_mode("tpu") == forced and dispatch.kernel_mode("cpu") == forced


def test_bad_env_value_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError):
        dispatch.kernel_mode()


def _int4_reference(mode: str):
    """The grouped INT4 reference a mode must match: the native kernel rounds x to int8."""
    return cpu_grouped_matmul.grouped_int4_matmul_reference if mode == "native" else I.grouped_int4_matmul_reference


def _int4_tol(mode: str) -> float:
    """`interpret` runs the Mosaic kernel, whose offset arithmetic rounds more (see INT4_F32_TOL)."""
    return INT4_F32_TOL["mosaic" if mode == "interpret" else "other"]


@pytest.mark.parametrize("mode", ["native", "xla", "interpret"])
@pytest.mark.parametrize("sizes,extra", [([0, 2, 0, 0, 1, 0, 0, 0], 1), ([5, 0, 9, 3], 2), ([1], 0)])
def test_grouped_paths_match_reference(rng, kernel_env, mode, sizes, extra):
    kernel_env(mode)
    packed, scale = random_int4(rng, len(sizes), 256, 128)
    x = random_normal(rng, (sum(sizes) + extra, 256))
    gs = jnp.asarray(sizes, jnp.int32)
    out = jax.jit(dispatch.grouped_int4_matmul)(x, packed, scale, gs)
    assert max_rel_err(out, _int4_reference(mode)(x, packed, scale, gs)) < _int4_tol(mode)
    assert not jnp.any(out[sum(sizes):])


def test_xla_path_dequantizes_only_active_experts(rng):
    """Few rows, many experts: the traced program never materializes all experts' weights."""
    packed, scale = random_int4(rng, 64, 256, 128)
    x = random_normal(rng, (3, 256))
    sizes = jnp.zeros(64, jnp.int32).at[9].set(3)
    jaxpr = str(jax.make_jaxpr(dispatch.grouped_int4_matmul_xla)(x, packed, scale, sizes))
    assert "f32[256,128]" in jaxpr and "f32[64,256,128]" not in jaxpr and "f32[3,256,128]" not in jaxpr


@pytest.mark.parametrize("m, e", [(8, 64), (64, 64), (300, 16)])
def test_xla_loop_forms_each_active_matrix_once(m, e):
    """The grouped loop asks for exactly the experts that got rows, each once, in id order."""
    rng = np.random.default_rng()
    sizes = rng.multinomial(m, rng.dirichlet(np.ones(e))).astype(np.int32)
    w = jnp.asarray(rng.normal(size=(e, 24, 16)), jnp.float32)
    seen = []

    def weight_of(g):
        jax.debug.callback(lambda g: seen.append(int(g)), g, ordered=True)
        return w[g]

    jax.block_until_ready(jax.jit(lambda x: dispatch.grouped_loop_xla(x, weight_of, jnp.asarray(sizes)))(
        jnp.asarray(rng.normal(size=(m, 24)), jnp.float32)))
    jax.effects_barrier()
    assert seen == [g for g in range(e) if sizes[g]]


@pytest.mark.parametrize("mode", ["native", "xla", "interpret", "interpret-triton"])
def test_dense_paths_match_reference(rng, kernel_env, mode):
    kernel_env(mode)
    packed, scale = random_int4(rng, 1, 512, 256)
    x = random_normal(rng, (6, 512))
    out = dispatch.int4_matmul(x, packed[0], scale[0])
    assert max_rel_err(out, _int4_reference(mode)(x, packed, scale, jnp.asarray([6], jnp.int32))) < _int4_tol(mode)


@pytest.mark.parametrize("mode,module,kernel", [("native", cpu_ragged_mla, "ragged_mla"),
                                                ("xla", R, "ragged_mla_reference"), ("interpret", R, "ragged_mla"),
                                                ("interpret-triton", R, "ragged_mla_triton")])
def test_ragged_mla_paths(rng, kernel_env, monkeypatch, mode, module, kernel):
    """Each mode reaches its ragged_mla implementation, which matches the reference at K2's cache lanes."""
    kernel_env(mode)
    kv = random_normal(rng, (2, 6, 16, 640)).at[..., 576:].set(0)
    q = random_normal(rng, (2, 3, 4, 640)).at[..., 576:].set(0)
    args = (q, kv, jnp.asarray([[4, 1, 0], [2, 5, 3]], jnp.int32), jnp.asarray([35, 9], jnp.int32),
            jnp.asarray([32, 6], jnp.int32), jnp.int32(1), jnp.int32(0))
    o_ref, lse_ref = R.ragged_mla_reference(*args, sm_scale=0.1, rank=512)
    chosen, calls = getattr(module, kernel), []
    monkeypatch.setattr(module, kernel, lambda *a, **kw: calls.append(kernel) or chosen(*a, **kw))
    o, lse = dispatch.ragged_mla(*args, sm_scale=0.1, rank=512)
    assert calls == [kernel]
    assert float(jnp.max(jnp.abs(o - o_ref))) < 1e-4 and float(jnp.max(jnp.abs(lse - lse_ref))) < 1e-4


@pytest.mark.parametrize("mode", ["native", "xla", "interpret"])
@pytest.mark.parametrize("rows", [2, 9])
def test_stacked_layer_paths_match_reference(rng, kernel_env, mode, rows):
    """The `layer` argument on every path: few rows (expert gather) and more rows than experts."""
    kernel_env(mode)
    packed, scale = random_int4(rng, 2 * 4, 256, 128)
    packed_LEHN, scale_LEGN = packed.reshape(2, 4, 128, 128), scale.reshape(2, 4, 8, 128)
    sizes = jnp.asarray([0, rows - 1, 0, 1], jnp.int32)
    x = random_normal(rng, (rows, 256))
    out = jax.jit(lambda layer: dispatch.grouped_int4_matmul(x, packed_LEHN, scale_LEGN, sizes, layer=layer))
    expect = _int4_reference(mode)(x, packed_LEHN[1], scale_LEGN[1], sizes)
    assert max_rel_err(out(jnp.int32(1)), expect) < _int4_tol(mode)


@pytest.mark.parametrize("m, e", [(1, 8), (8, 64), (64, 64), (256, 64), (1000, 16), (37, 5)])
def test_grouped_matmul_xla_equals_ragged_dot(m, e):
    """The tiled XLA grouped matmul against lax.ragged_dot, with empty groups and rows past the groups."""
    rng = np.random.default_rng()
    sizes = rng.multinomial(m - int(rng.integers(0, 2)), np.ones(e) / e).astype(np.int32)
    sizes[rng.integers(0, e)] = 0
    x = jnp.asarray(rng.normal(size=(m, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(e, 24, 16)), jnp.float32)
    ref = jnp.where(jnp.arange(m)[:, None] < sizes.sum(), jax.lax.ragged_dot(x, w, jnp.asarray(sizes)), 0)
    got = dispatch.grouped_matmul_xla(x, w, jnp.asarray(sizes))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)  # float32 sums of 24 terms


@pytest.mark.parametrize("mode", ["native", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_and_head_matmuls_read_layer_and_differentiate(rng, kernel_env, mode, dtype):
    """matmul / head_matmul on layer 1 of a stack equal float64 numpy products of the stored values; their
    gradients (the XLA form's on the native path) equal the XLA path's."""
    kernel_env(mode)
    x_MK, w_LKN = random_normal(rng, (5, 96)), random_normal(rng, (3, 96, 72), dtype)
    x_GMK, w_LGKN = random_normal(rng, (4, 3, 32)), random_normal(rng, (2, 4, 32, 24), dtype)
    w64 = lambda w: np.asarray(w.astype(jnp.float32), np.float64)
    layer = jnp.int32(1)
    got = jax.jit(lambda x, w: dispatch.matmul(x, w, layer=layer))(x_MK, w_LKN)
    assert max_rel_err(got, np.asarray(x_MK, np.float64) @ w64(w_LKN[1])) < 1e-5
    got = jax.jit(lambda x, w: dispatch.head_matmul(x, w, layer=layer))(x_GMK, w_LGKN)
    assert max_rel_err(got, np.einsum("gmk,gkn->gmn", np.asarray(x_GMK, np.float64), w64(w_LGKN[1]))) < 1e-5
    assert max_rel_err(dispatch.matmul(x_MK, w_LKN[2]), np.asarray(x_MK, np.float64) @ w64(w_LKN[2])) < 1e-5
    loss = lambda x, w: jnp.sum(jnp.sin(dispatch.matmul(x, w, layer=layer)))
    grads = jax.grad(loss, argnums=(0, 1))(x_MK, w_LKN.astype(jnp.float32))
    expect = jax.grad(lambda x, w: jnp.sum(jnp.sin(dispatch._matmul_xla(x, w, layer))), argnums=(0, 1))(
        x_MK, w_LKN.astype(jnp.float32))
    for g, e in zip(grads, expect):
        assert max_rel_err(g, e) < 1e-5


def test_without_a_compiler_the_xla_path_runs_and_says_why_once(tmp_path):
    """No C++ compiler (CXX names none, empty kernel cache): kernels run on the XLA path; stderr says once how much
    slower and why."""
    script = (
        "import jax, jax.numpy as jnp\n"
        "from pallas_kernels import dispatch\n"
        "x, w = jnp.ones((2, 64)), jnp.ones((3, 64, 16), jnp.bfloat16)\n"
        "for _ in range(3):\n"
        "    y = jax.jit(lambda x, w: dispatch.matmul(x, w, layer=1))(x, w)\n"
        "    z = dispatch.grouped_matmul(x, w, jnp.asarray([1, 0, 1], jnp.int32))\n"
        "    jax.clear_caches()\n"
        "assert dispatch.kernel_mode() == 'xla' and float(y[0, 0]) == 64 and float(z[1, 0]) == 64\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "K2JAX_CPU_KERNEL_CACHE": str(tmp_path),
           "JAX_PLATFORMS": "cpu"}
    env.pop(dispatch.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("cannot be built") == 1, proc.stderr
    assert "XLA path" in proc.stderr and "slower" in proc.stderr and "no-such-compiler" in proc.stderr
