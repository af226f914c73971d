"""Builds and registers the native CPU kernels (cpu_*.cc, XLA FFI custom calls) as one library.

The library is compiled on first use with the system C++ compiler against jaxlib's FFI headers, cached under
~/.cache/k2jax/cpu_kernels (K2JAX_CPU_KERNEL_CACHE overrides) by a key over every source, and its handlers are
registered with jax.ffi. `available()` is False when no compiler or build works; dispatch then keeps the plain
XLA paths and says so once on stderr.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_grouped_matmul.cc", HERE / "cpu_ragged_mla.cc")
HEADERS = (HERE / "cpu_common.h",)
# Sources compiled once per part (defines per object), in parallel: the grouped matmul's dense and INT4 handlers,
# so that the longest unit (~7 s) is not the whole file's 9-15 s. Units start in this order, longest first.
PARTS = {"cpu_grouped_matmul.cc": (("-DK2JAX_MATMUL_PART=1",), ("-DK2JAX_MATMUL_PART=2",))}
TARGETS = {"dense": "K2jaxGroupedMatmulDense", "int4": "K2jaxGroupedMatmulInt4", "ragged_mla": "K2jaxRaggedMla"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-fno-math-errno")  # per source; then linked -shared
# What the XLA paths cost (benchmarks/decode.py, "small" config, batch 1 / 8 / 32; see benchmarks/RESULTS.md).
XLA_PATH_COST = ("decode runs about 1.2-3.4x slower with float32 weights and 5-17x slower with a bf16 + INT4 "
                 "checkpoint, because XLA:CPU copies every layer's and expert's weights out of their stacks, and "
                 "widens bf16 and INT4 weights to float32 whole, before each matmul; and attention gathers every "
                 "row's pages over the whole page-table width, not just the positions the row holds")


def _cache_dir() -> Path:
    """Where built libraries live: K2JAX_CPU_KERNEL_CACHE, else ~/.cache/k2jax/cpu_kernels."""
    return Path(os.environ.get("K2JAX_CPU_KERNEL_CACHE", Path.home() / ".cache" / "k2jax" / "cpu_kernels"))


def _build_key(compiler_path: str) -> str:
    """Hash of what the library depends on: sources, headers, jaxlib, compiler, flags and this machine's CPU."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags_line = next((line for line in cpu.splitlines() if line.startswith(("flags", "Features"))), "")
    parts = (*(f.name.encode() + b"\0" + f.read_bytes() for f in (*SOURCES, *HEADERS)), jax.__version__.encode(),
             compiler_path.encode(), " ".join(FLAGS).encode(), flags_line.encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _units() -> list[tuple[Path, tuple[str, ...]]]:
    """(source, defines) per object: each source once per part (PARTS), else once."""
    return [(source, defines) for source in SOURCES for defines in PARTS.get(source.name, ((),))]


def compiler() -> str:
    """The C++ compiler: CXX, else the first of c++, g++, clang++ on PATH (RuntimeError when there is none)."""
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if found is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return found


def build() -> Path:
    """Compile the library once per build key (atomically, so parallel processes may race) and return its path."""
    compiler_path = compiler()
    out = _cache_dir() / f"k2jax_cpu_{_build_key(compiler_path)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        units = _units()
        objects = [Path(tmp) / f"{source.stem}_{i}.o" for i, (source, _) in enumerate(units)]
        print(f"k2jax: building the native CPU kernels ({', '.join(s.name for s in SOURCES)}) with {compiler_path} "
              "(once per machine and version, 5-15 s)", file=sys.stderr, flush=True)
        _run_all([[compiler_path, *FLAGS, *defines, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(obj)]
                  for (source, defines), obj in zip(units, objects)])
        _run_all([[compiler_path, "-shared", *map(str, objects), "-o", str(lib)]])
        os.replace(lib, out)
    return out


def _run_all(cmds: list[list[str]]) -> None:
    """Run the commands, as many at once as there are cores, in the order given (the longest first: with more
    compiles than cores at once, the longest shares a core and ends later); RuntimeError with the command and its
    compiler output if any fails, once all have finished."""
    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=cores) as pool:
        done = list(pool.map(run, cmds))
    for cmd, proc in zip(cmds, done):
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


@functools.cache
def library() -> ctypes.CDLL:
    """The built library, loaded once per process (raises OSError or RuntimeError when it cannot be)."""
    return ctypes.CDLL(str(build()))


@functools.cache
def available() -> bool:
    """Build and register the custom calls once per process; False (saying why on stderr, once) when that fails."""
    try:
        lib = library()
    except (OSError, RuntimeError) as err:
        print(f"k2jax: the native CPU kernels cannot be built ({err}); running on the plain XLA paths instead: "
              f"{XLA_PATH_COST}. Install a C++ compiler (or set CXX) for full speed.", file=sys.stderr, flush=True)
        return False
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    return True


def require() -> None:
    """Registers the custom calls, or says why they cannot run."""
    if not available():
        raise RuntimeError("the k2jax CPU kernels could not be built; see the warning above")
