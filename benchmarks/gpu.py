"""One H200 run: kernel numerics, INT4 grouped, dense layer and MLA decode timings, a K2 slice's decode step, generate.

Prints one markdown table. Each kernel row has its error against the pure-jnp reference, its median time (ten
calls chained in one program, so Python's dispatch is not in it), the bytes it must read and their time at the HBM
floor (4.8 TB/s), and the plain XLA path's time on the same inputs, taken the same way.
The dense rows time the Triton layer matmul (pallas_kernels.layer_matmul: x @ w[layer] read in place; the model
does not use it yet) against the model's XLA path on the same stack, whose temporaries show whether XLA copies
w[layer] first. The decode rows run k2jax's own decode step on Kimi K2 Thinking at true width with random INT4
experts, as many MoE layers as fit in the GPU's memory, and report the time per MoE layer: (step with L layers -
step with 1 layer) / (L - 1), against the bytes one layer must read (weights of the experts the batch routes to, expected
under uniform routing, plus attention, shared expert, router and the layer's cache) at the floor.
The generate rows run the bundled model through Model.generate (the scheduler, the engine step and its masked
sampler, a grammar-enforced tool call) with the backend's kernels and with plain XLA: logits error and wall
seconds per token of each. A case that raises is printed and counted, and the run goes on to the next.
Needs no install beyond jax with its CUDA plugin and llguidance (the project's pins do not matter: it imports this
checkout).

    python benchmarks/gpu.py               # on the GPU, about 9 minutes (--parts picks some of it)
    python benchmarks/gpu.py --parts sweep # the INT4 kernel's decode tilings, about 3 minutes
    python benchmarks/gpu.py --dry-run     # CPU, tiny shapes, Pallas interpreter: checks the script itself

The attention rows go through attention_case(): the ragged paged MLA kernel over each row's pages.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--dry-run" in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("K2JAX_KERNELS", "xla")  # the decode slice on plain XLA: no native CPU kernel build

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import k2jax  # noqa: E402
from k2jax import plan  # noqa: E402
from k2jax.engine import step  # noqa: E402
from k2jax.llm import Model  # noqa: E402
from k2jax.loading import abstract_model  # noqa: E402
from pallas_kernels import dispatch, int4_layout  # noqa: E402
from pallas_kernels import int4_matmul as I  # noqa: E402
from pallas_kernels import layer_matmul as D  # noqa: E402
from pallas_kernels import ragged_mla as R  # noqa: E402
from benchmarks.common import RANK, ragged_decode_args, ragged_decode_bytes, timed  # noqa: E402

HBM_BYTES_PER_S = 4.8e12
SM_SCALE = 0.1447
# bf16 outputs against fp32 references: the kernels round dequantized weights / probabilities to bf16 (2^-9)
# before fp32-accumulated dots, so with random signs the error stays far below 1% of the largest output.
TOLERANCE = 2e-2


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one run covers: K2 shapes on the GPU, tiny ones for --dry-run."""
    hidden: int
    expert_f: int
    experts: int
    top_k: int
    tokens: tuple[int, ...]
    mla: tuple[tuple[int, int, int], ...]  # (batch, heads, context)
    decode_batches: tuple[int, ...]
    decode_context: int
    iters: int
    generate_batches: tuple[int, ...]
    generate_tokens: int
    splits: tuple[int, ...]  # split_k values of the INT4 kernel to time
    mla_splits: tuple[int, ...]  # multiples of the MLA kernel's default page splits to time
    sweep_tokens: tuple[int, ...]  # tokens of the INT4 tiling sweep
    tilings: tuple[I.TritonTiling, ...]  # INT4 kernel tilings the sweep times
    dense: tuple[tuple[str, int, int], ...]  # (name, K, N) of dense weights the layer-matmul rows time
    dense_rows: tuple[int, ...]  # rows of those products


def tilings(block_ms: tuple[int, ...], block_ns: tuple[int, ...], warps: tuple[int, ...],
            stages: tuple[int, ...]) -> tuple[I.TritonTiling, ...]:
    """Every combination of the given block rows, block columns, warps and stages."""
    return tuple(I.TritonTiling(*t) for t in itertools.product(block_ms, block_ns, warps, stages))


