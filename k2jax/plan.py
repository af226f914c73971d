"""k2jax-plan: compile the real model for a target topology from abstract parameters and print what fits.

    k2jax-plan --preset kimi-k2-thinking --topology v5p:4x4x4 --batch 64 --context 131072

Devices come from jax.experimental.topologies (no accelerator needed); parameters, cache and tokens are
ShapeDtypeStructs placed by sharding.rules, so the compiled decode step (and a prefill chunk) is the
program a real pod would run. Prints per-device bytes for weights, cache and compiler temporaries against
the chip's HBM, the largest batch x context that fits, the bandwidth floor of a decode step, and whether
the step copies the cache or the expert stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from k2jax.cliargs import Parser, float_in, int_in, mesh_spec
from k2jax.config import K2Config, preset
from k2jax.engine import PREFILL_CHUNK, step
from k2jax.loading import abstract_model
from k2jax.model import CACHE_AXES, init_cache
from sharding.mesh import mesh_from_devices
from sharding.rules import named_sharding, partition_spec, shard_bytes

GIB = 1 << 30
# device_kind -> (HBM bytes, HBM bytes per second), from the vendors' spec sheets.
CHIPS: dict[str, tuple[int, float]] = {
    "TPU v4": (32 * GIB, 1.2e12),
    "TPU v5 lite": (16 * GIB, 8.19e11),
    "TPU v5": (95 * GIB, 2.765e12),
    "TPU v6 lite": (32 * GIB, 1.64e12),
}


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program's per-device memory (bytes), compile seconds, and the copies found in its HLO."""

    argument: int
    output: int
    alias: int
    temp: int
    compile_s: float
    cache_copies: int
    expert_copies: int
    error: str = ""

    @property
    def total(self) -> int:
        """Peak bytes the program needs on a device: inputs, non-aliased outputs, temporaries."""
        return self.argument + self.output - self.alias + self.temp


def topology_devices(name: str, platform: str = "tpu") -> list[Any]:
    """Abstract devices of a topology such as "v5p:2x4x4" or "v6e:8x8"."""
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=name, platform=platform).devices)


def abstract_state(cfg: K2Config, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and ShapeDtypeStruct parameters, each placed by the rules."""
    graphdef, state = abstract_model(cfg)

    def place(var: nnx.Variable) -> nnx.Variable:
        value = var.get_value()
        sharding = named_sharding(var.get_metadata()["axes"], value.shape, mesh)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return graphdef, jax.tree.map(place, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def abstract_cache(cfg: K2Config, mesh: Mesh, batch: int, context: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The latent cache as ShapeDtypeStructs, split by the rules for CACHE_AXES."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, batch, context))
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(
        mesh, partition_spec(CACHE_AXES, mesh, s.shape))) for k, s in shapes.items()}


def abstract_tokens(mesh: Mesh, batch: int, length: int) -> jax.ShapeDtypeStruct:
    """int32 [batch, length] token ids (or positions), rows split like the cache's."""
    spec = partition_spec(("batch", None), mesh, (batch, length))
    return jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=NamedSharding(mesh, spec))


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of placed ShapeDtypeStructs."""
    return sum(shard_bytes(x.shape, x.dtype.itemsize, x.sharding) for x in jax.tree.leaves(tree))


def hlo_copies(hlo: str, shape: Sequence[int], dtype: str) -> int:
    """Copy (or copy-start) instructions in compiled HLO whose result has this shape."""
    pattern = re.compile(rf"= {dtype}\[{','.join(map(str, shape))}\]\{{[^}}]*\}} copy(-start)?\(")
    return len(pattern.findall(hlo))


def short_error(message: str) -> str:
    """A compiler error in a few words: 'out of HBM (needs X of Y)' or its first line."""
    hbm = re.search(r"temporaries \(([^)]*)\) exceeds available HBM \(([^)]*)\)", message)
    return f"out of HBM (needs {hbm[1]} of {hbm[2]})" if hbm else message.splitlines()[0][:120]


def compile_step(cfg: K2Config, mesh: Mesh, batch: int, tokens: int, context: int) -> Compiled:
    """Compile engine.step for [batch, tokens] new tokens over a cache of `context` positions."""
    graphdef, state = abstract_state(cfg, mesh)
    cache = abstract_cache(cfg, mesh, batch, context)
    tok = abstract_tokens(mesh, batch, tokens)
    local_cache = cache["moe"].sharding.shard_shape(cache["moe"].shape)
    packed = state["moe_layers"]["mlp"]["gate"]["packed"].get_value()
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = step.lower(graphdef, state, tok, tok, cache, cfg, jnp.bfloat16, context).compile()
    except Exception as e:  # noqa: BLE001 - a compiler refusal (e.g. out of HBM) is a result to report
        return Compiled(0, 0, 0, 0, time.perf_counter() - start, 0, 0, error=short_error(str(e)))
    seconds = time.perf_counter() - start
    mem, hlo = compiled.memory_analysis(), compiled.as_text()
    return Compiled(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                    mem.temp_size_in_bytes, seconds, hlo_copies(hlo, local_cache, "bf16"),
                    hlo_copies(hlo, packed.sharding.shard_shape(packed.shape), "u8"))


def expected_active(n_tokens: int, top_k: int, n_experts: int) -> float:
    """Expected fraction of experts that at least one of n_tokens uniformly routed tokens picks."""
    return 1.0 - (1.0 - top_k / n_experts) ** n_tokens


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per-device bytes of weights (routed experts among them) and cache on a mesh, before any compile."""

    weights: int
    experts: int
    cache: int
    rows_per_device: int

    def step_read(self, cfg: K2Config, tokens_per_group: int) -> float:
        """Bytes a decode step reads per device: dense weights, the experts its tokens pick, the whole cache."""
        active = expected_active(tokens_per_group, cfg.num_experts_per_tok, cfg.n_routed_experts)
        return self.weights - self.experts + active * self.experts + self.cache


