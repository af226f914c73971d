"""Runs in a subprocess with 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); prints JSON.

`shard CKPT SEED CHUNK_BYTES`: stream a synthetic checkpoint onto an 8-way expert mesh; report the peak host
memory of the load, what each device holds, and how often each tensor was read.
`orbax HF_DIR OUT_DIR`: HF -> logits on 8 devices; k2jax-convert; restore onto 4 other devices; logits again
(equal up to the summation order of the expert-parallel partial sums, which depends on the mesh).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import checkpoints.hf_reader
from checkpoints.hf_names import int4_shape_name, sources
from k2jax.config import K2Config
from k2jax.convert import main as convert_main
from k2jax.llm import Model
from k2jax.loading import load_state
from k2jax.synthetic import random_state


def _status_kib(field: str) -> int:
    """A VmRSS / VmHWM figure of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _count_reads() -> collections.Counter:
    """Count every tensor the reader reads, by name."""
    counts: collections.Counter = collections.Counter()
    read = checkpoints.hf_reader.read_tensor

    def counting(info, out=None):
        counts[info.name] += 1
        return read(info, out)

    checkpoints.hf_reader.read_tensor = counting
    return counts


def shard(path: Path, seed: int, chunk_bytes: int) -> dict:
    """Load onto expert=8, measuring peak RSS; then check every shard against the generated parameters."""
    cfg = K2Config.from_json(path)
    mesh = Mesh(np.array(jax.devices()), ("expert",))
    counts = _count_reads()
    jax.jit(lambda x: x + 1)(np.zeros(8)).block_until_ready()  # start the compiler: its memory is not the loader's
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    _, state = load_state(path, cfg, mesh, chunk_bytes=chunk_bytes, progress=False)
    peak = _status_kib("VmHWM")
    owners = collections.Counter(name for src in sources(cfg) for name in src.names())  # kv_b_proj feeds two
    owners.update({int4_shape_name(name): 1 for src in sources(cfg) if src.int4 for name in src.names()})
    expected = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(random_state(cfg, seed))}
    experts = {}
    values_ok = True
    for key, var in nnx.to_flat_state(state):
        array = var.get_value()
        values_ok &= all(np.array_equal(np.asarray(s.data), expected[key][s.index]) for s in array.addressable_shards)
        if "experts" in var.get_metadata()["axes"]:
            experts["/".join(key)] = [(s.device.id, s.index[1].start, s.index[1].stop, list(s.data.shape))
                                      for s in array.addressable_shards]
    return {
        "peak_growth_bytes": (peak - before) * 1024,
        "device_bytes": sum(s.data.nbytes for _, v in nnx.to_flat_state(state) for s in v.get_value().addressable_shards),
        "experts": experts,
        "values_ok": bool(values_ok),
        "max_reads_per_tensor_and_parameter": max(n / owners[name] for name, n in counts.items()),
        "tensors_read": len(counts),
    }


def orbax(hf_dir: Path, out_dir: Path) -> dict:
    """Logits from the HF checkpoint on 8 devices and from its orbax conversion restored onto 4 others."""
    cfg = K2Config.from_json(hf_dir)
    devices = np.array(jax.devices())
    ids = np.arange(2 * 11).reshape(2, 11) % cfg.vocab_size
    graphdef, state = load_state(hf_dir, cfg, Mesh(devices, ("expert",)))
    from_hf = Model(cfg, graphdef, state).logits(ids)
    rc = convert_main([str(hf_dir), str(out_dir), "--mesh", "expert=8"])
    other = Mesh(devices[4:].reshape(2, 2), ("data", "expert"))
    graphdef, state = load_state(out_dir, cfg, other)
    packed = state["moe_layers"]["mlp"]["gate"]["packed"].get_value()
    return {
        "convert_rc": rc,
        "rel_err": float(np.abs(Model(cfg, graphdef, state).logits(ids) - from_hf).max() / np.abs(from_hf).max()),
        "restored_devices": sorted(d.id for d in packed.sharding.device_set),
        "restored_spec": str(packed.sharding.spec),
        "restored_shard_shape": list(packed.addressable_shards[0].data.shape),
    }


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "shard":
        result = shard(Path(args[0]), int(args[1]), int(args[2]))
    else:
        result = orbax(Path(args[0]), Path(args[1]))
    print("RESULT " + json.dumps(result))
