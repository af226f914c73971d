"""Times the Pallas kernels and the XLA paths at Kimi K2 decode shapes on whatever accelerator is present.

For each case: a numerics check of the kernel against the XLA path, then the median time, the bytes the
operation must read, the achieved GB/s, its fraction of the measured device copy bandwidth, and (grouped
INT4) the speed-up over a bf16 ragged_dot of the same experts. Prints a markdown table.
With no accelerator it says so and times only the XLA paths at reduced shapes (the kernels' interpreter is
a correctness tool, not a timing one).

    python benchmarks/kernel_timings.py [--iters 20]
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RANK, ragged_decode_args, ragged_decode_bytes, timed  # noqa: E402
from pallas_kernels import dispatch, int4_layout  # noqa: E402
from pallas_kernels import int4_matmul as I  # noqa: E402
from pallas_kernels import ragged_mla as R  # noqa: E402

HIDDEN, EXPERT_F, EXPERTS, TOP_K, SM_SCALE = 7168, 2048, 384, 8, 0.1447
CPU_SCALE_DOWN = 8


@dataclass
class Row:
    """One line of the result table."""
    name: str
    shape: str
    seconds: float
    bytes_read: int
    err: float | None = None
    baseline_s: float | None = None


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Device bytes per second of an elementwise copy, counting read and write."""
    src = jnp.ones((nbytes // 4,), jnp.float32)
    return 2 * src.nbytes / timed(jax.jit(lambda a: a + 1), src, iters=iters)


def routed_group_sizes(rng: np.random.Generator, tokens: int, local_experts: int) -> np.ndarray:
    """Rows per local expert when tokens pick top-8 of 384 experts at random and this device holds the first few."""
    picks = np.stack([rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(tokens)])
    return np.bincount(picks[picks < local_experts], minlength=local_experts).astype(np.int32)


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| in fp32."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def grouped_rows(rng, kernel, tokens: int, local: int, k: int, n: int, iters: int) -> list[Row]:
    """Grouped INT4 kernel, the INT4 XLA path and a bf16 ragged_dot for one routed decode batch."""
    sizes = routed_group_sizes(rng, tokens, local)
    m = int(sizes.sum())
    x = jnp.asarray(rng.standard_normal((max(m, 1), k)), jnp.bfloat16)
    packed = jnp.asarray(rng.integers(0, 256, (local, k // 2, n), dtype=np.uint8))
    scale = jnp.asarray(rng.uniform(0.005, 0.05, (local, k // 32, n)), jnp.bfloat16)
    gs = jnp.asarray(sizes)
    active = int((sizes > 0).sum())
    int4_bytes = active * (k // 2 + 2 * k // 32) * n + 2 * x.nbytes
    w_bf16 = int4_layout.dequantize(packed, scale, jnp.bfloat16)
    bf16 = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs))
    bf16_s = timed(bf16, x, w_bf16, gs, iters=iters)
    xla = jax.jit(dispatch.grouped_int4_matmul_xla)
    ref = xla(x, packed, scale, gs)
    shape = f"tok={tokens} E={local} act={active} rows={m} {k}x{n}"
    rows = [Row("bf16 ragged_dot (XLA)", shape, bf16_s, active * k * n * 2 + 2 * x.nbytes),
            Row("int4 grouped (XLA)", shape, timed(xla, x, packed, scale, gs, iters=iters), int4_bytes,
                baseline_s=bf16_s)]
    if kernel is not None:
        run = jax.jit(kernel)
        rows.append(Row("int4 grouped (Pallas)", shape, timed(run, x, packed, scale, gs, iters=iters), int4_bytes,
                        err=rel_err(run(x, packed, scale, gs), ref), baseline_s=bf16_s))
    return rows


def mla_rows(rng, kernel, b: int, h: int, s: int, iters: int) -> list[Row]:
    """Ragged paged MLA decode (one new token per row over s keys in shuffled pages), kernel and XLA path."""
    page = min(R.TPU_PAGE_SIZE if jax.default_backend() == "tpu" else R.GPU_PAGE_SIZE, s)
    args = ragged_decode_args(rng, b, h, s, page)
    nbytes = ragged_decode_bytes(b, h, s)
    xla = jax.jit(functools.partial(R.ragged_mla_reference, sm_scale=SM_SCALE, rank=RANK))
    shape = f"B={b} H={h} S={s}"
    rows = [Row("mla decode (XLA)", shape, timed(xla, *args, iters=iters), nbytes)]
    if kernel is not None:
        run = jax.jit(functools.partial(kernel, sm_scale=SM_SCALE, rank=RANK))
        rows.append(Row("mla decode (Pallas)", shape, timed(run, *args, iters=iters), nbytes,
                        err=rel_err(run(*args)[0], xla(*args)[0])))
    return rows


def table(rows: list[Row], copy_bw: float) -> str:
    """Markdown table of the rows."""
    lines = ["| op | shape | time (us) | GB/s | % copy BW | vs bf16 XLA | rel err vs XLA |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gbs = r.bytes_read / r.seconds / 1e9
        ratio = f"{r.baseline_s / r.seconds:.2f}x" if r.baseline_s else ""
        err = f"{r.err:.1e}" if r.err is not None else ""
        lines.append(f"| {r.name} | {r.shape} | {r.seconds * 1e6:.1f} | {gbs:.1f} | "
                     f"{100 * gbs * 1e9 / copy_bw:.0f}% | {ratio} | {err} |")
    return "\n".join(lines)


def main() -> None:
    """Pick shapes for the backend, run every case, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    backend = jax.default_backend()
    accelerated = backend in dispatch.PALLAS_BACKENDS
    triton = backend == "gpu"
    grouped = (I.grouped_int4_matmul_triton if triton else I.grouped_int4_matmul) if accelerated else None
    mla = (R.ragged_mla_triton if triton else R.ragged_mla) if accelerated else None
    div = 1 if accelerated else CPU_SCALE_DOWN
    print(f"backend: {backend} ({jax.devices()[0].device_kind})" if accelerated else
          f"backend: {backend}: no accelerator; XLA paths only, shapes / {div}")
    copy_bw = copy_bandwidth((1 << 30) if accelerated else (1 << 26), args.iters)
    print(f"measured device copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    for tokens, local, k, n in [(1, 48, HIDDEN, 2 * EXPERT_F), (32, 48, HIDDEN, 2 * EXPERT_F),
                                (256, 48, HIDDEN, 2 * EXPERT_F), (256, 48, EXPERT_F, HIDDEN),
                                (256, 6, HIDDEN, 2 * EXPERT_F)]:
        rows += grouped_rows(rng, grouped, tokens, local, k // div, n // div, args.iters)
    for b, h, s in [(1, 64, 32768), (1, 8, 262144), (32, 64, 8192), (256, 8, 4096)]:
        rows += mla_rows(rng, mla, b, h, s // div ** 2, args.iters)
    print(table(rows, copy_bw))


if __name__ == "__main__":
    main()
