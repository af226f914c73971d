"""Sharded vs single-device runs of a tiny INT4 model; run as a subprocess, prints one `RESULT {json}` line.

`meshes SPEC...`: one process with 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).
`kernels SPEC...`: the same, generating through each attention kernel flavour (Pallas interpreter) on every mesh.
`distributed COORDINATOR NUM_PROCESSES PROCESS_ID SPEC`: one of several jax.distributed processes, 2 CPU devices each.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from k2jax import engine
from k2jax.config import Int4Quant, K2Config
from k2jax.llm import GenerateOutput, Model
from k2jax.model import K2Model
from k2jax.sampling import SamplingParams
from k2jax.slots import Slots
from sharding import mesh as mesh_lib
from sharding.rules import named_sharding

CFG = K2Config(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=512, num_hidden_layers=3,
               num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=256,
               original_max_position_embeddings=64, rope_factor=4.0, bos_token_id=0, eos_token_id=1,
               quant=Int4Quant())
BATCH, PROMPT, NEW, FEW_ROWS = 8, 12, 6, 2


def tiny_model(seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Random float32 parameters with INT4 experts, scaled up so routing and argmax are decisive."""
    graphdef, state = nnx.split(K2Model(CFG, nnx.Rngs(seed), jnp.float32))
    return graphdef, jax.tree.map(lambda x: x * 4 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def place(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """Every parameter split by the rules, each process supplying its own blocks."""
    def put(var: nnx.Variable) -> nnx.Variable:
        host = np.asarray(var.get_value())
        sharding = named_sharding(var.get_metadata()["axes"], host.shape, mesh)
        return var.replace(jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx]))

    return jax.tree.map(put, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def device0_bytes(tree) -> int:
    """Bytes that the first local device holds of every array in `tree`."""
    dev = jax.local_devices()[0]
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards if s.device == dev)


def expert_bytes(state: nnx.State) -> tuple[int, int]:
    """(total bytes, first device's bytes) of the routed-expert parameters."""
    experts = [v.get_value() for _, v in nnx.to_flat_state(state) if "experts" in v.get_metadata()["axes"]]
    return sum(a.nbytes for a in experts), device0_bytes(experts)


def prompts(seed: int = 1) -> np.ndarray:
    """BATCH prompts of PROMPT token ids."""
    return np.random.default_rng(seed).integers(3, CFG.vocab_size, (BATCH, PROMPT))


def packed_rows(model: Model, ids: np.ndarray) -> tuple[list[int], list[float]]:
    """One step writing PACKED_CHUNKS prompt chunks, one per slot of as many, in reverse slot order (so the chunks
    are not the layout's rows in order), beside every slot's first decode row: greedy tokens and their log-probs."""
    n = engine.PACKED_CHUNKS
    slots = Slots(model, n, 128)
    chunks = [engine.Chunk(s, ids[s, :PROMPT - 1].tolist(), 0) for s in reversed(range(n))]
    toks, logps = slots.step(ids[:n, PROMPT - 1], [SamplingParams()] * n, 1, chunks=chunks)
    return toks[:, 0].tolist(), logps.chosen[:, 0].tolist()