GPU = Shapes(7168, 2048, 384, 8, (1, 8, 64), ((1, 64, 32768), (1, 64, 262144), (8, 64, 32768), (64, 64, 8192)),
             (1, 8, 64), 4096, 20, (1, 8), 64, (1, 2), (1, 2, 4), (1, 64),
             tilings((16,), (32, 64, 128), (2, 4), (2, 3, 4)),
             (("q_a", 7168, 1536), ("q_b", 1536, 12288), ("o_proj", 8192, 7168), ("shared down", 2048, 7168)),
             (1, 8, 64))
DRY = Shapes(128, 32, 8, 2, (2,), ((1, 2, 64),), (2,), 32, 1, (1,), 4, (1, 2), (1, 2), (2,),
             tilings((16,), (32, 64), (4,), (3,)), (("q_a", 128, 32),), (2,))
DENSE_LAYERS = 4  # layers in the stack the dense rows index


@dataclasses.dataclass
class Row:
    """One line of the table."""
    case: str
    shape: str
    seconds: float
    bytes_read: float
    err: float | None = None
    xla_seconds: float | None = None
    temp_bytes: int | None = None  # the compiled kernel program's temporaries: no copy of the weights fits in them


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| in fp32."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def routed_sizes(rng: np.random.Generator, tokens: int, experts: int, top_k: int) -> np.ndarray:
    """Rows per expert when each token picks top_k distinct experts uniformly at random."""
    picks = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]
    return np.bincount(picks.ravel(), minlength=experts).astype(np.int32)