def footprint(cfg: K2Config, mesh: Mesh, batch: int, context: int) -> Footprint:
    """Weights and cache per device for this mesh, batch and context, placed by the rules."""
    _, state = abstract_state(cfg, mesh)
    flat = [(v.get_metadata()["axes"], v.get_value()) for _, v in nnx.to_flat_state(state)]
    cache = abstract_cache(cfg, mesh, batch, context)
    return Footprint(per_device_bytes([x for _, x in flat]), per_device_bytes([x for a, x in flat if "experts" in a]),
                     per_device_bytes(cache), cache["moe"].sharding.shard_shape(cache["moe"].shape)[1])


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


def choose_mesh(cfg: K2Config, devices: Sequence[Any], batch: int, context: int, hbm: int) -> str:
    """The candidate mesh whose weights and cache fit 90% of HBM with the lowest bandwidth floor (else the smallest)."""
    scored = []
    for spec in candidate_specs(len(devices), cfg.n_routed_experts):
        mesh = mesh_from_devices(devices, spec)
        try:
            f = footprint(cfg, mesh, batch, context)
        except ValueError:  # a dimension that does not divide over this mesh
            continue
        need = f.weights + f.cache
        scored.append((need > 0.9 * hbm, f.step_read(cfg, batch // mesh.shape.get("data", 1)) if need <= 0.9 * hbm
                       else need, spec))
    return min(scored)[2]


def plan(cfg: K2Config, devices: Sequence[Any], spec: str, batch: int, context: int, prefill_chunk: int,
         hbm: int | None = None, bandwidth: float | None = None) -> dict[str, Any]:
    """Compile decode (and a prefill chunk) on this mesh; per-device bytes, fit, capacity and time floor.

    The prefill chunk is the worst one: `prefill_chunk` new tokens in one row per batch shard, at the last
    position of the context. Capacity figures hold the decode step's temporaries fixed.
    """
    mesh = mesh_from_devices(devices, spec)
    chip_hbm, chip_bw = CHIPS.get(devices[0].device_kind, (0, 0.0))
    hbm, bandwidth = hbm or chip_hbm, bandwidth or chip_bw
    f = footprint(cfg, mesh, batch, context)
    shards = batch // f.rows_per_device
    decode = compile_step(cfg, mesh, batch, 1, context)
    prefill = compile_step(cfg, mesh, shards, prefill_chunk, context) if prefill_chunk else None
    token_bytes = f.cache / (f.rows_per_device * context)  # per cached token of a row this device holds
    free = hbm - (decode.total - f.cache if not decode.error else f.weights)  # room for the cache
    max_context = int(free // (token_bytes * f.rows_per_device)) if free > 0 else 0
    step_read = f.step_read(cfg, batch // mesh.shape.get("data", 1))
    return {
        "topology": f"{devices[0].device_kind} x{len(devices)}", "mesh": spec, "batch": batch, "context": context,
        "hbm": hbm, "weights": f.weights, "experts": f.experts, "cache": f.cache, "decode": decode,
        "prefill": prefill, "fits": not decode.error and decode.total <= hbm,
        "max_context": min(max_context, cfg.max_position_embeddings),
        "max_batch": int(free // (token_bytes * context)) * shards if free > 0 else 0,
        "floor_ms": 1e3 * step_read / bandwidth if bandwidth else float("nan"),
    }


def _gb(n: float) -> str:
    """Bytes as decimal GB with two decimals."""
    return f"{n / 1e9:.2f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of plans, one row each."""
    head = ("| topology | mesh | batch x context | HBM GB | weights GB (experts) | cache GB | decode temp GB | "
            "decode total GB | fits | max context @batch | max batch @context | floor ms/step | cache copied | "
            "expert stack copied | decode compile s | prefill chunk at full context: temp GB (compile s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d, p = r["decode"], r["prefill"]
        pre = "-" if p is None else (f"error: {p.error}" if p.error else f"{_gb(p.temp)} ({p.compile_s:.0f})")
        dec = f"error: {d.error}" if d.error else _gb(d.total)
        lines.append(
            f"| {r['topology']} | {r['mesh']} | {r['batch']} x {r['context']} | {_gb(r['hbm'])} | "
            f"{_gb(r['weights'])} ({_gb(r['experts'])}) | {_gb(r['cache'])} | {_gb(d.temp)} | {dec} | "
            f"{'yes' if r['fits'] else 'no'} | {r['max_context']} | {r['max_batch']} | {r['floor_ms']:.2f} | "
            f"{'yes' if d.cache_copies else 'no'} | {'yes' if d.expert_copies else 'no'} | {d.compile_s:.1f} | {pre} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; a malformed or out-of-range one exits with code 2 and one line naming it."""
    ap = Parser(prog="k2jax-plan", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="kimi-k2-thinking", help="model preset (or --config)")
    ap.add_argument("--config", help="a checkpoint dir or config.json to plan instead of a preset")
    ap.add_argument("--topology", action="append", required=True,
                    help="topology name known to jax.experimental.topologies, e.g. v5p:2x4x4 (repeatable)")
    ap.add_argument("--platform", default="tpu")
    ap.add_argument("--mesh", type=mesh_spec, help="mesh spec such as expert=32,tensor=2 (default: the candidate "
                    "that fits with the lowest bandwidth floor)")
    ap.add_argument("--batch", type=int_in(1), default=64)
    ap.add_argument("--context", type=int_in(1), default=131072)
    ap.add_argument("--prefill-chunk", type=int_in(0), default=PREFILL_CHUNK, help="0 skips the prefill compile")
    ap.add_argument("--layers", type=int_in(1), help="override num_hidden_layers (quick checks)")
    ap.add_argument("--hbm-gib", type=float_in(0.0, low_open=True),
                    help="HBM per device when the chip is not in the table")
    ap.add_argument("--bandwidth-gbs", type=float_in(0.0, low_open=True),
                    help="HBM GB/s per device when the chip is not in the table")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Plan each topology and print the table."""
    args = parse_args(argv)
    os.environ.setdefault("K2JAX_KERNELS", "pallas")  # the target's kernels, not this host's XLA fallbacks
    cfg = K2Config.from_json(args.config) if args.config else preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    rows = []
    for name in args.topology:
        devices = topology_devices(name, args.platform)
        hbm = int(args.hbm_gib * GIB) if args.hbm_gib else CHIPS.get(devices[0].device_kind, (0, 0.0))[0]
        if not hbm:
            raise SystemExit(f"k2jax-plan: unknown chip {devices[0].device_kind!r}: pass --hbm-gib and --bandwidth-gbs")
        spec = args.mesh or choose_mesh(cfg, devices, args.batch, args.context, hbm)
        rows.append(plan(cfg, devices, spec, args.batch, args.context, args.prefill_chunk, hbm=hbm,
                         bandwidth=args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else None))
        print(f"planned {name}: {spec}", flush=True)
    print(table(rows))
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
