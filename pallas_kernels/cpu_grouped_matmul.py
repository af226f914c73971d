"""The CPU grouped matmul (cpu_grouped_matmul.cc, an XLA FFI custom call) and its jnp reference.

XLA:CPU copies each dynamically sliced expert (or layer) matrix before its dot, which at decode sizes costs
several times the dot; the custom call reads the active experts of the stacked weights in place. It is
compiled on first use with the system C++ compiler against jaxlib's FFI headers, cached under
~/.cache/k2jax/cpu_kernels (K2JAX_CPU_KERNEL_CACHE overrides), and registered with jax.ffi. `available()`
is False when no compiler or build works; dispatch then keeps the plain XLA path and says so once on stderr.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import int4_layout

SOURCE = Path(__file__).with_suffix(".cc")
TARGETS = {"dense": "K2jaxGroupedMatmulDense", "int4": "K2jaxGroupedMatmulInt4"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
# What the XLA path costs (benchmarks/decode.py, "small" config, batch 1 / 8 / 32; see benchmarks/RESULTS.md).
XLA_PATH_COST = ("decode runs about 1.3-1.8x slower with float32 weights and 4-7x slower with a bf16 + INT4 "
                 "checkpoint, because XLA:CPU copies every layer's and expert's weights out of their stacks, and "
                 "widens bf16 and INT4 weights to float32 whole, before each matmul")


def _cache_dir() -> Path:
    """Where built libraries live: K2JAX_CPU_KERNEL_CACHE, else ~/.cache/k2jax/cpu_kernels."""
    return Path(os.environ.get("K2JAX_CPU_KERNEL_CACHE", Path.home() / ".cache" / "k2jax" / "cpu_kernels"))


def _build_key(compiler: str) -> str:
    """Hash of what the library depends on: source, jaxlib, compiler, flags and this machine's CPU features."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags_line = next((line for line in cpu.splitlines() if line.startswith(("flags", "Features"))), "")
    parts = (SOURCE.read_bytes(), jax.__version__.encode(), compiler.encode(), " ".join(FLAGS).encode(),
             flags_line.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build() -> Path:
    """Compile the library once per build key (atomically, so parallel processes may race) and return its path."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    out = _cache_dir() / f"k2jax_cpu_{_build_key(compiler)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(lib)]
        print(f"k2jax: building the native CPU kernel from {SOURCE.name} with {compiler} (once per machine and "
              "version, about 10 s)", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(lib, out)
    return out


@functools.cache
def available() -> bool:
    """Build and register the custom calls once per process; False (saying why on stderr, once) when that fails."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:
        print(f"k2jax: the native CPU kernel cannot be built ({err}); running on the plain XLA path instead: "
              f"{XLA_PATH_COST}. Install a C++ compiler (or set CXX) for full speed.", file=sys.stderr, flush=True)
        return False
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    return True


def _require() -> None:
    """Registers the custom calls, or says why they cannot run."""
    if not available():
        raise RuntimeError("the k2jax CPU kernel could not be built; see the warning above")


def _stacked(a: jax.Array, layer) -> tuple[jax.Array, jax.Array]:
    """[L, E, ...] weights and an int32 layer index; unstacked [E, ...] weights get a unit layer axis."""
    if layer is None:
        return a[None], jnp.zeros((), jnp.int32)
    return a, jnp.asarray(layer, jnp.int32)


def grouped_matmul(x_MK, w_EKN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's dense matrix (f32 or bf16, [E, K, N] or [L, E, K, N] + layer)."""
    _require()
    w_LEKN, layer = _stacked(w_EKN, layer)
    y = jax.ffi.ffi_call(TARGETS["dense"], jax.ShapeDtypeStruct((x_MK.shape[0], w_LEKN.shape[-1]), jnp.float32))(
        x_MK.astype(jnp.float32), w_LEKN, layer, group_sizes_E.astype(jnp.int32))
    return y.astype(x_MK.dtype)


def matmul(x_MK, w_KN, *, layer=None) -> jax.Array:
    """x @ w[layer] for a stacked [L, K, N] dense weight (f32 or bf16; [K, N] without layer), read in place."""
    _require()
    layer = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    y = jax.ffi.ffi_call(TARGETS["dense"], jax.ShapeDtypeStruct((x_MK.shape[0], w_KN.shape[-1]), jnp.float32))(
        x_MK.astype(jnp.float32), w_KN, layer, jnp.full((1,), x_MK.shape[0], jnp.int32))
    return y.astype(x_MK.dtype)


def grouped_int4_matmul(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's INT4 matrix (int4_layout's planar format), read in place."""
    _require()
    packed, layer_ = _stacked(packed_EHN, layer)
    scale, _ = _stacked(scale_EGN, layer)
    planar = int4_layout.planar_block(x_MK.shape[1])
    y = jax.ffi.ffi_call(TARGETS["int4"], jax.ShapeDtypeStruct((x_MK.shape[0], packed.shape[-1]), jnp.float32))(
        x_MK.astype(jnp.float32), packed, scale.astype(jnp.bfloat16), layer_, group_sizes_E.astype(jnp.int32),
        planar=planar)
    return y.astype(x_MK.dtype)


def grouped_matmul_reference(x_MK, w_EKN, group_sizes_E) -> jax.Array:
    """lax.ragged_dot with rows past the groups set to 0 (the kernel's contract)."""
    sizes = group_sizes_E.astype(jnp.int32)
    y = jax.lax.ragged_dot(x_MK, w_EKN.astype(x_MK.dtype), sizes, preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(x_MK.shape[0])[:, None] < jnp.sum(sizes), y, 0).astype(x_MK.dtype)