@functools.partial(jax.jit, static_argnums=1)
def random_bytes(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Random uint8 of `shape` (last axis a multiple of 4) drawn as 32-bit words and bitcast: jax draws uint8 bits
    through one 32-bit word each, a temporary 4x the array (21 GiB for one K2 layer's gate+up on the H200)."""
    *lead, n = shape
    words = jax.random.bits(key, (*lead, n // 4), jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(shape)


def device_seconds(fn: Callable, *args, iters: int, reps: int = 10) -> float:
    """Median seconds of one fn(*args) with Python's dispatch amortized: `reps` calls chained in one jitted loop,
    each call's first input moved by 0 x the sum of the previous call's first output, so that none is hoisted,
    merged or cut to the elements read (the sum reads an output a fraction the size of the op's inputs)."""
    def chained(*a):
        def body(_, carry):
            out = fn(a[0] + (carry * 0).astype(a[0].dtype), *a[1:])
            return jnp.sum(jax.tree.leaves(out)[0].astype(jnp.float32))
        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    return timed(jax.jit(chained), *args, iters=iters) / reps


def grouped_reference(x_MK, packed_EHN, scale_EGN, group_sizes_E) -> jax.Array:
    """fp32 reference that dequantizes only the experts that got rows (the all-expert one needs ~45 GB at K2 size)."""
    with jax.default_matmul_precision("highest"):
        return dispatch.grouped_loop_xla(
            x_MK.astype(jnp.float32),
            lambda g: int4_layout.dequantize(packed_EHN[g], scale_EGN[g], jnp.float32), group_sizes_E)


def grouped_case(rng, sh: Shapes, tokens: int, k: int, n: int, interpret: bool, case: str,
                 variants: dict[str, dict[str, Any]], xla: bool) -> list[Row]:
    """The INT4 grouped matmul (Triton) on one routed batch, once per variant (label: keyword arguments of the
    kernel, e.g. split_k or tiling): error, time, bytes, temporaries; with `xla`, the XLA path's time on the same
    inputs."""
    sizes = routed_sizes(rng, tokens, sh.experts, sh.top_k)
    x = jnp.asarray(rng.standard_normal((int(sizes.sum()), k)), jnp.bfloat16)
    packed = random_bytes(jax.random.key(int(rng.integers(2**31))), (sh.experts, k // 2, n))
    scale = jnp.asarray(rng.uniform(0.005, 0.05, (sh.experts, k // 32, n)), jnp.bfloat16)
    gs = jnp.asarray(sizes)
    xla_seconds = device_seconds(dispatch.grouped_int4_matmul_xla, x, packed, scale, gs, iters=sh.iters) if xla \
        else None
    ref = grouped_reference(x, packed, scale, gs)
    active = int(np.sum(sizes > 0))
    nbytes = active * (k // 2 + 2 * k // int4_layout.GROUP) * n + x.nbytes + x.shape[0] * n * 2
    rows = []
    for label, kwargs in variants.items():
        kernel = jax.jit(functools.partial(I.grouped_int4_matmul_triton, interpret=interpret, **kwargs))
        temp = kernel.lower(x, packed, scale, gs).compile().memory_analysis().temp_size_in_bytes
        rows.append(Row(case, f"{tokens} tok, {active}/{sh.experts} experts, {k}x{n}, {label}",
                        device_seconds(kernel, x, packed, scale, gs, iters=sh.iters), nbytes,
                        rel_err(kernel(x, packed, scale, gs), ref), xla_seconds, temp))
    return rows


def attention_case(rng, b: int, h: int, s: int, sh: Shapes, interpret: bool) -> list[Row]:
    """The ragged paged MLA kernel (Triton), one new token per row over s keys in shuffled pages, at its default
    page splits and at each multiple of them in sh.mla_splits: error, time, bytes; the XLA path's time on the same
    pages."""
    args = ragged_decode_args(rng, b, h, s, min(R.GPU_PAGE_SIZE, s))
    xla = jax.jit(functools.partial(R.ragged_mla_reference, sm_scale=SM_SCALE, rank=RANK))
    xla_seconds, ref = device_seconds(xla, *args, iters=sh.iters), xla(*args)[0]
    width = args[2].shape[1]
    rows = []
    for mult in sh.mla_splits:
        splits = R.triton_splits(b, 1, h, width, R.triton_splits(b, 1, h, width) * mult)
        kernel = jax.jit(functools.partial(R.ragged_mla_triton, sm_scale=SM_SCALE, rank=RANK, interpret=interpret,
                                           num_splits=splits))
        rows.append(Row("mla decode attention", f"B={b} H={h} S={s}, {splits} splits",
                        device_seconds(kernel, *args, iters=sh.iters), ragged_decode_bytes(b, h, s),
                        rel_err(kernel(*args)[0], ref), xla_seconds))
    return rows


def dense_case(rng, sh: Shapes, name: str, k: int, n: int, interpret: bool) -> list[Row]:
    """x @ w[layer] on a stack of bf16 weights, at each of sh.dense_rows: the Triton layer matmul (reads the layer
    in place) against the model's XLA path (dispatch.matmul, which XLA:GPU compiles to a copy of w[layer] and a
    GEMM on it): error, time, bytes, the kernel's temporaries, and the XLA program's (the copy shows there)."""
    w = (0.02 * jax.random.normal(jax.random.key(int(rng.integers(2**31))), (DENSE_LAYERS, k, n))).astype(jnp.bfloat16)
    layer = jnp.int32(DENSE_LAYERS - 1)
    def varying(x, layer):
        """The layer made to depend on x, so that the chained timing loop cannot hoist w[layer] (XLA's copy of it)
        out of the loop, as it cannot in the model, whose layer changes every step of its scan."""
        return layer + (x[0, 0] * 0).astype(jnp.int32)

    kernel = jax.jit(lambda x, w, layer: D.layer_matmul_triton(x, w, varying(x, layer), interpret=interpret))
    xla = jax.jit(lambda x, w, layer: dispatch.matmul(x, w, layer=varying(x, layer), out_dtype=jnp.float32))
    rows = []
    for m in sh.dense_rows:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        temps = [f.lower(x, w, layer).compile().memory_analysis().temp_size_in_bytes for f in (kernel, xla)]
        rows.append(Row("dense layer matmul", f"{m} rows, {name} {k}x{n}, XLA temp {temps[1] / 1e6:.1f} MB",
                        device_seconds(kernel, x, w, layer, iters=sh.iters), k * n * 2 + x.nbytes + m * n * 4,
                        rel_err(kernel(x, w, layer), D.layer_matmul_reference(x, w, layer)),
                        device_seconds(xla, x, w, layer, iters=sh.iters), temps[0]))
    return rows


def random_state(abstract: Any, seed: int) -> Any:
    """Concrete parameters for an abstract state: random INT4 bytes, small normal weights, unit norms, zero biases."""
    leaves, treedef = jax.tree.flatten_with_path(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def make(path, leaf, key):
        name = jax.tree_util.keystr(path)
        if leaf.dtype == jnp.uint8:
            return random_bytes(key, leaf.shape)
        if "norm" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if "scale" in name:
            return jax.random.uniform(key, leaf.shape, jnp.float32, 0.001, 0.004).astype(leaf.dtype)
        return (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)

    return jax.tree.unflatten(treedef, [make(path, leaf, key) for (path, leaf), key in zip(leaves, keys)])


def layer_bytes(cfg: k2jax.K2Config, batch: int, context: int) -> float:
    """Bytes one MoE layer's decode reads: expected routed experts, all its dense weights, its cache rows."""
    graphdef, state = abstract_model(cfg)
    per_layer = {jax.tree_util.keystr(p): leaf.size * leaf.dtype.itemsize / leaf.shape[0]
                 for p, leaf in jax.tree.flatten_with_path(state["moe_layers"])[0]}
    experts = sum(v for name, v in per_layer.items() if "gate" in name or "up" in name or "down" in name
                  if "packed" in name or "scale" in name)
    dense = sum(per_layer.values()) - experts
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    expected_active = e * (1 - (1 - k / e) ** batch)
    return experts * expected_active / e + dense + batch * context * cfg.cache_lanes * 2


def fitting_moe_layers(cfg: k2jax.K2Config, budget_bytes: float, cap: int) -> int:
    """MoE layers whose weights fit the budget next to embeddings, head and the dense layer (at least 2)."""
    one = dataclasses.replace(cfg, num_hidden_layers=cfg.first_k_dense_replace + 1)
    two = dataclasses.replace(cfg, num_hidden_layers=cfg.first_k_dense_replace + 2)
    size = [sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_model(c)[1])) for c in (one, two)]
    per_layer = size[1] - size[0]
    return max(2, min(cap, int((budget_bytes - size[0]) // per_layer) + 1))


def decode_step_seconds(cfg: k2jax.K2Config, batches: tuple[int, ...], context: int, iters: int) -> list[float]:
    """Median seconds of one k2jax decode step (one new token per row, cache `context` long) at each batch size."""
    graphdef, abstract = abstract_model(cfg)
    state = random_state(abstract, seed=cfg.num_hidden_layers)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = Model(cfg, graphdef, state, dtype=dtype)
    medians = []
    for batch in batches:
        pages, pool = model.paged(batch, context)
        for row in range(batch):
            pages.reserve(row, context)
        cache = model.cache_view(pages, pool, range(batch), [context] * batch)
        # distinct tokens, so rows route to different experts as a real batch does
        tok = jax.random.randint(jax.random.key(batch), (batch, 1), 0, cfg.vocab_size, jnp.int32)
        pos = jnp.full((batch, 1), context - 1, jnp.int32)
        compiled = step.lower(graphdef, state, tok, pos, cache, cfg, dtype).compile()  # timed below: one compile
        if batch == batches[0]:
            print(f"decode step, batch {batch}, {cfg.num_hidden_layers} layers: each layer copies "
                  f"{plan.layer_copies(compiled.as_text(), plan.layer_stacks(state)) / 1e6:.1f} MB of its weights "
                  "out of the stacks (compiled on this device)", flush=True)
        times = []
        for _ in range(iters + 1):
            start = time.perf_counter()
            logits, cache = compiled(state, tok, pos, cache)
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times[1:])))
        del cache, pool
    return medians


def decode_rows(cfg: k2jax.K2Config, sh: Shapes, layers: int) -> list[Row]:
    """Per MoE layer decode time at each batch: difference of a 1-MoE-layer and an L-MoE-layer slice.

    Also prints each slice's step and the whole model's step on one GPU that could hold it: the 1-MoE-layer step
    plus the per-layer time for each further MoE layer of `cfg`."""
    one, many = (decode_step_seconds(dataclasses.replace(cfg, num_hidden_layers=cfg.first_k_dense_replace + n),
                                     sh.decode_batches, sh.decode_context, sh.iters) for n in (1, layers))
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    for b, t_one, t_many in zip(sh.decode_batches, one, many):
        per_layer = (t_many - t_one) / (layers - 1)
        print(f"decode step, batch {b}: 1 MoE layer {t_one * 1e3:.2f} ms, {layers} MoE layers {t_many * 1e3:.2f} ms; "
              f"all {moe_layers} MoE layers on one GPU: {(t_one + (moe_layers - 1) * per_layer) * 1e3:.1f} ms",
              flush=True)
    return [Row("decode step, per MoE layer", f"batch {b}, {layers} MoE layers, ctx {sh.decode_context}",
                (t_many - t_one) / (layers - 1), layer_bytes(cfg, b, sh.decode_context))
            for b, t_one, t_many in zip(sh.decode_batches, one, many)]


MULTIPLY = {"type": "function", "function": {"name": "multiply", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}


def generate_pass(mode: str, batches: tuple[int, ...], new_tokens: int) -> tuple[np.ndarray, list[float], float]:
    """The bundled model under one kernel mode: last-position logits of a prompt, wall seconds per token of its
    longest sequence of a Model.generate call at each batch (the second call: the first compiles), and the model's
    bytes. Raises when the enforced tool call of a chat turn is not `multiply` with two integers."""
    os.environ[dispatch.ENV_VAR] = mode
    jax.clear_caches()
    model = k2jax.load()
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 * 7?"}], tools=[MULTIPLY])
    calls = model.generate([prompt], tools=[MULTIPLY], tool_choice="required", max_reasoning_tokens=16).tool_calls[0]
    args = json.loads(calls[0]["function"]["arguments"]) if calls else {}
    if not calls or calls[0]["function"]["name"] != "multiply" or not all(type(args.get(k)) is int for k in "ab"):
        raise AssertionError(f"{mode}: enforced tool call came back as {calls}")
    logits = np.asarray(model.logits([model.tokenizer.encode(prompt)])[0, -1], np.float32)
    seconds = []
    for batch in batches:
        for _ in range(2):
            start = time.perf_counter()
            out = model.generate(["def fibonacci(n):"] * batch, max_new_tokens=new_tokens)
            elapsed = time.perf_counter() - start
        seconds.append(elapsed / max(len(ids) for ids in out.ids))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model.state))
    return logits, seconds, nbytes


def generate_rows(kernel_mode: str, batches: tuple[int, ...], new_tokens: int) -> list[Row]:
    """k2jax's main job on this backend: the bundled model through Model.generate (scheduler, engine step, masked
    sampler) with the backend's kernels against the same with plain XLA: logits error, seconds per token at each
    batch, prefill included (floor: the model's bytes once per step)."""
    before = os.environ.get(dispatch.ENV_VAR)
    try:
        (logits, seconds, nbytes), (xla_logits, xla_seconds, _) = (
            generate_pass(mode, batches, new_tokens) for mode in (kernel_mode, "xla"))
    finally:
        os.environ.pop(dispatch.ENV_VAR, None)
        if before is not None:
            os.environ[dispatch.ENV_VAR] = before
    err = rel_err(logits, xla_logits)
    return [Row("generate, bundled model", f"batch {b}, up to {new_tokens} tokens, per token", t, nbytes, err, t_xla)
            for b, t, t_xla in zip(batches, seconds, xla_seconds)]


def table(rows: list[Row]) -> str:
    """Markdown table of the rows, with each time against the HBM floor and the XLA path."""
    lines = ["| case | shape | rel err | time us | floor us | % of 4.8 TB/s | XLA path us | speed-up vs XLA | "
             "kernel temp MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        floor = r.bytes_read / HBM_BYTES_PER_S
        err = f"{r.err:.1e}" if r.err is not None else ""
        xla = f"{r.xla_seconds * 1e6:.1f} | {r.xla_seconds / r.seconds:.2f}x" if r.xla_seconds else " | "
        temp = f"{r.temp_bytes / 1e6:.2f}" if r.temp_bytes is not None else ""
        lines.append(f"| {r.case} | {r.shape} | {err} | {r.seconds * 1e6:.1f} | {floor * 1e6:.1f} | "
                     f"{100 * floor / r.seconds:.0f}% | {xla} | {temp} |")
    return "\n".join(lines)


def run_case(rows: list[Row], failures: list[str], label: str, make: Callable[[], list[Row]]) -> None:
    """Add make()'s rows and print them; on an exception print it and go on, so one broken case costs a
    time-limited GPU lease no other row."""
    try:
        new = make()
    except Exception as e:  # noqa: BLE001 - reported and counted as a failure below
        traceback.print_exc()
        stats = jax.devices()[0].memory_stats() or {}
        print(f"{label} failed; device bytes in use {stats.get('bytes_in_use', 0) / 2**30:.1f} GiB, peak "
              f"{stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB", flush=True)
        failures.append(f"{label}: {type(e).__name__}: {e}")
        return
    rows.extend(new)
    print("\n".join(table(new).splitlines()[2:]), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run every case; exit 1 when one raised or a kernel's error exceeds TOLERANCE."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Pallas interpreter")
    parser.add_argument("--max-layers", type=int, default=12, help="MoE layers in the decode slice at most")
    parser.add_argument("--parts", default="int4,dense,mla,decode,generate",
                        help="comma-separated parts to run: int4 (grouped matmul), dense (the layer matmul against "
                        "XLA's copy and GEMM), mla (attention), decode (K2 "
                        "step), generate (the bundled model's Model.generate, kernels against XLA), sweep (the INT4 "
                        "kernel's tilings at decode: block columns, warps, stages; not run by default)")
    args = parser.parse_args(argv)
    sh, interpret = (DRY, True) if args.dry_run else (GPU, False)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    if not args.dry_run and jax.default_backend() != "gpu":
        raise SystemExit("no GPU: run with --dry-run on CPU")
    rng = np.random.default_rng(0)
    parts = set(args.parts.split(","))
    rows: list[Row] = []
    failures: list[str] = []
    splits = {f"split {s}": {"split_k": s} for s in sh.splits}
    for tokens in sh.tokens if "int4" in parts else ():
        for k, n in ((sh.hidden, 2 * sh.expert_f), (sh.expert_f, sh.hidden)):
            run_case(rows, failures, f"int4 grouped matmul {tokens} tok {k}x{n}",
                     lambda: grouped_case(rng, sh, tokens, k, n, interpret, "int4 grouped matmul", splits, True))
    sweep = {f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}": {"tiling": t} for t in sh.tilings}
    for tokens in sh.sweep_tokens if "sweep" in parts else ():
        for k, n in ((sh.hidden, 2 * sh.expert_f), (sh.expert_f, sh.hidden)):
            run_case(rows, failures, f"int4 tiling sweep {tokens} tok {k}x{n}",
                     lambda: grouped_case(rng, sh, tokens, k, n, interpret, "int4 tiling sweep", sweep, False))
    for name, k, n in sh.dense if "dense" in parts else ():
        run_case(rows, failures, f"dense layer matmul {name}", lambda: dense_case(rng, sh, name, k, n, interpret))
    for b, h, s in sh.mla if "mla" in parts else ():
        run_case(rows, failures, f"mla decode attention B={b} H={h} S={s}",
                 lambda: attention_case(rng, b, h, s, sh, interpret))
    full = k2jax.preset("kimi-k2-thinking")
    cfg = full if not args.dry_run else dataclasses.replace(
        k2jax.preset("tiny"), hidden_size=sh.hidden, moe_intermediate_size=sh.expert_f, quant=full.quant)
    free = device.memory_stats()["bytes_limit"] * 0.75 if not args.dry_run else 1e8
    layers = fitting_moe_layers(cfg, free, args.max_layers if not args.dry_run else 2)
    if "decode" in parts:
        run_case(rows, failures, f"decode step, {layers} MoE layers", lambda: decode_rows(cfg, sh, layers))
    if "generate" in parts:
        mode = "interpret-triton" if args.dry_run else dispatch.kernel_mode()
        run_case(rows, failures, "generate, bundled model",
                 lambda: generate_rows(mode, sh.generate_batches, sh.generate_tokens))
    print(table(rows))
    failures += [f"{r.case} {r.shape}: rel err {r.err:.2e} > {TOLERANCE}"
                 for r in rows if r.err is not None and not r.err <= TOLERANCE]
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
