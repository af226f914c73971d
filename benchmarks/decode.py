"""Decode and prefill throughput of k2jax against HF transformers (PyTorch eager), same weights, same machine.

Also k2jax on its plain XLA path (K2JAX_KERNELS=xla, without the native CPU grouped-matmul kernel), the
memory-bandwidth floor of a batch-1 decode step (bytes it must read / measured copy bandwidth) and the cold
start to first token of `k2jax-generate` with the bundled model. Prints a markdown table.

    python benchmarks/decode.py [--preset small] [--new-tokens 64] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch

import k2jax
from k2jax.config import K2Config


def random_checkpoint(cfg: K2Config, path: str):
    """Random k2jax weights (float32) written as an HF checkpoint; returns transformers' model of it."""
    import jax.numpy as jnp
    from flax import nnx
    from transformers import DeepseekV3ForCausalLM

    from checkpoints.hf_writer import write_hf_checkpoint
    from k2jax.model import K2Model

    write_hf_checkpoint(path, cfg, nnx.state(K2Model(cfg, nnx.Rngs(0), jnp.float32)))
    config = Path(path) / "config.json"  # transformers maps per-expert tensors only for model_type deepseek_v3
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "deepseek_v3"}))
    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def copy_bandwidth() -> float:
    """Bytes per second a large numpy copy moves, counting read and write."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_bytes(cfg: K2Config, context: int, itemsize: int = 4) -> int:
    """Bytes one batch-1 decode step must read: non-expert weights, top-k experts per layer, one logits row, cache."""
    H, M = cfg.num_attention_heads, cfg.hidden_size
    q = M * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim if cfg.q_lora_rank else M * H * cfg.qk_head_dim
    attn = q + M * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (
        cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * M
    expert = 3 * M * cfg.moe_intermediate_size
    moe = (cfg.num_experts_per_tok + cfg.n_shared_experts) * expert + M * cfg.n_routed_experts
    params = (cfg.num_hidden_layers * attn + cfg.first_k_dense_replace * 3 * M * cfg.intermediate_size
              + cfg.num_moe_layers * moe + M * cfg.vocab_size + M)
    cache = cfg.num_hidden_layers * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return (params + cache) * itemsize


def k2jax_decode(model, prompts: list[list[int]], new_tokens: int, kernels: str = "") -> tuple[float, float]:
    """(decode tokens/s, seconds per step) after a warm-up run of the same shapes, with K2JAX_KERNELS=kernels."""
    before = os.environ.get("K2JAX_KERNELS", "")
    os.environ["K2JAX_KERNELS"] = kernels
    jax.clear_caches()  # the kernel choice is made at trace time
    model.generate(prompts, max_new_tokens=new_tokens)
    out = model.generate(prompts, max_new_tokens=new_tokens)
    os.environ["K2JAX_KERNELS"] = before
    rate = out.stats["decode_tokens_per_s"]
    return rate, len(prompts) / rate


def hf_decode(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Decode tokens/s of HF generate: (time for 1 + n tokens - time for 1 token) over n steps."""
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        one = _timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
        many = _timed(lambda: model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw))
    return len(prompts) * new_tokens / (many - one)


def prefill_rates(model, hf, length: int, rng: np.random.Generator) -> tuple[float, float]:
    """Tokens/s of a 1 x length prefill for k2jax (to first token) and HF (one forward)."""
    ids = rng.integers(2, model.config.vocab_size, (1, length)).tolist()
    model.generate(ids, max_new_tokens=1)
    k2 = length / model.generate(ids, max_new_tokens=1).stats["time_to_first_token_s"]
    with torch.no_grad():
        hf(torch.tensor(ids))
        ref = length / _timed(lambda: hf(torch.tensor(ids)))
    return k2, ref


def cold_start() -> str:
    """Seconds from launching `k2jax-generate` (bundled model, no compilation cache) to its exit after 1 token."""
    env = {**os.environ, "K2JAX_COMPILATION_CACHE": ""}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "k2jax.generate", "--max-new-tokens", "1"], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        return f"n/a ({proc.stderr.strip().splitlines()[-1]})"
    return f"{time.perf_counter() - start:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = k2jax.preset(args.preset)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as path:
        hf = random_checkpoint(cfg, path)
        model = k2jax.load(path)
    print(f"| {args.preset} config, {args.new_tokens} new tokens after {args.prompt_len}-token prompts, float32, "
          f"{os.cpu_count()} CPU cores |")
    print("| batch | k2jax tok/s | transformers tok/s | ratio | k2jax, XLA path only, tok/s |")
    print("|---|---|---|---|---|")
    step_s = None
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(2, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        rate, seconds = k2jax_decode(model, prompts, args.new_tokens)
        xla, _ = k2jax_decode(model, prompts, args.new_tokens, kernels="xla")
        ref = hf_decode(hf, prompts, args.new_tokens)
        step_s = seconds if batch == 1 else step_s
        print(f"| {batch} | {rate:.1f} | {ref:.1f} | {rate / ref:.2f}x | {xla:.1f} |", flush=True)
    bw = copy_bandwidth()
    floor = step_bytes(cfg, args.prompt_len + args.new_tokens // 2) / bw
    k2_pre, hf_pre = prefill_rates(model, hf, args.prefill, rng)
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| copy bandwidth (read + write) | {bw / 1e9:.1f} GB/s |")
    if step_s is not None:
        print(f"| batch-1 step: bandwidth floor / k2jax | {floor * 1e3:.2f} ms / {step_s * 1e3:.2f} ms "
              f"= {floor / step_s:.0%} of floor speed ({step_s / floor:.1f}x the floor) |")
    print(f"| prefill 1 x {args.prefill}: k2jax / transformers | {k2_pre:.0f} / {hf_pre:.0f} tok/s "
          f"= {k2_pre / hf_pre:.1f}x |")
    print(f"| cold start to first token, `k2jax-generate` (bundled model) | {cold_start()} |")


if __name__ == "__main__":
    main()
