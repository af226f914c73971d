"""Deviceless NVIDIA GPUs for ahead-of-time compiles: their hardware descriptions and jax's CUDA plugin.

The CUDA plugin lives in a folder of its own (default <venv>/cuda13-plugin, or $K2JAX_CUDA_PLUGIN_DIR), never in
the main environment: there it would load a 400 MB library into every CPU-only jax process and print a cuDNN
traceback whenever JAX_PLATFORMS is unset. Programs that compile for a GPU run in a process that has the folder
on PYTHONPATH (plugin_env); compiling to SASS also needs the CUDA 13 toolkit's ptxas on PATH.

    python -m k2jax.gpu_targets      # install the plugin that matches the installed jaxlib (~130 MB)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

OPT_LEVEL_FLAG = "--xla_backend_optimization_level"
PLUGIN_DIR = Path(os.environ.get("K2JAX_CUDA_PLUGIN_DIR", Path(sys.prefix) / "cuda13-plugin"))
PLUGIN_PACKAGES = ("jax-cuda13-plugin", "jax-cuda13-pjrt")
# nvdisasm (SASS listings of the compiled kernels) in a folder of its own: an `nvidia` package beside the plugin
# would change where the plugin looks for CUDA libraries.
TOOLS_DIR = PLUGIN_DIR.with_name(PLUGIN_DIR.name + "-tools")
TOOLS_PACKAGES = ("nvidia-cuda-nvdisasm==13.5.37",)
NVDISASM = TOOLS_DIR / "nvidia" / "cu13" / "bin" / "nvdisasm"


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What XLA's GPU compiler asks a real device for, and the HBM figures a plan needs (vendor spec sheets)."""

    description: str
    compute_capability: tuple[int, int]
    sms: int
    hbm_bytes: int
    bandwidth: float
    l2_bytes: int
    clock_ghz: float

    def target_config(self) -> str:
        """The gpu_device_info text proto of jax.experimental.topologies' deviceless CUDA targets."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {self.sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)} l2_cache_size: {self.l2_bytes} clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.hbm_bytes} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {major} minor: {minor} }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{self.description}"
"""


GPUS: dict[str, Gpu] = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * 10**9, 3.35e12, 50 * 2**20, 1.98),
    "h200": Gpu("NVIDIA H200", (9, 0), 132, 141 * 10**9, 4.8e12, 50 * 2**20, 1.98),
    "b200": Gpu("NVIDIA B200", (10, 0), 148, 180 * 10**9, 8.0e12, 126 * 2**20, 1.965),
}


def parse_gpu_topology(name: str) -> tuple[Gpu, int] | None:
    """"h200:8" -> (the H200, 8); None when the name is not a known GPU."""
    chip, _, count = name.partition(":")
    if chip.lower() not in GPUS:
        return None
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"GPU topology {name!r}: expected NAME:COUNT, e.g. h200:8")
    return GPUS[chip.lower()], int(count)


def gpu_devices(name: str) -> list[Any]:
    """Abstract devices of `count` GPUs of one host for a name such as "h200:8" (needs the plugin loaded)."""
    from jax.experimental import topologies

    gpu, count = parse_gpu_topology(name)
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    desc = topologies.get_topology_desc(name.partition(":")[0].lower(), "cuda", target_config=gpu.target_config(),
                                        topology=f"1x1x{count}")
    return list(desc.devices)


def plugin_loadable() -> bool:
    """Whether this process can load jax's CUDA 13 plugin."""
    return importlib.util.find_spec("jax_plugins") is not None and \
        importlib.util.find_spec("jax_plugins.xla_cuda13") is not None


def plugin_installed() -> bool:
    """Whether the plugin folder holds jax's CUDA 13 plugin."""
    return (PLUGIN_DIR / "jax_plugins" / "xla_cuda13").is_dir()


def plugin_env(root: Path | None = None) -> dict[str, str]:
    """Environment of a GPU-compiling child process: the plugin folder (and `root`) first on PYTHONPATH."""
    path = [str(PLUGIN_DIR), *([str(root)] if root else [])]
    path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # A GPU program compiles as it would for the GPU: an inherited backend optimization level (the test suite lowers
    # it for its CPU programs) would change the PTX and SASS that k2jax-plan and benchmarks/sm90.py read.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(OPT_LEVEL_FLAG)]
    # XLA's GPU scheduler logs an "error" whenever a program's arguments pass 80% of the device's memory, as a
    # plan's pool sized to fill HBM does; compile failures still raise with their message.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags),
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def install() -> None:
    """pip-install the CUDA 13 plugin matching this jaxlib into PLUGIN_DIR (no dependencies: jax stays as it is),
    and nvdisasm into TOOLS_DIR."""
    import jaxlib

    pins = [f"{name}=={jaxlib.__version__}" for name in PLUGIN_PACKAGES]
    for target, packages in ((PLUGIN_DIR, pins), (TOOLS_DIR, TOOLS_PACKAGES)):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
                        str(target), *packages], check=True)


if __name__ == "__main__":
    install()
    print(f"jax's CUDA plugin is in {PLUGIN_DIR}")
