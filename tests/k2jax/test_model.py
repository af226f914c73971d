"""The model against HF transformers' DeepseekV3ForCausalLM (PyTorch, CPU, float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import k2jax
from k2jax.engine import step
from k2jax.model import mlp, moe
from k2jax.loading import abstract_model
from k2jax.cache import abstract_cache, make_layout

# float32 on both sides; differences come from summation order only (~1e-6 relative observed).
RTOL = 1e-4

CONFIGS = {
    "q_lora_yarn_beta1": {},
    "group_limited_n4_k2": dict(n_group=4, topk_group=2, n_routed_experts=16, num_experts_per_tok=4),
    "yarn_beta32_no_q_lora": dict(
        q_lora_rank=None,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1},
    ),
    "rope_parameters_no_mscale_two_dense": dict(first_k_dense_replace=2, num_hidden_layers=4,
                                                rope_scaling={"type": "yarn", "factor": 2.0,
                                                              "original_max_position_embeddings": 64}),
}


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_logits_match_transformers(hf_checkpoint, rng, name):
    hf, path = hf_checkpoint(**CONFIGS[name])
    model = k2jax.load(path)
    ids = rng.integers(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(model.logits(ids), ref) <= RTOL


@pytest.mark.parametrize("name", ["q_lora_yarn_beta1", "group_limited_n4_k2"])
def test_paged_decode_matches_full_prefill(hf_checkpoint, rng, name):
    """A 6-token chunk over 4-token pages (crossing a page boundary), then one token per step through the pages."""
    _, path = hf_checkpoint(**CONFIGS[name])
    model = k2jax.load(path)
    model.page_size = 4
    B, T, C = 2, 14, 6
    ids = rng.integers(0, model.config.vocab_size, (B, T)).astype(np.int32)
    full = model.logits(ids)
    pages, pool = model.paged(B, 32)
    for row in range(B):
        pages.reserve(row, T)
    pos = np.broadcast_to(np.arange(C, dtype=np.int32), (B, C))
    cache = model.cache_view(pages, pool, range(B), [C] * B)
    logits, cache = step(model.graphdef, model.state, jnp.asarray(ids[:, :C]), jnp.asarray(pos), cache,
                         model.config, model.dtype)
    assert rel_err(np.asarray(logits), full[:, :C]) <= RTOL
    for t in range(C, T):
        cache = model.cache_view(pages, cache.pool, range(B), [t + 1] * B)
        logits, cache = step(model.graphdef, model.state, jnp.asarray(ids[:, t:t + 1]), jnp.full((B, 1), t, jnp.int32),
                             cache, model.config, model.dtype)
        assert rel_err(np.asarray(logits)[:, 0], full[:, t]) <= RTOL, f"decode step at position {t}"


def test_greedy_generate_matches_transformers(hf_checkpoint, rng):
    hf, path = hf_checkpoint(**CONFIGS["group_limited_n4_k2"])
    model = k2jax.load(path)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (9, 4)]
    out = model.generate(prompts, max_new_tokens=12)
    for prompt, got, reason in zip(prompts, out.ids, out.finish_reasons):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        if reason == "stop":  # HF keeps the EOS token; k2jax ends the sequence before it
            assert ref[len(got)] == model.config.eos_token_id
            ref = ref[: len(got)]
        assert got == ref


def test_bf16_checkpoint_stays_bf16_and_matches_transformers(hf_checkpoint, rng, tmp_path):
    """A bf16 checkpoint loads bf16 (compute float32, the weights widened inside the kernels) and matches
    transformers on the same bf16 weights in float32: prefill logits and greedy decoding through the pages."""
    hf, path = hf_checkpoint(**CONFIGS["group_limited_n4_k2"])
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf.to(torch.float32)  # the session's cached reference stays float32
    ref = type(hf).from_pretrained(tmp_path, dtype=torch.float32).eval()
    model = k2jax.load(tmp_path)
    assert model.dtype == jnp.float32
    dtypes = {"/".join(map(str, k)): v.get_value().dtype for k, v in nnx.to_flat_state(model.state)}
    assert all(d == jnp.bfloat16 for name, d in dtypes.items() if not name.endswith("router_bias")), dtypes
    ids = rng.integers(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    assert rel_err(model.logits(ids), expected) <= RTOL
    prompt = rng.integers(3, model.config.vocab_size, 9).tolist()
    got = model.generate([prompt], max_new_tokens=10).ids[0]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    if len(got) < len(want):  # k2jax ends the sequence before EOS; HF keeps it
        assert want[len(got)] == model.config.eos_token_id
    assert got == want[:len(got)]


def test_padding_tokens_reach_no_expert(hf_checkpoint, rng):
    """model.moe with real_N: the real tokens' outputs are the unmasked MoE's, and a padding token's is the shared
    expert's alone, so no routed expert ran for it (its rows were not in the grouped matmuls)."""
    _, path = hf_checkpoint()
    model = k2jax.load(path)
    stack = nnx.merge(model.graphdef, model.state).moe_layers.mlp
    x_NM = jnp.asarray(rng.standard_normal((12, model.config.hidden_size)), jnp.float32)
    real_N = jnp.asarray(rng.random(12) < 0.5).at[0].set(True).at[1].set(False)
    layer = jnp.int32(rng.integers(stack.router_bias.shape[0]))
    full = np.asarray(moe(stack, x_NM[None], layer, model.config)[0])
    masked = np.asarray(moe(stack, x_NM[None], layer, model.config, real_N)[0])
    shared = np.asarray(mlp(stack.shared, x_NM, layer))
    real = np.asarray(real_N)
    assert rel_err(masked[real], full[real]) <= RTOL
    assert rel_err(masked[~real], shared[~real]) <= RTOL and rel_err(full[~real], shared[~real]) > 1e-2


