"""k2jax-plan: compile the real model for a target topology from abstract parameters and print what fits.

    k2jax-plan --preset kimi-k2-thinking --topology v5p:4x4x4 --batch 64 --context 131072
    k2jax-plan --topology h200:8 --json

Devices come from jax.experimental.topologies (no accelerator needed: libtpu for TPUs, jax's CUDA plugin in its
own folder for GPUs, run in a child process that sees it; see k2jax.gpu_targets); parameters, the page pool and tokens
are ShapeDtypeStructs placed by sharding.rules, so the compiled decode step (and prefill chunks) is the
program a real pod would run. Prints per-device bytes for weights, the pool and compiler temporaries against
the chip's HBM, the KV tokens that fit in the pages left free, the bandwidth floor of a decode step, and
whether a step moves cache bytes (a copy, slice or gather of one layer's pages or more), the expert stack, or any
weight stack whole, and how many bytes of its own weights each layer copies out of the stacks before reading them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from k2jax.cache import PoolLayout, abstract_cache, default_page_size, make_layout
from k2jax.cliargs import Parser, float_in, int_in, mesh_spec
from k2jax.config import K2Config, preset
from k2jax.engine import (DECODE_STEPS, FULL_CHUNKS, PREFILL_CHUNK, DecodeRows, PrefillChunk, Program, host_layout,
                          packed_step)
from k2jax.gpu_targets import (GPUS, PLUGIN_DIR, gpu_devices, parse_gpu_topology, plugin_env, plugin_installed,
                               plugin_loadable)
from k2jax.loading import abstract_model
from k2jax.sampling import ROW_DTYPES, StepMasks, mask_words
from pallas_kernels import dispatch
from sharding.mesh import mesh_from_devices
from sharding.rules import named_sharding, shard_bytes

GIB = 1 << 30
DEFAULT_BATCH = 64
SHORT_CONTEXT = 8192  # the prefill chunk is also compiled at this context: its temp must not grow with context
# device_kind -> (HBM bytes, HBM bytes per second), from the vendors' spec sheets.
CHIPS: dict[str, tuple[int, float]] = {
    "TPU v4": (32 * GIB, 1.2e12),
    "TPU v5 lite": (16 * GIB, 8.19e11),
    "TPU v5": (95 * GIB, 2.765e12),
    "TPU v6 lite": (32 * GIB, 1.64e12),
}
MOVES = ("copy", "copy-start", "dynamic-slice", "gather", "all-gather", "all-gather-start", "all-to-all",
         "collective-permute", "collective-permute-start")


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program's per-device memory (bytes), compile seconds, and the copies found in its HLO."""

    argument: int
    output: int
    alias: int
    temp: int
    compile_s: float
    cache_moves: int
    expert_copies: int
    attention_kernels: int = 0
    error: str = ""
    weights_copied: int = 0  # bytes of whole weight parameters copied (a relayout of a stack the step reads)
    layer_copies: int = 0  # bytes of one layer's weights a layer copies out of the stacks (per layer, not per step)

    @property
    def total(self) -> int:
        """Peak bytes the program needs on a device: inputs, non-aliased outputs, temporaries."""
        return self.argument + self.output - self.alias + self.temp


def topology_devices(name: str) -> list[Any]:
    """Abstract devices of a TPU topology such as "v5p:2x4x4", or of one host's GPUs such as "h200:8"."""
    if parse_gpu_topology(name):
        return gpu_devices(name)
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)


def chip_specs(devices: Sequence[Any]) -> tuple[int, float]:
    """(HBM bytes, HBM bytes per second) of one device of the topology; (0, 0.0) when unknown."""
    kind = devices[0].device_kind
    gpu = next((g for g in GPUS.values() if g.description == kind), None)
    return (gpu.hbm_bytes, gpu.bandwidth) if gpu else CHIPS.get(kind, (0, 0.0))


@contextlib.contextmanager
def persistent_cache_off() -> Iterator[None]:
    """Compile without JAX's persistent cache: a program compiled for abstract devices cannot be loaded back
    ("PjRtCompiler must be constructed with a Client"), so its entry would only warn on every later run."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # the cache decides once, at its first use, whether it is on
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def abstract_state(cfg: K2Config, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and ShapeDtypeStruct parameters, each placed by the rules."""
    graphdef, state = abstract_model(cfg)

    def place(var: nnx.Variable) -> nnx.Variable:
        value = var.get_value()
        sharding = named_sharding(var.get_metadata()["axes"], value.shape, mesh)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


