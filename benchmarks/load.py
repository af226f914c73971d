"""Checkpoint load benchmark: write a synthetic multi-GB INT4 checkpoint, then time loading it in fresh processes.

    python benchmarks/load.py [--dir DIR] [--devices 8] [--chunk-mb 1024]

Reports, for the Hugging Face reader (streamed onto an expert mesh) and for the orbax restore of the same
parameters: seconds, MB/s (checkpoint bytes on disk / seconds), peak RSS and its growth over the process'
baseline, and the bytes the (CPU) devices hold. Files are read from the page cache when the machine has the
memory to keep them there (they were just written): these are warm-cache figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _config():
    """The benchmark's K2Config: K2's structure at 2048 wide, 128 INT4 experts, 5 MoE layers, ~2.7 GB."""
    from k2jax.config import Int4Quant, K2Config

    return K2Config(vocab_size=32768, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024,
                    num_hidden_layers=6, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256,
                    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=128,
                    num_experts_per_tok=8, max_position_embeddings=4096, original_max_position_embeddings=1024,
                    rope_factor=4.0, bos_token_id=0, eos_token_id=1, quant=Int4Quant())


def _dir_bytes(path: Path) -> int:
    """Bytes of all files under path."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def write(path: Path) -> float:
    """Write the synthetic HF checkpoint (unless present); returns seconds spent."""
    from checkpoints.hf_writer import write_hf_checkpoint
    from k2jax.synthetic import random_state

    start = time.perf_counter()
    cfg = _config()
    write_hf_checkpoint(path, cfg, random_state(cfg), max_shard_bytes=512 << 20)
    return time.perf_counter() - start


def measure(kind: str, path: Path, chunk_bytes: int, out: Path | None) -> dict:
    """In a fresh process: load `path` (HF or orbax) onto an expert mesh of all devices; time and memory."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    from checkpoints.orbax_io import save_orbax
    from k2jax.config import K2Config
    from k2jax.loading import load_state

    cfg = K2Config.from_json(path)
    mesh = Mesh(np.array(jax.devices()), ("expert",))
    jax.jit(lambda x: x + 1)(np.zeros(8)).block_until_ready()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mib("VmRSS")
    start = time.perf_counter()
    _, state = load_state(path, cfg, mesh, chunk_bytes=chunk_bytes, progress=False)
    arrays = [var.get_value() for _, var in nnx.to_flat_state(state)]
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    device_bytes = sum(s.data.nbytes for a in arrays for s in a.addressable_shards)
    if out is not None:
        save_orbax(out, cfg, state)
    disk = _dir_bytes(path)
    return {"kind": kind, "devices": len(jax.devices()), "seconds": seconds, "disk_mb": disk / 1e6,
            "mb_per_s": disk / 1e6 / seconds, "base_rss_mib": base, "peak_rss_mib": peak,
            "device_mib": device_bytes / 2**20}


def _run(args: list[str], devices: int) -> dict:
    """Run this script's --measure mode in a fresh process with `devices` CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write (once), then measure the HF load and the orbax restore, and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/k2jax_load_bench"))
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--chunk-mb", type=int, default=1024)
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--save-orbax", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    chunk = args.chunk_mb << 20
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), chunk, args.save_orbax)))
        return
    hf, orbax = args.dir / "hf", args.dir / "orbax"
    if not (hf / "config.json").exists():
        print(f"writing {hf}: {write(hf):.1f} s", file=sys.stderr)
    if not (orbax / "params").exists():
        _run(["--measure", "hf", str(hf), "--save-orbax", str(orbax), "--chunk-mb", str(args.chunk_mb)],
             args.devices)
    rows = [_run(["--measure", "hf", str(hf), "--chunk-mb", str(args.chunk_mb)], args.devices),
            _run(["--measure", "orbax", str(orbax)], args.devices)]
    print("| source | CPU devices | on disk (MB) | load (s) | MB/s | base RSS (MiB) | peak RSS (MiB) | "
          "device arrays (MiB) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['devices']} | {r['disk_mb']:.0f} | {r['seconds']:.2f} | {r['mb_per_s']:.0f} | "
              f"{r['base_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['device_mib']:.0f} |")


if __name__ == "__main__":
    main()
