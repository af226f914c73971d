"""Compiles every Triton kernel for an H200 (sm_90) down to SASS, with no GPU, and reports what each uses.

Each entry of KERNELS is jitted at Kimi K2 shapes for a deviceless H200 (jax's CUDA 13 plugin and this machine's
CUDA 13 toolkit) while XLA dumps its artefacts. From them: the kernel's launch (grid, threads per block, dynamic
shared memory) from XLA's thunk sequence; registers per thread, spills and static shared memory from
`ptxas -v -arch=sm_90a` on the kernel's PTX; the occupancy these allow under the sm_90 limits; and, from
nvdisasm's SASS listing, the instructions of the kernel's main loop. For the INT4 kernels these give warp
instructions per weight byte, and the share of H200's HBM bandwidth that the SMs' issue rate allows at that count
(132 SMs x 4 schedulers x 1.98 GHz warp instructions/s against 4.8 TB/s: at most 0.218 per byte).

The CUDA plugin lives in its own folder (default <venv>/cuda13-plugin, or $K2JAX_CUDA_PLUGIN_DIR), never in the
main environment: there it would load a 400 MB library into every CPU-only jax process and print a cuDNN
traceback whenever JAX_PLATFORMS is unset. The compiles therefore run in a child process that puts it on
PYTHONPATH.

    python benchmarks/sm90.py --install      # once: the plugin that matches the installed jaxlib (~130 MB)
    python benchmarks/sm90.py [--json]       # table (or JSON rows) of every kernel
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from k2jax.gpu_targets import NVDISASM, PLUGIN_DIR, gpu_devices, install, plugin_env, plugin_installed  # noqa: E402

TRITON_CALL = "__gpu$xla.gpu.triton"

# sm_90 (H100/H200) per-SM limits, from NVIDIA's CUDA occupancy calculator tables.
SM90_REGS_PER_SM = 65536
SM90_REGS_PER_THREAD = 255
SM90_REG_UNIT = 256  # registers are allocated per warp in units of 256
SM90_SUBPARTITIONS = 4  # the register file is split over 4 schedulers; a warp's registers sit in one
SM90_WARPS_PER_SM = 64
SM90_BLOCKS_PER_SM = 32
SM90_SMEM_PER_SM = 233472
SM90_SMEM_PER_BLOCK = 232448  # the opt-in maximum for one block
SM90_SMEM_RESERVED_PER_BLOCK = 1024  # the runtime keeps 1 KiB per resident block
SM90_SMEM_UNIT = 128
H200_WARP_ISSUE_PER_S = 132 * 4 * 1.98e9  # SMs x schedulers (one warp instruction per clock each) x boost clock
H200_HBM_BYTES_PER_S = 4.8e12

HIDDEN, EXPERT_F, EXPERTS, TOP_K = 7168, 2048, 384, 8
KV_LORA, CACHE_LANES, SM_SCALE, GPU_PAGE = 512, 640, 0.1447, 64
BF16, U8, I32 = "bfloat16", "uint8", "int32"
Arg = tuple[tuple[int, ...], str]


def grouped_args(tokens: int, experts: int, k: int, n: int) -> list[Arg]:
    """Rows of `tokens` tokens routed top-8, INT4 experts [E, K//2, N] with scales, group sizes."""
    return [((tokens * TOP_K, k), BF16), ((experts, k // 2, n), U8), ((experts, k // 32, n), BF16), ((experts,), I32)]


def dense_args(m: int, k: int, n: int) -> list[Arg]:
    """Rows, one INT4 matrix [K//2, N] and its scales."""
    return [((m, k), BF16), ((k // 2, n), U8), ((k // 32, n), BF16)]


def layer_args(m: int, k: int, n: int, layers: int = 60) -> list[Arg]:
    """Rows, a stack of dense bf16 weights [L, K, N], the layer."""
    return [((m, k), BF16), ((layers, k, n), BF16), ((), I32)]


def ragged_args(b: int, t: int, h: int, context: int) -> list[Arg]:
    """Absorbed queries [B, T, H, 640], a pool of 64-token pages holding every row's context, page tables,
    lengths, query starts, the layer and the position shard."""
    pages = context // GPU_PAGE
    return [((b, t, h, CACHE_LANES), BF16), ((1, b * pages, GPU_PAGE, CACHE_LANES), BF16), ((b, pages), I32),
            ((b,), I32), ((b,), I32), ((), I32), ((), I32)]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One compile: a label, 'module:function' of the kernel entry point, abstract args, static keyword args."""
    label: str
    fn: str
    args: list[Arg]
    static: dict[str, Any] = dataclasses.field(default_factory=dict)
    loop_bytes: int = 0  # weight bytes one program reads per trip of its main loop (0: not a weight-streaming kernel)


def int4_loop_bytes(m: int, k: int, e: int = 1) -> int:
    """Packed weight bytes per main-loop trip of one INT4 Triton program: a planar block of K by its column tile."""
    from pallas_kernels.int4_layout import planar_block
    from pallas_kernels.int4_matmul import triton_tiling

    return planar_block(k) // 2 * triton_tiling(m, e).block_n


def layer_loop_bytes(m: int) -> int:
    """bf16 weight bytes per main-loop trip of one dense layer-matmul program: a K block by its column tile."""
    from pallas_kernels.layer_matmul import BLOCK_K, _blocks

    return BLOCK_K * _blocks(m)[1] * 2


# Every Triton kernel at the K2 shapes that pick its distinct block configurations. One line per compile.
LAYER = "pallas_kernels.layer_matmul:layer_matmul_triton"
RAGGED = "pallas_kernels.ragged_mla:ragged_mla_triton"
RAGGED_STATIC = {"sm_scale": SM_SCALE, "rank": KV_LORA}
KERNELS = [
    Kernel("int4 grouped gate+up, 1 token", "pallas_kernels.int4_matmul:grouped_int4_matmul_triton",
           grouped_args(1, EXPERTS, HIDDEN, 2 * EXPERT_F), loop_bytes=int4_loop_bytes(TOP_K, HIDDEN, EXPERTS)),
    Kernel("int4 grouped gate+up, 64 tokens", "pallas_kernels.int4_matmul:grouped_int4_matmul_triton",
           grouped_args(64, EXPERTS, HIDDEN, 2 * EXPERT_F), loop_bytes=int4_loop_bytes(64 * TOP_K, HIDDEN, EXPERTS)),
    Kernel("int4 grouped down, 1024 tokens", "pallas_kernels.int4_matmul:grouped_int4_matmul_triton",
           grouped_args(1024, EXPERTS, EXPERT_F, HIDDEN),
           loop_bytes=int4_loop_bytes(1024 * TOP_K, EXPERT_F, EXPERTS)),
    Kernel("int4 dense, M=1", "pallas_kernels.int4_matmul:int4_matmul_triton", dense_args(1, HIDDEN, EXPERT_F),
           loop_bytes=int4_loop_bytes(1, HIDDEN)),
    Kernel("int4 dense, M=256", "pallas_kernels.int4_matmul:int4_matmul_triton", dense_args(256, HIDDEN, EXPERT_F),
           loop_bytes=int4_loop_bytes(256, HIDDEN)),
    Kernel("dense layer matmul, M=1 (q_a)", LAYER, layer_args(1, HIDDEN, 1536), loop_bytes=layer_loop_bytes(1)),
    Kernel("dense layer matmul, M=64 (o_proj)", LAYER, layer_args(64, 8192, HIDDEN), loop_bytes=layer_loop_bytes(64)),
    Kernel("ragged mla decode B=1 H=64 S=256k", RAGGED, ragged_args(1, 1, 64, 262144), RAGGED_STATIC),
    Kernel("ragged mla decode B=64 H=8 S=8k", RAGGED, ragged_args(64, 1, 8, 8192), RAGGED_STATIC),
    Kernel("ragged mla prefill T=512 H=64 S=8k", RAGGED, ragged_args(1, 512, 64, 8192), RAGGED_STATIC),
    Kernel("ragged mla prefill T=512 H=8 S=128k", RAGGED, ragged_args(1, 512, 8, 131072), RAGGED_STATIC),
]


def occupancy(regs: int, threads: int, smem: int) -> dict[str, float]:
    """Resident blocks and warps per SM, and occupancy (warps / 64), for one sm_90 kernel's resources."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // SM90_REG_UNIT) * SM90_REG_UNIT
    warps_by_regs = SM90_SUBPARTITIONS * (SM90_REGS_PER_SM // SM90_SUBPARTITIONS // regs_per_warp)
    limits = {"registers": warps_by_regs // warps, "warps": SM90_WARPS_PER_SM // warps, "blocks": SM90_BLOCKS_PER_SM}
    if smem:
        block_smem = -(-(smem + SM90_SMEM_RESERVED_PER_BLOCK) // SM90_SMEM_UNIT) * SM90_SMEM_UNIT
        limits["shared memory"] = SM90_SMEM_PER_SM // block_smem
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps / SM90_WARPS_PER_SM, "limited_by": limiter}


def ptxas_info(ptx: Path, ptxas: str, cubin: Path) -> dict[str, int]:
    """Registers, spill bytes, static shared memory and stack of the PTX's one entry, from `ptxas -v` for sm_90a
    (which writes the SASS to `cubin`)."""
    out = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(ptx), "-o", str(cubin)], capture_output=True, text=True,
                         check=True)
    text = out.stdout + out.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "static_smem": number(r"(\d+) bytes smem"),
            "stack": number(r"(\d+) bytes stack frame")}


def loop_instructions(sass: str) -> int:
    """Instructions in the longest loop of a SASS listing: from a label to the last branch back to it."""
    lines = [line.strip() for line in sass.splitlines()]
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\.L_x_\d+:", line)}
    longest = 0
    for i, line in enumerate(lines):
        found = re.search(r"BRA `?\((\.L_x_\d+)\)", line)
        if found and labels.get(found.group(1), i) < i:
            start = labels[found.group(1)]
            longest = max(longest, sum(1 for x in lines[start:i + 1] if re.match(r"/\*[0-9a-f]{4,}\*/", x)))
    return longest


def sass_of(cubin: Path) -> str:
    """nvdisasm's listing of a cubin."""
    if not NVDISASM.exists():
        raise RuntimeError(f"no nvdisasm at {NVDISASM}: run `python benchmarks/sm90.py --install`")
    return subprocess.run([str(NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def issue_fields(loop: int, threads: int, loop_bytes: int) -> dict[str, float]:
    """Warp instructions per weight byte of a weight-streaming loop, and the HBM share H200's issue rate allows."""
    if not loop_bytes:
        return {"instr_per_byte": 0.0, "issue_bound_bw": 0.0}
    per_byte = loop * -(-threads // 32) / loop_bytes
    return {"instr_per_byte": per_byte,
            "issue_bound_bw": min(1.0, H200_WARP_ISSUE_PER_S / H200_HBM_BYTES_PER_S / per_byte)}


def triton_launches(dump: Path) -> list[dict[str, Any]]:
    """(name, grid, threads, dynamic shared memory) of each Triton kernel in one compile's XLA dump."""
    hlo = next(dump.glob("*gpu_after_optimizations.txt")).read_text()
    names = re.findall(re.escape(f'custom_call_target="{TRITON_CALL}"') + r'.*?, name = "([^"]+)"', hlo)
    thunks = next(dump.glob("*.thunk_sequence.txt")).read_text()
    launches = []
    for name in names:
        found = re.search(re.escape(name) + r" grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+)",
                          thunks)
        if not found:
            raise RuntimeError(f"no launch of Triton kernel {name} in {dump}")
        grid, threads = ([int(v) for v in found.group(i).split(",")] for i in (1, 2))
        launches.append({"kernel": name, "grid": grid, "threads": math.prod(threads),
                         "dynamic_smem": int(found.group(3))})
    return launches


def kernel_ptx(dump: Path, name: str) -> Path:
    """The dumped PTX file that defines the entry `name`."""
    for ptx in dump.glob("*.ptx"):
        if re.search(rf"\.entry {re.escape(name)}\(", ptx.read_text()):
            return ptx
    raise RuntimeError(f"no PTX for Triton kernel {name} in {dump}")


def find_ptxas() -> str:
    """ptxas on PATH, else the CUDA toolkit's."""
    found = shutil.which("ptxas") or next((str(p) for p in (Path("/usr/local/cuda/bin/ptxas"),) if p.exists()), None)
    if not found:
        raise RuntimeError("ptxas not found: install the CUDA 13 toolkit (PATH or /usr/local/cuda/bin)")
    return found


def compile_kernel(kernel: Kernel, sharding, dump: Path) -> int:
    """AOT-compile one entry for the abstract H200, dumping XLA's artefacts into `dump`; the program's temp bytes."""
    import importlib

    import jax
    import jax.numpy as jnp

    module, name = kernel.fn.split(":")
    fn = getattr(importlib.import_module(module), name)
    args = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding) for shape, dtype in kernel.args]
    compiled = jax.jit(lambda *a: fn(*a, **kernel.static)).lower(*args).compile({"xla_dump_to": str(dump)})
    return compiled.memory_analysis().temp_size_in_bytes


def report_rows(kernels: list[Kernel]) -> list[dict[str, Any]]:
    """In a process where the CUDA plugin is importable: compile every kernel and measure each Triton launch."""
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(gpu_devices("h200:1")[0])
    ptxas = find_ptxas()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, kernel in enumerate(kernels):
            dump = Path(tmp) / str(i)
            temp = compile_kernel(kernel, sharding, dump)
            launches = triton_launches(dump)
            if not launches:
                raise RuntimeError(f"{kernel.label}: the compiled program has no Triton kernel")
            for launch in launches:
                cubin = dump / f"{launch['kernel']}.cubin"
                info = ptxas_info(kernel_ptx(dump, launch["kernel"]), ptxas, cubin)
                smem = launch["dynamic_smem"] + info["static_smem"]
                loop = loop_instructions(sass_of(cubin))
                rows.append({"label": kernel.label, **launch, **info, "smem": smem, "temp": temp,
                             "loop_instructions": loop,
                             **issue_fields(loop, launch["threads"], kernel.loop_bytes),
                             **occupancy(info["registers"], launch["threads"], smem)})
    return rows


def run_report() -> list[dict[str, Any]]:
    """Rows for every KERNELS entry, computed in a child process that sees the CUDA plugin."""
    if not plugin_installed():
        raise RuntimeError(f"no CUDA plugin in {PLUGIN_DIR}: run `python benchmarks/sm90.py --install`")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--worker", out.name], env=plugin_env(ROOT), check=True)
        return json.loads(Path(out.name).read_text())


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the report rows."""
    lines = ["| kernel | Triton function | grid | threads | registers | spills (st/ld B) | shared memory (B) "
             "| blocks/SM | occupancy | limited by | loop SASS instr | warp instr / weight B | issue allows |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        per_byte = f"{r['instr_per_byte']:.3f} | {100 * r['issue_bound_bw']:.0f}% of HBM" if r["instr_per_byte"] \
            else "– | –"
        lines.append(f"| {r['label']} | {r['kernel']} | {'x'.join(map(str, r['grid']))} | {r['threads']} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem']} | "
                     f"{r['blocks_per_sm']} | {100 * r['occupancy']:.0f}% | {r['limited_by']} | "
                     f"{r['loop_instructions']} | {per_byte} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Install the plugin, or compile every kernel and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help=f"pip-install the CUDA plugin into {PLUGIN_DIR}")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.install:
        install()
    elif args.worker:
        Path(args.worker).write_text(json.dumps(report_rows(KERNELS)))
    else:
        rows = run_report()
        print(json.dumps(rows, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