HLO_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1,
                "f64": 8, "s64": 8}


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of placed ShapeDtypeStructs."""
    return sum(shard_bytes(x.shape, x.dtype.itemsize, x.sharding) for x in jax.tree.leaves(tree))


def hlo_copies(hlo: str, shape: Sequence[int], dtype: str) -> int:
    """Copy (or copy-start) instructions in compiled HLO whose result has this shape."""
    pattern = re.compile(rf"= {dtype}\[{','.join(map(str, shape))}\]\{{[^}}]*\}} copy(-start)?\(")
    return len(pattern.findall(hlo))


def weight_params(hlo: str) -> set[str]:
    """HLO names of the entry parameters that hold model weights (their metadata names the state's leaves, as
    packed_step takes them), and of the bitcasts of them (a kernel may read a weight through a view, e.g. the Triton
    INT4 kernel's byte pairs)."""
    names = set(re.findall(r"(%[\w.-]+) = [^\n]*? parameter\(\d+\)[^\n]*op_name=\"leaves\[", hlo))
    views = re.findall(r"(%[\w.-]+) = [^\n]*? bitcast(?:-convert)?\((%[\w.-]+)\)", hlo)
    while True:
        more = {view for view, src in views if src in names} - names
        if not more:
            return names
        names |= more


def hlo_moves(hlo: str, min_bytes: int) -> list[tuple[str, str, tuple[int, ...], int]]:
    """Instructions that copy, slice, gather or exchange a result of min_bytes or more: (op, first operand, result
    dims, bytes)."""
    pattern = re.compile(r"= \(?(\w+)\[([\d,]*)\][^ ]* ([\w-]+)\((%[\w.-]+)?")
    moves = []
    for line in hlo.splitlines():
        m = pattern.search(line)
        if m and m[3] in MOVES and m[1] in HLO_ITEMSIZE:
            dims = tuple(int(d) for d in m[2].split(",") if d)
            size = math.prod(dims) * HLO_ITEMSIZE[m[1]]
            if size >= min_bytes:
                moves.append((m[3], m[4] or "", dims, size))
    return moves


def classify_moves(hlo: str, lanes: int, cache_bytes: int) -> tuple[int, int]:
    """(moves of cache bytes: results with the pool's `lanes` of cache_bytes or more; bytes of weight parameters
    copied whole) in compiled HLO."""
    weights, moves = weight_params(hlo), hlo_moves(hlo, 1 << 20)
    cache = sum(dims[-1:] == (lanes,) and size >= cache_bytes for _, _, dims, size in moves)
    return cache, sum(size for op, src, _, size in moves if op.startswith("copy") and src in weights)


def layer_stacks(state: Any) -> set[tuple[str, int]]:
    """(HLO dtype, elements) of one layer's per-device slice of each weight stack of 64 KiB or more."""
    names = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "uint8": "u8", "int8": "s8"}
    stacks = set()
    for path, leaf in jax.tree.flatten_with_path(state)[0]:
        if "layers" in jax.tree_util.keystr(path) and leaf.dtype.name in names:
            per_layer = math.prod(leaf.sharding.shard_shape(leaf.shape)[1:])
            if per_layer * leaf.dtype.itemsize >= 1 << 16:
                stacks.add((names[leaf.dtype.name], per_layer))
    return stacks


def layer_copies(hlo: str, stacks: set[tuple[str, int]]) -> int:
    """Bytes of the fusions in compiled HLO that slice one layer's weights out of a stack into a buffer of their own
    (XLA:GPU does this for a dot whose weight is `stack[layer]`; XLA:TPU reads the slice in place): results the size
    of one layer of a stack (`layer_stacks`), made by a dynamic slice."""
    pattern = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* fusion\([^\n]*op_name=\"[^\"]*/dynamic_slice\"")
    total = 0
    for m in pattern.finditer(hlo):
        elements = math.prod(int(d) for d in m[2].split(",") if d)
        if (m[1], elements) in stacks:
            total += elements * HLO_ITEMSIZE[m[1]]
    return total


def kernel_calls(hlo: str, name: str) -> int:
    """Custom calls of the Pallas kernel `name` in compiled HLO (named after it on TPU, in its metadata on GPU)."""
    return sum(1 for line in hlo.splitlines() if " custom-call(" in line and name in line)


