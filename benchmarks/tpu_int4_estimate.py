"""Estimates the Mosaic INT4 grouped matmul's share of HBM bandwidth on TPUs from its compiled VLIW bundles.

No TPU needed: libtpu compiles the kernel for an abstract chip (jax.experimental.topologies) and dumps its final
LLO schedule. The kernel body runs once per grid step as straight-line code inside one loop, so the program's
scheduled bundle count is the cycles a step issues (an upper bound: it includes the few prologue bundles). A step
also waits for its DMAs, so it takes max(bundles / clock, bytes DMA'd / its TensorCore's share of HBM bandwidth:
all of it, or half on v5p whose two TensorCores stream at once). A layer takes
(column tiles / TensorCores) x visits x K steps, and the figure of merit is the time to read the active experts'
weights at HBM bandwidth over that. Routing is random top-8 of 384 experts, all on one chip (expert parallelism
gives each chip the same rows per expert); visits are counted on that routing as the kernel's schedule does.

    python benchmarks/tpu_int4_estimate.py [--chips v5e v5p v6e] [--tokens 1 8 64 256]
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

DUMP = Path(tempfile.mkdtemp(prefix="k2jax_llo_"))
atexit.register(shutil.rmtree, DUMP, ignore_errors=True)
# libtpu reads its flags once, at start-up: dump only each program's final bundle schedule.
os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") + f" --xla_jf_dump_to={DUMP}"
                                  " --xla_jf_dump_llo_text=true --xla_jf_dump_llo_pass_label_regex=final_bundles")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import k2jax  # noqa: E402,F401 - first: quiets libtpu's start-up errors on a host without TPU
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from pallas_kernels import int4_layout  # noqa: E402
from pallas_kernels import int4_matmul as I  # noqa: E402

HIDDEN, EXPERT_F, EXPERTS, TOP_K = 7168, 2048, 384, 8
PROJECTIONS = {"gate+up": (HIDDEN, 2 * EXPERT_F), "down": (EXPERT_F, HIDDEN)}


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: its AOT topology, TensorCore clock, HBM bandwidth and TensorCores a 'parallel' axis spans."""
    topology: str
    clock_hz: float
    hbm_bytes_per_s: float
    cores: int


# Clocks: published peak bf16 FLOP/s over the MXUs' multiply-adds per cycle (v5e 197 T / (4 x 128^2 x 2);
# v5p 459 T / (2 cores x 4 x 128^2 x 2); v6e 918 T / (4 x 256^2 x 2)). v5p is a megacore: its two TensorCores
# split the kernel's parallel (column tile) axis.
CHIPS = {
    "v5e": Chip("v5e:2x2", 1.5e9, 819e9, 1),
    "v5p": Chip("v5p:2x2x1", 1.75e9, 2765e9, 2),
    "v6e": Chip("v6e:2x2", 1.75e9, 1640e9, 1),
}


def routed_sizes(rng: np.random.Generator, tokens: int) -> np.ndarray:
    """Rows per expert when each token picks 8 distinct experts of 384 uniformly at random."""
    picks = np.argsort(rng.random((tokens, EXPERTS)), axis=1)[:, :TOP_K]
    return np.bincount(picks.ravel(), minlength=EXPERTS)


def visits(sizes: np.ndarray, tm: int) -> int:
    """Row tiles the grouped kernel visits: each expert's rows start a tile of their own (int4_matmul._padded_rows)."""
    return int(np.sum(-(-sizes // tm)))


def bundles_per_step(chip: Chip, m: int, k: int, n: int) -> int:
    """Scheduled bundles of the grouped kernel compiled for the chip at [m, k] x 384 experts [k, n]."""
    sharding = SingleDeviceSharding(topologies.get_topology_desc(topology_name=chip.topology,
                                                                 platform="tpu").devices[0])

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    before = set(DUMP.iterdir())
    jax.jit(I.grouped_int4_matmul).lower(
        sds((m, k), jnp.bfloat16), sds((EXPERTS, k // 2, n), jnp.uint8),
        sds((EXPERTS, k // int4_layout.GROUP, n), jnp.bfloat16), sds((EXPERTS,), jnp.int32)).compile()
    schedules = [p for p in set(DUMP.iterdir()) - before
                 if "grouped_int4_matmul" in p.name and p.name.endswith("schedule-analysis_final_bundles.txt")]
    if len(schedules) != 1:
        raise RuntimeError(f"expected one kernel schedule in {DUMP}, found {len(schedules)}")
    return int(re.search(r"total scheduled bundles:\s+(\d+)", schedules[0].read_text()).group(1))


def estimate(chip_name: str, tokens: int, projection: str, rng: np.random.Generator) -> dict:
    """One row: tiles, bundles per step, step bytes, and the share of HBM bandwidth the layer reaches."""
    chip = CHIPS[chip_name]
    k, n = PROJECTIONS[projection]
    m = tokens * TOP_K
    tm, tk, tn = I._tiles(m, k, n, EXPERTS)
    bundles = bundles_per_step(chip, m, k, n)
    weight_bytes = tk // 2 * tn + tk // int4_layout.GROUP * tn * 2
    step_bytes = weight_bytes + tm * tk * 2  # x's block moves with K, so it is fetched every step
    step_s = max(bundles / chip.clock_hz, step_bytes / (chip.hbm_bytes_per_s / chip.cores))
    sizes = routed_sizes(rng, tokens)
    active = int(np.sum(sizes > 0))
    steps = -(-(n // tn) // chip.cores) * visits(sizes, tm) * (k // tk)
    floor_s = active * (k // 2 + 2 * k // int4_layout.GROUP) * n / chip.hbm_bytes_per_s
    return {"chip": chip_name, "tokens": tokens, "projection": projection, "tiles": f"{tm}x{tk}x{tn}",
            "bundles": bundles, "compute_share": step_bytes / (chip.hbm_bytes_per_s / chip.cores) / (bundles / chip.clock_hz),
            "active": active, "steps": steps, "us": 1e6 * steps * step_s, "floor_us": 1e6 * floor_s,
            "bandwidth_share": floor_s / (steps * step_s)}


def table(rows: list[dict]) -> str:
    """Markdown table of the estimates."""
    lines = ["| chip | tokens | projection | tiles tm x tk x tn | bundles/step | step DMA / issue time | "
             "active experts | steps | est. us | floor us | share of HBM BW |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['chip']} | {r['tokens']} | {r['projection']} | {r['tiles']} | {r['bundles']} | "
                     f"{100 * r['compute_share']:.0f}% | {r['active']} | {r['steps']} | {r['us']:.1f} | "
                     f"{r['floor_us']:.1f} | {100 * r['bandwidth_share']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    """Compile each (chip, tokens, projection), print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", nargs="+", default=list(CHIPS), choices=list(CHIPS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=list(PROJECTIONS))
    args = parser.parse_args()
    rows = [estimate(chip, tokens, projection, np.random.default_rng(tokens))
            for chip in args.chips for tokens in args.tokens for projection in args.projections]
    print(table(rows))


if __name__ == "__main__":
    main()