def test_decode_step_updates_pool_in_place():
    """Two rows with 1024-token tables over a pool for 8 x 8192 tokens: nothing of one layer's pool is copied."""
    cfg = k2jax.preset("tiny")
    graphdef, state = abstract_model(cfg, jnp.float32)
    cache = abstract_cache(cfg, make_layout(None, 8, 8192, 32), 2, 1024 // 32, jnp.float32)
    tok = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    compiled = step.lower(graphdef, state, tok, tok, cache, cfg, jnp.float32).compile()
    mem = compiled.memory_analysis()
    pool_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.pool))
    assert mem.alias_size_in_bytes >= pool_bytes, "the pool is not donated into the output"
    assert mem.temp_size_in_bytes < pool_bytes / cfg.num_hidden_layers / 4, (mem.temp_size_in_bytes, pool_bytes)


def test_forward_has_one_loop_per_layer_stack():
    cfg = k2jax.preset("tiny")
    graphdef, state = abstract_model(cfg, jnp.float32)
    tok = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    shallow = str(jax.make_jaxpr(lambda s, t: k2jax.engine._logits(graphdef, s, t, cfg, jnp.float32))(state, tok))
    deep_cfg = k2jax.K2Config(**{**cfg.__dict__, "num_hidden_layers": 9})
    deep_graph, deep_state = abstract_model(deep_cfg, jnp.float32)
    deep = str(jax.make_jaxpr(lambda s, t: k2jax.engine._logits(deep_graph, s, t, deep_cfg, jnp.float32))(deep_state, tok))
    assert deep.count("scan[") == shallow.count("scan[") == 2  # the dense stack and the MoE stack
    assert abs(len(deep) - len(shallow)) < 0.01 * len(shallow)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_reads_weights_in_place(monkeypatch, dtype):
    """The compiled CPU decode step ("small" config, native kernels) neither copies a layer's weights out of their
    stacks nor widens bf16 weights as whole arrays: its temporaries stay far below one layer's attention weights.

    (Slicing each layer in the scan made temp >= one layer's non-expert weights, 16.4 MB in float32, and
    widening bf16 at use 290 MB.)
    """
    monkeypatch.setenv("K2JAX_KERNELS", "native")
    jax.clear_caches()
    cfg = k2jax.preset("small")
    graphdef, state = abstract_model(cfg, dtype)
    cache = abstract_cache(cfg, make_layout(None, 1, 64, 32), 1, 2, jnp.float32)
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    temp = step.lower(graphdef, state, tok, tok, cache, cfg, jnp.float32).compile().memory_analysis().temp_size_in_bytes
    attn_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["moe_layers"]["attn"]))
    attn_layer = attn_bytes // cfg.num_moe_layers
    assert temp < attn_layer / 8, (temp, attn_layer)