def short_error(message: str) -> str:
    """A compiler error in a few words: 'out of HBM (needs X of Y)' or its first line."""
    hbm = re.search(r"temporaries \(([^)]*)\) exceeds available HBM \(([^)]*)\)", message)
    return f"out of HBM (needs {hbm[1]} of {hbm[2]})" if hbm else message.splitlines()[0][:120]


def abstract_step(cfg: K2Config, mesh: Mesh, layout: PoolLayout, rows: int, chunk: int, width: int, chunks: int = 1
                  ) -> tuple[dict[str, jax.ShapeDtypeStruct], DecodeRows, PrefillChunk | None]:
    """ShapeDtypeStructs of an engine step's pool (placed), `rows` decode rows and `chunks` prefill chunks of `chunk`
    tokens (0: none) with `width`-page tables (shapes only: they travel in one replicated int32 buffer)."""
    cache = abstract_cache(cfg, layout, rows, width, jnp.bfloat16, mesh)
    sds = jax.ShapeDtypeStruct
    decode = DecodeRows(sds((rows,), jnp.int32), sds((rows,), jnp.int32), sds((rows,), jnp.bool_), cache.table_BM,
                        {name: sds((rows,), dtype) for name, dtype in ROW_DTYPES.items()},
                        jax.tree.map(lambda a: sds(a.shape, a.dtype), StepMasks.unconstrained(
                            rows, mask_words(cfg.vocab_size), 1 if chunk else DECODE_STEPS)))
    tokens = (chunks * chunk,)
    prefill = None if not chunk else PrefillChunk(sds(tokens, jnp.int32), sds(tokens, jnp.int32),
                                                  sds((chunks, chunk), jnp.int32), sds((chunks,), jnp.int32),
                                                  sds((chunks,), jnp.int32), sds((chunks, width), jnp.int32))
    return cache.pool, decode, prefill


def compile_step(cfg: K2Config, mesh: Mesh, layout: PoolLayout, rows: int, chunk: int, context: int,
                 chunks: int = 1) -> Compiled:
    """Compile the engine step for `rows` decode rows beside `chunks` prefill chunks of `chunk` tokens (0: a
    decode-only step of up to DECODE_STEPS steps), page tables covering `context` positions."""
    graphdef, state = abstract_state(cfg, mesh)
    pool_in, decode, prefill = abstract_step(cfg, mesh, layout, rows, chunk, layout.pages_for(context), chunks)
    pool = pool_in["moe"]
    layer_bytes = math.prod(pool.sharding.shard_shape(pool.shape)[1:]) * pool.dtype.itemsize
    # Attention's queries and outputs over all heads (f32) may be relaid out around the kernel; a move counts as
    # cache bytes only when it has the pool's lanes, at least one layer's pages, and is larger than those (the MoE's
    # routed rows [tokens x top-k, hidden] of a long step are as large, and move by design).
    activations = (rows + chunks * chunk) * cfg.num_attention_heads * cfg.cache_lanes * 4
    packed = state["moe_layers"]["mlp"]["gate"]["packed"].get_value()
    # The program Engine.run calls: the state as its leaves, the host inputs as one replicated int32 buffer.
    program = Program(graphdef, jax.tree.structure(state), cfg, jnp.bfloat16)
    host = host_layout((decode, prefill, jax.ShapeDtypeStruct((), jnp.int32)))
    host_N = jax.ShapeDtypeStruct((host.words,), jnp.int32, sharding=NamedSharding(mesh, P()))
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh), persistent_cache_off():
            compiled = packed_step.lower(program, jax.tree.leaves(state), pool_in, host_N, host, layout,
                                         1 if chunk else DECODE_STEPS).compile()
    except Exception as e:  # noqa: BLE001 - a compiler refusal (e.g. out of HBM) is a result to report
        return Compiled(0, 0, 0, 0, time.perf_counter() - start, 0, 0, error=short_error(str(e)))
    seconds = time.perf_counter() - start
    mem, hlo = compiled.memory_analysis(), compiled.as_text()
    cache_moves, relaid = classify_moves(hlo, cfg.cache_lanes, max(layer_bytes, activations + 1))
    return Compiled(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                    mem.temp_size_in_bytes, seconds, cache_moves,
                    hlo_copies(hlo, packed.sharding.shard_shape(packed.shape), "u8"), kernel_calls(hlo, "ragged_mla"),
                    weights_copied=relaid, layer_copies=layer_copies(hlo, layer_stacks(state)))