def collective_permutes(model: Model) -> dict[str, int]:
    """collective-permutes in the compiled decode step of BATCH rows, as Engine.run calls it (packed_step, its host
    inputs in one buffer) and as run_step takes them: unpacking the buffer on a mesh must add none (engine.unpack_host
    keeps each leaf whole; left free, the partitioner split the buffer and exchanged halos to slice it)."""
    pages, pool = model.paged(BATCH, 64)
    width = engine.table_width(pages.layout, pages.table.shape[1], PROMPT + 1)
    rows = engine.decode_rows(pages.table, np.arange(BATCH), list(range(BATCH)), [5] * BATCH, [PROMPT] * BATCH,
                              [SamplingParams()] * BATCH, None, BATCH, width, 0, -(-CFG.vocab_size // 32), NEW)
    with model.on_mesh():
        programs = {
            "packed_step": model.lower(pool, rows, None, NEW, pages.layout, NEW),
            "run_step": engine.run_step.lower(model.graphdef, model.state, pool, rows, None, np.int32(NEW), CFG,
                                              model.dtype, pages.layout, NEW)}
        return {name: low.compile().as_text().count("collective-permute(") for name, low in programs.items()}


def meshes(specs: list[str]) -> dict:
    """Logits, greedy tokens and per-device bytes on each mesh, against the single-device model."""
    graphdef, state = tiny_model()
    ids = prompts()
    ref = Model(CFG, graphdef, state)
    ref_logits, ref_tokens = ref.logits(ids), ref.generate(ids.tolist(), max_new_tokens=NEW).ids
    ref_packed_tokens, ref_packed_logprobs = packed_rows(ref, ids)
    few = ids[:FEW_ROWS].tolist()  # too few rows to split: the cache splits its positions over more axes
    out = {}
    for spec in specs:
        mesh = mesh_lib.make_mesh(spec)
        model = Model(CFG, graphdef, place(state, mesh))
        logits = model.logits(ids)
        pages, pool = model.paged(BATCH, 64)
        few_layout = model.paged(FEW_ROWS, 64)[0].layout
        total, local = expert_bytes(model.state)
        packed_tokens, packed_logprobs = packed_rows(model, ids)
        out[spec] = {
            "packed_tokens_equal": packed_tokens == ref_packed_tokens,
            "packed_logprob_err": float(np.abs(np.subtract(packed_logprobs, ref_packed_logprobs)).max()),
            "packed_split": model.paged(engine.PACKED_CHUNKS, 128)[0].layout.row_axes,
            "rel_err": float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()),
            "tokens_equal": model.generate(ids.tolist(), max_new_tokens=NEW).ids == ref_tokens,
            "few_rows_tokens_equal": model.generate(few, max_new_tokens=NEW).ids == ref_tokens[:FEW_ROWS],
            "split": [pages.layout.row_axes, pages.layout.seq_axes],
            "few_rows_split": [few_layout.row_axes, few_layout.seq_axes],
            "expert_fraction": local / total,
            "cache_fraction": device0_bytes(pool) / sum(c.nbytes for c in pool.values()),
            "collective_permutes": collective_permutes(model),
        }
    return out


def kernels(specs: list[str]) -> dict:
    """Greedy tokens and log-probs through each kernel flavour on each mesh, against the single-device XLA path.

    Chunked prefill then 32 greedy decode steps. Prompts of different lengths, each forked into two rows sharing
    its whole pages (8 rows: rows split over the batch axes), and one prompt alone (2 rows: its pages split over
    the other axes); 4-token pages, 8-token prefill chunks. (The XLA path on meshes: see meshes().)
    """
    engine.PREFILL_CHUNK = 8
    graphdef, state = tiny_model()
    ids = prompts()
    batches = {"rows": [ids[i, : 3 + 2 * i].tolist() for i in range(4)], "positions": [ids[4].tolist()]}

    def run(model: Model, batch: list[list[int]], mode: str) -> GenerateOutput:
        os.environ["K2JAX_KERNELS"] = mode
        jax.clear_caches()
        return model.generate(batch, max_new_tokens=32, n=2, logprobs=True)

    ref = {name: run(Model(CFG, graphdef, state, page_size=4), batch, "xla") for name, batch in batches.items()}
    out = {}
    for spec in specs:
        model = Model(CFG, graphdef, place(state, mesh_lib.make_mesh(spec)), page_size=4)
        for mode in ("interpret", "interpret-triton"):
            for name, batch in batches.items():
                got = run(model, batch, mode)
                err = max(float(np.abs(np.subtract(a, b)).max()) for a, b in zip(got.logprobs, ref[name].logprobs))
                out[f"{spec} {mode} {name}"] = {"tokens_equal": got.ids == ref[name].ids, "logprob_err": err}
    return out


def host_value(x: jax.Array) -> np.ndarray:
    """The whole value of an array on this host, gathering blocks other processes hold."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def greedy(model: Model, ids: np.ndarray) -> np.ndarray:
    """Prefill then NEW greedy steps through engine.step over the page pool; tokens gathered to every process."""
    pages, pool = model.paged(BATCH, PROMPT + NEW)
    for row in range(BATCH):
        pages.reserve(row, PROMPT + NEW)
    pos = np.broadcast_to(np.arange(PROMPT, dtype=np.int32), ids.shape)
    toks = []
    with model.on_mesh():
        cache = model.cache_view(pages, pool, range(BATCH), [PROMPT] * BATCH)
        logits, cache = engine.step(model.graphdef, model.state, ids.astype(np.int32), pos, cache, CFG, jnp.float32)
        for i in range(NEW):
            tok = host_value(logits[:, -1]).argmax(-1).astype(np.int32)
            toks.append(tok)
            pos = np.full((BATCH, 1), PROMPT + i, np.int32)
            cache = model.cache_view(pages, cache.pool, range(BATCH), [PROMPT + i + 1] * BATCH)
            logits, cache = engine.step(model.graphdef, model.state, tok[:, None], pos, cache, CFG, jnp.float32)
    return np.stack(toks, 1)


def distributed(coordinator: str, n: int, pid: int, spec: str) -> dict:
    """Sharded prefill + greedy decode across processes, against this process's own single-device run."""
    jax.config.update("jax_num_cpu_devices", 2)
    mesh_lib.initialize(coordinator, n, pid, timeout_s=60)
    graphdef, state = tiny_model()
    ids = mesh_lib.broadcast_from_process0(prompts(seed=100 + pid))  # every process decodes process 0's prompts
    local = jax.tree.map(lambda x: jax.device_put(x, jax.local_devices()[0]), state)
    sharded = Model(CFG, graphdef, place(state, mesh_lib.make_mesh(spec)))
    result = {"processes": jax.process_count(), "devices": jax.device_count(),
              "tokens": greedy(sharded, ids).tolist(), "single": greedy(Model(CFG, graphdef, local), ids).tolist()}
    jax.distributed.shutdown()
    return result


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "meshes":
        res = meshes(args)
    elif mode == "kernels":
        res = kernels(args)
    else:
        res = distributed(args[0], int(args[1]), int(args[2]), args[3])
    print("RESULT " + json.dumps(res), flush=True)