def expected_active(n_tokens: int, top_k: int, n_experts: int) -> float:
    """Expected fraction of experts that at least one of n_tokens uniformly routed tokens picks."""
    return 1.0 - (1.0 - top_k / n_experts) ** n_tokens


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per-device bytes of weights (routed experts among them) and of the pool for batch x context, before compiling."""

    weights: int
    experts: int
    cache: int

    def step_read(self, cfg: K2Config, tokens_per_group: int) -> float:
        """Bytes a decode step reads per device: dense weights, the experts its tokens pick, its pages."""
        active = expected_active(tokens_per_group, cfg.num_experts_per_tok, cfg.n_routed_experts)
        return self.weights - self.experts + active * self.experts + self.cache


def footprint(cfg: K2Config, mesh: Mesh, layout: PoolLayout) -> Footprint:
    """Weights and pool per device for this mesh and layout, placed by the rules."""
    _, state = abstract_state(cfg, mesh)
    flat = [(v.get_metadata()["axes"], v.get_value()) for _, v in nnx.to_flat_state(state)]
    pool = abstract_cache(cfg, layout, 1, 1, jnp.bfloat16, mesh).pool
    return Footprint(per_device_bytes([x for _, x in flat]), per_device_bytes([x for a, x in flat if "experts" in a]),
                     per_device_bytes(pool))


def token_bytes(cfg: K2Config) -> int:
    """Bytes one cached token takes (all layers, bf16), on the one device that holds it."""
    return cfg.num_hidden_layers * cfg.cache_lanes * 2


def kv_tokens(cfg: K2Config, free_per_device: float, n_devices: int, page_size: int) -> int:
    """Tokens whose pages fit in `free_per_device` bytes on every device (whole pages)."""
    pages = int(max(free_per_device, 0) // (token_bytes(cfg) * page_size))
    return pages * page_size * n_devices


def candidate_specs(n_devices: int, n_experts: int) -> list[str]:
    """Meshes worth planning: experts over what divides them, the rest over tensor (1, 2, 4, 8) and data."""
    specs = []
    for tensor in (1, 2, 4, 8):
        if n_devices % tensor:
            continue
        expert = math.gcd(n_devices // tensor, n_experts)
        sizes = {"data": n_devices // (tensor * expert), "expert": expert, "tensor": tensor}
        specs.append(",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "expert=1")
    return specs


def choose_mesh(cfg: K2Config, devices: Sequence[Any], batch: int, context: int, hbm: int, bandwidth: float,
                page_size: int, max_floor_ms: float | None = None) -> str:
    """The candidate mesh that leaves the most KV tokens in 90% of HBM, among those whose decode bandwidth floor
    is within max_floor_ms (all when None); ties go to the lower floor."""
    scored = []
    for spec in candidate_specs(len(devices), cfg.n_routed_experts):
        mesh = mesh_from_devices(devices, spec)
        try:
            f = footprint(cfg, mesh, make_layout(mesh, batch, context, page_size))
        except ValueError:  # a dimension that does not divide over this mesh
            continue
        floor_ms = 1e3 * f.step_read(cfg, batch // mesh.shape.get("data", 1)) / bandwidth if bandwidth else 0.0
        tokens = kv_tokens(cfg, 0.9 * hbm - f.weights, len(devices), page_size)
        scored.append((max_floor_ms is not None and floor_ms > max_floor_ms, -tokens, floor_ms, spec))
    return min(scored)[-1]


def fitting_batch(cfg: K2Config, mesh: Mesh, context: int, hbm: int, page_size: int) -> int:
    """The most sequences (up to DEFAULT_BATCH, at least 1) whose pages of `context` tokens fit 90% of HBM beside
    the weights: the planner's default batch."""
    f = footprint(cfg, mesh, make_layout(mesh, 1, context, page_size))
    tokens = kv_tokens(cfg, 0.9 * hbm - f.weights, mesh.size, page_size)
    return max(1, min(DEFAULT_BATCH, tokens // context))


def plan(cfg: K2Config, devices: Sequence[Any], spec: str, batch: int, context: int, prefill_chunk: int,
         hbm: int | None = None, bandwidth: float | None = None, page_size: int | None = None,
         name: str = "") -> dict[str, Any]:
    """Compile the engine step, decode-only and with prefill chunks, on this mesh; per-device bytes, fit, KV tokens
    and time floor.

    The prefill step is one row's `prefill_chunk` new tokens beside `batch` decode rows, page tables covering the
    whole context (as a server steps), compiled again at SHORT_CONTEXT to show its temporaries do not grow with the
    context, and with FULL_CHUNKS such chunks of different rows (a server's largest step) when the batch has them.
    KV tokens count the pages that fit beside the weights and the largest of the programs' temporaries.
    `name` (the topology as given on the command line) leads the row's label.
    """
    mesh = mesh_from_devices(devices, spec)
    chip_hbm, chip_bw = chip_specs(devices)
    hbm, bandwidth = hbm or chip_hbm, bandwidth or chip_bw
    page_size = page_size or default_page_size(devices[0].platform)
    layout = make_layout(mesh, batch, context, page_size)
    f = footprint(cfg, mesh, layout)
    decode = compile_step(cfg, mesh, layout, batch, 0, context)
    prefill = prefill_short = packed = None
    if prefill_chunk:
        prefill = compile_step(cfg, mesh, layout, batch, prefill_chunk, context)
        if batch >= FULL_CHUNKS:  # long prompts arriving together: a server's largest step
            packed = compile_step(cfg, mesh, layout, batch, prefill_chunk, context, FULL_CHUNKS)
        short = min(context, SHORT_CONTEXT)
        prefill_short = compile_step(cfg, mesh, make_layout(mesh, batch, short, page_size), batch, prefill_chunk,
                                     short)
    temp = max([decode.temp] + [p.temp for p in (prefill, packed, prefill_short) if p is not None])
    free = hbm - f.weights - temp - (decode.argument - f.weights - f.cache)  # pages fit in what is left
    tokens = kv_tokens(cfg, free, len(devices), page_size) if not decode.error else 0
    step_read = f.step_read(cfg, batch // mesh.shape.get("data", 1))
    return {
        "topology": f"{name + ': ' if name else ''}{len(devices)} x {devices[0].device_kind}", "mesh": spec, "batch": batch, "context": context,
        "page_size": page_size, "hbm": hbm, "weights": f.weights, "experts": f.experts, "cache": f.cache,
        "decode": decode, "prefill": prefill, "prefill_packed": packed, "prefill_short": prefill_short,
        "fits": not decode.error and decode.total + temp - decode.temp <= hbm,
        "kv_tokens": tokens, "max_batch": tokens // context, "max_context": min(tokens // batch,
                                                                                 cfg.max_position_embeddings),
        "floor_ms": 1e3 * step_read / bandwidth if bandwidth else float("nan"),
    }


def _gb(n: float) -> str:
    """Bytes as decimal GB with two decimals."""
    return f"{n / 1e9:.2f}"


def _temp(c: Compiled | None) -> str:
    """A program's temp GB (compile s), its error, or '-' when not compiled."""
    return "-" if c is None else f"error: {c.error}" if c.error else f"{_gb(c.temp)} ({c.compile_s:.0f})"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of plans, one row each."""
    head = ("| topology | mesh | batch x context | HBM GB | weights GB (experts) | pool GB | decode temp GB | "
            "decode total GB | fits | KV tokens that fit | max batch @context | max context @batch | floor ms/step | "
            "attention kernel | cache moved | expert stack copied | weights copied GB | "
            "a layer's weights copied per layer GB | decode compile s | "
            f"prefill chunk temp GB (compile s) | {FULL_CHUNKS} chunks | same as one at context {SHORT_CONTEXT} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d, p, pp, ps = r["decode"], r["prefill"], r["prefill_packed"], r["prefill_short"]
        compiled = [c for c in (d, p, pp, ps) if c is not None and not c.error]
        moved = any(c.cache_moves for c in (d, p, pp) if c is not None)  # the short context's pool is not the plan's
        kernel = bool(compiled) and all(c.attention_kernels for c in compiled)
        dec = f"error: {d.error}" if d.error else _gb(d.total)
        lines.append(
            f"| {r['topology']} | {r['mesh']} | {r['batch']} x {r['context']} | {_gb(r['hbm'])} | "
            f"{_gb(r['weights'])} ({_gb(r['experts'])}) | {_gb(r['cache'])} | {_gb(d.temp)} | {dec} | "
            f"{'yes' if r['fits'] else 'no'} | {r['kv_tokens']:,} | {r['max_batch']} | {r['max_context']} | "
            f"{r['floor_ms']:.2f} | {_yes(kernel)} | {_yes(moved)} | {_yes(d.expert_copies)} | "
            f"{_gb(max(c.weights_copied for c in compiled)) if compiled else '-'} | "
            f"{_gb(max(c.layer_copies for c in compiled)) if compiled else '-'} | {d.compile_s:.1f} | "
            f"{_temp(p)} | {_temp(pp)} | {_temp(ps)} |")
    return "\n".join(lines)


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def as_json(r: dict[str, Any]) -> dict[str, Any]:
    """A plan with its compiled programs as plain dicts (for --json)."""
    return {k: dataclasses.asdict(v) if isinstance(v, Compiled) else v for k, v in r.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; a malformed or out-of-range one exits with code 2 and one line naming it."""
    ap = Parser(prog="k2jax-plan", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="kimi-k2-thinking", help="model preset (or --config)")
    ap.add_argument("--config", help="a checkpoint dir or config.json to plan instead of a preset")
    ap.add_argument("--topology", action="append", required=True,
                    help="a TPU topology known to jax.experimental.topologies (e.g. v5p:2x4x4) or GPUS:COUNT of one "
                    f"host ({', '.join(GPUS)}, e.g. h200:8); repeatable")
    ap.add_argument("--mesh", type=mesh_spec, help="mesh spec such as expert=32,tensor=2 (default: the candidate "
                    "that leaves the most KV tokens within --max-floor-ms)")
    ap.add_argument("--batch", type=int_in(1), help=f"sequences decoded together (default: the most, up to "
                    f"{DEFAULT_BATCH}, whose pages fit at --context)")
    ap.add_argument("--context", type=int_in(1), default=131072)
    ap.add_argument("--prefill-chunk", type=int_in(0), default=PREFILL_CHUNK, help="0 skips the prefill compiles")
    ap.add_argument("--page-size", type=int_in(1), help="tokens per cache page (default: the backend's kernel page)")
    ap.add_argument("--max-floor-ms", type=float_in(0.0, low_open=True),
                    help="only meshes whose decode bandwidth floor is within this")
    ap.add_argument("--layers", type=int_in(1), help="override num_hidden_layers (quick checks)")
    ap.add_argument("--hbm-gib", type=float_in(0.0, low_open=True),
                    help="HBM per device when the chip is not in the table")
    ap.add_argument("--bandwidth-gbs", type=float_in(0.0, low_open=True),
                    help="HBM GB/s per device when the chip is not in the table")
    ap.add_argument("--json", action="store_true", help="print the plans as JSON instead of a table")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Plan each topology and print the table (or JSON); GPU topologies re-run this in a process that sees the
    CUDA plugin."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if any(parse_gpu_topology(t) for t in args.topology) and not plugin_loadable():
        if not plugin_installed():
            raise SystemExit(f"k2jax-plan: GPU topologies need jax's CUDA plugin in {PLUGIN_DIR}: "
                             "python -m k2jax.gpu_targets")
        return subprocess.call([sys.executable, "-m", "k2jax.plan", *argv], env=plugin_env())
    cfg = K2Config.from_json(args.config) if args.config else preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    rows = []
    for name in args.topology:
        devices = topology_devices(name)
        chip_hbm, chip_bw = chip_specs(devices)
        hbm = int(args.hbm_gib * GIB) if args.hbm_gib else chip_hbm
        bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else chip_bw
        if not hbm:
            raise SystemExit(f"k2jax-plan: unknown chip {devices[0].device_kind!r}: pass --hbm-gib and --bandwidth-gbs")
        page_size = args.page_size or default_page_size(devices[0].platform)
        spec = args.mesh or choose_mesh(cfg, devices, args.batch or DEFAULT_BATCH, args.context, hbm, bandwidth,
                                        page_size, args.max_floor_ms)
        batch = args.batch or fitting_batch(cfg, mesh_from_devices(devices, spec), args.context, hbm, page_size)
        with target_kernels(devices[0].platform):
            rows.append(plan(cfg, devices, spec, batch, args.context, args.prefill_chunk, hbm=hbm,
                             bandwidth=bandwidth, page_size=page_size, name=name))
        if not args.json:
            print(f"planned {name}: {spec}", flush=True)
    print(json.dumps([as_json(r) for r in rows], indent=1) if args.json else table(rows))
    return 0 if all(r["fits"] for r in rows) else 1


@contextlib.contextmanager
def target_kernels(platform: str) -> Iterator[None]:
    """Trace the target's Pallas kernels (Triton for GPUs, Mosaic for TPUs), not this host's XLA fallbacks,
    unless K2JAX_KERNELS says otherwise."""
    forced = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = forced or ("triton" if platform == "gpu" else "pallas")
    try:
        yield
    finally:
        if forced is None:
            del os.environ[dispatch.ENV_VAR]


if __name__ == "__main__":
    raise SystemExit(main())
